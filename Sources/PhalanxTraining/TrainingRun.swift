import Checkpoint
import Foundation
import PhalanxData
import PhalanxModels
import PhalanxRuntime

/// Starting and resuming a run in a run folder (`checkpoint.safetensors`, `tokens.bin`,
/// `loss.svg`), with the guarantees the `train` command promises:
///
/// - a command that fails leaves the folder as it was: every option is checked, and the
///   trainer built, before anything in the folder is written or replaced (the corpus is
///   tokenized into a staging file that replaces `tokens.bin` only at the end);
/// - a folder holding a checkpoint is never started over unless `overwrite` is set;
/// - leftovers of writes killed mid-way (`.*.partial`) are removed first.
public enum TrainingRun {
    /// The tokenizer of a new run.
    public enum TokenizerChoice: Sendable, Equatable {
        /// Bytes (vocabulary 256).
        case byte
        /// Byte-pair encoding trained on the corpus, with this vocabulary size.
        case bpe(vocabulary: Int)

        /// The vocabulary sizes a BPE tokenizer may have.
        public static let bpeVocabularies = 257...65536

        /// The vocabulary the model is built for.
        public var vocabularySize: Int {
            switch self {
            case .byte: 256
            case .bpe(let vocabulary): vocabulary
            }
        }
    }

    /// Everything a new run is made of.
    public struct Plan: Sendable {
        /// The model; its vocabulary is replaced by the tokenizer's.
        public var model: ModelConfiguration
        /// How the model is trained (steps, batch shape, optimizer, intervals).
        public var training: TrainingConfiguration
        /// UTF-8 text files to train on.
        public var files: [URL]
        /// The tokenizer to use (trained on `files` for BPE).
        public var tokenizer: TokenizerChoice
        /// Seeds the model's initialisation (the data order is seeded with `seed + 1`).
        public var seed: UInt64
        /// Start over in a folder that already holds a checkpoint.
        public var overwrite: Bool

        /// A plan; see the properties.
        public init(model: ModelConfiguration, training: TrainingConfiguration, files: [URL],
                    tokenizer: TokenizerChoice = .byte, seed: UInt64, overwrite: Bool = false) {
            self.model = model
            self.training = training
            self.files = files
            self.tokenizer = tokenizer
            self.seed = seed
            self.overwrite = overwrite
        }

        /// Checks the plan against itself and this machine, touching no file: configuration
        /// ranges, memory for one step, the tokenizer's vocabulary, readable input files.
        public func validate() throws {
            if case .bpe(let vocabulary) = tokenizer, !TokenizerChoice.bpeVocabularies.contains(vocabulary) {
                throw TrainingError("a BPE vocabulary must be in \(TokenizerChoice.bpeVocabularies), got \(vocabulary)", field: "vocabulary")
            }
            var model = self.model
            model.vocabulary = tokenizer.vocabularySize
            do {
                try model.validate()
            } catch let error as ConfigurationError {
                throw TrainingError("model: \(error)", field: error.field)
            }
            try training.validate()
            try training.checkMemory(for: model)
            guard !files.isEmpty else { throw TrainingError("no text files to train on", field: "data") }
            for file in files where !FileManager.default.isReadableFile(atPath: file.path) {
                throw TrainingError("cannot read \(file.path)", field: "data")
            }
        }
    }

    /// The checkpoint file of a run folder.
    public static func checkpointURL(in folder: URL) -> URL { folder.appendingPathComponent("checkpoint.safetensors") }
    /// The token file of a run folder.
    public static func tokensURL(in folder: URL) -> URL { folder.appendingPathComponent("tokens.bin") }

    /// Starts a new run in `folder` (created if needed) and returns its trainer, ready to run.
    ///
    /// Refuses, changing nothing, when the plan is invalid (`Plan.validate`), when `folder`
    /// already holds a checkpoint and `plan.overwrite` is not set, or when the corpus is too
    /// small for the context. With `overwrite`, the old checkpoint and plot are removed once the
    /// new run is ready. `log` receives progress lines (tokenizer training).
    public static func start(_ plan: Plan, in folder: URL, log: (String) -> Void = { _ in }) throws -> Trainer {
        try plan.validate()
        let checkpoint = checkpointURL(in: folder)
        if FileManager.default.fileExists(atPath: checkpoint.path) && !plan.overwrite {
            throw TrainingError("\(folder.path) already holds a checkpoint; continue it (resume) or replace it (overwrite)", field: "overwrite")
        }
        let createdFolder = !FileManager.default.fileExists(atPath: folder.path)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        removeStalePartialFiles(in: folder)
        let staging = folder.appendingPathComponent(".tokens.bin.staged.partial")
        do {
            let tokenizer: any Tokenizer
            switch plan.tokenizer {
            case .byte:
                tokenizer = ByteTokenizer()
            case .bpe(let vocabulary):
                log("training a BPE tokenizer of \(vocabulary) tokens ...")
                let text = try plan.files.map { try String(contentsOf: $0, encoding: .utf8) }.joined(separator: "\n")
                tokenizer = BPETokenizer.train(on: text, vocabularySize: vocabulary)
            }
            try CorpusPreparation.prepare(files: plan.files, tokenizer: tokenizer, output: staging)
            var model = plan.model
            model.vocabulary = tokenizer.vocabularySize
            let languageModel = try LanguageModel(model, seed: plan.seed)
            let state = TrainingState(configuration: plan.training, samplerSeed: plan.seed &+ 1,
                                      dataPath: tokensURL(in: folder).path, tokenizer: try tokenizer.serialized(),
                                      modelSeed: plan.seed)
            let trainer = try Trainer(model: languageModel,
                                      optimizer: AdamW(languageModel.parameters, hyperparameters: plan.training.optimizer),
                                      state: state, data: try TokenFile(contentsOf: staging), runFolder: folder)
            if plan.overwrite {
                for old in [checkpoint, trainer.plotURL] where FileManager.default.fileExists(atPath: old.path) {
                    try FileManager.default.removeItem(at: old)
                }
            }
            guard rename(staging.path, tokensURL(in: folder).path) == 0 else {
                throw TrainingError("\(folder.path): could not move the token file into place (errno \(errno))")
            }
            return trainer
        } catch {
            try? FileManager.default.removeItem(at: staging)
            if createdFolder { try? FileManager.default.removeItem(at: folder) }
            throw error
        }
    }

    /// Resumes the run in `folder` from its checkpoint (whose configuration wins).
    ///
    /// - Parameter steps: a new total step count: larger than the run's extends it (the
    ///   learning-rate schedule is stretched to the new length from here on), equal changes
    ///   nothing, below the checkpoint's step is refused. Nil keeps the run's.
    public static func resume(in folder: URL, steps: Int? = nil, log: (String) -> Void = { _ in }) throws -> Trainer {
        let url = checkpointURL(in: folder)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw TrainingError("no checkpoint to resume at \(url.path)", field: "resume")
        }
        removeStalePartialFiles(in: folder)
        var (model, optimizer, state) = try TrainingCheckpoint.load(from: url)
        if let steps, steps != state.configuration.steps {
            guard steps >= state.step else {
                throw TrainingError("steps \(steps) is below the checkpoint's step \(state.step); give at least \(state.step)", field: "steps")
            }
            log("extending the run from \(state.configuration.steps) to \(steps) steps (the learning-rate schedule stretches to the new length)")
            state.configuration.steps = steps
        }
        let tokens = try TokenFile(contentsOf: URL(fileURLWithPath: state.dataPath))
        log(state.step == state.configuration.steps
            ? "the run has already finished all \(state.step) steps; give a larger step count to extend it"
            : "resuming at step \(state.step) of \(state.configuration.steps)")
        return try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: folder,
                           checkpointStep: state.step)
    }
}
