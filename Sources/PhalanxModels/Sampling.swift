import Foundation
import PhalanxLayers
import PhalanxRuntime

/// Draws the next token from logits: temperature, then top-k, then top-p (nucleus), seeded.
///
///     p_j ∝ exp(z_j / T) over the k most likely tokens whose cumulative probability reaches topP
///
/// Temperature 0 picks the most likely token (greedy).
public struct TokenSampler: Sendable {
    /// Divides the logits before the softmax, `T`; 0 or below picks the most likely token.
    public var temperature: Float
    /// Keep only the k most likely tokens (0: all).
    public var topK: Int
    /// Keep the smallest set of most likely tokens whose probability reaches this (1: all).
    public var topP: Float
    /// The seeded stream the draws come from (a greedy pick draws nothing).
    public var generator: SeededGenerator

    /// A sampler with a generator seeded with `seed`; the defaults are temperature 0.8 and no
    /// top-k or top-p cut.
    public init(temperature: Float = 0.8, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        generator = SeededGenerator(seed: seed)
    }

    /// The sampled token index for one row of logits.
    ///
    /// Logits that are not finite (a NaN, an infinity) or weights that do not sum to a positive
    /// finite number (an overflow at a tiny temperature) leave nothing to draw from: the most
    /// likely finite logit is returned, as at temperature 0 (index 0 when none is finite).
    public mutating func sample(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        let n = logits.count
        require(n >= 1, "TokenSampler.sample: no logits")
        var best = 0
        for j in 0..<n where logits[j].isFinite && (!logits[best].isFinite || logits[j] > logits[best]) { best = j }
        if temperature <= 0 || !logits.allSatisfy(\.isFinite) { return Int32(best) }
        var order = Array(0..<n)
        order.sort { logits[$0] > logits[$1] }
        if topK > 0 { order = Array(order.prefix(topK)) }
        let top = logits[order[0]]
        var weights = order.map { exp((logits[$0] - top) / temperature) }
        let total = weights.reduce(0, +)
        if topP < 1 {
            var cumulative: Float = 0
            var keep = 0
            for (i, w) in weights.enumerated() {
                cumulative += w / total
                keep = i + 1
                if cumulative >= topP { break }
            }
            order = Array(order.prefix(keep))
            weights = Array(weights.prefix(keep))
        }
        let sum = weights.reduce(0, +)
        guard sum > 0 && sum.isFinite else { return Int32(best) }
        var draw = Float.random(in: 0..<sum, using: &generator)
        for (i, w) in weights.enumerated() {
            draw -= w
            if draw < 0 { return Int32(order[i]) }
        }
        return Int32(order[order.count - 1])
    }
}

/// One prompt of a batched generation (`LanguageModel.generate(_:prefillChunk:stop:)`): its tokens,
/// its budget, and its own sampler (so that a batch samples exactly what each prompt alone would).
public struct GenerationRequest: Sendable {
    /// The prompt's tokens; an empty prompt starts from token 0.
    public var prompt: [Int32]
    /// Tokens to generate at most.
    public var maxTokens: Int
    /// This prompt's sampler.
    public var sampler: TokenSampler

    /// A request for up to `maxTokens` tokens after `prompt`, sampled by `sampler`.
    public init(prompt: [Int32], maxTokens: Int, sampler: TokenSampler) {
        (self.prompt, self.maxTokens, self.sampler) = (prompt, maxTokens, sampler)
    }
}

extension LanguageModel {
    /// A one-sequence decode state after `prompt` (token 0 when empty), prefilled in chunks of
    /// `prefillChunk`, and the logits `[V]` of its last position.
    public func prefill(_ prompt: [Int32], chunk prefillChunk: Int = 512) -> (state: DecodeState, logits: [Float]) {
        require(prefillChunk >= 1, "LanguageModel.prefill: the chunk must be at least 1 token, got \(prefillChunk)")
        var state = makeDecodeState(batch: 1)
        let V = configuration.vocabulary
        let start = prompt.isEmpty ? [Int32(0)] : prompt
        var logits: [Float] = []
        var offset = 0
        while offset < start.count {
            let piece = Array(start[offset..<min(offset + prefillChunk, start.count)])
            let out = infer(tokens: piece, length: piece.count, state: &state)
            logits = Tensor(viewing: out, offset: (piece.count - 1) * V, shape: [V]).array
            offset += piece.count
        }
        return (state, logits)
    }

    /// Generates up to `maxTokens` tokens after `prompt` (one sequence): the prompt is prefilled
    /// in chunks of `prefillChunk`, then each new token is one decode step through every mixer's
    /// state. `emit` receives each token and returns false to stop. Returns the generated tokens
    /// (the one `emit` stopped at included). An empty prompt starts from token 0.
    public func generate(prompt: [Int32], maxTokens: Int, sampler: inout TokenSampler, prefillChunk: Int = 512,
                         emit: (Int32) -> Bool) -> [Int32] {
        var (state, logits) = prefill(prompt, chunk: prefillChunk)
        var produced: [Int32] = []
        for _ in 0..<maxTokens {
            let next = logits.withUnsafeBufferPointer { sampler.sample($0) }
            produced.append(next)
            if !emit(next) { break }
            logits = infer(tokens: [next], length: 1, state: &state).array
        }
        return produced
    }

    /// Generates for every request together: each prompt is prefilled alone (prompts of any
    /// lengths), the states are stacked into one batch (`DecodeState.stacking`), and each step
    /// decodes one token of every sequence in one pass. A sequence stops at its budget or when
    /// `stop(index, tokens so far)` returns true (the token that made it stop included); a stopped
    /// sequence rides along on a placeholder token until all have stopped, its output unused.
    /// Each request's tokens are those it gets alone with the same sampler (up to float32
    /// rounding of the batched products, which can decide a near tie).
    public func generate(_ requests: [GenerationRequest], prefillChunk: Int = 512,
                         stop: (_ index: Int, _ tokens: [Int32]) -> Bool = { _, _ in false }) -> [[Int32]] {
        guard !requests.isEmpty else { return [] }
        let V = configuration.vocabulary
        let prefilled = requests.map { prefill($0.prompt, chunk: prefillChunk) }
        var state = DecodeState.stacking(prefilled.map { $0.state })
        var logits = prefilled.flatMap { $0.logits }
        var samplers = requests.map(\.sampler)
        var produced = [[Int32]](repeating: [], count: requests.count)
        var running = requests.map { $0.maxTokens > 0 }
        while running.contains(true) {
            var next = [Int32](repeating: 0, count: requests.count)
            for i in requests.indices where running[i] {
                next[i] = logits[(i * V)..<((i + 1) * V)].withUnsafeBufferPointer { samplers[i].sample($0) }
                produced[i].append(next[i])
                if produced[i].count >= requests[i].maxTokens || stop(i, produced[i]) { running[i] = false }
            }
            guard running.contains(true) else { break }
            logits = infer(tokens: next, length: 1, state: &state).array
        }
        return produced
    }
}
