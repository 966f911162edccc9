import Foundation
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining

/// Times training steps (forward, backward, AdamW) of a model on random tokens.
public enum TrainingBenchmark {
    /// One model's training speed at one context length.
    public struct Result: Sendable {
        /// The model preset's name (`ModelConfiguration.preset`).
        public let preset: String
        /// Positions per training sequence (batch 1).
        public let context: Int
        /// Median seconds of one step: forward, loss, backward and AdamW update.
        public let secondsPerStep: Double
        /// Tokens trained on per step.
        public let tokensPerStep: Int
        /// FLOPs of one step by `LanguageModel.trainingFlops`.
        public let modelFlopsPerStep: Double
        /// Tokens trained on per second: `tokensPerStep / secondsPerStep`.
        public var tokensPerSecond: Double { Double(tokensPerStep) / secondsPerStep }
        /// Model FLOPs per second over the sgemm rate.
        public func utilisation(sgemmRate: Double) -> Double { modelFlopsPerStep / secondsPerStep / sgemmRate }
    }

    /// Times training steps of a freshly initialised model on one sequence of `context` random tokens:
    /// one warm-up step, then the median of `steps`.
    ///
    /// - Parameter window: overrides the preset's sliding window; nil keeps it.
    /// - Throws: `ConfigurationError` for an unknown preset or a configuration out of range.
    public static func measure(preset: String, context: Int, steps: Int, window: Int? = nil) throws -> Result {
        var configuration = try ModelConfiguration.preset(preset)
        if let window { configuration.window = window }
        let model = try LanguageModel(configuration, seed: 1)
        let optimizer = AdamW(model.parameters)
        var rng = SeededGenerator(seed: 2)
        let tokens = (0..<(context + 1)).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        let inputs = Array(tokens.prefix(context)), targets = Array(tokens.dropFirst())
        let seconds = Timing.median(repeats: steps) {
            model.zeroGradients()
            let cache = model.forward(tokens: inputs, batch: 1, length: context)
            _ = model.loss(cache, targets: targets)
            model.backward(cache)
            optimizer.update(learningRate: 1e-4)
        }
        return Result(preset: preset, context: context, secondsPerStep: seconds, tokensPerStep: context,
                      modelFlopsPerStep: model.trainingFlops(tokens: context, context: context))
    }
}
