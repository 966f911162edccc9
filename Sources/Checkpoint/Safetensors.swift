import Foundation

/// Errors from reading or writing a safetensors file; each names the file and what was expected.
public struct SafetensorsError: Error, CustomStringConvertible, Equatable {
    /// What went wrong, naming the file (or data), the tensor or metadata key, and the byte range.
    public let description: String
    /// An error saying `description`.
    public init(_ description: String) { self.description = description }
}

/// Element types of a safetensors tensor that Phalanx reads.
public enum TensorDType: String, Sendable, CaseIterable {
    case float64 = "F64", float32 = "F32", float16 = "F16", bfloat16 = "BF16"
    case int64 = "I64", int32 = "I32", uint8 = "U8"

    /// Bytes per element: 8 (F64, I64), 4 (F32, I32), 2 (F16, BF16) or 1 (U8).
    public var byteSize: Int {
        switch self {
        case .float64, .int64: 8
        case .float32, .int32: 4
        case .float16, .bfloat16: 2
        case .uint8: 1
        }
    }
}

/// A tensor's entry in the header: its type, shape and byte range inside the data section.
public struct TensorInfo: Sendable, Equatable {
    /// The element type, from the header's `dtype` field.
    public let dtype: TensorDType
    /// The extents, outermost first (row-major); `[]` is a scalar, and every extent is >= 0.
    public let shape: [Int]
    /// Byte range relative to the start of the data section.
    public let byteRange: Range<Int>
    /// The product of `shape`; the reader has checked that it fits `Int` (and the file).
    public var elementCount: Int { shape.reduce(1, *) }
}

/// A safetensors file held in memory (the Hugging Face format).
///
/// Layout: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping each tensor name
/// to `{"dtype", "shape", "data_offsets": [begin, end]}` (plus an optional `__metadata__` map of
/// strings), then the raw little-endian data. Offsets count from the first byte after the header.
///
/// Everything is checked before any tensor is read, so a hostile file fails here with its name,
/// the key and the byte range, never later with a crash or a huge allocation:
/// - the header length fits the file and the header is a JSON object;
/// - each shape's byte count `dtype size * product(shape)` is computed with overflow checks and
///   equals its range's length;
/// - alignment: each range starts at a multiple of its element size, counted from the start of
///   the data section (as every writer lays tensors out);
/// - the ranges, in offset order, tile the data section exactly: the first starts at 0, each
///   starts where the previous ended (no overlap, no gap), the last ends at the end of the file.
///   A header length off by any number of bytes moves the start of the data section and with it
///   its size, so the tiling refuses it (a shorter length leaves bytes after the last tensor, a
///   longer one puts the last tensor past the end).
///
/// Where the data section starts in the file is not checked: the format only allows the header
/// to be padded (our writer pads to 8 bytes; older files are not padded), and values are read
/// with unaligned loads.
public struct SafetensorsFile: Sendable {
    /// Every tensor's entry, by name (the header without `__metadata__`).
    public let tensors: [String: TensorInfo]
    /// The header's `__metadata__` strings; empty when the file has none.
    public let metadata: [String: String]
    private let data: Data
    private let dataStart: Int
    private let origin: String

    /// Reads (memory-mapped where safe) and validates the file at `url`.
    ///
    /// - Throws: `SafetensorsError` when the file cannot be read or fails one of the checks listed
    ///   on the type.
    public init(contentsOf url: URL) throws {
        let data: Data
        do {
            data = try Data(contentsOf: url, options: .mappedIfSafe)
        } catch {
            throw SafetensorsError("\(url.path): cannot read the file (\(error.localizedDescription))")
        }
        try self.init(data: data, origin: url.path)
    }

    /// Parses and validates a safetensors image; `origin` names it in error messages.
    ///
    /// - Throws: `SafetensorsError` naming `origin` and the check that failed.
    public init(data: Data, origin: String = "safetensors data") throws {
        self.origin = origin
        self.data = data
        guard data.count >= 8 else {
            throw SafetensorsError("\(origin): \(data.count) bytes is too short for a safetensors file (8-byte header length expected)")
        }
        let headerLength = data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard headerLength <= UInt64(data.count - 8) else {
            throw SafetensorsError("\(origin): header length \(headerLength) exceeds the \(data.count - 8) bytes after it (truncated file?)")
        }
        dataStart = 8 + Int(headerLength)
        let json: Any
        do {
            json = try JSONSerialization.jsonObject(with: data.subdata(in: data.startIndex + 8 ..< data.startIndex + dataStart))
        } catch {
            let detail = (error as NSError).userInfo[NSDebugDescriptionErrorKey] as? String ?? error.localizedDescription
            throw SafetensorsError("\(origin): the header (bytes 8..<\(dataStart)) is not valid JSON (\(detail))")
        }
        guard let entries = json as? [String: Any] else {
            throw SafetensorsError("\(origin): the header (bytes 8..<\(dataStart)) must be a JSON object of tensor entries")
        }
        let dataSize = data.count - dataStart
        var tensors: [String: TensorInfo] = [:]
        var metadata: [String: String] = [:]
        for (name, value) in entries {
            if name == "__metadata__" {
                guard let map = value as? [String: String] else {
                    throw SafetensorsError("\(origin): '__metadata__' must map strings to strings")
                }
                metadata = map
                continue
            }
            tensors[name] = try Self.parseEntry(name, value, dataSize: dataSize, origin: origin)
        }
        try Self.checkTiling(tensors, dataSize: dataSize, origin: origin)
        self.tensors = tensors
        self.metadata = metadata
    }

    private static func parseEntry(_ name: String, _ value: Any, dataSize: Int, origin: String) throws -> TensorInfo {
        guard let entry = value as? [String: Any], let dtypeName = entry["dtype"] as? String,
              let shape = entry["shape"] as? [Int], let offsets = entry["data_offsets"] as? [Int],
              offsets.count == 2
        else {
            throw SafetensorsError("\(origin): tensor '\(name)' needs dtype (string), shape (integers) and data_offsets ([begin, end])")
        }
        guard let dtype = TensorDType(rawValue: dtypeName) else {
            throw SafetensorsError("\(origin): tensor '\(name)' has dtype \(dtypeName); supported: \(TensorDType.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw SafetensorsError("\(origin): tensor '\(name)' has a negative dimension in shape \(shape)")
        }
        let (begin, end) = (offsets[0], offsets[1])
        guard 0 <= begin, begin <= end, end <= dataSize else {
            throw SafetensorsError("\(origin): tensor '\(name)' has data_offsets [\(begin), \(end)] outside the \(dataSize)-byte data section (truncated file, or a wrong header length?)")
        }
        guard let expected = byteCount(dtype, shape) else {
            throw SafetensorsError("\(origin): tensor '\(name)': \(dtype.rawValue) \(shape) needs more bytes than an Int counts (byte range [\(begin), \(end)))")
        }
        guard end - begin == expected else {
            throw SafetensorsError("\(origin): tensor '\(name)' spans \(end - begin) bytes [\(begin), \(end)), but \(dtype.rawValue) \(shape) needs \(expected)")
        }
        guard begin % dtype.byteSize == 0 else {
            throw SafetensorsError("\(origin): tensor '\(name)' starts at data byte \(begin), not a multiple of its \(dtype.byteSize)-byte elements (misaligned)")
        }
        return TensorInfo(dtype: dtype, shape: shape, byteRange: begin..<end)
    }

    /// `dtype.byteSize * product(shape)`, or nil when it overflows `Int`.
    public static func byteCount(_ dtype: TensorDType, _ shape: [Int]) -> Int? {
        var total = dtype.byteSize
        for extent in shape {
            let (product, overflow) = total.multipliedReportingOverflow(by: extent)
            if overflow { return nil }
            total = product
        }
        return total
    }

    /// Checks that the ranges, in offset order, cover `0 ..< dataSize` without overlap or gap.
    private static func checkTiling(_ tensors: [String: TensorInfo], dataSize: Int, origin: String) throws {
        let ordered = tensors.sorted { ($0.value.byteRange.lowerBound, $0.value.byteRange.upperBound, $0.key) < ($1.value.byteRange.lowerBound, $1.value.byteRange.upperBound, $1.key) }
        var covered = 0
        var previous: String?
        for (name, info) in ordered {
            let range = info.byteRange
            if range.lowerBound < covered {
                throw SafetensorsError("\(origin): tensor '\(name)' at bytes [\(range.lowerBound), \(range.upperBound)) overlaps '\(previous ?? "")' (which ends at \(covered))")
            }
            if range.lowerBound > covered {
                throw SafetensorsError("\(origin): data bytes [\(covered), \(range.lowerBound)) before tensor '\(name)' belong to no tensor")
            }
            covered = range.upperBound
            previous = name
        }
        guard covered == dataSize else {
            throw SafetensorsError("\(origin): data bytes [\(covered), \(dataSize)) after the last tensor belong to no tensor (a wrong header length, or wrong offsets?)")
        }
    }

    /// The entry for `name`, or an error listing what the file holds.
    public func info(_ name: String) throws -> TensorInfo {
        guard let info = tensors[name] else {
            let known = tensors.keys.sorted().prefix(8).joined(separator: ", ")
            throw SafetensorsError("\(origin): no tensor '\(name)' (the file holds \(tensors.count): \(known)\(tensors.count > 8 ? ", ..." : ""))")
        }
        return info
    }

    /// The raw bytes of tensor `name`.
    public func bytes(_ name: String) throws -> Data {
        let range = try info(name).byteRange
        return data.subdata(in: data.startIndex + dataStart + range.lowerBound ..< data.startIndex + dataStart + range.upperBound)
    }

    /// Tensor `name` converted to `Float` (from F32, F64, F16 or BF16), checking the shape if given.
    public func floats(_ name: String, shape expectedShape: [Int]? = nil) throws -> [Float] {
        let info = try info(name)
        if let expectedShape, expectedShape != info.shape {
            throw SafetensorsError("\(origin): tensor '\(name)' has shape \(info.shape), expected \(expectedShape)")
        }
        let raw = try bytes(name)
        return try raw.withUnsafeBytes { (p: UnsafeRawBufferPointer) -> [Float] in
            let n = info.elementCount
            switch info.dtype {
            case .float32: return (0..<n).map { Float(bitPattern: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) }
            case .float64: return (0..<n).map { Float(Double(bitPattern: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self)))) }
            case .float16: return (0..<n).map { Float(Float16(bitPattern: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self)))) }
            case .bfloat16: return (0..<n).map { Float(bitPattern: UInt32(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self))) << 16) }
            default: throw SafetensorsError("\(origin): tensor '\(name)' is \(info.dtype.rawValue), not a floating-point type")
            }
        }
    }

    /// Tensor `name` as `Double` (exact for F64; widened otherwise).
    public func doubles(_ name: String, shape expectedShape: [Int]? = nil) throws -> [Double] {
        let info = try info(name)
        if info.dtype == .float64 {
            if let expectedShape, expectedShape != info.shape {
                throw SafetensorsError("\(origin): tensor '\(name)' has shape \(info.shape), expected \(expectedShape)")
            }
            return try bytes(name).withUnsafeBytes { p in
                (0..<info.elementCount).map { Double(bitPattern: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self))) }
            }
        }
        return try floats(name, shape: expectedShape).map(Double.init)
    }
}
