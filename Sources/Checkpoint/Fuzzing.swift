import Foundation
import PhalanxRuntime

/// Hostile variants of a valid safetensors image, drawn from a seeded generator, for checking
/// that a reader refuses bad files with an error instead of crashing.
///
/// Each case applies one `Mutation` to the original image. Edits to the header are made on the
/// parsed JSON and written back with a correct, padded header length, so that they reach the
/// checks behind the JSON parser; edits to a metadata value that holds JSON (a configuration)
/// replace one of its numbers, at any depth, with a hostile one.
public struct SafetensorsMutator {
    /// What a case changes.
    public enum Mutation: String, CaseIterable, Sendable {
        /// Cut the file anywhere.
        case truncate
        /// Overwrite a random byte of the header length or the JSON.
        case headerByte
        /// Overwrite a random byte of the data section.
        case dataByte
        /// Write a float32 NaN or infinity over an element of a float32 tensor.
        case nonFiniteValue
        /// Add a small or huge amount to the 8-byte header length.
        case headerLength
        /// Move a tensor's begin or end offset, or give it another tensor's range.
        case offsets
        /// Replace the JSON with malformed text (cut, unbalanced, deeply nested, not an object).
        case malformedJSON
        /// Give a tensor another dtype name, known or not.
        case dtype
        /// Give a tensor a hostile shape: overflowing, negative, empty, one more dimension.
        case shape
        /// Replace one number inside a metadata value that holds JSON with a hostile number,
        /// or the value itself with something that is not what it should be.
        case metadataValue
    }

    /// Numbers a hostile configuration holds.
    public static let hostileNumbers: [String] = [
        "0", "-1", "1", "2", "3", "7", "17", "-9223372036854775808", "9223372036854775807", "4294967296",
        "1099511627776", "100000000", "65537", "1e308", "-1e308", "1e-320", "0.5", "-0.5", "1e40", "1.0000001",
        "18446744073709551615", "\"text\"", "null", "[]", "{}", "true",
    ]

    private let original: Data
    private let header: [String: Any]
    private var generator: SeededGenerator

    /// Prepares mutations of `original` (a valid image) drawn from `seed`.
    ///
    /// - Throws: `SafetensorsError` when `original` is not a valid safetensors image.
    public init(original: Data, seed: UInt64) throws {
        self.original = original
        _ = try SafetensorsFile(data: original, origin: "the original")
        let length = Int(original.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        header = try JSONSerialization.jsonObject(with: original.subdata(in: original.startIndex + 8 ..< original.startIndex + 8 + length)) as? [String: Any] ?? [:]
        generator = SeededGenerator(seed: seed)
    }

    /// The next case: which mutation, and the mutated image.
    public mutating func next() -> (mutation: Mutation, data: Data) {
        let mutation = Mutation.allCases[pick(Mutation.allCases.count)]
        return (mutation, apply(mutation))
    }

    private mutating func pick(_ n: Int) -> Int { Int(generator.next() % UInt64(n)) }

    private var dataStart: Int {
        8 + Int(original.prefix(8).enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    }

    private var tensorNames: [String] { header.keys.filter { $0 != "__metadata__" }.sorted() }

    private mutating func apply(_ mutation: Mutation) -> Data {
        var data = original
        switch mutation {
        case .truncate:
            return data.prefix(pick(data.count))
        case .headerByte:
            data[data.startIndex + pick(dataStart)] = UInt8(truncatingIfNeeded: generator.next())
            return data
        case .dataByte:
            guard data.count > dataStart else { return data }
            data[data.startIndex + dataStart + pick(data.count - dataStart)] = UInt8(truncatingIfNeeded: generator.next())
            return data
        case .nonFiniteValue:
            let floats = tensorNames.compactMap { name -> [Int]? in
                guard let entry = header[name] as? [String: Any], entry["dtype"] as? String == "F32",
                      let offsets = entry["data_offsets"] as? [Int], offsets[1] > offsets[0] else { return nil }
                return offsets
            }
            guard !floats.isEmpty else { return data }
            let offsets = floats[pick(floats.count)]
            let element = offsets[0] + 4 * pick((offsets[1] - offsets[0]) / 4)
            let bits: UInt32 = [0x7FC0_0000, 0x7F80_0000, 0xFF80_0000, 0x7FA0_0001][pick(4)]
            withUnsafeBytes(of: bits.littleEndian) { data.replaceSubrange(data.startIndex + dataStart + element ..< data.startIndex + dataStart + element + 4, with: $0) }
            return data
        case .headerLength:
            let deltas: [Int64] = [-8, -2, -1, 1, 2, 3, 8, 1 << 20, Int64.max / 2, Int64.min / 2, -Int64(dataStart)]
            let length = Int64(dataStart - 8) &+ deltas[pick(deltas.count)]
            withUnsafeBytes(of: UInt64(bitPattern: length).littleEndian) { data.replaceSubrange(data.startIndex ..< data.startIndex + 8, with: $0) }
            return data
        case .malformedJSON:
            let json = String(decoding: original.subdata(in: original.startIndex + 8 ..< original.startIndex + dataStart), as: UTF8.self)
            let variants = [
                String(json.prefix(pick(json.count))), "[" + json, json.replacingOccurrences(of: "}", with: ""),
                String(repeating: "[", count: 10_000), "[]", "\"text\"", "{\"a\":", "null",
                json.replacingOccurrences(of: "\"", with: "'"), json.replacingOccurrences(of: ":", with: ",")]
            return replacingHeader(Data(variants[pick(variants.count)].utf8))
        case .offsets, .dtype, .shape:
            var edited = header
            let names = tensorNames
            guard !names.isEmpty else { return data }
            let name = names[pick(names.count)]
            var entry = edited[name] as? [String: Any] ?? [:]
            switch mutation {
            case .offsets:
                let offsets = entry["data_offsets"] as? [Int] ?? [0, 0]
                let other = (edited[names[pick(names.count)]] as? [String: Any])?["data_offsets"] as? [Int] ?? offsets
                let deltas = [-4, -1, 1, 4, 1 << 40, Int.max / 2, -(1 << 40)]
                let choices: [[Int]] = [
                    [offsets[0] &+ deltas[pick(deltas.count)], offsets[1]], [offsets[0], offsets[1] &+ deltas[pick(deltas.count)]],
                    other, [offsets[1], offsets[0]], [offsets[0]], [Int.max, Int.max]]
                entry["data_offsets"] = choices[pick(choices.count)]
            case .dtype:
                entry["dtype"] = ["F64", "F16", "BF16", "I64", "I32", "U8", "Q4", "", "F8_E4M3", "f32"][pick(10)]
            default:
                let shape = entry["shape"] as? [Int] ?? []
                let choices: [[Int]] = [[1 << 32, 1 << 32], [Int.max, 2], [-1] + shape, [0], shape + [1], shape + [2],
                                        Array(shape.reversed()), [], [1 << 62, 1 << 62, 1 << 62], shape.map { $0 * 2 }]
                entry["shape"] = choices[pick(choices.count)]
            }
            edited[name] = entry
            return replacingHeader(edited)
        case .metadataValue:
            var edited = header
            guard var metadata = edited["__metadata__"] as? [String: String], !metadata.isEmpty else { return data }
            let key = metadata.keys.sorted()[pick(metadata.count)]
            let value = metadata[key] ?? ""
            if var json = try? JSONSerialization.jsonObject(with: Data(value.utf8)), pick(8) != 0 {
                json = replacingNumber(in: json)
                metadata[key] = (try? JSONSerialization.data(withJSONObject: json)).map { String(decoding: $0, as: UTF8.self) } ?? value
                // Let a hostile token replace the number verbatim (NaN-like and huge literals).
                if let literal = metadata[key], literal.contains("\"__hostile__\"") {
                    metadata[key] = literal.replacingOccurrences(of: "\"__hostile__\"", with: Self.hostileNumbers[pick(Self.hostileNumbers.count)])
                }
            } else {
                metadata[key] = ["", "-1", "2", "{}", "[]", "{\"a\":1}", "9223372036854775808", String(repeating: "9", count: 400)][pick(8)]
            }
            edited["__metadata__"] = metadata
            return replacingHeader(edited)
        }
    }

    /// `json` with one number, chosen uniformly among all it holds at any depth, replaced by the
    /// placeholder string `"__hostile__"` (swapped for a hostile literal once serialized).
    private mutating func replacingNumber(in json: Any) -> Any {
        var count = 0
        func countNumbers(_ value: Any) {
            if let object = value as? [String: Any] { object.values.forEach(countNumbers) }
            else if let array = value as? [Any] { array.forEach(countNumbers) }
            else if value is NSNumber { count += 1 }
        }
        countNumbers(json)
        guard count > 0 else { return json }
        var target = pick(count)
        func replace(_ value: Any) -> Any {
            if let object = value as? [String: Any] {
                return object.keys.sorted().reduce(into: [String: Any]()) { $0[$1] = replace(object[$1]!) }
            }
            if let array = value as? [Any] { return array.map(replace) }
            if value is NSNumber {
                defer { target -= 1 }
                return target == 0 ? "__hostile__" : value
            }
            return value
        }
        return replace(json)
    }

    /// `object` as JSON, keys in sorted order (so that a seed gives the same bytes in every
    /// process); each value is serialized on its own, which is much faster than `.sortedKeys`.
    private func replacingHeader(_ object: [String: Any]) -> Data {
        var json = Data("{".utf8)
        for (i, key) in object.keys.sorted().enumerated() {
            guard let name = try? JSONSerialization.data(withJSONObject: key, options: .fragmentsAllowed),
                  let value = try? JSONSerialization.data(withJSONObject: object[key]!, options: .fragmentsAllowed) else { return original }
            if i > 0 { json.append(UInt8(ascii: ",")) }
            json.append(name)
            json.append(UInt8(ascii: ":"))
            json.append(value)
        }
        json.append(UInt8(ascii: "}"))
        return replacingHeader(json)
    }

    /// The original data section behind `json`, padded with spaces to an 8-byte boundary.
    private func replacingHeader(_ json: Data) -> Data {
        var padded = json
        while (8 + padded.count) % 8 != 0 { padded.append(0x20) }
        var out = Data()
        withUnsafeBytes(of: UInt64(padded.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(padded)
        out.append(original.subdata(in: original.startIndex + dataStart ..< original.endIndex))
        return out
    }
}

/// What a fuzzing run saw.
public struct FuzzReport: Sendable, CustomStringConvertible {
    /// Mutated files passed to the loader: `accepted + refused`.
    public var cases = 0
    /// Cases the reader accepted (a mutation that left a valid file, such as a flipped data bit).
    public var accepted = 0
    /// Cases refused with an error.
    public var refused = 0
    /// Refusals per mutation.
    public var refusedBy: [SafetensorsMutator.Mutation: Int] = [:]
    /// The first refusal message of each mutation, as an example.
    public var examples: [SafetensorsMutator.Mutation: String] = [:]
    /// Refusal messages that name neither a key (a quoted name) nor a byte range (at most 20 kept).
    public var vagueMessages: [String] = []
    /// Wall time of the run in seconds.
    public var seconds = 0.0

    /// One summary line, then the refusals per mutation.
    public var description: String {
        let parts = SafetensorsMutator.Mutation.allCases.map { "\($0.rawValue) \(refusedBy[$0] ?? 0)" }.joined(separator: ", ")
        return "\(cases) cases in \(String(format: "%.1f", seconds)) s: \(refused) refused with an error, \(accepted) accepted, 0 crashes; \(vagueMessages.count) vague messages\n  refused by mutation: \(parts)"
    }

    /// Runs `cases` mutations of `original` from `seed` through `load`, which must throw for a
    /// file it refuses (a crash ends the process: that is the failure this run looks for).
    /// `progress` is called every 1,000 cases.
    ///
    /// - Throws: `SafetensorsError` when `original` is not a valid safetensors image (a refusal
    ///   by `load` is counted, not thrown).
    public static func run(original: Data, cases: Int, seed: UInt64, load: (Data) throws -> Void,
                           progress: (FuzzReport) -> Void = { _ in }) throws -> FuzzReport {
        require(cases >= 0, "FuzzReport.run: cases must not be negative, got \(cases)")
        var mutator = try SafetensorsMutator(original: original, seed: seed)
        var report = FuzzReport()
        let start = Date()
        for index in 0..<cases {
            let (mutation, data) = mutator.next()
            report.cases += 1
            do {
                try load(data)
                report.accepted += 1
            } catch {
                report.refused += 1
                report.refusedBy[mutation, default: 0] += 1
                let message = "\(error)"
                if report.examples[mutation] == nil { report.examples[mutation] = message }
                if !(message.contains("'") || message.contains("byte")), report.vagueMessages.count < 20 {
                    report.vagueMessages.append("\(mutation.rawValue): \(message)")
                }
            }
            if (index + 1) % 1000 == 0 {
                report.seconds = Date().timeIntervalSince(start)
                progress(report)
            }
        }
        report.seconds = Date().timeIntervalSince(start)
        return report
    }
}
