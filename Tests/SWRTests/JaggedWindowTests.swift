import PhalanxRuntime
import PhalanxTestSupport
import SWR
import Testing

@Suite("Jagged window: forward")
struct JaggedWindowTests {
    static let lengths = [1, 15, 16, 17, 63, 100, 1024]

    @Test("matches the double-precision definition on ragged lengths, every gate regime, k = 1 and 2",
          arguments: lengths, [1, 2])
    func matchesReference(length: Int, blocksSeen: Int) {
        var rng = SeededGenerator(seed: UInt64(length * 10 + blocksSeen))
        let window = JaggedWindow(blockLength: 16, blocksSeen: blocksSeen)
        for regime in GateRegime.allCases {
            // 16 heads of 16 on one thread: one work item per sequence, the unrolled 16-head kernel.
            for (heads, headDim, pool) in [(3, 16, WorkerPool.shared), (2, 5, .shared), (1, 33, .shared), (16, 16, oneThread)] {
                let layout = SequenceLayout.batched(batch: 2, length: length, heads: heads, headDim: headDim)
                let gates = regime.draw(layout.gateCount, &rng)
                let inputs = randomInputs(layout.elementCount, &rng)
                let expected = Reference.jaggedWindow(
                    gates: gates.map(Double.init), inputs: inputs.map(Double.init), layout: layout, window: window)
                var state = JaggedState(for: layout, blockLength: window.blockLength)
                expectClose(jagged(window, gates: gates, inputs: inputs, layout: layout, state: &state, pool: pool),
                            expected.output, tolerance: .float32Kernel, "\(regime), \(layout)")
            }
        }
    }

    @Test("any block length", arguments: [1, 4, 7, 32])
    func otherBlockLengths(blockLength: Int) {
        var rng = SeededGenerator(seed: UInt64(blockLength))
        let window = JaggedWindow(blockLength: blockLength)
        let layout = SequenceLayout.batched(batch: 1, length: 75, heads: 2, headDim: 16)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        let expected = Reference.jaggedWindow(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                              layout: layout, window: window)
        expectClose(jagged(window, gates: gates, inputs: inputs, layout: layout), expected.output, tolerance: .float32Kernel)
    }

    /// k = 2 sees the current and the previous block, so a sequence of at most two blocks is seen
    /// whole: its every output must be the exact recurrence's, which needs the carrier handed
    /// from block 0 to block 1 (gates near 1 keep that carrier large).
    @Test("a window covering the whole sequence equals the exact recurrence, across a carrier")
    func wholeWindowIsExact() {
        var rng = SeededGenerator(seed: 7)
        let window = JaggedWindow(blockLength: 20, blocksSeen: 2)
        // Ragged sequences of 37, 21, 40 (two full blocks), 1 and 20 positions: four carriers crossed.
        let layout = SequenceLayout.packed(offsets: [0, 37, 58, 98, 99, 119], heads: 2, headDim: 16)
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        let full = Reference.exactRecurrence(gates: gates.map(Double.init), inputs: inputs.map(Double.init), layout: layout)
        expectClose(jagged(window, gates: gates, inputs: inputs, layout: layout), full.output, tolerance: .float32Kernel)
        #expect(maxRelativeError(jagged(JaggedWindow(blockLength: 8), gates: gates, inputs: inputs, layout: layout),
                                 full.output) > 1e-3, "with gates near 1 a window of 8-blocks must drop visible history")

        // The same 37 positions fed in two chunks, the hand-off before and after the carrier.
        let one = SequenceLayout.batched(batch: 1, length: 37, heads: 2, headDim: 16)
        let expected37 = Array(full.output.prefix(one.elementCount))
        for split in [13, 25] {
            var state = JaggedState(for: one, blockLength: 20)
            var y: [Float] = []
            for range in [0..<split, split..<37] {
                let part = SequenceLayout.batched(batch: 1, length: range.count, heads: 2, headDim: 16)
                y += jagged(window, gates: rows(gates, batch: 1, length: 37, width: 2, range),
                            inputs: rows(inputs, batch: 1, length: 37, width: 32, range), layout: part, state: &state)
            }
            expectClose(y, expected37, tolerance: .float32Kernel, "split at \(split)")
        }
    }

    @Test("gate 0 returns the input exactly")
    func zeroGateIsIdentity() {
        var rng = SeededGenerator(seed: 8)
        let layout = SequenceLayout.batched(batch: 1, length: 50, heads: 4, headDim: 16)
        let inputs = randomInputs(layout.elementCount, &rng)
        for k in [1, 2] {
            let y = jagged(JaggedWindow(blocksSeen: k), gates: .init(repeating: 0, count: layout.gateCount),
                           inputs: inputs, layout: layout)
            #expect(y == inputs)
        }
    }

    @Test("linear in the input")
    func linearity() {
        var rng = SeededGenerator(seed: 9)
        let layout = SequenceLayout.batched(batch: 1, length: 70, heads: 2, headDim: 16)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let u1 = randomInputs(layout.elementCount, &rng), u2 = randomInputs(layout.elementCount, &rng)
        let window = JaggedWindow()
        let y1 = jagged(window, gates: gates, inputs: u1, layout: layout)
        let y2 = jagged(window, gates: gates, inputs: u2, layout: layout)
        let y12 = jagged(window, gates: gates, inputs: zip(u1, u2).map { 2 * $0 - 3 * $1 }, layout: layout)
        expectClose(y12, zip(y1, y2).map { 2 * Double($0) - 3 * Double($1) }, tolerance: .float32Kernel)
    }

    @Test("causal, and k = 1 never crosses a block, k = 2 never reaches two blocks back")
    func causalityAndReach() {
        var rng = SeededGenerator(seed: 10)
        let layout = SequenceLayout.batched(batch: 1, length: 64, heads: 1, headDim: 16)
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        for k in [1, 2] {
            let window = JaggedWindow(blocksSeen: k)
            let base = jagged(window, gates: gates, inputs: inputs, layout: layout)
            for j in [0, 15, 16, 20, 31] {
                var changed = inputs
                changed[j * 16 + 3] += 1
                let y = jagged(window, gates: gates, inputs: changed, layout: layout)
                let blockOfJ = j / 16
                for i in 0..<64 {
                    let differs = y[i * 16 + 3] != base[i * 16 + 3]
                    let block = i / 16
                    let visible = i >= j && block - blockOfJ < k
                    #expect(differs == visible, "k=\(k): input \(j) -> output \(i)")
                }
            }
        }
    }

    @Test("a prefill split into ragged chunks equals one pass, outputs and final state")
    func splitPrefill() {
        var rng = SeededGenerator(seed: 11)
        let (batch, length, heads, headDim) = (2, 100, 3, 16)
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: heads, headDim: headDim)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        for k in [1, 2] {
            let window = JaggedWindow(blocksSeen: k)
            var oneState = JaggedState(for: layout)
            let one = jagged(window, gates: gates, inputs: inputs, layout: layout, state: &oneState)
            var state = JaggedState(for: layout)
            var pieces = [Float](repeating: 0, count: inputs.count)
            var start = 0
            for size in [1, 15, 16, 17, 3, 0, 31, 17] {  // sums to 100
                let part = SequenceLayout.batched(batch: batch, length: size, heads: heads, headDim: headDim)
                let range = start..<(start + size)
                let y = jagged(window, gates: rows(gates, batch: batch, length: length, width: heads, range),
                               inputs: rows(inputs, batch: batch, length: length, width: heads * headDim, range),
                               layout: part, state: &state)
                setRows(&pieces, y, batch: batch, length: length, width: heads * headDim, range)
                start += size
            }
            #expect(start == length)
            #expect(pieces == one, "k=\(k)")
            #expect(state == oneState, "k=\(k)")
        }
    }

    @Test("the final state equals the definition's, continuing from a mid-block state")
    func stateAgainstReference() {
        var rng = SeededGenerator(seed: 12)
        let layout = SequenceLayout.batched(batch: 2, length: 37, heads: 2, headDim: 16)
        var state = JaggedState(for: layout)
        state.offset = [5, 0]
        state.local = randomInputs(state.local.count, &rng)
        state.carrier = randomInputs(state.carrier.count, &rng)
        state.gateProduct = GateRegime.uniform.draw(state.gateProduct.count, &rng)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        for k in [1, 2] {
            let window = JaggedWindow(blocksSeen: k)
            var s = state
            let y = jagged(window, gates: gates, inputs: inputs, layout: layout, state: &s)
            let expected = Reference.jaggedWindow(gates: gates.map(Double.init), inputs: inputs.map(Double.init),
                                                  layout: layout, window: window, initial: .init(state))
            expectClose(y, expected.output, tolerance: .float32Kernel)
            expectClose(s.local, expected.final.local, tolerance: .float32Kernel)
            expectClose(s.carrier, expected.final.carrier, tolerance: .float32Kernel)
            expectClose(s.gateProduct, expected.final.gateProduct, tolerance: .float32Kernel)
            #expect(s.offset == expected.final.offset)
        }
    }

    @Test("packed variable-length sequences equal separate calls, each from its own state")
    func packedSequences() {
        var rng = SeededGenerator(seed: 13)
        let lengths = [17, 0, 1, 64, 33]
        let offsets = lengths.reduce(into: [0]) { $0.append($0.last! + $1) }
        let (heads, headDim) = (2, 16)
        let layout = SequenceLayout.packed(offsets: offsets, heads: heads, headDim: headDim)
        let gates = GateRegime.uniform.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        var state = JaggedState(for: layout)
        state.carrier = randomInputs(state.carrier.count, &rng)
        let initial = state
        let packed = jagged(JaggedWindow(), gates: gates, inputs: inputs, layout: layout, state: &state)
        for s in lengths.indices {
            let one = SequenceLayout.batched(batch: 1, length: lengths[s], heads: heads, headDim: headDim)
            var own = JaggedState(for: one)
            own.carrier = Array(initial.carrier[(s * heads * headDim)..<((s + 1) * heads * headDim)])
            let w = heads * headDim
            let y = jagged(JaggedWindow(), gates: Array(gates[(offsets[s] * heads)..<(offsets[s + 1] * heads)]),
                           inputs: Array(inputs[(offsets[s] * w)..<(offsets[s + 1] * w)]), layout: one, state: &own)
            #expect(Array(packed[(offsets[s] * w)..<(offsets[s + 1] * w)]) == y, "sequence \(s)")
            #expect(Array(state.carrier[(s * w)..<((s + 1) * w)]) == own.carrier)
            #expect(state.offset[s] == own.offset[0])
        }
    }

    @Test("cutting the time axis over threads (halo blocks) changes no bit", arguments: [0, 5])
    func timeSplitIsExact(startOffset: Int) {
        var rng = SeededGenerator(seed: 14)
        let layout = SequenceLayout.batched(batch: 1, length: 9000, heads: 1, headDim: 16)
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        var initial = JaggedState(for: layout)
        initial.offset = [startOffset]
        initial.local = randomInputs(16, &rng)
        initial.carrier = randomInputs(16, &rng)
        var serialState = initial, splitState = initial
        let serial = jagged(JaggedWindow(), gates: gates, inputs: inputs, layout: layout, state: &serialState,
                            pool: WorkerPool(threadCount: 1))
        let split = jagged(JaggedWindow(), gates: gates, inputs: inputs, layout: layout, state: &splitState,
                           pool: WorkerPool(threadCount: 4))
        #expect(split == serial)
        #expect(splitState == serialState)
    }

    @Test("decode steps after a prompt equal the parallel forward", arguments: [0, 1, 15, 16, 17, 40, 48, 100])
    func decodeEqualsForward(prompt: Int) {
        var rng = SeededGenerator(seed: 15)
        let (heads, headDim, total) = (2, 16, 120)
        let layout = SequenceLayout.batched(batch: 2, length: total, heads: heads, headDim: headDim)
        let gates = GateRegime.nearOne.draw(layout.gateCount, &rng)
        let inputs = randomInputs(layout.elementCount, &rng)
        let full = jagged(JaggedWindow(), gates: gates, inputs: inputs, layout: layout)
        var state = JaggedState(for: layout)
        let w = heads * headDim
        let promptLayout = SequenceLayout.batched(batch: 2, length: prompt, heads: heads, headDim: headDim)
        _ = jagged(JaggedWindow(), gates: rows(gates, batch: 2, length: total, width: heads, 0..<prompt), inputs: rows(inputs, batch: 2, length: total, width: w, 0..<prompt),
                   layout: promptLayout, state: &state)
        for i in prompt..<total {
            var y = [Float](repeating: 0, count: 2 * w)
            let a = rows(gates, batch: 2, length: total, width: heads, i..<(i + 1))
            let u = rows(inputs, batch: 2, length: total, width: w, i..<(i + 1))
            a.withUnsafeBufferPointer { a in
                u.withUnsafeBufferPointer { u in
                    y.withUnsafeMutableBufferPointer { y in JaggedWindow().step(gates: a, inputs: u, output: y, state: &state) }
                }
            }
            #expect(y == rows(full, batch: 2, length: total, width: w, i..<(i + 1)), "position \(i)")
        }
    }

    @Test("the state's size does not depend on the context length")
    func constantStateSize() {
        let layout = SequenceLayout.batched(batch: 1, length: 1, heads: 8, headDim: 16)
        var state = JaggedState(for: layout)
        let before = state.bytesPerSequence
        let long = SequenceLayout.batched(batch: 1, length: 5000, heads: 8, headDim: 16)
        _ = jagged(JaggedWindow(), gates: .init(repeating: 0.5, count: long.gateCount),
                   inputs: .init(repeating: 1, count: long.elementCount), layout: long, state: &state)
        #expect(state.bytesPerSequence == before)
        #expect(state.local.count == 8 * 16 && state.carrier.count == 8 * 16 && state.gateProduct.count == 8)
    }
}
