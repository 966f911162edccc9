import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

@Suite("Exact recurrence: streaming, hierarchical and time-split forms")
struct ExactRecurrenceTests {
    @Test("streaming kernel matches the double reference on ragged lengths and every gate regime",
          arguments: [1, 15, 16, 17, 63, 100, 1024])
    func matchesReference(length: Int) {
        var rng = SeededGenerator(seed: UInt64(length))
        for regime in GateRegime.allCases {
            // 16 heads of 16 on one thread: one work item per sequence, the unrolled 16-head kernel.
            for (heads, headDim, pool) in [(3, 16, WorkerPool.shared), (2, 7, .shared), (16, 16, oneThread)] {
                let layout = SequenceLayout.batched(batch: 2, length: length, heads: heads, headDim: headDim)
                let gates = regime.draw(layout.gateCount, &rng)
                let inputs = randomInputs(layout.elementCount, &rng)
                var state = ExactState(for: layout)
                state.x = randomInputs(state.x.count, &rng)
                let expected = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                         layout: layout, initial: state.x.map(Double.init))
                let y = exact(gates: gates, inputs: inputs, layout: layout, state: &state, pool: pool)
                expectClose(y, expected.output, tolerance: .float32Kernel, "\(regime) \(layout)")
                expectClose(state.x, expected.final, tolerance: .float32Kernel)
            }
        }
    }

    @Test("the reference recurrence equals the full window sum")
    func referenceIsFullWindow() {
        var rng = SeededGenerator(seed: 3)
        let layout = SequenceLayout.batched(batch: 1, length: 30, heads: 2, headDim: 3)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng).map(Double.init)
        let inputs = randomInputs(layout.elementCount, &rng).map(Double.init)
        let a = Reference.exactRecurrence(gates: gates, inputs: inputs, layout: layout).output
        let b = Reference.fullWindow(gates: gates, inputs: inputs, layout: layout)
        #expect(zip(a, b).allSatisfy { abs($0 - $1) < 1e-12 })
    }

    @Test("hierarchical decomposition at one, two and three levels equals the streaming kernel",
          arguments: [[16], [4, 4], [3, 5, 2], [16, 16]])
    func hierarchical(levels: [Int]) {
        var rng = SeededGenerator(seed: 4)
        for length in [1, 17, 100, 300] {
            let layout = SequenceLayout.batched(batch: 2, length: length, heads: 2, headDim: 16)
            let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
            let inputs = randomInputs(layout.elementCount, &rng)
            var state = ExactState(for: layout)
            state.x = randomInputs(state.x.count, &rng)
            let expected = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                     layout: layout, initial: state.x.map(Double.init))
            var out = [Float](repeating: .nan, count: inputs.count)
            gates.withUnsafeBufferPointer { a in
                inputs.withUnsafeBufferPointer { u in
                    out.withUnsafeMutableBufferPointer { y in
                        ExactRecurrence().hierarchical(gates: a, inputs: u, output: y, layout: layout,
                                                       state: &state, blockLengths: levels)
                    }
                }
            }
            expectClose(out, expected.output, tolerance: .float32Kernel, "levels \(levels), length \(length)")
            expectClose(state.x, expected.final, tolerance: .float32Kernel)
        }
    }

    @Test("cutting the time axis over threads (carrier scan between chunks) matches one thread")
    func timeSplit() {
        var rng = SeededGenerator(seed: 5)
        let layout = SequenceLayout.batched(batch: 1, length: 10000, heads: 1, headDim: 16)
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        var initial = ExactState(for: layout)
        initial.x = randomInputs(16, &rng)
        var serialState = initial, splitState = initial
        let serial = exact(gates: gates, inputs: inputs, layout: layout, state: &serialState, pool: WorkerPool(threadCount: 1))
        let split = exact(gates: gates, inputs: inputs, layout: layout, state: &splitState, pool: WorkerPool(threadCount: 4))
        let expected = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                 layout: layout, initial: initial.x.map(Double.init))
        expectClose(serial, expected.output, tolerance: .float32Kernel)
        expectClose(split, expected.output, tolerance: .float32Kernel)
        expectClose(splitState.x, expected.final, tolerance: .float32Kernel)
    }

    @Test("a prefill split into chunks equals one pass; packed sequences keep their own state")
    func chunksAndPacking() {
        var rng = SeededGenerator(seed: 6)
        let lengths = [5, 0, 40, 17]
        let offsets = lengths.reduce(into: [0]) { $0.append($0.last! + $1) }
        let layout = SequenceLayout.packed(offsets: offsets, heads: 2, headDim: 16)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        var state = ExactState(for: layout)
        state.x = randomInputs(state.x.count, &rng)
        let expected = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                 layout: layout, initial: state.x.map(Double.init))
        var chunked = state
        let y = exact(gates: gates, inputs: inputs, layout: layout, state: &state)
        expectClose(y, expected.output, tolerance: .float32Kernel)
        // The same packed batch in two halves: first 3 positions of each sequence, then the rest.
        let firstLengths = lengths.map { min($0, 3) }
        var outputs = [Float](repeating: 0, count: inputs.count)
        for (part, take) in [(0, firstLengths), (1, zip(lengths, firstLengths).map { $0 - $1 })] {
            let partOffsets = take.reduce(into: [0]) { $0.append($0.last! + $1) }
            let partLayout = SequenceLayout.packed(offsets: partOffsets, heads: 2, headDim: 16)
            var a: [Float] = [], u: [Float] = []
            for s in lengths.indices {
                let begin = offsets[s] + (part == 0 ? 0 : firstLengths[s])
                a += gates[(begin * 2)..<((begin + take[s]) * 2)]
                u += inputs[(begin * 32)..<((begin + take[s]) * 32)]
            }
            let out = exact(gates: a, inputs: u, layout: partLayout, state: &chunked)
            for s in lengths.indices {
                let begin = offsets[s] + (part == 0 ? 0 : firstLengths[s])
                for r in 0..<(take[s] * 32) { outputs[begin * 32 + r] = out[partOffsets[s] * 32 + r] }
            }
        }
        #expect(outputs == y)
        #expect(chunked == state)
    }
}
