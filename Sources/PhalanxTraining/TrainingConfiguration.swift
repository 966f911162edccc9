import PhalanxCUDA
import PhalanxModels
import PhalanxRuntime

/// How a model is trained. Stored in every checkpoint, so a resume needs no flags.
public struct TrainingConfiguration: Codable, Hashable, Sendable {
    /// Optimizer steps in the whole run (the schedule's length).
    public var steps = 2000
    /// Sequences per micro-batch.
    public var batchSize = 16
    /// Positions per sequence.
    public var contextLength = 256
    /// Micro-batches per optimizer step; their gradients are averaged (each scaled by
    /// `1 / accumulation`).
    public var accumulation = 1
    /// The learning rate at the end of the warm-up; positive and finite.
    public var peakLearningRate: Float = 2e-3
    /// Steps of linear warm-up to `peakLearningRate` (0: none).
    public var warmupSteps = 100
    /// The learning rate at the end, as a fraction of the peak.
    public var finalLearningRateFraction: Float = 0.1
    /// AdamW's decoupled weight decay `wd` (multiplied by the learning rate); finite, at least 0.
    public var weightDecay: Float = 0.1
    /// Decay norms, biases and embeddings too.
    public var decayAll = false
    /// AdamW's first-moment decay `b1`, in [0, 1).
    public var beta1: Float = 0.9
    /// AdamW's second-moment decay `b2`, in [0, 1).
    public var beta2: Float = 0.95
    /// Maximum global gradient norm (0: no clipping).
    public var gradientClip: Float = 1
    /// Steps between evaluations on the validation split (0: only at the end).
    public var evaluationInterval = 200
    /// Validation batches per evaluation: at most `evaluationBatches * batchSize` windows of
    /// `contextLength` tokens are scored.
    public var evaluationBatches = 16
    /// Steps between checkpoints (0: only at the end and on interruption).
    public var checkpointInterval = 500
    /// Seeds the dropout masks. The data order has its own seed (`TrainingState`'s `samplerSeed`)
    /// and so has the model's initialisation; `TrainingRun` derives both from `Plan.seed`.
    public var seed: UInt64 = 1
    /// Residual dropout rate of every block's mixer and MLP output (`Dropout`); nil or 0: none.
    /// Optional so that checkpoints written before it existed still load; read `dropoutRate`.
    public var dropout: Float?

    /// The defaults above.
    public init() {}

    /// Training tokens per optimizer step: `batchSize * contextLength * accumulation`.
    public var tokensPerStep: Int { batchSize * contextLength * accumulation }

    /// This run's learning rate per step: warm-up to `peakLearningRate`, then cosine decay to
    /// `peakLearningRate * finalLearningRateFraction` at `steps`.
    public var schedule: LearningRateSchedule {
        LearningRateSchedule(peak: peakLearningRate, warmupSteps: warmupSteps, totalSteps: steps,
                             finalFraction: finalLearningRateFraction)
    }

    /// AdamW's constants from this configuration (`epsilon` keeps its default).
    public var optimizer: AdamW.Hyperparameters {
        var h = AdamW.Hyperparameters()
        h.beta1 = beta1
        h.beta2 = beta2
        h.weightDecay = weightDecay
        h.decayAll = decayAll
        return h
    }

    /// Checks every value, naming the field (its Swift name, in `TrainingError.field`) and the
    /// allowed range. Products the run computes (tokens per step, all its tokens, validation
    /// windows) must fit `Int`.
    ///
    /// - Throws: `TrainingError` for the first value out of range, with `field` set.
    public func validate() throws {
        func check(_ condition: Bool, _ field: String, _ range: String, _ value: Any) throws {
            if !condition { throw TrainingError("\(field) must be \(range), got \(value)", field: field) }
        }
        try check(steps >= 1, "steps", "at least 1", steps)
        try check(batchSize >= 1, "batchSize", "at least 1", batchSize)
        try check(contextLength >= 1, "contextLength", "at least 1", contextLength)
        try check(accumulation >= 1, "accumulation", "at least 1", accumulation)
        // A product that overflows is blamed on its largest factor.
        func checkProduct(_ factors: KeyValuePairs<String, Int>) throws {
            guard MemoryBudget.product(factors.map(\.value)) == nil else { return }
            let field = factors.max { $0.value < $1.value }!.key
            try check(false, field, "small enough that \(factors.map(\.key).joined(separator: " x ")) fits Int",
                      factors.map { "\($0.value)" }.joined(separator: " x "))
        }
        try checkProduct(["steps": steps, "batchSize": batchSize, "contextLength": contextLength, "accumulation": accumulation])
        try check(peakLearningRate > 0 && peakLearningRate.isFinite, "peakLearningRate", "positive and finite", peakLearningRate)
        try check(warmupSteps >= 0, "warmupSteps", "at least 0", warmupSteps)
        try check((0...1).contains(finalLearningRateFraction), "finalLearningRateFraction", "in [0, 1]", finalLearningRateFraction)
        try check(weightDecay >= 0 && weightDecay.isFinite, "weightDecay", "finite and at least 0", weightDecay)
        try check((0..<1).contains(beta1), "beta1", "in [0, 1)", beta1)
        try check((0..<1).contains(beta2), "beta2", "in [0, 1)", beta2)
        try check(gradientClip >= 0 && gradientClip.isFinite, "gradientClip", "finite and at least 0 (0: off)", gradientClip)
        try check(evaluationInterval >= 0, "evaluationInterval", "at least 0 (0: only at the end)", evaluationInterval)
        try check(checkpointInterval >= 0, "checkpointInterval", "at least 0 (0: only at the end)", checkpointInterval)
        try check(evaluationBatches >= 1, "evaluationBatches", "at least 1", evaluationBatches)
        try checkProduct(["evaluationBatches": evaluationBatches, "batchSize": batchSize])
        try check((0..<1).contains(dropoutRate), "dropout", "in [0, 1) (0: none)", dropoutRate)
    }

    /// The residual dropout rate, 0 when none is stored (the one place that reads `dropout`).
    public var dropoutRate: Float { dropout ?? 0 }

    /// Checks that a step of this run fits in memory with `model` (see
    /// `ModelConfiguration.trainingBytes`), naming `batchSize` when it does not.
    ///
    /// - Throws: `TrainingError` with the bytes needed and the bytes this machine has.
    public func checkMemory(for model: ModelConfiguration) throws {
        let bytes = model.trainingBytes(batch: batchSize, length: contextLength)
        guard MemoryBudget.fits(bytes) else {
            throw TrainingError("batchSize \(batchSize) x contextLength \(contextLength) needs about \(MemoryBudget.describe(bytes)) per step with this model, more than this machine's \(MemoryBudget.describe(MemoryBudget.physicalBytes))", field: "batchSize")
        }
    }

    /// Checks that a step of this run fits in `device`'s memory with `model` when activations are
    /// stored in `compute`: float32 weights, gradients and moments (16 bytes per parameter), a
    /// bfloat16 copy of the weights in mixed precision, and the activations kept for backward
    /// (per token: the logits and their gradient, and about 12 dim + 3 mlpHidden numbers per
    /// block, as `ModelConfiguration.trainingBytes` counts them) at `compute`'s width, against 90%
    /// of the device's memory (the rest: cuBLAS workspaces, kernels, the allocation cache's slack).
    ///
    /// - Throws: `TrainingError` naming `batchSize`, with the bytes needed and the device's.
    public func checkDeviceMemory(for model: ModelConfiguration, compute: NumberFormat, device: CUDADevice) throws {
        typealias M = MemoryBudget
        let perToken = M.sum(M.product(2, model.vocabulary), M.product(model.depth, M.sum(M.product(12, model.dim), M.product(3, model.mlpHidden)) ?? -1))
        let bytes = M.sum(model.parameterCount.flatMap { M.product(16 + (compute == .bfloat16 ? 2 : 0), $0) },
                          perToken.flatMap { M.product(compute.byteCount, batchSize, contextLength, $0) })
        guard let bytes, bytes <= device.plannableBytes else {
            throw TrainingError("batchSize \(batchSize) x contextLength \(contextLength) needs about \(M.describe(bytes)) of device memory per step with this model in \(compute), more than \(device.plannableDescription); lower batchSize (and raise accumulation)", field: "batchSize")
        }
    }
}

/// A training run's configuration or state is unusable; `field` names the
/// `TrainingConfiguration` property at fault, when one is.
public struct TrainingError: Error, CustomStringConvertible, Equatable {
    /// What is wrong and what is allowed.
    public let description: String
    /// The `TrainingConfiguration` property the message is about (for the CLI to name its flag).
    public let field: String?
    /// An error saying `description`, about `field` when one is given.
    public init(_ description: String, field: String? = nil) {
        self.description = description
        self.field = field
    }
}
