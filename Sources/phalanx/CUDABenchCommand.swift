import ArgumentParser
import PhalanxBench

struct BenchCUDA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cuda",
        abstract: "The SWR operators and the Phalanx layer on a CUDA GPU against the device's copy bandwidth and cuBLAS rate.",
        discussion: """
        Measures the device's copy bandwidth (cuMemcpyDtoD; read + write), then the forward and \
        backward kernels at dim = 16 * --heads for each --shapes BATCHxLENGTH, in bfloat16 and \
        float32 storage: the median per-launch time over CUDA events, the effective bandwidth (bytes \
        each kernel must move / time) and its fraction of the copy bandwidth, for the default tuning \
        (automatic chunk length) and every alternative (backward channels per thread, 128 or 256 \
        threads per block, the --chunks lengths); the summary gives the default and the fastest. \
        The layer part times the Phalanx layer (bf16, --kv-heads key/value heads) forward and \
        forward+backward for each --layer-shapes BATCHxLENGTH against its own matrix products alone \
        (its GEMM floor) and the cuBLAS bf16 rate of an 8192^3 product; with --attention, the JSON \
        written by scripts/cuda-attention-baseline.py is shown beside it. The exact part times the \
        exact recurrence (hierarchical decomposition). --check first compares every case of the \
        tests (operator, layer, exact recurrence, attention) with the CPU and prints PASS/FAIL per case \
        (exit status 1 if any fails). --attention-kernels times the GPU attention instead (bf16, \
        causal and windowed, forward and forward+backward in TFLOP/s: forward 4*B*H*D*pairs, \
        forward+backward 3.5 times that): ours, and cuDNN's fused attention (default and \
        deterministic backward) where libcudnn.so.9 loads (PHALANX_CUDNN to point at one), beside \
        scripts/torch-cuda-attention.py's JSON (--torch-attention). Needs the PhalanxCUDA resource \
        bundle beside the executable, libcuda.so.1, NVRTC (PHALANX_NVRTC to point at it) and, for \
        the layer, cuBLAS. Ends with one JSON line.
        """)

    @Flag(help: "Compare with the CPU operator first (the tests' cases), printing PASS/FAIL per case.")
    var check = false
    @Option(help: "Heads of 16 channels (dim = 16 * heads).") var heads = 128
    @Option(parsing: .upToNextOption, help: "Shapes to time, as BATCHxLENGTH.") var shapes = CUDABenchmark.Settings().shapes
    @Option(parsing: .upToNextOption, help: "Storages to time: bf16, f32.") var storages = CUDABenchmark.Settings().storages
    @Option(parsing: .upToNextOption, help: "Chunk lengths (in blocks) swept besides the automatic one.")
    var chunks = CUDABenchmark.Settings().chunks
    @Option(parsing: .upToNextOption, help: "Parts to time: operator, layer, exact.") var parts = CUDABenchmark.Settings().parts
    @Option(parsing: .upToNextOption, help: "Shapes of the layer and exact-recurrence parts, as BATCHxLENGTH.")
    var layerShapes = CUDABenchmark.Settings().layerShapes
    @Option(help: "Key/value heads of the Phalanx layer (default: as many as heads).") var kvHeads: Int?
    @Option(help: "JSON file of scripts/cuda-attention-baseline.py to compare the layer with.") var attention: String?
    @Flag(help: "Time the GPU attention kernels instead (bf16 forward and forward+backward in TFLOP/s at 32K tokens per call); with --check, compare them with the CPU first.")
    var attentionKernels = false
    @Option(parsing: .upToNextOption, help: "Head dims of --attention-kernels (heads = 2048 / head dim).")
    var attentionHeadDims = CUDAAttentionBenchmark.Settings().headDims
    @Option(parsing: .upToNextOption, help: "Sequence lengths of --attention-kernels (batch = 32768 / length).")
    var attentionLengths = CUDAAttentionBenchmark.Settings().lengths
    @Option(parsing: .upToNextOption, help: "Windows of --attention-kernels (0: full causal).")
    var attentionWindows = CUDAAttentionBenchmark.Settings().windows
    @Option(help: "JSON line of scripts/torch-cuda-attention.py to show beside --attention-kernels.") var torchAttention: String?
    @Option(help: "Launches per timed sample.") var launches = 20
    @Option(help: "Timed samples per figure (the median is reported).") var repeats = 7

    var settings: CUDABenchmark.Settings {
        var s = CUDABenchmark.Settings()
        (s.check, s.heads, s.shapes, s.storages, s.chunks, s.parts) = (check, heads, shapes, storages, chunks, parts)
        (s.layerShapes, s.kvHeads, s.attention, s.launches, s.repeats) = (layerShapes, kvHeads, attention, launches, repeats)
        return s
    }

    var attentionSettings: CUDAAttentionBenchmark.Settings {
        var s = CUDAAttentionBenchmark.Settings()
        (s.check, s.headDims, s.lengths, s.windows, s.torch) = (check, attentionHeadDims, attentionLengths, attentionWindows, torchAttention)
        return s
    }

    func validate() throws {
        try validating(settings.validate)
        if attentionKernels { try validating(attentionSettings.validate) }
    }

    func run() throws {
        let failures = attentionKernels ? try CUDAAttentionBenchmark(attentionSettings).run() : try CUDABenchmark(settings).run()
        if failures > 0 { throw ExitCode.failure }
    }
}
