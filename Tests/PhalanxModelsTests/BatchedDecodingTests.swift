import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import Testing

/// Prompts of different lengths decoded together: stacking separately prefilled states gives each
/// sequence exactly what it gets alone.
@Suite("A batch of ragged prompts decodes as each prompt alone")
struct BatchedDecodingTests {
    /// Prompt lengths around the Phalanx block (16), the window (8) and the ring's wrap (8 + 64).
    static let lengths = [0, 1, 15, 16, 17, 40, 100]

    @Test("stacked states: every step's logits equal each sequence's own (P, S and A blocks)")
    func stackedStates() throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 21)
        var rng = SeededGenerator(seed: 22)
        let prompts = Self.lengths.map { n in (0..<n).map { _ in Int32.random(in: 0..<256, using: &rng) } }
        let steps = 20
        let next = (0..<steps).map { _ in prompts.map { _ in Int32.random(in: 0..<256, using: &rng) } }
        var alone = prompts.map { model.prefill($0, chunk: 7).state }
        var together = LanguageModel.DecodeState.stacking(prompts.map { model.prefill($0, chunk: 7).state })
        #expect(together.positions == Self.lengths.map { max($0, 1) })
        for step in 0..<steps {
            let batched = model.infer(tokens: next[step], length: 1, state: &together).array
            for i in prompts.indices {
                let single = model.infer(tokens: [next[step][i]], length: 1, state: &alone[i]).array
                #expect(maxDifference(Array(batched[(i * 256)..<((i + 1) * 256)]), single) < 1e-5, "prompt \(i), step \(step)")
            }
        }
    }

    @Test("generate: greedy and seeded sampling give each prompt its own tokens, budgets and stops included")
    func generateTogether() throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 23)
        var rng = SeededGenerator(seed: 24)
        let requests = Self.lengths.enumerated().map { i, n in
            GenerationRequest(prompt: (0..<n).map { _ in Int32.random(in: 0..<256, using: &rng) }, maxTokens: 5 + 3 * i,
                              sampler: TokenSampler(temperature: i % 2 == 0 ? 0 : 0.9, topK: 20, seed: UInt64(i)))
        }
        // Stop a sequence at its first token above 200 (after at least one token).
        let stop = { (_: Int, tokens: [Int32]) in tokens.last! > 200 }
        let batched = model.generate(requests, prefillChunk: 9, stop: stop)
        for (i, request) in requests.enumerated() {
            var sampler = request.sampler
            var produced: [Int32] = []
            let alone = model.generate(prompt: request.prompt, maxTokens: request.maxTokens, sampler: &sampler, prefillChunk: 9) { token in
                produced.append(token)
                return !stop(i, produced)
            }
            #expect(batched[i] == alone, "prompt \(i) (length \(request.prompt.count))")
            #expect(batched[i].count <= request.maxTokens)
        }
    }
}
