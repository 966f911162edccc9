import Foundation
import PhalanxRuntime
#if canImport(Glibc)
import Glibc
#endif

/// Writes safetensors files: an 8-byte little-endian header length, the JSON header (tensor
/// name -> dtype, shape, data offsets; optional `__metadata__` strings), then the raw
/// little-endian data. The header is padded with spaces so that the data section starts at a
/// multiple of 8 bytes; tensors follow each other without padding, widest elements first (in the
/// order they were added within one width), so that every tensor starts at a multiple of its
/// element size, as `SafetensorsFile` requires: each tensor's byte count is a multiple of its
/// element size, and every earlier one's of a larger or equal power of two.
///
/// `write(to:)` is atomic: the file is written under a temporary name in the same folder and
/// renamed over the destination, so an interrupted write never leaves a truncated file.
public struct SafetensorsWriter {
    private var entries: [(name: String, dtype: TensorDType, shape: [Int], bytes: Data)] = []
    /// Strings written as the header's `__metadata__` map (omitted when empty).
    public var metadata: [String: String] = [:]

    /// A writer with no tensors and no metadata.
    public init() {}

    /// Adds a float32 tensor; `values` must number `shape`'s product.
    public mutating func add(_ name: String, floats values: [Float], shape: [Int]) {
        require(SafetensorsFile.byteCount(.float32, shape) == 4 * values.count,
                "SafetensorsWriter: '\(name)' has \(values.count) values for shape \(shape)")
        var data = Data(count: values.count * 4)
        data.withUnsafeMutableBytes { raw in
            for (i, v) in values.enumerated() { raw.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
        }
        add(name, dtype: .float32, shape: shape, bytes: data)
    }

    /// Adds raw little-endian bytes of a tensor.
    public mutating func add(_ name: String, dtype: TensorDType, shape: [Int], bytes: Data) {
        require(!entries.contains { $0.name == name } && name != "__metadata__", "SafetensorsWriter: duplicate or reserved name '\(name)'")
        require(SafetensorsFile.byteCount(dtype, shape) == bytes.count, "SafetensorsWriter: '\(name)' has \(bytes.count) bytes for \(dtype.rawValue) \(shape)")
        entries.append((name, dtype, shape, bytes))
    }

    /// The complete file image: header length, padded JSON header, then every tensor's bytes.
    ///
    /// - Throws: the `JSONSerialization` error when the header cannot be encoded.
    public func serialized() throws -> Data {
        let entries = self.entries.enumerated()
            .sorted { ($0.element.dtype.byteSize, -$0.offset) > ($1.element.dtype.byteSize, -$1.offset) }.map(\.element)
        var header: [String: Any] = [:]
        var offset = 0
        for e in entries {
            header[e.name] = ["dtype": e.dtype.rawValue, "shape": e.shape, "data_offsets": [offset, offset + e.bytes.count]]
            offset += e.bytes.count
        }
        if !metadata.isEmpty { header["__metadata__"] = metadata }
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while (8 + json.count) % 8 != 0 { json.append(0x20) }
        var out = Data(capacity: 8 + json.count + offset)
        withUnsafeBytes(of: UInt64(json.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(json)
        for e in entries { out.append(e.bytes) }
        return out
    }

    /// Writes the file atomically (temporary file in the same folder, then rename).
    ///
    /// - Throws: `SafetensorsError` naming `url` when the file cannot be written (see
    ///   `writeAtomically(_:to:)`).
    public func write(to url: URL) throws {
        try writeAtomically(try serialized(), to: url)
    }
}

/// Writes `data` under a temporary name beside `url`, flushes it, then renames it over `url`
/// (creating the folder if needed); on failure the temporary file is removed.
///
/// - Throws: `SafetensorsError` naming `url` when the write, flush or rename fails; the
///   `FileManager` error when the folder cannot be created.
public func writeAtomically(_ data: Data, to url: URL) throws {
    let folder = url.deletingLastPathComponent()
    try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    let temporary = folder.appendingPathComponent(".\(url.lastPathComponent).\(UUID().uuidString).partial")
    do {
        try data.write(to: temporary)
        let handle = try FileHandle(forWritingTo: temporary)
        try handle.synchronize()
        try handle.close()
        // rename(2) replaces the destination atomically.
        guard rename(temporary.path, url.path) == 0 else {
            throw SafetensorsError("rename failed with errno \(errno)")
        }
    } catch {
        try? FileManager.default.removeItem(at: temporary)
        throw SafetensorsError("\(url.path): could not write (\(error.localizedDescription))")
    }
}

/// The temporary files `writeAtomically` (and the token-file writer) leave in `folder` when the
/// process is killed mid-write: names of the form `.<file>.<UUID>.partial`.
public func stalePartialFiles(in folder: URL) -> [URL] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []
    return names.filter { $0.hasPrefix(".") && $0.hasSuffix(".partial") }.sorted()
        .map { folder.appendingPathComponent($0) }
}

/// Removes the leftovers of interrupted writes in `folder` (see `stalePartialFiles(in:)`) and
/// returns what it removed. Call it only where no other process is writing into `folder`.
@discardableResult
public func removeStalePartialFiles(in folder: URL) -> [URL] {
    stalePartialFiles(in: folder).filter { (try? FileManager.default.removeItem(at: $0)) != nil }
}
