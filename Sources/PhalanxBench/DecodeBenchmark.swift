import Foundation
import PhalanxModels
import PhalanxRuntime

/// Prefill and decode speed of a model at a given context length (batch 1, random tokens).
public enum DecodeBenchmark {
    /// One model's prefill and decode speed at one context length.
    public struct Result: Sendable {
        /// The model preset's name (`ModelConfiguration.preset`).
        public let preset: String
        /// Prompt tokens prefilled before decoding.
        public let context: Int
        /// Prompt tokens per second of a prefill of `context` tokens from empty.
        public let prefillTokensPerSecond: Double
        /// Tokens per second of one-token steps after that prefill.
        public let decodeTokensPerSecond: Double
        /// Bytes of decode state after the prefill (recurrence states and key/value caches).
        public let stateBytes: Int
        /// Of `stateBytes`, those held by the Phalanx blocks (the same at every context).
        public let phalanxStateBytes: Int
    }

    /// Prefills `context` random tokens into a fresh decode state (timed once), then times `steps`
    /// greedy one-token steps after it.
    ///
    /// - Parameter window: overrides the preset's sliding window; nil keeps it.
    /// - Throws: `ConfigurationError` for an unknown preset or a configuration out of range.
    public static func measure(preset: String, context: Int, steps: Int, window: Int? = nil) throws -> Result {
        var configuration = try ModelConfiguration.preset(preset)
        if let window { configuration.window = window }
        let model = try LanguageModel(configuration, seed: 1)
        var rng = SeededGenerator(seed: 3)
        let prompt = (0..<context).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        var state = model.makeDecodeState(batch: 1)
        let prefill = Timing.seconds { _ = model.infer(tokens: prompt, length: context, state: &state) }
        let stateBytes = state.byteCount, phalanxStateBytes = state.byteCount(of: .phalanx)
        var token: Int32 = 1
        let decode = Timing.seconds {
            for _ in 0..<steps {
                let logits = model.infer(tokens: [token], length: 1, state: &state)
                token = Int32(logits.buffer.indices.max { logits.buffer[$0] < logits.buffer[$1] } ?? 0)
            }
        }
        return Result(preset: preset, context: context, prefillTokensPerSecond: Double(context) / prefill,
                      decodeTokensPerSecond: Double(steps) / decode, stateBytes: stateBytes,
                      phalanxStateBytes: phalanxStateBytes)
    }
}
