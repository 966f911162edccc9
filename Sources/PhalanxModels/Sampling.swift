import Foundation
import PhalanxRuntime

/// Draws the next token from logits: temperature, then top-k, then top-p (nucleus), seeded.
///
///     p_j ∝ exp(z_j / T) over the k most likely tokens whose cumulative probability reaches topP
///
/// Temperature 0 picks the most likely token (greedy).
public struct TokenSampler: Sendable {
    public var temperature: Float
    /// Keep only the k most likely tokens (0: all).
    public var topK: Int
    /// Keep the smallest set of most likely tokens whose probability reaches this (1: all).
    public var topP: Float
    public var generator: SeededGenerator

    public init(temperature: Float = 0.8, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        generator = SeededGenerator(seed: seed)
    }

    /// The sampled token index for one row of logits.
    public mutating func sample(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        let n = logits.count
        var best = 0
        for j in 1..<n where logits[j] > logits[best] { best = j }
        if temperature <= 0 { return Int32(best) }
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
        var draw = Float.random(in: 0..<sum, using: &generator)
        for (i, w) in weights.enumerated() {
            draw -= w
            if draw < 0 { return Int32(order[i]) }
        }
        return Int32(order[order.count - 1])
    }
}

extension LanguageModel {
    /// Generates up to `maxTokens` tokens after `prompt`, handing each to `emit` (which returns
    /// false to stop), by running the forward pass over the last `context` tokens for every new
    /// token. Returns the generated tokens.
    public func generate(prompt: [Int32], maxTokens: Int, context: Int, sampler: inout TokenSampler,
                         emit: (Int32) -> Bool) -> [Int32] {
        var tokens = prompt.isEmpty ? [Int32(0)] : prompt
        var produced: [Int32] = []
        for _ in 0..<maxTokens {
            let window = Array(tokens.suffix(context))
            let cache = forward(tokens: window, batch: 1, length: window.count)
            let V = configuration.vocabulary
            let row = UnsafeBufferPointer(start: cache.logits.pointer + (window.count - 1) * V, count: V)
            let next = sampler.sample(row)
            tokens.append(next)
            produced.append(next)
            if !emit(next) { break }
        }
        return produced
    }
}
