import Checkpoint
import Foundation
import PhalanxData
import PhalanxDistributed
import PhalanxLayers
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
///
/// Data-parallel runs: every rank calls `start` (or `resume`) with the same arguments and its
/// communicator. Rank 0 alone touches the folder: it prepares the token file and then tells the
/// others, which read it and build the same model; rank 0's errors reach every rank.
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
        /// UTF-8 text files held out whole for validation (documents never trained on); empty:
        /// the last 10% of each of `files` (see `CorpusPreparation.prepare`).
        public var validationFiles: [URL]
        /// The tokenizer to use (trained on `files` for BPE).
        public var tokenizer: TokenizerChoice
        /// Seeds the model's initialisation (the data order is seeded with `seed + 1`).
        public var seed: UInt64
        /// Start over in a folder that already holds a checkpoint.
        public var overwrite: Bool
        /// A trained run's checkpoint to start from (a retrofit): every parameter of the new
        /// model with the same name and shape as one there takes its trained value, the rest
        /// their seeded initialisation, and the checkpoint's tokenizer replaces `tokenizer`.
        /// Nil: a model trained from scratch.
        public var startingPoint: URL?
        /// With a starting point: steps of layer-wise distillation (`Retrofit.distill`) of the new
        /// Phalanx mixers before training; 0: none.
        public var distillationSteps = 0

        /// A plan; see the properties.
        public init(model: ModelConfiguration, training: TrainingConfiguration, files: [URL], validationFiles: [URL] = [],
                    tokenizer: TokenizerChoice = .byte, seed: UInt64, overwrite: Bool = false, startingPoint: URL? = nil) {
            self.model = model
            self.training = training
            self.files = files
            self.validationFiles = validationFiles
            self.tokenizer = tokenizer
            self.seed = seed
            self.overwrite = overwrite
            self.startingPoint = startingPoint
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
            for file in validationFiles where !FileManager.default.isReadableFile(atPath: file.path) {
                throw TrainingError("cannot read \(file.path)", field: "validationData")
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
    ///
    /// - Parameter communicator: this process's rank of a data-parallel run (see the type's
    ///   summary); nil for a single process.
    public static func start(_ plan: Plan, in folder: URL, placement: Placement = .cpu, communicator: (any Communicator)? = nil,
                             log: (String) -> Void = { _ in }) throws -> Trainer {
        try plan.validate()
        let checkpoint = checkpointURL(in: folder)
        let staging = folder.appendingPathComponent(".tokens.bin.staged.partial")
        if let communicator, communicator.rank != 0 {
            try communicator.barrier(timeout: preparationTimeout)
            let word = String(decoding: try communicator.broadcast([]), as: UTF8.self)
            guard word == tokensReady else { throw TrainingError("rank 0 could not start the run: \(word)") }
            return try makeTrainer(plan, data: try TokenFile(contentsOf: staging), folder: folder, placement: placement,
                                   communicator: communicator, log: log)
        }
        // Tells the other ranks, once, whether the token file is ready (or rank 0's error).
        var announced = communicator == nil
        func announce(_ word: String) throws {
            guard !announced, let communicator else { return }
            announced = true
            try communicator.barrier(timeout: preparationTimeout)
            _ = try communicator.broadcast(Array(word.utf8))
        }
        if FileManager.default.fileExists(atPath: checkpoint.path) && !plan.overwrite {
            let error = TrainingError("\(folder.path) already holds a checkpoint; continue it (resume) or replace it (overwrite)", field: "overwrite")
            try? announce(error.description)
            throw error
        }
        let createdFolder = !FileManager.default.fileExists(atPath: folder.path)
        do {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        } catch {
            try? announce("\(error)")
            throw error
        }
        removeStalePartialFiles(in: folder)
        do {
            let source = try plan.startingPoint.map { try TrainingCheckpoint.load(from: $0) }
            let tokenizer: any Tokenizer
            switch (source, plan.tokenizer) {
            case (let source?, _):
                tokenizer = try loadTokenizer(from: source.state.tokenizer, origin: plan.startingPoint!.path)
            case (nil, .byte):
                tokenizer = ByteTokenizer()
            case (nil, .bpe(let vocabulary)):
                log("training a BPE tokenizer of \(vocabulary) tokens ...")
                let text = try plan.files.map { try String(contentsOf: $0, encoding: .utf8) }.joined(separator: "\n")
                tokenizer = BPETokenizer.train(on: text, vocabularySize: vocabulary)
            }
            try CorpusPreparation.prepare(files: plan.files, validationFiles: plan.validationFiles, tokenizer: tokenizer, output: staging)
            try announce(tokensReady)
            let trainer = try makeTrainer(plan, data: try TokenFile(contentsOf: staging), source: source, folder: folder,
                                          placement: placement, communicator: communicator, log: log)
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
            try? announce("\(error)")
            try? FileManager.default.removeItem(at: staging)
            if createdFolder { try? FileManager.default.removeItem(at: folder) }
            throw error
        }
    }

    /// What rank 0 broadcasts when the token file is ready for the other ranks.
    private static let tokensReady = "tokens ready"
    /// Seconds the other ranks wait for rank 0 to prepare the token file (training a BPE
    /// tokenizer on a large corpus takes minutes).
    public static let preparationTimeout = 3600.0

    /// The model of `plan` (from its seed, then the starting point's matching weights) and its
    /// trainer on `data`, at step 0.
    private static func makeTrainer(_ plan: Plan, data: TokenFile, source: (model: LanguageModel, optimizer: AdamW, state: TrainingState)? = nil, folder: URL,
                                    placement: Placement, communicator: (any Communicator)?, log: (String) -> Void) throws -> Trainer {
        let source = try source ?? plan.startingPoint.map { try TrainingCheckpoint.load(from: $0) }
        var model = plan.model
        model.vocabulary = data.tokenizer.vocabularySize
        let languageModel = try LanguageModel(model, seed: plan.seed)
        if let source {
            let (copied, initialised) = languageModel.copyMatchingParameters(from: source.model)
            log("starting from \(plan.startingPoint!.path) (step \(source.state.step)): \(copied.count) tensors keep their "
                + "trained values, \(initialised.count) start from the seeded initialisation"
                + (initialised.isEmpty ? "" : " (\(Retrofit.summary(initialised)))"))
            if plan.distillationSteps > 0 {
                Retrofit.distill(languageModel, from: source.model, data: data, steps: plan.distillationSteps,
                                 training: plan.training, seed: plan.seed, log: log)
            }
        }
        let state = TrainingState(configuration: plan.training, samplerSeed: plan.seed &+ 1,
                                  dataPath: tokensURL(in: folder).path, tokenizer: try data.tokenizer.serialized(),
                                  modelSeed: plan.seed)
        return try Trainer(model: languageModel, optimizer: AdamW(languageModel.parameters, hyperparameters: plan.training.optimizer),
                           state: state, data: data, runFolder: folder, placement: placement,
                           parallel: try communicator.map { try DataParallel(communicator: $0, parameters: languageModel.parameters) })
    }

    /// Resumes the run in `folder` from its checkpoint (whose configuration wins).
    ///
    /// - Parameters:
    ///   - steps: a new total step count: larger than the run's extends it (the learning-rate
    ///     schedule is stretched to the new length from here on), equal changes nothing, below the
    ///     checkpoint's step is refused. Nil keeps the run's.
    ///   - communicator: this process's rank of a data-parallel run; every rank reads the
    ///     checkpoint (the folder must be visible to all). With as many ranks as the run that wrote
    ///     it, the run continues exactly; with another number it continues from the same global
    ///     step with the same global batch and data order, and `log` says so.
    public static func resume(in folder: URL, steps: Int? = nil, placement: Placement = .cpu, communicator: (any Communicator)? = nil,
                              log: (String) -> Void = { _ in }) throws -> Trainer {
        let url = checkpointURL(in: folder)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw TrainingError("no checkpoint to resume at \(url.path)", field: "resume")
        }
        if (communicator?.rank ?? 0) == 0 { removeStalePartialFiles(in: folder) }
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
        let ranks = communicator?.worldSize ?? 1, before = state.worldSize ?? 1
        if ranks != before {
            let batch = state.configuration.batchSize
            log("the checkpoint was written by \(before) rank\(before == 1 ? "" : "s"); continuing on \(ranks) from global step "
                + "\(state.step) with the same global batch (\(batch) sequences, \(batch / before) per rank before, \(batch / ranks) now) "
                + "and data order: the same computation, with losses that differ from an uninterrupted run in rounding only")
        }
        return try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: folder,
                           checkpointStep: state.step, placement: placement,
                           parallel: try communicator.map { try DataParallel(communicator: $0, parameters: model.parameters) })
    }
}

/// Turning a trained model into one of another layer pattern (the paper's retrofit: its
/// window-attention layers replaced by Phalanx layers, then fine-tuned).
public enum Retrofit {
    /// The plan of a retrofit run: the trained checkpoint's model configuration with `pattern`
    /// (and `depth`, when given) in place of its own, trained by `training` on `files` (validated on
    /// `validationFiles`, as in `TrainingRun.Plan`), starting
    /// from the checkpoint's weights wherever they still fit (`Plan.startingPoint`).
    ///
    /// - Throws: `SafetensorsError` for an unreadable checkpoint; `TrainingError` (field
    ///   `pattern`) when the new pattern equals the old one.
    public static func plan(from checkpoint: URL, pattern: String, depth: Int? = nil, training: TrainingConfiguration,
                            files: [URL], validationFiles: [URL] = [], seed: UInt64, overwrite: Bool = false) throws -> TrainingRun.Plan {
        let (source, _, _) = try TrainingCheckpoint.load(from: checkpoint)
        var model = source.configuration
        guard pattern != model.pattern || (depth ?? model.depth) != model.depth else {
            throw TrainingError("the checkpoint's pattern is already \(pattern): a retrofit changes the layer pattern", field: "pattern")
        }
        model.pattern = pattern
        if let depth { model.depth = depth }
        let tokenizer: TrainingRun.TokenizerChoice = model.vocabulary == 256 ? .byte : .bpe(vocabulary: model.vocabulary)
        return TrainingRun.Plan(model: model, training: training, files: files, validationFiles: validationFiles,
                                tokenizer: tokenizer, seed: seed, overwrite: overwrite, startingPoint: checkpoint)
    }

    /// Layer-wise distillation before a retrofit's training: for `steps` batches of `training`'s
    /// shape from `data` (a sampler seeded with `seed + 2`), the Phalanx mixers that replaced
    /// `teacher`'s attention mixers learn to reproduce them (`LanguageModel.distillMixers`) with
    /// AdamW at `training`'s peak learning rate (warmed up over the first tenth) and gradient
    /// clip; every other weight stays as it is.
    public static func distill(_ model: LanguageModel, from teacher: LanguageModel, data: TokenFile, steps: Int,
                               training: TrainingConfiguration, seed: UInt64, log: (String) -> Void) {
        let replaced = zip(teacher.mixerKinds, model.mixerKinds).enumerated().filter { $0.element.0 != .phalanx && $0.element.1 == .phalanx }.map(\.offset)
        guard !replaced.isEmpty else { return log("distillation: no attention mixer was replaced by a Phalanx mixer; nothing to distil") }
        let optimizer = AdamW(replaced.flatMap { model.mixerParameters(block: $0) }, hyperparameters: training.optimizer)
        var sampler = BatchSampler(batchSize: training.batchSize, contextLength: training.contextLength, generator: SeededGenerator(seed: seed &+ 2))
        let warmup = max(1, steps / 10)
        for step in 0..<steps {
            model.zeroGradients()
            let batch = sampler.next(from: data.train)
            let loss = model.distillMixers(from: teacher, blocks: replaced, tokens: batch.inputs, batch: batch.batchSize, length: batch.contextLength)
            _ = optimizer.clipGradients(maxNorm: training.gradientClip)
            optimizer.update(learningRate: training.peakLearningRate * Float(min(step + 1, warmup)) / Float(warmup))
            if step == 0 || (step + 1) % max(1, steps / 5) == 0 || step == steps - 1 {
                log(String(format: "distillation step %d/%d: mean squared difference to the replaced mixers %.5f", step + 1, steps, loss))
            }
        }
        model.zeroGradients()
    }

    /// `names` grouped by block: `layers.0.mixer (7 tensors), ...`.
    static func summary(_ names: [String]) -> String {
        var groups: [(String, Int)] = []
        for name in names {
            let parts = name.split(separator: ".")
            let group = parts.count >= 3 && parts[0] == "layers" ? parts.prefix(3).joined(separator: ".") : name
            if groups.last?.0 == group { groups[groups.count - 1].1 += 1 } else { groups.append((group, 1)) }
        }
        return groups.map { "\($0.0) (\($0.1) tensor\($0.1 == 1 ? "" : "s"))" }.joined(separator: ", ")
    }
}
