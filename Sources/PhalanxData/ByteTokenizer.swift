import Foundation
import PhalanxRuntime

/// The default tokenizer: token `t` is the byte `t` of the text's UTF-8 encoding.
///
/// Vocabulary 256, nothing to train, and every model trained on it reads any text. The cost is
/// length: about 4.5 tokens per English word, against about 1.3 for a trained ``BPETokenizer``.
public struct ByteTokenizer: Tokenizer, Codable, Equatable {
    /// The serialisation format version this code writes and reads.
    public static let version = 1

    /// Always `.byte`.
    public var kind: TokenizerKind { .byte }
    /// 256: one token per byte value.
    public var vocabularySize: Int { 256 }

    /// The byte tokenizer (it has no parameters).
    public init() {}

    /// The UTF-8 bytes of `text`, one token each.
    public func encode(_ text: String) -> [Int32] {
        text.utf8.map { Int32($0) }
    }

    /// The single byte `token`; `token` must be in `0 ..< 256`.
    public func bytes(of token: Int32) -> [UInt8] {
        require(token >= 0 && token < 256, "ByteTokenizer: token \(token) is outside the vocabulary 0..<256")
        return [UInt8(token)]
    }

    /// Decodes `{"kind": "byte", "version": 1}`.
    ///
    /// - Throws: `DataError` for another kind or version; `DecodingError` when a field is
    ///   missing or of the wrong type.
    public init(from decoder: any Decoder) throws {
        let header = try TokenizerHeader(from: decoder)
        guard header.kind == .byte, header.version == Self.version else {
            throw DataError("expected a byte tokenizer of version \(Self.version), found \(header.kind.rawValue) version \(header.version)")
        }
    }

    /// Encodes as `{"kind": "byte", "version": 1}`.
    public func encode(to encoder: any Encoder) throws {
        try TokenizerHeader(kind: .byte, version: Self.version).encode(to: encoder)
    }
}
