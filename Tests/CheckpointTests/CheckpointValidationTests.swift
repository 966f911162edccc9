import Checkpoint
import Foundation
import Testing

/// A writer-made image with two float32 tensors (`a` [2, 3], `b` [4]).
private func writtenImage() throws -> Data {
    var writer = SafetensorsWriter()
    writer.add("a", floats: [1, 2, 3, 4, 5, 6], shape: [2, 3])
    writer.add("b", floats: [7, 8, 9, 10], shape: [4])
    writer.metadata = ["note": "x"]
    return try writer.serialized()
}

/// `data` with its 8-byte header length replaced by `length`.
private func withHeaderLength(_ data: Data, _ length: UInt64) -> Data {
    var copy = data
    for i in 0..<8 { copy[copy.startIndex + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt64(i))) }
    return copy
}

private func headerLength(_ data: Data) -> UInt64 {
    data.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
}

/// Whether reading `data` throws an error that names the file and contains every one of `parts`.
private func refuses(_ data: Data, mentioning parts: [String]) -> Bool {
    do {
        _ = try SafetensorsFile(data: data, origin: "hostile.safetensors")
        return false
    } catch {
        let text = "\(error)"
        return text.contains("hostile.safetensors") && parts.allSatisfy(text.contains)
    }
}

@Suite("Safetensors validation: hostile files are refused before anything is allocated")
struct CheckpointValidationTests {
    @Test("every file our writer produces and every golden fixture is accepted")
    func acceptsWrittenAndGoldenFiles() throws {
        _ = try SafetensorsFile(data: try writtenImage())
        let tests = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        let fixtures = ["SWRTests/Fixtures/btp.safetensors", "SWRTests/Fixtures/jagged.safetensors",
                        "PhalanxLayersTests/Fixtures/phalanx_kv4_bf16.weights.safetensors",
                        "PhalanxLayersTests/Fixtures/phalanx_kv4_f32.io.safetensors"]
        for path in fixtures {
            let file = try SafetensorsFile(contentsOf: tests.appendingPathComponent(path))
            #expect(!file.tensors.isEmpty)
        }
    }

    @Test("a header length off by one or two bytes (every tensor shifted) is refused", arguments: [-2, -1, 1, 2])
    func headerLengthOffByAFewBytes(delta: Int) throws {
        let data = try writtenImage()
        let shifted = withHeaderLength(data, UInt64(Int(headerLength(data)) + delta))
        #expect(refuses(shifted, mentioning: ["header"]))
    }

    @Test("a header shortened by one padding space still parses as JSON, but every tensor moves by a byte: refused")
    func misalignedByOneByte() throws {
        let data = try writtenImage()
        let length = headerLength(data)
        #expect(data[data.startIndex + 8 + Int(length) - 1] == 0x20)  // the writer's padding
        #expect(refuses(withHeaderLength(data, length - 1), mentioning: ["after the last tensor", "wrong header length"]))
    }

    @Test("an unpadded header (allowed by the format) is accepted")
    func unpaddedHeader() throws {
        let json = Array(#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.utf8)
        #expect((8 + json.count) % 4 != 0)
        var data = Data((0..<8).map { UInt8(truncatingIfNeeded: UInt64(json.count) >> (8 * $0)) })
        data.append(contentsOf: json + bytes([1.5, -2]))
        #expect(try SafetensorsFile(data: data).floats("w") == [1.5, -2])
    }

    @Test("a shape whose byte count overflows Int names the tensor and its byte range")
    func overflowingShape() {
        let header = #"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#
        #expect(refuses(image(header: header, data: bytes([1, 2, 3, 4])), mentioning: ["'w'", "[0, 16)", "than an Int counts"]))
    }

    @Test("overlapping byte ranges are refused, naming both tensors")
    func overlap() {
        let header = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        #expect(refuses(image(header: header, data: bytes([1, 2, 3])), mentioning: ["'b'", "[4, 12)", "overlaps 'a'"]))
    }

    @Test("bytes that belong to no tensor (a gap, or trailing data) are refused with their range")
    func gapsAndTrailingBytes() {
        let gap = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
        #expect(refuses(image(header: gap, data: bytes([1, 2, 3])), mentioning: ["[4, 8)", "'b'"]))
        let trailing = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
        #expect(refuses(image(header: trailing, data: bytes([1, 2])), mentioning: ["[4, 8)", "after the last tensor"]))
    }

    @Test("a tensor that starts off its element size is refused")
    func misalignedTensor() {
        let header = #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}"#
        #expect(refuses(image(header: header, data: [9] + bytes([1])), mentioning: ["'b'", "data byte 1"]))
    }

    @Test("the overflow-checked byte count")
    func byteCount() {
        #expect(SafetensorsFile.byteCount(.float32, [2, 3]) == 24)
        #expect(SafetensorsFile.byteCount(.bfloat16, []) == 2)
        #expect(SafetensorsFile.byteCount(.float64, [Int.max / 4]) == nil)
    }

    @Test("leftovers of killed writes are found and removed; other files stay")
    func stalePartials() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        for name in [".checkpoint.safetensors.\(UUID().uuidString).partial", ".tokens.bin.1.partial", "keep.partial", "checkpoint.safetensors"] {
            try Data([1]).write(to: folder.appendingPathComponent(name))
        }
        #expect(removeStalePartialFiles(in: folder).count == 2)
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["checkpoint.safetensors", "keep.partial"])
    }
}
