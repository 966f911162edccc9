import PhalanxRuntime
import SWR
import Testing

/// Forward outputs of 64 MiB or more, 64-byte aligned, are written with non-temporal stores; a
/// buffer one float off the line boundary is written with ordinary ones. Both must hold the same
/// values, bit for bit, on ragged sequences that start mid-line.
@Suite("Forward outputs beyond the caches")
struct OutputStreamingTests {
    /// Two ragged sequences, 16 heads x 16 channels: 65537 rows, just over 64 MiB of output.
    static let layout = SequenceLayout.packed(offsets: [0, 40_001, 65_537], heads: 16, headDim: 16)

    /// `body` run on a 64-byte aligned output and on one shifted by a float; returns both results.
    func bothStores(_ body: (UnsafeMutableBufferPointer<Float>) -> Void) -> (streamed: [Float], ordinary: [Float]) {
        let count = Self.layout.elementCount
        let raw = UnsafeMutableRawPointer.allocate(byteCount: (count + 16) * 4, alignment: 64)
        defer { raw.deallocate() }
        let base = raw.bindMemory(to: Float.self, capacity: count + 16)
        var results: [[Float]] = []
        for shift in [0, 1] {
            let output = UnsafeMutableBufferPointer(start: base + shift, count: count)
            output.update(repeating: .nan)
            body(output)
            results.append(Array(output))
        }
        return (results[0], results[1])
    }

    /// Positions where the two results differ (NaN counts as different), the first few.
    func differences(_ x: [Float], _ y: [Float]) -> [Int] {
        Array(zip(x, y).enumerated().lazy.filter { $0.element.0.bitPattern != $0.element.1.bitPattern }.map(\.offset).prefix(5))
    }

    @Test("jagged window forward, k = 2: streamed and ordinary stores agree")
    func jaggedWindow() {
        var rng = SeededGenerator(seed: 3)
        let layout = Self.layout
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = (0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) }
        let window = JaggedWindow(blockLength: 16, blocksSeen: 2)
        let (streamed, ordinary) = bothStores { output in
            var state = JaggedState(for: layout, blockLength: 16)
            gates.withUnsafeBufferPointer { a in
                inputs.withUnsafeBufferPointer { u in
                    window.forward(gates: a, inputs: u, output: output, layout: layout, state: &state)
                }
            }
        }
        #expect(!ordinary.contains { $0.isNaN })
        #expect(differences(streamed, ordinary) == [])
    }

    @Test("exact recurrence forward: streamed and ordinary stores agree")
    func exactRecurrence() {
        var rng = SeededGenerator(seed: 4)
        let layout = Self.layout
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = (0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) }
        let (streamed, ordinary) = bothStores { output in
            var state = ExactState(for: layout)
            gates.withUnsafeBufferPointer { a in
                inputs.withUnsafeBufferPointer { u in
                    ExactRecurrence().forward(gates: a, inputs: u, output: output, layout: layout, state: &state)
                }
            }
        }
        #expect(!ordinary.contains { $0.isNaN })
        #expect(differences(streamed, ordinary) == [])
    }
}
