import Foundation
import PhalanxModels
import PhalanxRuntime

extension TrainingRun.Plan {
    /// How many optimizer steps of this plan fit in `budget` seconds on this machine, measured:
    /// a scratch model of the plan's shape takes one warm-up step and then `timedSteps` steps
    /// (forward, loss and backward of every micro-batch, AdamW) on random tokens, and
    ///
    ///     steps = max(1, floor(0.9 * budget / median seconds per step))
    ///
    /// leaving a tenth of the budget to evaluations, checkpoints and the loss plot. The plan's
    /// own model and data are untouched (a run sized this way is still a pure function of its
    /// seed and its step count).
    ///
    /// - Returns: the step count and the measured seconds per step.
    /// - Throws: `TrainingError` (field `minutes`) for a budget that is not positive and finite;
    ///   `ConfigurationError` for a model out of range.
    public func stepsFitting(seconds budget: Double, timedSteps: Int = 2) throws -> (steps: Int, secondsPerStep: Double) {
        guard budget > 0 && budget.isFinite else {
            throw TrainingError("the time budget must be positive and finite, got \(budget) s", field: "minutes")
        }
        var configuration = model
        configuration.vocabulary = tokenizer.vocabularySize
        let scratch = try LanguageModel(configuration, seed: seed)
        let optimizer = AdamW(scratch.parameters, hyperparameters: training.optimizer)
        let (batch, length) = (training.batchSize, training.contextLength)
        var rng = SeededGenerator(seed: seed)
        let vocabulary = Int32(configuration.vocabulary)
        let inputs = (0..<(batch * length)).map { _ in Int32.random(in: 0..<vocabulary, using: &rng) }
        let targets = (0..<(batch * length)).map { _ in Int32.random(in: 0..<vocabulary, using: &rng) }
        let clock = ContinuousClock()
        var samples: [Double] = []
        for step in 0...max(timedSteps, 1) {
            let start = clock.now
            scratch.zeroGradients()
            for _ in 0..<training.accumulation {
                let cache = scratch.forward(tokens: inputs, batch: batch, length: length)
                _ = scratch.loss(cache, targets: targets, gradientScale: 1 / Float(training.accumulation))
                scratch.backward(cache)
            }
            optimizer.update(learningRate: training.peakLearningRate)
            if step > 0 { samples.append(seconds(clock.now - start)) }
        }
        let perStep = samples.sorted()[samples.count / 2]
        let steps = max(1, Int(min(0.9 * budget / perStep, 1e12)))
        return (steps, perStep)
    }
}
