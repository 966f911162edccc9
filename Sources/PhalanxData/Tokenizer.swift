import Foundation

/// Errors from reading tokenizers and token files; each names the file (or data) and what was
/// expected.
public struct DataError: Error, CustomStringConvertible, Equatable {
    /// What went wrong, naming the file or data.
    public let description: String
    /// An error saying `description`.
    public init(_ description: String) { self.description = description }
}

/// The tokenizers Phalanx knows, as stored in the `"kind"` field of a serialised tokenizer.
public enum TokenizerKind: String, Codable, Sendable, CaseIterable {
    /// ``ByteTokenizer``: one token per UTF-8 byte.
    case byte
    /// ``BPETokenizer``: byte-level byte-pair encoding.
    case bpe
}

/// Turns text into token ids and back.
///
/// Every Phalanx tokenizer is byte-level: token `t` stands for a fixed byte string `bytes(of: t)`,
/// and decoding concatenates those bytes and reads them as UTF-8. So any string encodes (no
/// unknown token), `decode(encode(x)) == x` for every `x`, and a token sequence that ends inside a
/// multi-byte character still decodes (the incomplete character becomes U+FFFD; see
/// ``StreamingDecoder`` to print generated text as it becomes complete).
///
/// A tokenizer serialises to JSON holding its `kind` and `version`, so a checkpoint or token file
/// can carry it and ``loadTokenizer(from:origin:)`` can restore it without knowing the type.
public protocol Tokenizer: Sendable {
    /// Which tokenizer this is; selects the decoder in ``loadTokenizer(from:origin:)``.
    var kind: TokenizerKind { get }
    /// Token ids are `0 ..< vocabularySize`.
    var vocabularySize: Int { get }
    /// The tokens of `text`.
    func encode(_ text: String) -> [Int32]
    /// The bytes token `token` stands for; `token` must be in `0 ..< vocabularySize`.
    func bytes(of token: Int32) -> [UInt8]
    /// JSON with at least `{"kind": ..., "version": ...}`; ``loadTokenizer(from:origin:)`` reads it.
    func serialized() throws -> Data
}

extension Tokenizer {
    /// The bytes of `tokens`, concatenated.
    public func bytes(of tokens: [Int32]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(tokens.count)
        for token in tokens { out += bytes(of: token) }
        return out
    }

    /// The text of `tokens`: their bytes read as UTF-8, each invalid or incomplete sequence
    /// replaced by U+FFFD (so a sequence cut inside a character never fails).
    public func decode(_ tokens: [Int32]) -> String {
        String(decoding: bytes(of: tokens), as: UTF8.self)
    }
}

extension Tokenizer where Self: Encodable {
    /// The tokenizer's `Codable` form as JSON with sorted keys (the same bytes on every machine).
    public func serialized() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try encoder.encode(self)
    }
}

/// The fields every serialised tokenizer starts with.
struct TokenizerHeader: Codable {
    var kind: TokenizerKind
    var version: Int
}

/// Restores a tokenizer from ``Tokenizer/serialized()`` output; `origin` names the source in errors.
public func loadTokenizer(from data: Data, origin: String = "tokenizer data") throws -> any Tokenizer {
    let header: TokenizerHeader
    do {
        header = try JSONDecoder().decode(TokenizerHeader.self, from: data)
    } catch {
        let kinds = TokenizerKind.allCases.map(\.rawValue).joined(separator: ", ")
        throw DataError("\(origin): not a serialised tokenizer (expected JSON with \"kind\" (one of \(kinds)) and \"version\"): \(error)")
    }
    do {
        switch header.kind {
        case .byte:
            return try JSONDecoder().decode(ByteTokenizer.self, from: data)
        case .bpe:
            return try JSONDecoder().decode(BPETokenizer.self, from: data)
        }
    } catch let error as DataError {
        throw DataError("\(origin): \(error.description)")
    } catch {
        throw DataError("\(origin): malformed \(header.kind.rawValue) tokenizer (\(error))")
    }
}

/// Turns a stream of tokens into text as soon as it is complete, for printing generated text.
///
/// A byte-level token can end inside a multi-byte UTF-8 character ("é" is `C3 A9`; one token may
/// carry `C3` and the next `A9`). `append` returns the text up to the last complete character and
/// holds back a trailing incomplete one (at most 3 bytes) until the bytes that finish it arrive.
/// Bytes that can never become valid are emitted at once as U+FFFD. The concatenation of every
/// `append` result and `finish()` equals `tokenizer.decode(allTokens)`, because text is only ever
/// cut before a lead byte, where a UTF-8 decoder restarts anyway.
///
///     var stream = StreamingDecoder(tokenizer: tokenizer)
///     for token in generated { print(stream.append(token), terminator: "") }
///     print(stream.finish())
public struct StreamingDecoder: Sendable {
    /// The tokenizer whose tokens are decoded.
    public let tokenizer: any Tokenizer
    /// Bytes received but not yet returned: a possibly incomplete character.
    private var pending: [UInt8] = []

    /// A decoder with nothing pending.
    public init(tokenizer: any Tokenizer) { self.tokenizer = tokenizer }

    /// Adds one token and returns the text it completed (often empty, sometimes several characters).
    public mutating func append(_ token: Int32) -> String {
        pending += tokenizer.bytes(of: token)
        let cut = Self.completePrefixLength(pending)
        guard cut > 0 else { return "" }
        let text = String(decoding: pending[..<cut], as: UTF8.self)
        pending.removeFirst(cut)
        return text
    }

    /// Returns what is held back (an unfinished character becomes U+FFFD) and resets the stream.
    public mutating func finish() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }

    /// The length of `bytes` without a trailing sequence that is the start of a character still
    /// missing continuation bytes: a lead byte `C2...F4` among the last three bytes, followed only
    /// by continuation bytes `80...BF`, fewer than the lead byte announces.
    static func completePrefixLength(_ bytes: [UInt8]) -> Int {
        let n = bytes.count
        var i = n - 1
        while i >= max(0, n - 3) {
            let b = bytes[i]
            if b & 0xC0 != 0x80 {  // Not a continuation byte: the last sequence starts here.
                let length = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 1
                return n - i < length ? i : n
            }
            i -= 1
        }
        return n
    }
}
