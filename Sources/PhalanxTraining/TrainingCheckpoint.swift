import Checkpoint
import Foundation
import PhalanxLayers
import PhalanxData
import PhalanxModels
import PhalanxRuntime

/// Everything a training run needs to continue exactly where it stopped, besides the weights
/// and the optimizer moments (which are tensors in the same file).
public struct TrainingState: Codable, Sendable {
    /// How the run is trained (a resume may raise `steps`).
    public var configuration: TrainingConfiguration
    /// Optimizer steps completed.
    public var step = 0
    /// Training tokens consumed so far: `step * configuration.tokensPerStep`.
    public var tokensSeen = 0
    /// Training wall time in seconds, summed over resumes (evaluations excluded).
    public var elapsedSeconds = 0.0
    /// Where the data sampler's stream stands: the next batch after a resume is the one the
    /// uninterrupted run would have drawn. (The batch shape is the configuration's.)
    public var sampler: SamplerPosition
    /// The training loss of every step.
    public var trainLosses: [LossPoint] = []
    /// The validation loss of every evaluation.
    public var validationLosses: [LossPoint] = []
    /// Where the token file came from, for `inspect` and for a resume without `--data`.
    public var dataPath: String
    /// The tokenizer, serialised by its own type (see `PhalanxData.loadTokenizer`).
    public var tokenizer: Data
    /// The model's initialisation seed (reported by `inspect`).
    public var modelSeed: UInt64
    /// The number of data-parallel ranks (GPUs) of the run that wrote the checkpoint; nil for a
    /// single process. The global batch, and so the run, does not depend on it.
    public var worldSize: Int?

    /// The state of a run that has not taken a step yet; its batches are drawn from a generator
    /// seeded with `samplerSeed`.
    public init(configuration: TrainingConfiguration, samplerSeed: UInt64, dataPath: String, tokenizer: Data, modelSeed: UInt64) {
        self.configuration = configuration
        sampler = SamplerPosition(generator: SeededGenerator(seed: samplerSeed))
        self.dataPath = dataPath
        self.tokenizer = tokenizer
        self.modelSeed = modelSeed
    }

    /// The batch sampler's generator state (stored under `sampler`, as `BatchSampler` encodes
    /// it, so checkpoints of either shape load).
    public struct SamplerPosition: Codable, Sendable, Equatable {
        /// The generator the next batch's starts are drawn from.
        public var generator: SeededGenerator
    }

    /// One point of a loss curve.
    public struct LossPoint: Codable, Sendable, Equatable {
        /// The step the loss belongs to: steps completed when it was measured.
        public var step: Int
        /// The loss in nats per token.
        public var loss: Float
    }
}

/// A training checkpoint: one safetensors file holding the model's weights under their names,
/// the AdamW moments under `optimizer.m.<name>` and `optimizer.v.<name>`, and in its metadata
/// the model configuration, the training state (JSON) and the format version. Written
/// atomically, so an interrupted save leaves the previous checkpoint intact.
public enum TrainingCheckpoint {
    static let trainingKey = "training_state"
    static let optimizerStepKey = "optimizer_step"

    /// Writes `model`'s weights, `optimizer`'s moments and step, and `state` to `url`, atomically.
    ///
    /// - Throws: `SafetensorsError` when the file cannot be written.
    public static func save(model: LanguageModel, optimizer: AdamW, state: TrainingState, to url: URL) throws {
        var writer = SafetensorsWriter()
        try model.addWeights(to: &writer)
        for (i, p) in optimizer.parameters.enumerated() {
            writer.add("optimizer.m.\(p.name)", floats: optimizer.firstMoments[i].array, shape: p.value.shape)
            writer.add("optimizer.v.\(p.name)", floats: optimizer.secondMoments[i].array, shape: p.value.shape)
        }
        writer.metadata[trainingKey] = String(decoding: try JSONEncoder().encode(state), as: UTF8.self)
        writer.metadata[optimizerStepKey] = String(optimizer.step)
        try writer.write(to: url)
    }

    /// Reads a checkpoint back: the model, an optimizer with its moments and step, the state.
    ///
    /// - Throws: `SafetensorsError` naming `url` and what is wrong (see `load(from:origin:)`).
    public static func load(from url: URL) throws -> (model: LanguageModel, optimizer: AdamW, state: TrainingState) {
        try load(from: try SafetensorsFile(contentsOf: url), origin: url.path)
    }

    /// Reads a checkpoint image (for example one held in memory); `origin` names it in errors.
    ///
    /// Everything is checked before the model is built (see `LanguageModel.load`): the training
    /// state must be readable and in range (a valid configuration whose step fits in memory,
    /// `0 <= step <= steps`, at most `step x tokensPerStep` tokens seen, a finite non-negative
    /// elapsed time, an optimizer step equal to the state's), and no weight or optimizer moment
    /// may be NaN or infinite.
    ///
    /// - Throws: `SafetensorsError` naming `origin`, the key or tensor, and what was expected.
    public static func load(from file: SafetensorsFile, origin: String) throws
        -> (model: LanguageModel, optimizer: AdamW, state: TrainingState) {
        try LanguageModel.checkFormat(of: file, origin: origin)
        let state = try storedState(file, origin: origin)
        let model = try LanguageModel.load(from: file, origin: origin)
        do {
            try state.configuration.checkMemory(for: model.configuration)
        } catch {
            throw SafetensorsError("\(origin): metadata '\(trainingKey)': \(error)")
        }
        let optimizer = AdamW(model.parameters, hyperparameters: state.configuration.optimizer)
        for (i, p) in optimizer.parameters.enumerated() {
            let m = try file.floats("optimizer.m.\(p.name)", shape: p.value.shape)
            let v = try file.floats("optimizer.v.\(p.name)", shape: p.value.shape)
            _ = optimizer.firstMoments[i].buffer.update(fromContentsOf: m)
            _ = optimizer.secondMoments[i].buffer.update(fromContentsOf: v)
        }
        try checkFinite(optimizer.parameters.enumerated().flatMap { i, p in
            [("optimizer.m.\(p.name)", optimizer.firstMoments[i]), ("optimizer.v.\(p.name)", optimizer.secondMoments[i])]
        }, origin: origin)
        optimizer.step = state.step
        return (model, optimizer, state)
    }

    /// The training state in the metadata, checked value by value.
    static func storedState(_ file: SafetensorsFile, origin: String) throws -> TrainingState {
        func fail(_ message: String) -> SafetensorsError { SafetensorsError("\(origin): metadata '\(trainingKey)': \(message)") }
        guard let json = file.metadata[trainingKey] else {
            throw SafetensorsError("\(origin): metadata '\(trainingKey)' is missing (a weights-only file cannot be resumed)")
        }
        let state: TrainingState
        do {
            state = try JSONDecoder().decode(TrainingState.self, from: Data(json.utf8))
        } catch {
            throw fail("unreadable (\(error))")
        }
        do {
            try state.configuration.validate()
        } catch {
            throw fail("\(error)")
        }
        guard (0...state.configuration.steps).contains(state.step) else {
            throw fail("step \(state.step) is outside 0...\(state.configuration.steps) (the run's steps)")
        }
        let tokens = state.step * state.configuration.tokensPerStep
        guard (0...tokens).contains(state.tokensSeen) else {
            throw fail("tokensSeen \(state.tokensSeen) is outside 0...\(tokens) (step x tokens per step)")
        }
        guard state.elapsedSeconds.isFinite && state.elapsedSeconds >= 0 else {
            throw fail("elapsedSeconds \(state.elapsedSeconds) is not a finite, non-negative time")
        }
        guard let step = file.metadata[optimizerStepKey].flatMap(Int.init), step == state.step else {
            throw SafetensorsError("\(origin): metadata '\(optimizerStepKey)' is \(file.metadata[optimizerStepKey] ?? "missing"), expected the state's step \(state.step)")
        }
        return state
    }
}
