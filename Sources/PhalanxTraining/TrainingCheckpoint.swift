import Checkpoint
import Foundation
import PhalanxLayers
import PhalanxData
import PhalanxModels

/// Everything a training run needs to continue exactly where it stopped, besides the weights
/// and the optimizer moments (which are tensors in the same file).
public struct TrainingState: Codable, Sendable {
    public var configuration: TrainingConfiguration
    /// Optimizer steps completed.
    public var step = 0
    public var tokensSeen = 0
    public var elapsedSeconds = 0.0
    /// The data sampler with its generator state: the next batch after a resume is the one the
    /// uninterrupted run would have drawn.
    public var sampler: BatchSampler
    public var trainLosses: [LossPoint] = []
    public var validationLosses: [LossPoint] = []
    /// Where the token file came from, for `inspect` and for a resume without `--data`.
    public var dataPath: String
    /// The tokenizer, serialised by its own type (see `PhalanxData.loadTokenizer`).
    public var tokenizer: Data
    /// The model's initialisation seed (reported by `inspect`).
    public var modelSeed: UInt64

    /// The state of a run that has not taken a step yet.
    public init(configuration: TrainingConfiguration, sampler: BatchSampler, dataPath: String, tokenizer: Data, modelSeed: UInt64) {
        self.configuration = configuration
        self.sampler = sampler
        self.dataPath = dataPath
        self.tokenizer = tokenizer
        self.modelSeed = modelSeed
    }

    public struct LossPoint: Codable, Sendable, Equatable {
        public var step: Int
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
    public static func load(from url: URL) throws -> (model: LanguageModel, optimizer: AdamW, state: TrainingState) {
        let file = try SafetensorsFile(contentsOf: url)
        let model = try LanguageModel.load(from: file, origin: url.path)
        guard let json = file.metadata[trainingKey],
              let state = try? JSONDecoder().decode(TrainingState.self, from: Data(json.utf8)),
              let step = file.metadata[optimizerStepKey].flatMap(Int.init) else {
            throw SafetensorsError("\(url.path): the training state in the metadata is missing or unreadable (a weights-only file cannot be resumed)")
        }
        let optimizer = AdamW(model.parameters, hyperparameters: state.configuration.optimizer)
        for (i, p) in optimizer.parameters.enumerated() {
            let m = try file.floats("optimizer.m.\(p.name)", shape: p.value.shape)
            let v = try file.floats("optimizer.v.\(p.name)", shape: p.value.shape)
            _ = optimizer.firstMoments[i].buffer.update(fromContentsOf: m)
            _ = optimizer.secondMoments[i].buffer.update(fromContentsOf: v)
        }
        optimizer.step = step
        return (model, optimizer, state)
    }
}
