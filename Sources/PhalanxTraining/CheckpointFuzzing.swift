import Checkpoint
import Foundation
import PhalanxData
import PhalanxModels

/// Fuzzing of the checkpoint loader: hostile variants (`SafetensorsMutator`) of a real training
/// checkpoint of a small model go through everything a command does with a file it is given:
/// read, validate, build the model and optimizer, read the tokenizer. Each must
/// either work or throw; a crash ends the run, and with it the test or command that started it.
public enum CheckpointFuzzing {
    /// A checkpoint of a small hybrid model (one block of each mixer kind, byte vocabulary)
    /// after two training steps, so that every tensor, moment and state field is populated.
    public static func sampleCheckpoint() throws -> Data {
        let configuration = ModelConfiguration(vocabulary: 256, dim: 16, depth: 3, pattern: "PSA", attentionHeads: 2,
                                               attentionHeadDim: 8, window: 4, mlpHidden: 16, phalanxKVHeads: 1)
        let model = try LanguageModel(configuration, seed: 3)
        var training = TrainingConfiguration()
        training.steps = 2
        training.batchSize = 2
        training.contextLength = 8
        training.warmupSteps = 1
        training.evaluationInterval = 0
        training.checkpointInterval = 0
        let text = (0..<200).map { i in Int32(i * 7 % 256) }
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-fuzz-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: folder) }
        let tokens = folder.appendingPathComponent("tokens.bin")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try TokenFile.write(train: text, validation: Array(text.prefix(40)), tokenizer: ByteTokenizer(), to: tokens)
        let state = TrainingState(configuration: training, samplerSeed: 4, dataPath: tokens.path,
                                  tokenizer: try ByteTokenizer().serialized(), modelSeed: 3)
        let trainer = try Trainer(model: model, optimizer: AdamW(model.parameters, hyperparameters: training.optimizer),
                                  state: state, data: try TokenFile(contentsOf: tokens), runFolder: folder)
        _ = try trainer.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        return try Data(contentsOf: trainer.checkpointURL)
    }

    /// What `eval`, `generate`, `inspect` and `train --resume` do with a checkpoint image before
    /// their own work: read and check it, build model and optimizer, read the tokenizer.
    public static func load(_ data: Data) throws {
        let file = try SafetensorsFile(data: data, origin: "fuzzed.safetensors")
        let state = try TrainingCheckpoint.load(from: file, origin: "fuzzed.safetensors").state
        _ = try loadTokenizer(from: state.tokenizer, origin: "fuzzed.safetensors")
    }

    /// Runs `cases` hostile variants of `sampleCheckpoint()` drawn from `seed` through `load`.
    public static func run(cases: Int, seed: UInt64, progress: (FuzzReport) -> Void = { _ in }) throws -> FuzzReport {
        try FuzzReport.run(original: try sampleCheckpoint(), cases: cases, seed: seed, load: load, progress: progress)
    }
}
