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
///
/// Data-parallel (`parallel` given): every rank runs this loop on its share of each global batch;
/// gradients are averaged across ranks during backward, and the step's loss and the stop request
/// after it, so every rank takes the same steps and stops at the same one. Rank 0 alone writes
/// checkpoints and plots; every rank evaluates the same validation windows (identical weights
/// give identical results on every rank), in batches of its own share's size, the size its
/// device memory was checked for.
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
        /// Training tokens per second (of all ranks together) since this process's first step
        /// (which compiles kernels and warms caches; at that step, its own rate); training seconds
        /// so far, summed over resumes (evaluations excluded); estimated seconds to the last step at
        /// that rate (evaluations not counted).
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
    /// The data-parallel run this trainer is one rank of; nil for a single process.
    public let parallel: DataParallel?
    /// This rank's share of every global batch (nil for a single process).
    let shard: BatchShard?
    /// Whether this process writes the checkpoint and the plot: rank 0, or the only process.
    public var writesCheckpoints: Bool { (parallel?.rank ?? 0) == 0 }
    /// The step of the run folder's checkpoint: the one this trainer resumed from, then each one
    /// it writes; nil while the run has none.
    public private(set) var checkpointStep: Int?

    /// A trainer continuing `state` (step 0 for a new run) with `model` and `optimizer` on `data`,
    /// writing into `runFolder`.
    ///
    /// - Parameters:
    ///   - checkpointStep: the step of the checkpoint `state` was loaded from (nil for a new run).
    ///   - parallel: the data-parallel run to train in as one rank (every rank makes its trainer
    ///     from the same configuration and weights); nil for a single process.
    /// - Throws: `TrainingError` when the configuration is out of range, a step would not fit in
    ///   memory, the token file's vocabulary exceeds the model's, the training split is too short
    ///   for one window, or the ranks do not divide the batch; `CommunicatorError` when the ranks'
    ///   models or weights differ.
    public init(model: LanguageModel, optimizer: AdamW, state: TrainingState, data: TokenFile, runFolder: URL,
                checkpointStep: Int? = nil, placement: Placement = .cpu, parallel: DataParallel? = nil) throws {
        try state.configuration.validate()
        let c = state.configuration
        shard = try parallel?.shard(globalBatchSize: c.batchSize)
        var local = c
        local.batchSize = shard?.localBatchSize ?? c.batchSize
        if let gpu = placement.device.cuda {
            try local.checkDeviceMemory(for: model.configuration, compute: placement.compute, device: gpu)
        } else {
            try local.checkMemory(for: model.configuration)
        }
        guard data.vocabularySize <= model.configuration.vocabulary else {
            throw TrainingError("the token file's vocabulary (\(data.vocabularySize)) exceeds the model's (\(model.configuration.vocabulary))")
        }
        guard data.train.count > c.contextLength + 1 else {
            throw TrainingError("the training split holds \(data.train.count) tokens, too few for windows of \(c.contextLength + 1)")
        }
        try parallel?.requireSameWeights(model.parameters)
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.state.worldSize = parallel.map(\.worldSize).flatMap { $0 > 1 ? $0 : nil }
        self.data = data
        self.runFolder = runFolder
        self.checkpointStep = checkpointStep
        self.placement = placement
        self.parallel = parallel
        model.move(to: placement.device, compute: placement.compute)
        optimizer.move(to: placement.device)
        if let gpu = placement.device.cuda {
            try gpu.checkFailure()
            matrixRate = try gpu.blas.measureRate(format: placement.compute) * Double(parallel?.worldSize ?? 1)
        }
    }

    /// The matrix-product rate (FLOP/s) in the compute format of all the run's devices: one GPU's,
    /// measured at start, times the number of ranks (GPU runs).
    public private(set) var matrixRate: Double?

    /// Runs until the configured step count, a stop request, or divergence.
    ///
    /// - Parameters:
    ///   - stopRequested: polled after every step (for Ctrl-C).
    ///   - onStep: called after every step, for the progress line.
    ///   - onEvaluation: called with each validation result.
    /// - Throws: `SafetensorsError` when a checkpoint or the plot cannot be written; the
    ///   communicator's error when a rank failed or stopped answering (data-parallel runs).
    public func run(stopRequested: () -> Bool, onStep: (StepReport) -> Void,
                    onEvaluation: (EvaluationResult) -> Void) throws -> Outcome {
        let c = state.configuration
        let schedule = c.schedule
        let parameters = model.parameters
        let clock = ContinuousClock()
        var runStart = clock.now
        let elapsedBefore = state.elapsedSeconds
        var tokensThisRun = 0
        // The rate leaves out this process's first step, which compiles kernels and warms caches.
        var rateStart = runStart, tokensSinceFirstStep = 0
        var sampler = BatchSampler(batchSize: c.batchSize, contextLength: c.contextLength, generator: state.sampler.generator)
        let flopsPerToken = model.trainingFlops(tokens: 1, context: c.contextLength)
        while state.step < c.steps {
            model.zeroGradients()
            var loss: Float = 0
            for micro in 0..<c.accumulation {
                let batch = shard.map { sampler.next(from: data.train, shard: $0) } ?? sampler.next(from: data.train)
                state.sampler.generator = sampler.generator
                let dropout = c.dropoutRate > 0
                    ? Dropout(rate: c.dropoutRate, seed: c.seed, step: state.step, microBatch: micro,
                              firstSequence: shard?.rows.lowerBound ?? 0) : nil
                let cache = model.forward(tokens: batch.inputs, batch: batch.batchSize, length: batch.contextLength,
                                          dropout: dropout)
                loss += model.loss(cache, targets: batch.targets, gradientScale: 1 / Float(c.accumulation)) / Float(c.accumulation)
                if let parallel, micro == c.accumulation - 1 {
                    parallel.beginReduction()
                    model.backward(cache) { parallel.gradientsFinished(from: $0, parameters: parameters) }
                    try parallel.finishReduction(parameters: parameters)
                } else {
                    model.backward(cache)
                }
            }
            // Every rank decides alike, on the global batch's loss.
            if let parallel { loss = try parallel.average([loss], on: placement.device)[0] }
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
            if tokensThisRun == c.tokensPerStep { rateStart = clock.now } else { tokensSinceFirstStep += c.tokensPerStep }
            state.trainLosses.append(.init(step: state.step, loss: loss))
            let elapsedRun = seconds(clock.now - runStart)
            state.elapsedSeconds = elapsedBefore + elapsedRun
            let rate = tokensSinceFirstStep > 0 ? Double(tokensSinceFirstStep) / max(seconds(clock.now - rateStart), 1e-9)
                                                : Double(tokensThisRun) / max(elapsedRun, 1e-9)
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
                rateStart = rateStart + (clock.now - pause)
            }
            if last || (c.checkpointInterval > 0 && state.step % c.checkpointInterval == 0) {
                try saveCheckpoint()
            }
            if !last, try stopAsked(stopRequested) {
                try saveCheckpoint()
                return .interrupted(step: state.step)
            }
        }
        return .finished
    }

    /// Whether to stop after this step: asked of this process, or, data-parallel, of any rank
    /// (every rank gets the same answer).
    private func stopAsked(_ stopRequested: () -> Bool) throws -> Bool {
        guard let parallel else { return stopRequested() }
        return try parallel.average([stopRequested() ? 1 : 0], on: placement.device)[0] > 0
    }

    /// Validation loss at `contextLength` over at most `maxWindows` windows, in batches of this
    /// rank's share of a training batch.
    public func evaluate(contextLength: Int, maxWindows: Int?) -> EvaluationResult {
        Evaluation.evaluate(model, split: data.validation, tokenizer: data.tokenizer, contextLength: contextLength,
                            batchSize: shard?.localBatchSize ?? state.configuration.batchSize, maxWindows: maxWindows)
    }

    /// Writes the checkpoint and the loss plot (both atomically); in a data-parallel run, rank 0
    /// writes them and every rank returns once it has (waiting up to `checkpointTimeout`).
    ///
    /// - Throws: `SafetensorsError` when either file cannot be written.
    public func saveCheckpoint() throws {
        guard writesCheckpoints else {
            try parallel?.communicator.barrier(timeout: Self.checkpointTimeout)
            checkpointStep = state.step
            return
        }
        try TrainingCheckpoint.save(model: model, optimizer: optimizer, state: state, to: checkpointURL)
        checkpointStep = state.step
        let svg = LossPlot.svg(train: state.trainLosses.map { ($0.step, $0.loss) },
                               validation: state.validationLosses.map { ($0.step, $0.loss) },
                               title: "\(model.configuration.pattern) x \(model.configuration.depth), dim \(model.configuration.dim)")
        try writeAtomically(Data(svg.utf8), to: plotURL)
        try parallel?.communicator.barrier(timeout: Self.checkpointTimeout)
    }

    /// Seconds the other ranks wait for rank 0 to write a checkpoint (the collectives' own
    /// timeout is shorter: it bounds how long a dead rank goes unnoticed).
    public static let checkpointTimeout = 900.0
}

/// `d` in seconds.
func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}
