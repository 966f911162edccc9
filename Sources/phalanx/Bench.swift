import ArgumentParser
import PhalanxBench
import PhalanxCUDA
import PhalanxCUDAChecks

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks that measure this machine's ceilings and report every result as a fraction of them.",
        subcommands: [BenchOperators.self, BenchLayers.self, BenchTraining.self, BenchDecode.self, BenchCUDA.self],
        defaultSubcommand: BenchOperators.self)
}

/// Runs a library validation, reporting its error as a command-line validation error.
func validating(_ body: () throws -> Void) throws {
    do { try body() } catch { throw ValidationError("\(error)") }
}

/// Exits with failure when a report found a result above its ceiling (it printed why).
func failingOnCeilingErrors(_ errors: [String]) throws {
    if !errors.isEmpty { throw ExitCode.failure }
}

struct BenchOperators: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "operators",
        abstract: "The SWR operators against the measured copy bandwidth (the default benchmark).",
        discussion: """
        Each operator's median time and effective bandwidth (bytes it must read and write / time) \
        as a fraction of the copy bandwidth: every repeat copies the same number of bytes with all \
        threads right before the operator (the faster of memcpy and a copy with non-temporal \
        stores), and the median of those paired ratios is reported (the machine is shared; its \
        bandwidth drifts). A result above 110% of its copy is reported as a ceiling error. Ends \
        with one JSON line.
        """)

    @Option(help: "Sequences per call.") var batch = 4
    @Option(help: "Positions per sequence.") var length = 65536
    @Option(help: "Heads.") var heads = 16
    @Option(help: "Channels per head.") var headDim = 16
    @Option(help: "Timed repeats per figure (the median is reported).") var repeats = 9
    @Option(help: "Only the operators whose name contains this text (for example 'backward').") var only: String?

    var settings: OperatorBenchmark.Configuration {
        var c = OperatorBenchmark.Configuration()
        (c.batch, c.length, c.heads, c.headDim, c.repeats, c.only) = (batch, length, heads, headDim, repeats, only)
        return c
    }

    func validate() throws { try validating(settings.validate) }
    func run() throws { try failingOnCeilingErrors(OperatorBenchmark.report(settings)) }
}

struct BenchLayers: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "layers",
        abstract: "Layers against their matrix-product floor, attention against the sgemm rate, and a length sweep.",
        discussion: """
        1. The Phalanx layer's forward+backward against its floor: the FLOPs of its matrix products \
        (forward, and twice that for backward) divided by the sgemm rate measured in the same run. \
        2. The attention kernel's forward rate (causal, batch 1) as a fraction of the sgemm rate. \
        3. A sweep over lengths of forward+backward time for Phalanx, sliding-window attention and \
        full attention layers at the same width, with the length where each pair crosses. \
        Ends with one JSON line.
        """)

    @Option(help: "Model width (Phalanx heads of 16; attention heads of --dim / --heads).") var dim = 256
    @Option(help: "Attention heads.") var heads = 4
    @Option(help: "Key/value heads of the Phalanx layer (default: as many as heads).") var kvHeads: Int?
    @Option(help: "Length of the Phalanx floor and attention-rate measurements.") var length = 4096
    @Option(help: "Sliding-window attention window in the sweep.") var window = 512
    @Option(parsing: .upToNextOption, help: "Lengths of the sweep.") var sweep = LayerBenchmark.Settings().sweep
    @Option(help: "Timed repeats per figure (the median is reported).") var repeats = 5
    @Flag(help: "Also time each of the Phalanx layer's matrix products alone at its shapes (where the time goes).")
    var profile = false
    @OptionGroup var pytorch: PyTorchOptions

    var settings: LayerBenchmark.Settings {
        var s = LayerBenchmark.Settings()
        (s.dim, s.heads, s.kvHeads, s.length, s.window, s.sweep, s.repeats) = (dim, heads, kvHeads, length, window, sweep, repeats)
        s.profile = profile
        s.pytorch = pytorch.baseline
        return s
    }

    func validate() throws { try validating(settings.validate) }
    func run() throws { try failingOnCeilingErrors(LayerBenchmark.report(settings)) }
}

/// The same-run PyTorch comparison of `bench layers` and `bench train`.
struct PyTorchOptions: ParsableArguments {
    @Flag(help: "Also measure the same models in PyTorch in this run: on the CPU scripts/torch-cpu-bench.py, with --device cuda the command's GPU script (see the overview); needs torch, PHALANX_PYTHON picks the interpreter.")
    var pytorch = false
    @Option(help: "Path of the PyTorch baseline script.") var pytorchScript = PyTorchBaseline().script

    var baseline: PyTorchBaseline? { pytorch ? PyTorchBaseline(script: pytorchScript) : nil }

    /// The baseline of a GPU benchmark: `gpuScript` unless --pytorch-script names another.
    func gpuBaseline(_ gpuScript: String) -> PyTorchBaseline? {
        pytorch ? PyTorchBaseline(script: pytorchScript == PyTorchBaseline().script ? gpuScript : pytorchScript) : nil
    }
}

/// The options shared by the model-level benchmarks.
struct ModelBenchmarkOptions: ParsableArguments {
    @Option(parsing: .upToNextOption, help: "Presets to compare (the first is the baseline of the ratios).")
    var presets = ModelBenchmarkSettings(contexts: [], steps: 1).presets
    @Option(help: "Sliding-window attention window.") var window = 512

    /// The settings of these options; on a GPU, the -large presets unless --presets chose others.
    func settings(contexts: [Int], steps: Int, onGPU: Bool = false) -> ModelBenchmarkSettings {
        var s = ModelBenchmarkSettings(contexts: contexts, steps: steps)
        (s.presets, s.window) = (presets, window)
        if onGPU && presets == ModelBenchmarkSettings(contexts: [], steps: 1).presets {
            s.presets = ["transformer-large", "swa-hybrid-large", "phalanx-hybrid-large"]
        }
        return s
    }
}

struct BenchTraining: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Training-step speed (forward, backward, AdamW) of the presets at several context lengths.",
        discussion: """
        Batch 1, random byte tokens. Reports tokens/s, model-FLOPs utilisation (model FLOPs per \
        second over the sgemm rate measured in the same run, and over the FMA peak) and each \
        preset's speed-up over the first preset; with --pytorch, also over the same models in \
        PyTorch measured in the same run. Ends with one JSON line. With --device cuda: \
        --tokens-per-step tokens per step, the -large presets unless --presets says otherwise, \
        clipping included, MFU over cuBLAS's bf16 rate measured \
        in the same run, and --pytorch runs scripts/torch-cuda-train.py (the same models with \
        SDPA and flex attention, bf16 autocast, fused AdamW).
        """)

    @OptionGroup var options: ModelBenchmarkOptions
    @Option(parsing: .upToNextOption, help: "Context lengths (default 2048 8192 32768; with --device cuda 4096 8192 16384 32768).")
    var contexts: [Int] = []
    @Option(help: "Timed steps per figure (the median is reported).") var steps = 3
    @OptionGroup var pytorch: PyTorchOptions
    @OptionGroup var device: DeviceOptions
    @Option(help: "With --device cuda: tokens per step (batch = tokens / context; on the CPU, batch 1).") var tokensPerStep = 65536

    var onGPU: Bool { device.onGPU }

    var settings: ModelBenchmarkSettings {
        var s = options.settings(contexts: contexts.isEmpty ? (onGPU ? [4096, 8192, 16384, 32768] : [2048, 8192, 32768]) : contexts,
                                 steps: steps, onGPU: onGPU)
        s.pytorch = pytorch.baseline
        return s
    }

    var gpuSettings: CUDATrainingBenchmark.Settings {
        var s = CUDATrainingBenchmark.Settings(models: settings)
        s.tokensPerStep = tokensPerStep
        s.compute = device.compute
        s.pytorch = pytorch.gpuBaseline("scripts/torch-cuda-train.py")
        return s
    }

    func validate() throws {
        try validating { onGPU ? try gpuSettings.validate() : try settings.validate(minimumContext: 16) }
    }

    func run() throws {
        if onGPU {
            try CUDATrainingBenchmark.report(gpuSettings)
        } else {
            try failingOnCeilingErrors(TrainingBenchmark.report(settings))
        }
    }
}

struct BenchDecode: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Prefill and decode tokens/s of the presets against context length.",
        discussion: """
        Batch 1, random tokens: a prefill of the whole context from empty, then one-token decode \
        steps, each through every mixer's state (Phalanx: constant-size recurrence state; \
        attention: a key/value cache that grows; sliding window: a fixed ring). Ends with one JSON line. \
        With --device cuda: the -large presets unless --presets says otherwise, the parallel \
        forward's tokens/s beside the prefill's, decode at every --batches size (copies of the \
        prefilled state stacked), and --pytorch runs scripts/torch-cuda-decode.py (the transformer \
        of the same shape: SDPA, a pre-allocated key/value cache, bf16) in the same run.
        """)

    @OptionGroup var options: ModelBenchmarkOptions
    @Option(parsing: .upToNextOption, help: "Context lengths.") var contexts = [1024, 4096, 16384, 32768]
    @Option(help: "Decode steps timed after each prefill.") var steps = 32
    @Option(parsing: .upToNextOption, help: "With --device cuda: sequences decoded together.") var batches = [1, 32]
    @Flag(help: "With --device cuda: first compare decoding on the GPU with its parallel forward, with the CPU and ragged prompts with each alone (CUDADecodeCheck), printing PASS/FAIL per case.")
    var check = false
    @OptionGroup var pytorch: PyTorchOptions
    @OptionGroup var device: DeviceOptions

    var settings: ModelBenchmarkSettings { options.settings(contexts: contexts, steps: steps, onGPU: device.onGPU) }

    var gpuSettings: CUDADecodeBenchmark.Settings {
        var s = CUDADecodeBenchmark.Settings(models: settings)
        s.batches = batches
        s.compute = device.compute
        s.pytorch = pytorch.gpuBaseline("scripts/torch-cuda-decode.py")
        return s
    }

    func validate() throws {
        guard device.onGPU || !(pytorch.pytorch || check) else { throw ValidationError("--pytorch and --check compare decoding on the GPU: add --device cuda.") }
        try validating { device.onGPU ? try gpuSettings.validate() : try settings.validate() }
    }

    func run() throws {
        guard device.onGPU else { return try failingOnCeilingErrors(DecodeBenchmark.report(settings)) }
        var failures = 0
        if check {
            let gpu = try CUDADevice.shared.get()
            print("Check: decoding on the GPU against its parallel forward, CPU decoding, and ragged prompts decoded alone")
            for testCase in CUDADecodeCheck.standardCases {
                let outcome = try CUDADecodeCheck.run(testCase, device: gpu)
                print("  \(outcome)")
                if !outcome.passed { failures += 1 }
            }
            print("  \(CUDADecodeCheck.standardCases.count - failures) passed, \(failures) failed")
        }
        try CUDADecodeBenchmark.report(gpuSettings)
        if failures > 0 { throw ExitCode.failure }
    }
}
