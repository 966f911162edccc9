import ArgumentParser
import Checkpoint
import Foundation
import PhalanxCUDA
import PhalanxData
import PhalanxDistributed
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining
import Synchronization

/// Set by the SIGINT/SIGTERM handler; read by the preparation watcher, then by the loop after each step.
private let interruptRequested = Atomic<Bool>(false)
/// Whether the training loop runs (before it, an interrupt cleans up and exits at once).
private let trainingStarted = Atomic<Bool>(false)

/// The library's defaults: every flag's default is the value the library would use.
private let defaults = TrainingConfiguration()

struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Train a hybrid language model on a text corpus.",
        discussion: """
        Without --data, trains on the default corpus (data/shakespeare.txt, fetched by \
        scripts/fetch-corpus). The text is tokenized once into a token file beside the run \
        (90% train, the last 10% of each file validation; with --validation-data, all of --data trains \
        and those files, held out whole, validate). Every --checkpoint-every steps, at the \
        end, and on Ctrl-C, the run folder receives checkpoint.safetensors (weights, optimizer, \
        data position: --resume continues bit for bit) and loss.svg. Every option is checked \
        before the run folder is touched; a folder holding a checkpoint is only continued \
        (--resume) or replaced (--overwrite).

        Several GPUs (data parallelism, NCCL): --gpus N on one host starts one worker per GPU; \
        under mpirun, srun or torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, \
        MASTER_PORT) each process is one rank. --batch-size is the global batch, split evenly \
        over the GPUs; the run is the one a single GPU would train. See docs/MULTI-GPU.md.
        """)

    @Option(help: "Text files to train on (repeat for several). Default: data/shakespeare.txt.")
    var data: [String] = []

    @Option(help: "Text files held out whole for validation (repeat for several): documents never trained on. Default: the last 10% of each --data file.")
    var validationData: [String] = []

    @Option(name: .customLong("run"), help: "Run folder for checkpoints, the token file and the loss plot.")
    var runFolder = "runs/default"

    @Option(help: "Model preset: \(ModelConfiguration.presetNames.joined(separator: ", ")) (default phalanx-hybrid-small).")
    var preset: String?

    @Option(help: "Retrofit: start from this trained checkpoint's model and weights with the new --pattern (every tensor that still fits keeps its trained value; new layers start from the seeded initialisation), then train.")
    var from: String?

    @Option(help: "With --from: steps of layer-wise distillation first, in which only the new Phalanx mixers learn to reproduce the attention mixers they replace (0: none).")
    var distillSteps = 0

    @Option(help: "Override the preset's layer pattern (P Phalanx, S sliding-window attention, A attention), e.g. PPPA.")
    var pattern: String?

    @Option(help: "Override the preset's depth.") var depth: Int?
    @Option(help: "Sliding-window attention window, in 1...\(ModelConfiguration.maximumWindow).") var window: Int?
    @Option(help: "Scale on Phalanx gates, in (0, 1].") var gateScale: Float?

    @Option(help: "Tokenizer: byte (default) or bpe.") var tokenizer = "byte"
    @Option(help: "Vocabulary size of a trained BPE tokenizer, in \(TrainingRun.TokenizerChoice.bpeVocabularies).") var vocabulary = 512

    @Option(help: "Optimizer steps (default \(defaults.steps)). With --resume, a larger count extends the run.")
    var steps: Int?
    @Option(help: "Instead of --steps: as many steps as fit in this many minutes of training, measured on this machine before the run starts.")
    var minutes: Double?
    @Option(help: "Sequences per micro-batch.") var batchSize = defaults.batchSize
    @Option(help: "Context length in tokens.") var context = defaults.contextLength
    @Option(help: "Micro-batches per optimizer step (gradient accumulation).") var accumulation = defaults.accumulation
    @Option(help: "Peak learning rate.") var learningRate = defaults.peakLearningRate
    @Option(help: "Warm-up steps.") var warmup = defaults.warmupSteps
    @Option(help: "Weight decay (matrices only unless --decay-all).") var weightDecay = defaults.weightDecay
    @Flag(help: "Apply weight decay to norms, biases and embeddings too.") var decayAll = false
    @Option(help: "Residual dropout on every block's mixer and MLP output, in [0, 1) (0: none).") var dropout = defaults.dropoutRate
    @Option(help: "Global gradient-norm clip (0: off).") var clip = defaults.gradientClip
    @Option(help: "Steps between validation evaluations (0: only at the end).") var evalEvery = defaults.evaluationInterval
    @Option(help: "Validation batches per evaluation.") var evalBatches = defaults.evaluationBatches
    @Option(help: "Steps between checkpoints (0: only at the end and on Ctrl-C).") var checkpointEvery = defaults.checkpointInterval
    @Option(help: "Seed for initialisation and data order.") var seed: UInt64 = 1
    @OptionGroup var device: DeviceOptions
    @Option(help: "With --device cuda: train on this many GPUs of this host, one worker process each (data parallelism through NCCL; --batch-size is split over them).")
    var gpus: Int?
    @Option(help: "Data-parallel runs: seconds a rank waits at a collective (and at the start for the others) before it declares a rank dead and stops. Waits for rank 0 to prepare the data or write a checkpoint are longer.")
    var collectiveTimeout = 30.0

    @Flag(help: "Continue the run in --run from its checkpoint (its configuration wins; --steps may extend it).")
    var resume = false

    @Flag(help: "Start a new run in a --run folder that already holds a checkpoint, replacing it.")
    var overwrite = false

    @Option(help: "Characters of text to generate at the end (0: none).")
    var sample = 300

    /// The flag of each library field, for error messages.
    private static let flags = [
        "steps": "--steps", "batchSize": "--batch-size", "contextLength": "--context", "accumulation": "--accumulation",
        "peakLearningRate": "--learning-rate", "warmupSteps": "--warmup", "weightDecay": "--weight-decay",
        "gradientClip": "--clip", "evaluationInterval": "--eval-every", "evaluationBatches": "--eval-batches",
        "checkpointInterval": "--checkpoint-every", "dropout": "--dropout", "vocabulary": "--vocabulary", "data": "--data",
        "validationData": "--validation-data", "pattern": "--pattern", "depth": "--depth", "window": "--window", "gateScale": "--gate-scale",
        "overwrite": "--resume or --overwrite", "resume": "--resume", "minutes": "--minutes",
    ]

    /// `error` with the flag of the field it names.
    private func flagError(_ error: TrainingError) -> ValidationError {
        let flag = error.field.flatMap { Self.flags[$0] } ?? "--preset"
        return ValidationError("\(flag): \(error.description)")
    }

    /// The new run the flags describe.
    private func plan() throws -> TrainingRun.Plan {
        if let from { return try retrofitPlan(from) }
        var model = try ModelConfiguration.preset(preset ?? "phalanx-hybrid-small")
        if let pattern { model.pattern = pattern }
        if let depth { model.depth = depth }
        if let window { model.window = window }
        if let gateScale { model.gateScale = gateScale }
        let training = trainingConfiguration()
        let files = try corpusFiles()
        return TrainingRun.Plan(model: model, training: training, files: files, validationFiles: try validationFiles(),
                                tokenizer: tokenizer == "bpe" ? .bpe(vocabulary: vocabulary) : .byte, seed: seed,
                                overwrite: overwrite)
    }

    /// The training settings the flags give.
    private func trainingConfiguration() -> TrainingConfiguration {
        var training = TrainingConfiguration()
        training.steps = steps ?? defaults.steps
        training.batchSize = batchSize
        training.contextLength = context
        training.accumulation = accumulation
        training.peakLearningRate = learningRate
        training.warmupSteps = warmup
        training.weightDecay = weightDecay
        training.decayAll = decayAll
        training.dropout = dropout
        training.gradientClip = clip
        training.evaluationInterval = evalEvery
        training.evaluationBatches = evalBatches
        training.checkpointInterval = checkpointEvery
        training.seed = seed
        return training
    }

    /// The corpus files, checked to exist.
    private func corpusFiles() throws -> [URL] {
        let files = data.isEmpty ? ["data/shakespeare.txt"] : data
        for file in files where !FileManager.default.fileExists(atPath: file) {
            throw ValidationError(file == "data/shakespeare.txt"
                ? "the default corpus data/shakespeare.txt is missing: run scripts/fetch-corpus, or pass --data FILE"
                : "--data: no such file: \(file)")
        }
        return files.map { URL(fileURLWithPath: $0) }
    }

    /// The --validation-data files, checked to exist.
    private func validationFiles() throws -> [URL] {
        for file in validationData where !FileManager.default.fileExists(atPath: file) {
            throw ValidationError("--validation-data: no such file: \(file)")
        }
        return validationData.map { URL(fileURLWithPath: $0) }
    }

    /// The retrofit run of `--from`: the checkpoint's model with the new --pattern.
    private func retrofitPlan(_ checkpoint: String) throws -> TrainingRun.Plan {
        guard let pattern else { throw ValidationError("--from needs the new layer --pattern (for example PPPA).") }
        guard preset == nil, window == nil, gateScale == nil else {
            throw ValidationError("--from takes the model from the checkpoint: --preset, --window and --gate-scale do not apply.")
        }
        do {
            var plan = try Retrofit.plan(from: URL(fileURLWithPath: checkpoint), pattern: pattern, depth: depth,
                                         training: trainingConfiguration(), files: try corpusFiles(),
                                         validationFiles: try validationFiles(), seed: seed, overwrite: overwrite)
            plan.distillationSteps = distillSteps
            return plan
        } catch let error as SafetensorsError {
            throw ValidationError("--from: \(error)")
        }
    }

    /// The plan, its step count measured from --minutes when given.
    private func sizedPlan() throws -> TrainingRun.Plan {
        var plan = try plan()
        guard let minutes else { return plan }
        print("measuring a training step on this machine for --minutes \(minutes) ...")
        let (steps, perStep) = try plan.stepsFitting(seconds: minutes * 60)
        plan.training.steps = steps
        print(String(format: "sized to %d steps (%.3f s per step here; a tenth of the time is left to evaluations)", steps, perStep))
        return plan
    }

    func validate() throws {
        guard ["byte", "bpe"].contains(tokenizer) else { throw ValidationError("--tokenizer must be byte or bpe; got \(tokenizer).") }
        guard sample >= 0 else { throw ValidationError("--sample must be at least 0; got \(sample).") }
        guard distillSteps >= 0 && distillSteps <= 1_000_000 else { throw ValidationError("--distill-steps must be in 0...1000000; got \(distillSteps).") }
        guard distillSteps == 0 || from != nil else { throw ValidationError("--distill-steps distils a retrofit: give --from too.") }
        if let gpus {
            guard gpus >= 1 else { throw ValidationError("--gpus must be at least 1; got \(gpus).") }
            guard gpus == 1 || device.onGPU else { throw ValidationError("--gpus \(gpus) trains on GPUs: add --device cuda.") }
            guard gpus == 1 || minutes == nil else {
                throw ValidationError("--minutes measures one process's step; with --gpus give --steps.")
            }
            guard resume || batchSize % gpus == 0 else {
                throw ValidationError("--batch-size \(batchSize) is the global batch, split evenly over the GPUs: give a multiple of --gpus \(gpus) (for example \(max(1, batchSize / gpus) * gpus)).")
            }
        }
        guard collectiveTimeout > 0 else { throw ValidationError("--collective-timeout must be positive; got \(collectiveTimeout).") }
        guard !(resume && overwrite) else { throw ValidationError("--resume continues a run and --overwrite replaces it: give one.") }
        if let minutes {
            guard steps == nil else { throw ValidationError("--minutes sizes the run by time and --steps by count: give one.") }
            guard !resume else { throw ValidationError("--minutes sizes a new run; a resumed run keeps its steps (extend it with --steps).") }
            guard minutes > 0 && minutes <= 100_000 else { throw ValidationError("--minutes must be in (0, 100000]; got \(minutes).") }
        }
        if resume {
            if let steps, steps < 1 { throw ValidationError("--steps must be at least 1; got \(steps).") }
            return
        }
        do {
            try plan().validate()
        } catch let error as TrainingError {
            throw flagError(error)
        } catch let error as ConfigurationError {
            throw ValidationError("--preset: \(error)")
        }
    }

    /// `--gpus N` on one host: this process starts N workers (itself, with the same arguments and
    /// the variables of ranks 0 ..< N) and waits for them; it forwards a stop request to them.
    private func launchWorkers(_ gpus: Int) throws {
        let available: Int
        do { available = try CUDADriver.shared.get().deviceCount() } catch { throw ValidationError("--gpus \(gpus): \(error)") }
        guard gpus <= available else { throw ValidationError("--gpus \(gpus): this machine has \(available) GPU\(available == 1 ? "" : "s").") }
        catchStopSignals()
        let executable = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let port = try WorkerLaunch.freePort()
        print("starting \(gpus) workers, one per GPU (rendezvous on 127.0.0.1:\(port)); rank 0 reports")
        do {
            try WorkerLaunch.run(executable, arguments: Array(CommandLine.arguments.dropFirst()),
                                 environments: WorkerLaunch.environments(gpus: gpus, port: port, base: ProcessInfo.processInfo.environment),
                                 stopRequested: { interruptRequested.load(ordering: .relaxed) })
        } catch let failure as WorkerFailure {
            FileHandle.standardError.write(Data("\nError: \(failure)\n".utf8))
            throw ExitCode.failure
        }
    }

    func run() throws {
        let launch: LaunchEnvironment
        do { launch = try LaunchEnvironment.detect(ProcessInfo.processInfo.environment) } catch { throw ValidationError("\(error)") }
        if launch.worldSize == 1, let gpus, gpus > 1 { return try launchWorkers(gpus) }
        guard launch.worldSize > 1 else { return try train(launch) }
        guard device.onGPU else { throw ValidationError("\(launch): data-parallel training runs on GPUs; add --device cuda.") }
        if let gpus, gpus != launch.worldSize { throw ValidationError("--gpus \(gpus) differs from the launcher's world (\(launch)).") }
        guard minutes == nil else { throw ValidationError("--minutes measures one process's step; with several ranks give --steps.") }
        do {
            try train(launch)
        } catch {
            // A rank that failed may leave NCCL's work unfinished on the GPU, which an orderly exit
            // could wait for without end: say what happened, then leave at once.
            let message = "\(error)"
            let named = message.hasPrefix("rank ") ? message : "rank \(launch.rank) of \(launch.worldSize): \(message)"
            FileHandle.standardError.write(Data("\nError: \(named)\n".utf8))
            _exit(1)
        }
    }

    /// The run, as the single process or as one rank of `launch`.
    private func train(_ launch: LaunchEnvironment) throws {
        let lead = launch.rank == 0
        // Rank 0 speaks for the run; the others only report their errors.
        let say: @Sendable (String) -> Void = { if lead { print($0) } }
        let folder = URL(fileURLWithPath: runFolder)
        // While the run is prepared, a watcher removes half-written files and exits on a stop
        // signal; once training runs, the loop saves a checkpoint and stops.
        catchStopSignals()
        Thread.detachNewThread {
            while !trainingStarted.load(ordering: .relaxed) {
                if interruptRequested.load(ordering: .relaxed) {
                    if lead { removeStalePartialFiles(in: folder) }
                    say("\ninterrupted before training started; half-written files removed")
                    Foundation.exit(130)
                }
                usleep(20_000)
            }
        }

        let trainer: Trainer
        do {
            let placement = try device.placement(ordinal: launch.deviceOrdinal)
            let communicator = launch.worldSize > 1
                ? try NCCLCommunicator(launch: launch, device: placement.device.cuda!, timeout: collectiveTimeout) : nil
            if launch.worldSize > 1 { say("data parallel: \(launch.worldSize) ranks over NCCL (\(launch))") }
            trainer = resume ? try TrainingRun.resume(in: folder, steps: steps, placement: placement, communicator: communicator, log: say)
                             : try TrainingRun.start(try sizedPlan(), in: folder, placement: placement, communicator: communicator, log: say)
        } catch let error as TrainingError {
            throw flagError(error)
        }
        let model = trainer.model
        say("model: \(model.configuration.pattern) tiled over \(model.configuration.depth) blocks (\(model.mixerKinds.map { String($0.rawValue) }.joined())), dim \(model.configuration.dim), \(formatCount(model.parameterCount)) parameters")
        let c = trainer.state.configuration
        say("data: \(formatCount(trainer.data.train.count)) train / \(formatCount(trainer.data.validation.count)) validation tokens; \(c.steps) steps of \(formatCount(c.tokensPerStep)) tokens")
        say("run folder: \(folder.path) (Ctrl-C saves a checkpoint and stops); training on \(trainer.placement)"
            + (launch.worldSize > 1 ? " and \(launch.worldSize - 1) more GPU\(launch.worldSize == 2 ? "" : "s"), \(c.batchSize / launch.worldSize) sequences each" : ""))

        trainingStarted.store(true, ordering: .relaxed)
        var lastLine = Date.distantPast
        let outcome = try trainer.run(
            stopRequested: { interruptRequested.load(ordering: .relaxed) },
            onStep: { r in
                guard lead, Date().timeIntervalSince(lastLine) > 0.25 || r.step == r.totalSteps else { return }
                lastLine = Date()
                let line = String(format: "step %d/%d | loss %.4f | lr %.2e | |g| %.2f | %@ tok/s%@ | %@ elapsed | ETA %@",
                                  r.step, r.totalSteps, r.loss, r.learningRate, r.gradientNorm,
                                  formatCount(Int(r.tokensPerSecond)), r.utilisation.map { String(format: " (MFU %.1f%%)", 100 * $0) } ?? "",
                                  formatDuration(r.elapsed), formatDuration(r.remaining))
                print("\r" + line.padding(toLength: max(line.count, 110), withPad: " ", startingAt: 0), terminator: "")
                fflush(nil)
            },
            onEvaluation: { e in
                say(String(format: "\n  validation @%d: loss %.4f | ppl %.2f | %.4f bits/byte",
                             trainer.state.step, e.loss, e.perplexity, e.bitsPerByte))
            })
        say("")
        switch outcome {
        case .finished:
            say("finished: checkpoint \(trainer.checkpointURL.path), plot \(trainer.plotURL.path)")
        case .interrupted(let step):
            say("interrupted at step \(step): checkpoint written; continue with --resume --run \(runFolder)")
            return
        case .diverged(let step, let loss, let checkpointStep):
            let kept = checkpointStep.map { "the last good checkpoint (step \($0), \(trainer.checkpointURL.path)) was kept" }
                ?? "no checkpoint had been written yet, so there is nothing to resume"
            throw ValidationError("training diverged at step \(step) (loss \(loss); the loss or the updated weights are not finite); it stopped and \(kept). Try a lower --learning-rate.")
        }
        if sample > 0 && lead {
            print("\nsample:")  // decoded where the model trained
            var sampler = TokenSampler(temperature: 0.8, topK: 40, topP: 1, seed: seed)
            let prompt = trainer.data.tokenizer.encode("\n")
            var decoder = StreamingDecoder(tokenizer: trainer.data.tokenizer)
            var produced = 0
            _ = model.generate(prompt: prompt, maxTokens: sample, sampler: &sampler) { token in
                let text = decoder.append(token)
                print(text, terminator: "")
                fflush(nil)
                produced += text.count
                return produced < sample && !interruptRequested.load(ordering: .relaxed)
            }
            print("")
            try trainer.placement.device.cuda?.checkFailure()
        }
    }
}

/// Ctrl-C and SIGTERM set `interruptRequested` (all a signal handler may safely do), and are
/// unblocked: a parent may have started this process with them blocked, which would hold them
/// back for good.
private func catchStopSignals() {
    var handled = sigset_t()
    sigemptyset(&handled)
    for signalNumber in [SIGINT, SIGTERM] {
        signal(signalNumber) { _ in interruptRequested.store(true, ordering: .relaxed) }
        sigaddset(&handled, signalNumber)
    }
    pthread_sigmask(SIG_UNBLOCK, &handled, nil)
}

func formatCount(_ n: Int) -> String {
    switch n {
    case ..<10_000: return "\(n)"
    case ..<10_000_000: return String(format: "%.1fk", Double(n) / 1e3)
    default: return String(format: "%.2fM", Double(n) / 1e6)
    }
}

func formatDuration(_ seconds: Double) -> String {
    guard seconds.isFinite, abs(seconds) < 1e15 else { return "--:--" }
    let s = Int(seconds.rounded())
    return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%02d:%02d", s / 60, s % 60)
}
