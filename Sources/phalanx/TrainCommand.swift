import ArgumentParser
import Dispatch
import Foundation
import PhalanxData
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining
import Synchronization

/// Set by the SIGINT handler, read by the training loop after each step.
private let interruptRequested = Atomic<Bool>(false)

struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Train a hybrid language model on a text corpus.",
        discussion: """
        Without --data, trains on the default corpus (data/shakespeare.txt, fetched by \
        scripts/fetch-corpus). The text is tokenized once into a token file beside the run \
        (90% train, the last 10% of each file validation). Every --checkpoint-every steps, at the \
        end, and on Ctrl-C, the run folder receives checkpoint.safetensors (weights, optimizer, \
        data position: --resume continues bit for bit) and loss.svg.
        """)

    @Option(help: "Text files to train on (repeat for several). Default: data/shakespeare.txt.")
    var data: [String] = []

    @Option(name: .customLong("run"), help: "Run folder for checkpoints, the token file and the loss plot.")
    var runFolder = "runs/default"

    @Option(help: "Model preset: \(ModelConfiguration.presetNames.joined(separator: ", ")).")
    var preset = "phalanx-hybrid-small"

    @Option(help: "Override the preset's layer pattern (P Phalanx, S sliding-window attention, A attention), e.g. PPPA.")
    var pattern: String?

    @Option(help: "Override the preset's depth.") var depth: Int?
    @Option(help: "Sliding-window attention window.") var window: Int?
    @Option(help: "Scale on Phalanx gates, in (0, 1].") var gateScale: Float?

    @Option(help: "Tokenizer: byte (default) or bpe.") var tokenizer = "byte"
    @Option(help: "Vocabulary size of a trained BPE tokenizer.") var vocabulary = 512

    @Option(help: "Optimizer steps (the default takes about ten minutes on 2 cores).") var steps = 2000
    @Option(help: "Sequences per micro-batch.") var batchSize = 16
    @Option(help: "Context length in tokens.") var context = 256
    @Option(help: "Micro-batches per optimizer step (gradient accumulation).") var accumulation = 1
    @Option(help: "Peak learning rate.") var learningRate: Float = 2e-3
    @Option(help: "Warm-up steps.") var warmup = 100
    @Option(help: "Weight decay (matrices only unless --decay-all).") var weightDecay: Float = 0.1
    @Flag(help: "Apply weight decay to norms, biases and embeddings too.") var decayAll = false
    @Option(help: "Residual dropout on every block's mixer and MLP output, in [0, 1) (0: none).") var dropout: Float = 0
    @Option(help: "Global gradient-norm clip (0: off).") var clip: Float = 1
    @Option(help: "Steps between validation evaluations.") var evalEvery = 200
    @Option(help: "Validation batches per evaluation.") var evalBatches = 8
    @Option(help: "Steps between checkpoints.") var checkpointEvery = 500
    @Option(help: "Seed for initialisation and data order.") var seed: UInt64 = 1

    @Flag(help: "Continue the run in --run from its checkpoint (its configuration wins).")
    var resume = false

    @Option(help: "Characters of text to generate at the end (0: none).")
    var sample = 300

    func validate() throws {
        guard steps >= 1, batchSize >= 1, context >= 1, accumulation >= 1 else {
            throw ValidationError("--steps, --batch-size, --context and --accumulation must be at least 1.")
        }
        guard learningRate > 0 else { throw ValidationError("--learning-rate must be positive; got \(learningRate).") }
        guard ["byte", "bpe"].contains(tokenizer) else { throw ValidationError("--tokenizer must be byte or bpe; got \(tokenizer).") }
        guard tokenizer == "byte" || (257...65536).contains(vocabulary) else {
            throw ValidationError("--vocabulary for bpe must be in 257...65536; got \(vocabulary).")
        }
        guard sample >= 0 else { throw ValidationError("--sample must not be negative.") }
    }

    func run() throws {
        let folder = URL(fileURLWithPath: runFolder)
        let trainer: Trainer
        if resume {
            trainer = try resumeTrainer(folder)
        } else {
            trainer = try newTrainer(folder)
        }
        let model = trainer.model
        print("model: \(model.configuration.pattern) tiled over \(model.configuration.depth) blocks (\(model.mixerKinds.map { String($0.rawValue) }.joined())), dim \(model.configuration.dim), \(formatCount(model.parameterCount)) parameters")
        let c = trainer.state.configuration
        print("data: \(formatCount(trainer.data.train.count)) train / \(formatCount(trainer.data.validation.count)) validation tokens; \(c.steps) steps of \(formatCount(c.tokensPerStep)) tokens")
        print("run folder: \(folder.path) (Ctrl-C saves a checkpoint and stops)")

        signal(SIGINT, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        source.setEventHandler { interruptRequested.store(true, ordering: .relaxed) }
        source.resume()

        var lastLine = Date.distantPast
        let outcome = try trainer.run(
            stopRequested: { interruptRequested.load(ordering: .relaxed) },
            onStep: { r in
                guard Date().timeIntervalSince(lastLine) > 0.25 || r.step == r.totalSteps else { return }
                lastLine = Date()
                let line = String(format: "step %d/%d | loss %.4f | lr %.2e | |g| %.2f | %@ tok/s | %@ elapsed | ETA %@",
                                  r.step, r.totalSteps, r.loss, r.learningRate, r.gradientNorm,
                                  formatCount(Int(r.tokensPerSecond)), formatDuration(r.elapsed), formatDuration(r.remaining))
                print("\r" + line.padding(toLength: 110, withPad: " ", startingAt: 0), terminator: "")
                fflush(nil)
            },
            onEvaluation: { e in
                print(String(format: "\n  validation @%d: loss %.4f | ppl %.2f | %.4f bits/byte",
                             trainer.state.step, e.loss, e.perplexity, e.bitsPerByte))
            })
        print("")
        switch outcome {
        case .finished:
            print("finished: checkpoint \(trainer.checkpointURL.path), plot \(trainer.plotURL.path)")
        case .interrupted(let step):
            print("interrupted at step \(step): checkpoint written; continue with --resume --run \(runFolder)")
            return
        case .diverged(let step, let loss):
            throw ValidationError("the loss became \(loss) at step \(step); training stopped and the last good checkpoint (\(trainer.checkpointURL.path)) was kept. Try a lower --learning-rate.")
        }
        if sample > 0 {
            print("\nsample:")
            var sampler = TokenSampler(temperature: 0.8, topK: 40, topP: 1, seed: seed)
            let prompt = trainer.data.tokenizer.encode("\n")
            var decoder = StreamingDecoder(tokenizer: trainer.data.tokenizer)
            var produced = 0
            _ = model.generate(prompt: prompt, maxTokens: sample, sampler: &sampler) { token in
                let text = decoder.append(token)
                print(text, terminator: "")
                fflush(nil)
                produced += text.count
                return produced < sample
            }
            print("")
        }
    }

    private func newTrainer(_ folder: URL) throws -> Trainer {
        var configuration = try ModelConfiguration.preset(preset)
        if let pattern { configuration.pattern = pattern }
        if let depth { configuration.depth = depth }
        if let window { configuration.window = window }
        if let gateScale { configuration.gateScale = gateScale }
        let files = data.isEmpty ? ["data/shakespeare.txt"] : data
        for file in files where !FileManager.default.fileExists(atPath: file) {
            throw ValidationError(file == "data/shakespeare.txt"
                ? "the default corpus data/shakespeare.txt is missing: run scripts/fetch-corpus, or pass --data FILE"
                : "no such file: \(file)")
        }
        let tokenFile = folder.appendingPathComponent("tokens.bin")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let tokenizerValue: any Tokenizer
        if tokenizer == "bpe" {
            print("training a BPE tokenizer of \(vocabulary) tokens ...")
            let text = try files.map { try String(contentsOfFile: $0, encoding: .utf8) }.joined(separator: "\n")
            tokenizerValue = BPETokenizer.train(on: text, vocabularySize: vocabulary)
        } else {
            tokenizerValue = ByteTokenizer()
        }
        configuration.vocabulary = tokenizerValue.vocabularySize
        let summary = try CorpusPreparation.prepare(files: files.map { URL(fileURLWithPath: $0) }, tokenizer: tokenizerValue, output: tokenFile)
        _ = summary
        let tokens = try TokenFile(contentsOf: tokenFile)
        var training = TrainingConfiguration()
        training.steps = steps
        training.batchSize = batchSize
        training.contextLength = context
        training.accumulation = accumulation
        training.peakLearningRate = learningRate
        training.warmupSteps = warmup
        training.weightDecay = weightDecay
        training.decayAll = decayAll
        training.dropout = dropout > 0 ? dropout : nil
        training.gradientClip = clip
        training.evaluationInterval = evalEvery
        training.evaluationBatches = evalBatches
        training.checkpointInterval = checkpointEvery
        training.seed = seed
        let model = try LanguageModel(configuration, seed: seed)
        let optimizer = AdamW(model.parameters, hyperparameters: training.optimizer)
        let state = TrainingState(configuration: training,
                                  sampler: BatchSampler(batchSize: batchSize, contextLength: context, seed: seed &+ 1),
                                  dataPath: tokenFile.path, tokenizer: try tokenizerValue.serialized(), modelSeed: seed)
        return try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: folder)
    }

    private func resumeTrainer(_ folder: URL) throws -> Trainer {
        let url = folder.appendingPathComponent("checkpoint.safetensors")
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw ValidationError("--resume: no checkpoint at \(url.path)")
        }
        let (model, optimizer, state) = try TrainingCheckpoint.load(from: url)
        let tokens = try TokenFile(contentsOf: URL(fileURLWithPath: state.dataPath))
        print("resuming at step \(state.step) of \(state.configuration.steps)")
        return try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: folder)
    }
}

func formatCount(_ n: Int) -> String {
    switch n {
    case ..<10_000: return "\(n)"
    case ..<10_000_000: return String(format: "%.1fk", Double(n) / 1e3)
    default: return String(format: "%.2fM", Double(n) / 1e6)
    }
}

func formatDuration(_ seconds: Double) -> String {
    guard seconds.isFinite else { return "--:--" }
    let s = Int(seconds.rounded())
    return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%02d:%02d", s / 60, s % 60)
}
