import Foundation
import PhalanxRuntime
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One split of a token file (or of an in-memory array): random access to its tokens without
/// copying the file into memory.
public struct TokenSplit: RandomAccessCollection, Sendable {
    /// The bytes holding the tokens (a memory-mapped file, or an array's bytes).
    private let storage: Data
    /// Where the first token starts in `storage`.
    private let byteOffset: Int
    /// Bytes per token: 2 (`UInt16`) or 4 (`UInt32`), little-endian.
    private let width: Int
    /// Tokens in the split.
    public let count: Int

    /// Always 0.
    public var startIndex: Int { 0 }
    /// `count`.
    public var endIndex: Int { count }

    init(storage: Data, byteOffset: Int, width: Int, count: Int) {
        assert(width == 2 || width == 4, "token width must be 2 or 4 bytes")
        assert(byteOffset >= 0 && byteOffset + count * width <= storage.count, "split outside its storage")
        self.storage = storage
        self.byteOffset = byteOffset
        self.width = width
        self.count = count
    }

    /// A split over `tokens` held in memory (for tests and for text tokenized on the fly).
    public init(_ tokens: [Int32]) {
        var data = Data(count: tokens.count * 4)
        data.withUnsafeMutableBytes { raw in
            for (i, t) in tokens.enumerated() { raw.storeBytes(of: UInt32(bitPattern: t).littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
        }
        self.init(storage: data, byteOffset: 0, width: 4, count: tokens.count)
    }

    /// The token at `position`, which must be in `0 ..< count`.
    public subscript(position: Int) -> Int32 {
        require(position >= 0 && position < count, "TokenSplit: index \(position) is outside 0..<\(count)")
        return storage.withUnsafeBytes { raw in
            let offset = byteOffset + position * width
            return width == 2
                ? Int32(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt16.self)))
                : Int32(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)))
        }
    }

    /// Copies the tokens at `range` to `destination[0 ..< range.count]`, widening `UInt16` tokens.
    public func copy(_ range: Range<Int>, into destination: UnsafeMutablePointer<Int32>) {
        require(range.lowerBound >= 0 && range.upperBound <= count, "TokenSplit: range \(range) is outside 0..<\(count)")
        storage.withUnsafeBytes { raw in
            let source = raw.baseAddress! + byteOffset + range.lowerBound * width
            if width == 2 {
                for i in 0..<range.count {
                    destination[i] = Int32(UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                }
            } else {
                #if _endian(little)
                UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: 4 * range.count)
                #else
                for i in 0..<range.count {
                    destination[i] = Int32(bitPattern: UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
                }
                #endif
            }
        }
    }
}

/// A tokenized corpus on disk: the training and validation tokens and the tokenizer that made them.
///
/// Layout (all integers little-endian):
///
///     offset  size  field
///          0     8  magic "PHXTOKS1"
///          8     4  version (UInt32, 1)
///         12     4  token width in bytes (UInt32): 2 when vocabularySize <= 65536, else 4
///         16     8  vocabularySize (UInt64); every token is below it
///         24     8  train token count T (UInt64)
///         32     8  validation token count V (UInt64)
///         40     8  tokenizer byte count n (UInt64)
///         48     n  the tokenizer, serialised (``Tokenizer/serialized()``, JSON)
///            pad   zeros up to the next multiple of 8: the token section starts at
///                  p = roundUp(48 + n, 8)
///          p  T*w  train tokens (UInt16 or UInt32 each)
///    p + T*w  V*w  validation tokens
///
/// The file is exactly `p + (T + V) * w` bytes. Carrying the tokenizer makes the file
/// self-describing: training takes its vocabulary and tokenizer from here, so a token file can
/// never be read with a tokenizer other than the one that wrote it.
///
/// Reading memory-maps the file and checks everything (magic, version, width, sizes against the
/// file length, the tokenizer, every token below `vocabularySize`), so a truncated or corrupt file
/// fails here with its name and the reason, never later inside training.
public struct TokenFile: Sendable {
    /// The first 8 bytes of every token file: ASCII `PHXTOKS1`.
    public static let magic = Array("PHXTOKS1".utf8)
    /// The format version this code writes and reads (the `UInt32` at byte 8).
    public static let version: UInt32 = 1
    static let headerSize = 48

    /// The token width for a vocabulary: `UInt16` (2 bytes) when every id fits, else `UInt32`.
    public static func tokenWidth(vocabularySize: Int) -> Int { vocabularySize <= 65536 ? 2 : 4 }

    /// The tokenizer that made the tokens, restored from the file.
    public let tokenizer: any Tokenizer
    /// Token ids are `0 ..< vocabularySize`; equal to `tokenizer.vocabularySize`.
    public let vocabularySize: Int
    /// The training tokens, `T` of them.
    public let train: TokenSplit
    /// The held-out tokens for evaluation, `V` of them.
    public let validation: TokenSplit

    /// Memory-maps and validates the token file at `url`.
    ///
    /// - Throws: `DataError` naming the file and the check that failed.
    public init(contentsOf url: URL) throws {
        let data: Data
        do {
            data = try Data(contentsOf: url, options: .alwaysMapped)
        } catch {
            throw DataError("\(url.path): cannot read the token file (\(error.localizedDescription))")
        }
        try self.init(data: data, origin: url.path)
    }

    /// Validates a token file image; `origin` names it in error messages.
    ///
    /// - Throws: `DataError` naming `origin` and the check that failed.
    public init(data: Data, origin: String = "token data") throws {
        let data = data.startIndex == 0 ? data : Data(data)  // Offsets below are from 0.
        let size = data.count
        guard size >= Self.headerSize else {
            throw DataError("\(origin): \(size) bytes is too short for a token file (a \(Self.headerSize)-byte header is expected)")
        }
        guard Array(data.prefix(8)) == Self.magic else {
            let found = String(decoding: data.prefix(8).map { (0x20..<0x7F).contains($0) ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
            throw DataError("\(origin): not a Phalanx token file (magic \"PHXTOKS1\" expected, found \"\(found)\")")
        }
        func field(_ offset: Int, _ size: Int) -> UInt64 {
            (0..<size).reduce(UInt64(0)) { $0 | UInt64(data[offset + $1]) << (8 * UInt64($1)) }
        }
        let version = UInt32(field(8, 4))
        guard version == Self.version else {
            throw DataError("\(origin): token file version \(version); this build reads version \(Self.version)")
        }
        let width = Int(field(12, 4))
        let (vocabulary, trainCount, validationCount, tokenizerSize) = (field(16, 8), field(24, 8), field(32, 8), field(40, 8))
        guard vocabulary > 0 && vocabulary <= UInt64(Int32.max) else {
            throw DataError("\(origin): vocabulary size \(vocabulary) is outside 1...\(Int32.max)")
        }
        guard width == Self.tokenWidth(vocabularySize: Int(vocabulary)) else {
            throw DataError("\(origin): token width \(width) bytes, but a vocabulary of \(vocabulary) is stored with \(Self.tokenWidth(vocabularySize: Int(vocabulary)))")
        }
        guard tokenizerSize <= UInt64(size - Self.headerSize) else {
            throw DataError("\(origin): the tokenizer's \(tokenizerSize) bytes exceed the \(size - Self.headerSize) bytes after the header (truncated file?)")
        }
        let tokenStart = (Self.headerSize + Int(tokenizerSize) + 7) / 8 * 8
        // Compare counts with the bytes present before multiplying, so huge counts cannot overflow.
        let available = UInt64(max(0, size - tokenStart)) / UInt64(width)
        guard trainCount <= available, validationCount <= available - trainCount,
              tokenStart + Int(trainCount + validationCount) * width == size
        else {
            throw DataError("\(origin): the file is \(size) bytes, but the header announces \(trainCount) train + \(validationCount) validation tokens of \(width) bytes from byte \(tokenStart) (truncated or corrupt file?)")
        }
        let tokenizer = try loadTokenizer(from: data.subdata(in: Self.headerSize ..< Self.headerSize + Int(tokenizerSize)), origin: "\(origin) (its tokenizer)")
        guard tokenizer.vocabularySize == Int(vocabulary) else {
            throw DataError("\(origin): the header's vocabulary size \(vocabulary) differs from its tokenizer's \(tokenizer.vocabularySize)")
        }
        self.tokenizer = tokenizer
        vocabularySize = Int(vocabulary)
        train = TokenSplit(storage: data, byteOffset: tokenStart, width: width, count: Int(trainCount))
        validation = TokenSplit(storage: data, byteOffset: tokenStart + Int(trainCount) * width, width: width, count: Int(validationCount))
        try Self.checkRange(train, vocabulary: vocabularySize, name: "train", origin: origin)
        try Self.checkRange(validation, vocabulary: vocabularySize, name: "validation", origin: origin)
    }

    /// Throws unless every token of `split` is below `vocabulary`.
    private static func checkRange(_ split: TokenSplit, vocabulary: Int, name: String, origin: String) throws {
        let block = 1 << 16
        var buffer = [Int32](repeating: 0, count: min(block, split.count))
        for start in stride(from: 0, to: split.count, by: block) {
            let end = min(start + block, split.count)
            let bad = buffer.withUnsafeMutableBufferPointer { b in
                split.copy(start..<end, into: b.baseAddress!)
                return b[0..<(end - start)].firstIndex { UInt32(bitPattern: $0) >= UInt32(vocabulary) }
            }
            if let bad {
                throw DataError("\(origin): \(name) token \(start + bad) is \(buffer[bad]), outside the vocabulary 0..<\(vocabulary) (corrupt file?)")
            }
        }
    }

    /// Writes a token file atomically (a temporary file in the same folder, renamed over `url`).
    /// Every token must be in `0 ..< tokenizer.vocabularySize`.
    ///
    /// - Throws: `DataError` naming `url` when it cannot be written; `url` is then left as it was.
    public static func write(train: [Int32], validation: [Int32], tokenizer: any Tokenizer, to url: URL) throws {
        var writer = try TokenFileWriter(url: url, tokenizer: tokenizer)
        do {
            try writer.appendTrain(train)
            try writer.finish(validation: validation)
        } catch {
            writer.abandon()
            throw error
        }
    }
}

/// Writes a token file in one pass: train tokens are appended as they come, then the validation
/// tokens, then the header (whose counts are known only at the end) is written over its
/// placeholder. Everything goes to a temporary file beside the destination, which `finish`
/// flushes and renames over it, so an interrupted write never leaves a partial token file.
struct TokenFileWriter {
    let url: URL
    let temporary: URL
    let vocabularySize: Int
    let width: Int
    let tokenizerByteCount: Int
    private let handle: FileHandle
    private var trainCount = 0

    init(url: URL, tokenizer: any Tokenizer) throws {
        self.url = url
        vocabularySize = tokenizer.vocabularySize
        width = TokenFile.tokenWidth(vocabularySize: vocabularySize)
        let tokenizerData = try tokenizer.serialized()
        tokenizerByteCount = tokenizerData.count
        let folder = url.deletingLastPathComponent()
        temporary = folder.appendingPathComponent(".\(url.lastPathComponent).\(UUID().uuidString).partial")
        do {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            guard FileManager.default.createFile(atPath: temporary.path, contents: nil) else {
                throw DataError("cannot create \(temporary.path)")
            }
            handle = try FileHandle(forWritingTo: temporary)
        } catch {
            throw DataError("\(url.path): cannot write the token file (\(error))")
        }
        // The header is a placeholder until `finish` knows the counts.
        var prefix = Self.header(tokenizerBytes: tokenizerByteCount, vocabulary: vocabularySize, width: width, train: 0, validation: 0)
        prefix.append(tokenizerData)
        prefix.append(Data(count: (8 - prefix.count % 8) % 8))
        do {
            try write(prefix)
        } catch {
            abandon()
            throw error
        }
    }

    /// The 48-byte header.
    static func header(tokenizerBytes: Int, vocabulary: Int, width: Int, train: Int, validation: Int) -> Data {
        var out = Data(TokenFile.magic)
        withUnsafeBytes(of: TokenFile.version.littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(width).littleEndian) { out.append(contentsOf: $0) }
        for value in [vocabulary, train, validation, tokenizerBytes] {
            withUnsafeBytes(of: UInt64(value).littleEndian) { out.append(contentsOf: $0) }
        }
        assert(out.count == TokenFile.headerSize)
        return out
    }

    private func write(_ data: Data) throws {
        do {
            try handle.write(contentsOf: data)
        } catch {
            throw DataError("\(url.path): cannot write the token file (\(error.localizedDescription))")
        }
    }

    /// The little-endian bytes of `tokens` at this file's width.
    private func encoded(_ tokens: [Int32]) -> Data {
        var data = Data(count: tokens.count * width)
        data.withUnsafeMutableBytes { raw in
            for (i, t) in tokens.enumerated() {
                require(t >= 0 && Int(t) < vocabularySize, "TokenFile: token \(t) is outside the tokenizer's vocabulary 0..<\(vocabularySize)")
                if width == 2 {
                    raw.storeBytes(of: UInt16(t).littleEndian, toByteOffset: 2 * i, as: UInt16.self)
                } else {
                    raw.storeBytes(of: UInt32(t).littleEndian, toByteOffset: 4 * i, as: UInt32.self)
                }
            }
        }
        return data
    }

    mutating func appendTrain(_ tokens: [Int32]) throws {
        try write(encoded(tokens))
        trainCount += tokens.count
    }

    /// Appends the validation tokens, fills in the header, flushes, closes and renames into place.
    func finish(validation: [Int32]) throws {
        try write(encoded(validation))
        do {
            try handle.seek(toOffset: 0)
            try handle.write(contentsOf: Self.header(tokenizerBytes: tokenizerByteCount, vocabulary: vocabularySize, width: width, train: trainCount, validation: validation.count))
            try handle.synchronize()
            try handle.close()
        } catch {
            throw DataError("\(url.path): cannot write the token file (\(error.localizedDescription))")
        }
        // rename(2) replaces the destination atomically.
        guard rename(temporary.path, url.path) == 0 else {
            throw DataError("\(url.path): cannot rename \(temporary.lastPathComponent) into place (errno \(errno))")
        }
    }

    /// Closes and deletes the temporary file (after a failure).
    func abandon() {
        try? handle.close()
        try? FileManager.default.removeItem(at: temporary)
    }
}
