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

    /// `forward(gates, inputs, output)` on random inputs and `regime` gates, into a 64-byte
    /// aligned output and into one shifted by a float: both complete, and equal bit for bit.
    func expectBothStoresAgree(seed: UInt64, _ regime: GateRegime,
                               _ forward: (UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>, UnsafeMutableBufferPointer<Float>) -> Void) {
        var rng = SeededGenerator(seed: seed)
        let layout = Self.layout, count = layout.elementCount
        let gates = regime.draw(layout.gateCount, &rng)
        let inputs = (0..<count).map { _ in Float.random(in: -1...1, using: &rng) }
        let raw = UnsafeMutableRawPointer.allocate(byteCount: (count + 16) * 4, alignment: 64)
        defer { raw.deallocate() }
        let base = raw.bindMemory(to: Float.self, capacity: count + 16)
        var results: [[Float]] = []
        for shift in [0, 1] {
            let output = UnsafeMutableBufferPointer(start: base + shift, count: count)
            output.update(repeating: .nan)
            gates.withUnsafeBufferPointer { a in inputs.withUnsafeBufferPointer { u in forward(a, u, output) } }
            results.append(Array(output))
        }
        #expect(!results[1].contains { $0.isNaN })
        // The first few positions that differ (listing 16M floats would take the report minutes).
        let differences = zip(results[0], results[1]).enumerated().lazy
            .filter { $0.element.0.bitPattern != $0.element.1.bitPattern }.map(\.offset).prefix(5)
        #expect(Array(differences) == [])
    }

    @Test("jagged window forward, k = 2: streamed and ordinary stores agree")
    func jaggedWindow() {
        let window = JaggedWindow(blockLength: 16, blocksSeen: 2)
        expectBothStoresAgree(seed: 3, .uniform) { a, u, y in
            var state = JaggedState(for: Self.layout, blockLength: 16)
            window.forward(gates: a, inputs: u, output: y, layout: Self.layout, state: &state)
        }
    }

    @Test("exact recurrence forward: streamed and ordinary stores agree")
    func exactRecurrence() {
        expectBothStoresAgree(seed: 4, .nearOne) { a, u, y in
            var state = ExactState(for: Self.layout)
            ExactRecurrence().forward(gates: a, inputs: u, output: y, layout: Self.layout, state: &state)
        }
    }
}
