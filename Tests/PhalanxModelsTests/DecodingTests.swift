import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import Testing

func maxDifference(_ a: [Float], _ b: [Float]) -> Float {
    zip(a, b).map { abs($0 - $1) }.max() ?? 0
}

@Suite("Decoding equals the parallel forward")
struct DecodingTests {
    static let prompts = [0, 1, 15, 16, 17, 40, 48, 100]

    /// Feeds `total` positions as a prefill of `prompt` in ragged chunks, then one step at a time,
    /// and returns the outputs in order, `[batch, total, width]`.
    static func decode(prompt: Int, total: Int, batch: Int, width: Int, _ step: (Range<Int>) -> [Float]) -> [Float] {
        var pieces: [(Range<Int>, [Float])] = []
        var start = 0, chunk = 0
        while start < prompt {
            let size = min([7, 0, 33, 1][chunk % 4], prompt - start)
            chunk += 1
            pieces.append((start..<(start + size), step(start..<(start + size))))
            start += size
        }
        for i in prompt..<total { pieces.append((i..<(i + 1), step(i..<(i + 1)))) }
        var out = [Float](repeating: .nan, count: batch * total * width)
        for (range, values) in pieces {
            for b in 0..<batch {
                for r in 0..<range.count {
                    for c in 0..<width { out[(b * total + range.lowerBound + r) * width + c] = values[(b * range.count + r) * width + c] }
                }
            }
        }
        return out
    }

    @Test("attention: full causal and sliding window, any prompt length", arguments: [nil, 8] as [Int?], prompts)
    func attention(window: Int?, prompt: Int) {
        var rng = SeededGenerator(seed: 4)
        let layer = Attention("attn", dim: 32, heads: 4, kvHeads: 2, headDim: 8, window: window, rng: &rng)
        let (batch, total, dim) = (2, 110, 32)
        let x = randomTensor([batch, total, dim], &rng)
        let (full, _) = layer.forward(x)
        var state = layer.makeState(batch: batch)
        let decoded = Self.decode(prompt: prompt, total: total, batch: batch, width: dim) { range in
            let piece = Tensor(rows(x.array, batch: batch, length: total, width: dim, range), shape: [batch, range.count, dim])
            return layer.infer(piece, state: &state).array
        }
        #expect(maxDifference(decoded, full.array) < 1e-5, "window \(String(describing: window)), prompt \(prompt)")
        if let window { #expect(state.byteCount == 2 * (window + 64) * batch * 2 * 8 * 4, "a ring of constant size") }
    }

    @Test("a sliding-window prefill longer than the ring's piece size, in one call, then steps")
    func longSlidingPrefill() {
        var rng = SeededGenerator(seed: 5)
        let layer = Attention("attn", dim: 32, heads: 2, kvHeads: 2, headDim: 16, window: 8, rng: &rng)
        let (batch, total, dim) = (1, 300, 32)
        let x = randomTensor([batch, total, dim], &rng)
        let (full, _) = layer.forward(x)
        var state = layer.makeState(batch: batch)
        let prefill = layer.infer(Tensor(Array(x.array.prefix(290 * dim)), shape: [1, 290, dim]), state: &state)
        var decoded = prefill.array
        for i in 290..<total {
            decoded += layer.infer(Tensor(Array(x.array[(i * dim)..<((i + 1) * dim)]), shape: [1, 1, dim]), state: &state).array
        }
        #expect(maxDifference(decoded, full.array) < 1e-5)
    }

    @Test("whole model (P, S and A blocks): decode after any prompt equals the parallel forward", arguments: prompts)
    func model(prompt: Int) throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 11)
        var rng = SeededGenerator(seed: 12)
        let (batch, total, V) = (2, 110, 256)
        let tokens = (0..<(batch * total)).map { _ in Int32.random(in: 0..<256, using: &rng) }
        let full = model.forward(tokens: tokens, batch: batch, length: total).logits.array
        var state = model.makeDecodeState(batch: batch)
        let decoded = Self.decode(prompt: prompt, total: total, batch: batch, width: V) { range in
            model.infer(tokens: rows(tokens, batch: batch, length: total, width: 1, range), length: range.count, state: &state).array
        }
        #expect(state.positions == [Int](repeating: total, count: batch))
        #expect(maxDifference(decoded, full) < 1e-4, "prompt \(prompt)")
    }
}
