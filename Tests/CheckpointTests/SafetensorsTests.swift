import Checkpoint
import Foundation
import Testing

/// Builds a safetensors image from a header object and a data section, padding the header with
/// spaces so that the data section starts 8-byte aligned (as every writer does).
func image(header: String, data: [UInt8]) -> Data {
    var json = Array(header.utf8)
    while (8 + json.count) % 8 != 0 { json.append(0x20) }
    var out = Data((0..<8).map { UInt8(truncatingIfNeeded: UInt64(json.count) >> (8 * $0)) })
    out.append(contentsOf: json)
    out.append(contentsOf: data)
    return out
}

func bytes(_ values: [Float]) -> [UInt8] { values.flatMap { withUnsafeBytes(of: $0.bitPattern.littleEndian, Array.init) } }

@Suite("Safetensors reader")
struct SafetensorsTests {
    @Test("reads float32, bfloat16 and float16 tensors, shapes and metadata")
    func readsTensors() throws {
        let f32 = bytes([1, -2.5, 3, 0.125])
        let bf16: [UInt8] = [0x80, 0x3F, 0x00, 0xC0]  // 1.0, -2.0
        let f16: [UInt8] = [0x00, 0x3C, 0x00, 0x38]  // 1.0, 0.5
        let header = #"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[16,20]},"h":{"dtype":"F16","shape":[2],"data_offsets":[20,24]}}"#
        let file = try SafetensorsFile(data: image(header: header, data: f32 + bf16 + f16))
        #expect(try file.floats("w", shape: [2, 2]) == [1, -2.5, 3, 0.125])
        #expect(try file.floats("b") == [1, -2])
        #expect(try file.floats("h") == [1, 0.5])
        #expect(file.metadata == ["format": "pt"])
        #expect(try file.info("w").shape == [2, 2])
    }

    @Test("malformed files fail with a message naming the problem", arguments: [
        (image(header: "{}", data: []).prefix(5), "too short"),
        (image(header: #"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: [0, 0, 0, 0]), "outside"),
        (image(header: #"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#, data: Array(repeating: 0, count: 16)), "needs 12"),
        (image(header: #"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#, data: [0]), "dtype Q4"),
        (image(header: #"{"w": nonsense"#, data: []), "not valid JSON"),
        (Data([255, 255, 255, 255, 0, 0, 0, 0, 1]), "exceeds"),
    ])
    func malformed(data: Data, expected: String) {
        #expect {
            try SafetensorsFile(data: data, origin: "test.safetensors")
        } throws: { error in
            let text = "\(error)"
            return text.contains(expected) && text.contains("test.safetensors")
        }
    }

    @Test("a missing tensor and a wrong shape name the key and what was expected")
    func missingAndWrongShape() throws {
        let file = try SafetensorsFile(data: image(header: #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, data: bytes([1, 2])))
        #expect { try file.floats("v") } throws: { "\($0)".contains("no tensor 'v'") && "\($0)".contains("w") }
        #expect { try file.floats("w", shape: [3]) } throws: { "\($0)".contains("'w' has shape [2], expected [3]") }
    }
}

@Suite("Safetensors writer")
struct SafetensorsWriterTests {
    @Test("what is written reads back: values, shapes, metadata, aligned data")
    func roundTrip() throws {
        var writer = SafetensorsWriter()
        writer.add("b", floats: [1, 2, 3], shape: [3])
        writer.add("a.weight", floats: [0.5, -1, 2, 4, 8, 16], shape: [2, 3])
        writer.metadata = ["config": "{\"dim\":4}"]
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-\(UUID().uuidString)/x.safetensors")
        try writer.write(to: url)
        try writer.write(to: url)  // overwriting an existing file works too
        let file = try SafetensorsFile(contentsOf: url)
        #expect(try file.floats("a.weight", shape: [2, 3]) == [0.5, -1, 2, 4, 8, 16])
        #expect(try file.floats("b") == [1, 2, 3])
        #expect(file.metadata["config"] == "{\"dim\":4}")
        let raw = try Data(contentsOf: url)
        let headerLength = raw.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        #expect((8 + headerLength) % 8 == 0)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: url.deletingLastPathComponent().path)
        #expect(leftovers == ["x.safetensors"])
    }

    @Test("tensors of mixed widths, added narrowest first, still read back (each starts at a multiple of its width)")
    func mixedWidths() throws {
        var writer = SafetensorsWriter()
        writer.add("bytes", dtype: .uint8, shape: [3], bytes: Data([1, 2, 3]))
        writer.add("halves", dtype: .bfloat16, shape: [1], bytes: Data([0x80, 0x3f]))  // 1.0
        writer.add("floats", floats: [2, 4], shape: [2])
        writer.add("more floats", floats: [8], shape: [1])
        let file = try SafetensorsFile(data: try writer.serialized())
        #expect(try file.floats("floats") == [2, 4] && file.floats("more floats") == [8])
        #expect(try file.floats("halves") == [1])
        #expect(try file.bytes("bytes") == Data([1, 2, 3]))
        for (name, info) in file.tensors { #expect(info.byteRange.lowerBound % info.dtype.byteSize == 0, "\(name)") }
    }
}
