import Checkpoint
import Foundation
import PhalanxData
import PhalanxLayers
import PhalanxModels

/// The training loop: sample, forward, loss, backward (accumulated), clip, AdamW step; evaluate
/// and checkpoint at intervals; stop cleanly on request, or on a non-finite loss or weights (never
/// saving them).
///
/// A run is fully determined by its checkpoint: weights, optimizer moments, step, sampler state.
/// Resuming from a checkpoint therefore reproduces the uninterrupted run's losses exactly.
public final class Trainer {
    /// The model trained; its weights are updated in place.
    public let model: LanguageModel
    /// AdamW over `model.parameters`, holding the moments and the step count.
    public let optimizer: AdamW
    /// The run's progress (configuration, step, tokens, losses, sampler position), saved in every
    /// checkpoint.
    public private(set) var state: TrainingState
    /// The token file: batches come from `train`, evaluations from `validation`.
    public let data: TokenFile
    /// Folder of `checkpoint.safetensors` and `loss.svg`.
    public let runFolder: URL

    /// `runFolder/checkpoint.safetensors`, written by `saveCheckpoint()`.
    public var checkpointURL: URL { runFolder.appendingPathComponent("checkpoint.safetensors") }
    /// `runFolder/loss.svg`, the loss curve written with each checkpoint.
    public var plotURL: URL { runFolder.appendingPathComponent("loss.svg") }

    /// What one optimizer step reports.
    public struct StepReport: Sendable {
        /// Steps completed, this one included, and the run's total (`configuration.steps`).
        public let step: Int, totalSteps: Int
        /// The step's training loss (nats per token, the mean over its micro-batches), the
        /// learning rate it used, and the global gradient L2 norm before clipping.
        public let loss: Float, learningRate: Float, gradientNorm: Float
        /// Training tokens per second since this process started or resumed the run; training
        /// seconds so far, summed over resumes (evaluations excluded); estimated seconds to the
        /// last step at that rate (evaluations not counted).
        public let tokensPerSecond: Double, elapsed: Double, remaining: Double
        /// Model-FLOPs utilisation at that rate: `LanguageModel.trainingFlops` per second over the
        /// device's matrix-product rate measured when the trainer started (GPU runs); nil on the CPU.
        public let utilisation: Double?
    }

    /// How `run` ended.
    public enum Outcome: Equatable, Sendable {
        /// The run reached `configuration.steps`; the checkpoint holds the last step.
        case finished
        /// Stopped on request after `step`; a checkpoint was written.
        case interrupted(step: Int)
        /// At `step` the loss (`loss`) or the weights after the update became non-finite; nothing
        /// of that step was saved, so the checkpoint of `checkpointStep` is the run's latest and
        /// good one (nil: none was ever written).
        case diverged(step: Int, loss: Float, checkpointStep: Int?)
    }

    /// Where the model trains (and evaluates): the CPU, or a GPU in bfloat16 or float32.
    public let placement: Placement
    /// The step of the run folder's checkpoint: the one this trainer resumed from, then each one
    /// it writes; nil while the run has none.
    public private(set) var checkpointStep: Int?

    /// A trainer continuing `state` (step 0 for a new run) with `model` and `optimizer` on `data`,
    /// writing into `runFolder`.
    ///
    /// - Parameter checkpointStep: the step of the checkpoint `state` was loaded from (nil for a
    ///   new run).
    /// - Throws: `TrainingError` when the configuration is out of range, a step would not fit in
    ///   memory, the token file's vocabulary exceeds the model's, or the training split is too short
    ///   for one window.
    public init(model: LanguageModel, optimizer: AdamW, state: TrainingState, data: TokenFile, runFolder: URL,
                checkpointStep: Int? = nil, placement: Placement = .cpu) throws {
        try state.configuration.validate()
        let c = state.configuration
        if let gpu = placement.device.cuda {
            try c.checkDeviceMemory(for: model.configuration, compute: placement.compute, device: gpu)
        } else {
            try c.checkMemory(for: model.configuration)
        }
        guard data.vocabularySize <= model.configuration.vocabulary else {
            throw TrainingError("the token file's vocabulary (\(data.vocabularySize)) exceeds the model's (\(model.configuration.vocabulary))")
        }
        guard data.train.count > c.contextLength + 1 else {
            throw TrainingError("the training split holds \(data.train.count) tokens, too few for windows of \(c.contextLength + 1)")
        }
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.data = data
        self.runFolder = runFolder
        self.checkpointStep = checkpointStep
        self.placement = placement
        model.move(to: placement.device, compute: placement.compute)
        optimizer.move(to: placement.device)
        if let gpu = placement.device.cuda {
            try gpu.checkFailure()
            matrixRate = try gpu.blas.measureRate(format: placement.compute)
        }
    }

    /// The device's matrix-product rate (FLOP/s) in the compute format, measured at start (GPU runs).
    public private(set) var matrixRate: Double?

    /// Runs until the configured step count, a stop request, or divergence.
    ///
    /// - Parameters:
    ///   - stopRequested: polled after every step (for Ctrl-C).
    ///   - onStep: called after every step, for the progress line.
    ///   - onEvaluation: called with each validation result.
    /// - Throws: `SafetensorsError` when a checkpoint or the plot cannot be written.
    public func run(stopRequested: () -> Bool, onStep: (StepReport) -> Void,
                    onEvaluation: (EvaluationResult) -> Void) throws -> Outcome {
        let c = state.configuration
        let schedule = c.schedule
        let parameters = model.parameters
        let clock = ContinuousClock()
        var runStart = clock.now
        let elapsedBefore = state.elapsedSeconds
        var tokensThisRun = 0
        var sampler = BatchSampler(batchSize: c.batchSize, contextLength: c.contextLength, generator: state.sampler.generator)
        let flopsPerToken = model.trainingFlops(tokens: 1, context: c.contextLength)
        while state.step < c.steps {
            model.zeroGradients()
            var loss: Float = 0
            for micro in 0..<c.accumulation {
                let batch = sampler.next(from: data.train)
                state.sampler.generator = sampler.generator
                let dropout = c.dropoutRate > 0 ? Dropout(rate: c.dropoutRate, seed: c.seed, step: state.step, microBatch: micro) : nil
                let cache = model.forward(tokens: batch.inputs, batch: batch.batchSize, length: batch.contextLength,
                                          dropout: dropout)
                loss += model.loss(cache, targets: batch.targets, gradientScale: 1 / Float(c.accumulation)) / Float(c.accumulation)
                model.backward(cache)
            }
            guard loss.isFinite else { return .diverged(step: state.step + 1, loss: loss, checkpointStep: checkpointStep) }
            let norm = optimizer.clipGradients(maxNorm: c.gradientClip)
            // A NaN or infinite gradient: the CPU would write it into the weights (caught below), a
            // GPU update skips it; either way the step is not taken.
            guard norm.isFinite else { return .diverged(step: state.step + 1, loss: loss, checkpointStep: checkpointStep) }
            let learningRate = schedule(state.step)
            optimizer.update(learningRate: learningRate)
            guard parametersAreFinite(parameters) else {
                return .diverged(step: state.step + 1, loss: loss, checkpointStep: checkpointStep)
            }
            if let gpu = placement.device.cuda { try gpu.checkFailure() }
            state.step += 1
            state.tokensSeen += c.tokensPerStep
            tokensThisRun += c.tokensPerStep
            state.trainLosses.append(.init(step: state.step, loss: loss))
            let elapsedRun = seconds(clock.now - runStart)
            state.elapsedSeconds = elapsedBefore + elapsedRun
            let rate = Double(tokensThisRun) / max(elapsedRun, 1e-9)
            onStep(StepReport(step: state.step, totalSteps: c.steps, loss: loss, learningRate: learningRate,
                              gradientNorm: norm, tokensPerSecond: rate, elapsed: state.elapsedSeconds,
                              remaining: Double(c.steps - state.step) * Double(c.tokensPerStep) / max(rate, 1e-9),
                              utilisation: matrixRate.map { flopsPerToken * rate / $0 }))
            let last = state.step == c.steps
            if last || (c.evaluationInterval > 0 && state.step % c.evaluationInterval == 0) {
                let pause = clock.now
                let result = evaluate(contextLength: c.contextLength, maxWindows: c.evaluationBatches * c.batchSize)
                state.validationLosses.append(.init(step: state.step, loss: Float(result.loss)))
                onEvaluation(result)
                runStart = runStart + (clock.now - pause)  // evaluation time is not training time
            }
            if last || (c.checkpointInterval > 0 && state.step % c.checkpointInterval == 0) {
                try saveCheckpoint()
            }
            if !last && stopRequested() {
                try saveCheckpoint()
                return .interrupted(step: state.step)
            }
        }
        return .finished
    }

    /// Validation loss at `contextLength` over at most `maxWindows` windows.
    public func evaluate(contextLength: Int, maxWindows: Int?) -> EvaluationResult {
        Evaluation.evaluate(model, split: data.validation, tokenizer: data.tokenizer, contextLength: contextLength,
                            batchSize: state.configuration.batchSize, maxWindows: maxWindows)
    }

    /// Writes the checkpoint and the loss plot (both atomically).
    ///
    /// - Throws: `SafetensorsError` when either file cannot be written.
    public func saveCheckpoint() throws {
        try TrainingCheckpoint.save(model: model, optimizer: optimizer, state: state, to: checkpointURL)
        checkpointStep = state.step
        let svg = LossPlot.svg(train: state.trainLosses.map { ($0.step, $0.loss) },
                               validation: state.validationLosses.map { ($0.step, $0.loss) },
                               title: "\(model.configuration.pattern) x \(model.configuration.depth), dim \(model.configuration.dim)")
        try writeAtomically(Data(svg.utf8), to: plotURL)
    }
}

/// `d` in seconds.
func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}
