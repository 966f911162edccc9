/// How a model is trained. Stored in every checkpoint, so a resume needs no flags.
public struct TrainingConfiguration: Codable, Hashable, Sendable {
    /// Optimizer steps in the whole run (the schedule's length).
    public var steps = 2000
    /// Sequences per micro-batch.
    public var batchSize = 16
    /// Positions per sequence.
    public var contextLength = 256
    /// Micro-batches whose gradients are summed per optimizer step.
    public var accumulation = 1
    public var peakLearningRate: Float = 2e-3
    public var warmupSteps = 100
    /// The learning rate at the end, as a fraction of the peak.
    public var finalLearningRateFraction: Float = 0.1
    public var weightDecay: Float = 0.1
    /// Decay norms, biases and embeddings too.
    public var decayAll = false
    public var beta1: Float = 0.9
    public var beta2: Float = 0.95
    /// Maximum global gradient norm (0: no clipping).
    public var gradientClip: Float = 1
    /// Steps between evaluations on the validation split (0: only at the end).
    public var evaluationInterval = 200
    /// Validation windows per evaluation.
    public var evaluationBatches = 16
    /// Steps between checkpoints (0: only at the end and on interruption).
    public var checkpointInterval = 500
    /// Seeds the data order and the dropout masks (the model's initialisation has its own seed).
    public var seed: UInt64 = 1
    /// Residual dropout rate of every block's mixer and MLP output (`Dropout`); nil or 0: none.
    /// Optional so that checkpoints written before it existed still load.
    public var dropout: Float?

    public init() {}

    public var tokensPerStep: Int { batchSize * contextLength * accumulation }

    public var schedule: LearningRateSchedule {
        LearningRateSchedule(peak: peakLearningRate, warmupSteps: warmupSteps, totalSteps: steps,
                             finalFraction: finalLearningRateFraction)
    }

    public var optimizer: AdamW.Hyperparameters {
        var h = AdamW.Hyperparameters()
        h.beta1 = beta1
        h.beta2 = beta2
        h.weightDecay = weightDecay
        h.decayAll = decayAll
        return h
    }

    /// Checks every value, naming the option and what is allowed.
    public func validate() throws {
        func check(_ condition: Bool, _ message: String) throws {
            if !condition { throw TrainingError(message) }
        }
        try check(steps >= 1, "steps must be at least 1, got \(steps)")
        try check(batchSize >= 1, "batch size must be at least 1, got \(batchSize)")
        try check(contextLength >= 1, "context length must be at least 1, got \(contextLength)")
        try check(accumulation >= 1, "gradient accumulation must be at least 1, got \(accumulation)")
        try check(peakLearningRate > 0 && peakLearningRate.isFinite, "learning rate must be positive, got \(peakLearningRate)")
        try check(warmupSteps >= 0, "warm-up steps must not be negative, got \(warmupSteps)")
        try check((0...1).contains(finalLearningRateFraction), "final learning-rate fraction must be in [0, 1], got \(finalLearningRateFraction)")
        try check(weightDecay >= 0, "weight decay must not be negative, got \(weightDecay)")
        try check((0..<1).contains(beta1) && (0..<1).contains(beta2), "Adam betas must be in [0, 1), got \(beta1), \(beta2)")
        try check(gradientClip >= 0, "gradient clip must not be negative, got \(gradientClip)")
        try check(evaluationInterval >= 0 && checkpointInterval >= 0, "intervals must not be negative")
        try check((0..<1).contains(dropout ?? 0), "dropout must be in [0, 1), got \(dropout ?? 0)")
        try check(evaluationBatches >= 1, "evaluation batches must be at least 1, got \(evaluationBatches)")
    }
}

public struct TrainingError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
