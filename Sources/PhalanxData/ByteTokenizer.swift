import Foundation
import PhalanxRuntime

/// The default tokenizer: token `t` is the byte `t` of the text's UTF-8 encoding.
///
/// Vocabulary 256, nothing to train, and every model trained on it reads any text. The cost is
/// length: about 4.5 tokens per English word, against about 1.3 for a trained ``BPETokenizer``.
public struct ByteTokenizer: Tokenizer, Codable, Equatable {
    /// The serialisation format version this code writes and reads.
    public static let version = 1

    public var kind: TokenizerKind { .byte }
    public var vocabularySize: Int { 256 }

    public init() {}

    public func encode(_ text: String) -> [Int32] {
        text.utf8.map { Int32($0) }
    }

    public func bytes(of token: Int32) -> [UInt8] {
        require(token >= 0 && token < 256, "ByteTokenizer: token \(token) is outside the vocabulary 0..<256")
        return [UInt8(token)]
    }

    public init(from decoder: any Decoder) throws {
        let header = try TokenizerHeader(from: decoder)
        guard header.kind == .byte, header.version == Self.version else {
            throw DataError("expected a byte tokenizer of version \(Self.version), found \(header.kind.rawValue) version \(header.version)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        try TokenizerHeader(kind: .byte, version: Self.version).encode(to: encoder)
    }
}
