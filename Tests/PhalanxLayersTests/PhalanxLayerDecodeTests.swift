import PhalanxLayers
import PhalanxRuntime
import PhalanxTestSupport
import Testing

@Suite("Phalanx layer: decoding after a long prompt")
struct PhalanxLayerDecodeTests {
    /// A prompt of 100 positions ends 4 positions into its seventh block of 16: decoding must pick
    /// up the running local state, the gate product and the sixth block's carrier mid-block, and
    /// hand over a fresh carrier at positions 112 and 128.
    @Test("a prefill of 100 positions (one call, or ragged chunks), then one-token steps, equals the parallel forward",
          arguments: [[100], [37, 0, 16, 47]])
    func prompt100(chunks: [Int]) {
        var rng = SeededGenerator(seed: 81)
        let (batch, length, dim) = (2, 136, 32)
        let layer = PhalanxLayer("", .init(dim: dim, kvHeads: 1), rng: &rng)
        // Gates near 1 (sigmoid(4), sigmoid(2)): the carrier from the previous block is large.
        _ = layer.projABias.value.buffer.update(fromContentsOf: [4, 2])
        let x = randomTensor([batch, length, dim], &rng)
        let (full, _) = layer.forward(x)
        func slice(_ range: Range<Int>) -> Tensor {
            Tensor(rows(x.array, batch: batch, length: length, width: dim, range), shape: [batch, range.count, dim])
        }
        var state = layer.makeState(batch: batch)
        var outputs: [(Range<Int>, Tensor)] = []
        var start = 0
        for size in chunks {
            outputs.append((start..<(start + size), layer.infer(slice(start..<(start + size)), state: &state)))
            start += size
        }
        #expect(start == 100)
        for i in 100..<length { outputs.append((i..<(i + 1), layer.infer(slice(i..<(i + 1)), state: &state))) }
        for (range, y) in outputs {
            // The same float32 operations in another grouping: a few roundings apart.
            expectClose(y.array, rows(full.array, batch: batch, length: length, width: dim, range).map(Double.init),
                        tolerance: 1e-6, "positions \(range)")
        }
    }
}

@Suite("Phalanx layer: the decode state")
struct PhalanxStateTests {
    @Test("two prompts prefilled alone and stacked decode as each alone; the state keeps positions and a constant size")
    func stacking() {
        var rng = SeededGenerator(seed: 82)
        let dim = 32
        let layer = PhalanxLayer("", .init(dim: dim, kvHeads: 1), rng: &rng)
        let prompts = [randomTensor([1, 21, dim], &rng), randomTensor([1, 6, dim], &rng)]
        let steps = (0..<5).map { _ in randomTensor([2, 1, dim], &rng) }
        var alone: [[Float]] = [[], []], states: [PhalanxState] = []
        for (i, prompt) in prompts.enumerated() {
            var state = layer.makeState(batch: 1)
            _ = layer.infer(prompt, state: &state)
            states.append(state)
            for step in steps {
                alone[i] += layer.infer(Tensor(Array(step.array[(i * dim)..<((i + 1) * dim)]), shape: [1, 1, dim]), state: &state).array
            }
        }
        var together = PhalanxState.stacking(states)
        #expect(together.positions == [21, 6] && together.sequences == 2)
        #expect(together.byteCount == 2 * layer.makeState(batch: 1).byteCount, "(2 * 16 + 1) * heads floats per sequence")
        var batched: [[Float]] = [[], []]
        for step in steps {
            let y = layer.infer(step, state: &together).array
            for i in 0..<2 { batched[i] += y[(i * dim)..<((i + 1) * dim)] }
        }
        #expect(together.positions == [26, 11])
        for i in 0..<2 { expectClose(batched[i], alone[i].map(Double.init), tolerance: 1e-6, "prompt \(i)") }
    }

    @Test("Tensor(concatenating:) joins along the first dimension")
    func concatenating() {
        let joined = Tensor(concatenating: [Tensor([1, 2, 3, 4], shape: [2, 2]), Tensor([5, 6], shape: [1, 2])])
        #expect(joined.shape == [3, 2] && joined.array == [1, 2, 3, 4, 5, 6])
    }
}
