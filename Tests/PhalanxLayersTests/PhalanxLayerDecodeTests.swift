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
