import ArgumentParser
import Foundation
import PhalanxCUDA
import PhalanxRuntime
import SWR

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
        tests (operator, layer, exact recurrence) with the CPU and prints PASS/FAIL per case (exit \
        status 1 if any fails). Needs the PhalanxCUDA resource bundle beside the executable, \
        libcuda.so.1, NVRTC (PHALANX_NVRTC to point at it) and, for the layer, cuBLAS. Ends with one \
        JSON line.
        """)

    @Flag(help: "Compare with the CPU operator first (the tests' cases), printing PASS/FAIL per case.")
    var check = false
    @Option(help: "Heads of 16 channels (dim = 16 * heads).") var heads = 128
    @Option(parsing: .upToNextOption, help: "Shapes to time, as BATCHxLENGTH.") var shapes = ["4x8192", "1x32768"]
    @Option(parsing: .upToNextOption, help: "Storages to time: bf16, f32.") var storages = ["bf16", "f32"]
    @Option(parsing: .upToNextOption, help: "Chunk lengths (in blocks of 16) swept besides the automatic one.")
    var chunks = [4, 8, 16, 32, 64]
    @Option(parsing: .upToNextOption, help: "Parts to time: operator, layer, exact.") var parts = ["operator", "layer", "exact"]
    @Option(parsing: .upToNextOption, help: "Shapes of the layer and exact-recurrence parts, as BATCHxLENGTH.")
    var layerShapes = ["8x4096", "4x8192", "2x16384", "1x32768"]
    @Option(help: "Key/value heads of the Phalanx layer (default: as many as heads).") var kvHeads: Int?
    @Option(help: "JSON file of scripts/cuda-attention-baseline.py to compare the layer with.") var attention: String?
    @Option(help: "Launches per timed sample.") var launches = 20
    @Option(help: "Timed samples per figure (the median is reported).") var repeats = 7

    func validate() throws {
        for shape in shapes + layerShapes where parse(shape) == nil {
            throw ValidationError("--shapes takes BATCHxLENGTH with positive numbers (4x8192); got '\(shape)'.")
        }
        for storage in storages where CUDAJaggedWindow.Storage(name: storage) == nil {
            throw ValidationError("--storages takes bf16 or f32; got '\(storage)'.")
        }
        for part in parts where !["operator", "layer", "exact"].contains(part) {
            throw ValidationError("--parts takes operator, layer, exact; got '\(part)'.")
        }
        if let kvHeads, kvHeads < 1 || heads % kvHeads != 0 {
            throw ValidationError("--kv-heads must divide the \(heads) heads; got \(kvHeads).")
        }
        guard heads >= 1, launches >= 1, repeats >= 1, chunks.allSatisfy({ $0 >= 1 }) else {
            throw ValidationError("--heads, --launches, --repeats and --chunks must be positive.")
        }
    }

    func parse(_ shape: String) -> (batch: Int, length: Int)? {
        let parts = shape.split(separator: "x").compactMap { Int($0) }
        guard parts.count == 2, parts[0] >= 1, parts[1] >= 1 else { return nil }
        return (parts[0], parts[1])
    }

    func run() throws {
        let nvrtc = try NVRTC.shared.get()
        _ = try KernelSources.source(named: "jagged_window")
        print("Kernels: \(KernelSources.directory?.path ?? "?"); NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) at \(nvrtc.path)")
        let context = try CUDAContext.shared.get()
        print("Device: \(context.deviceName), \(context.architecture), \(context.multiprocessorCount) SMs, "
              + String(format: "%.0f GiB", Double(context.totalMemory) / Double(1 << 30))
              + "; driver \(context.driver.path) (CUDA \(context.driver.version / 1000).\(context.driver.version % 1000 / 10))")
        var json: [String: Any] = [
            "benchmark": "swr-cuda", "device": context.deviceName, "architecture": context.architecture,
            "heads": heads, "head_dim": 16,
        ]

        var failures = 0
        if check {
            failures = try runChecks(context, json: &json)
        }

        let copy = try copyBandwidth(context)
        print(String(format: "\nCopy bandwidth (cuMemcpyDtoD, 1 GiB, read + write): %.0f GB/s", copy / 1e9))
        json["copy_gbps"] = copy / 1e9
        if parts.contains("operator") { try timeOperator(context, copy: copy, json: &json) }
        if parts.contains("layer") { json["layer"] = try timeLayer(context, copy: copy) }
        if parts.contains("exact") { json["exact"] = try timeExact(context, copy: copy) }
        printJSONLine(json)
        if failures > 0 { throw ExitCode.failure }
    }

    /// The jagged-window operator for each --shapes in each --storages: every kernel variant.
    private func timeOperator(_ context: CUDAContext, copy: Double, json: inout [String: Any]) throws {
        var summary: [String] = []
        for shape in shapes.compactMap(parse) {
            let layout = SequenceLayout.batched(batch: shape.batch, length: shape.length, heads: heads, headDim: 16)
            let title = "B=\(shape.batch) L=\(shape.length), \(heads) heads x 16 (dim \(16 * heads))"
            print("\n\(title), median of \(repeats) x \(launches) launches; every kernel variant, block size and chunk length")
            summary.append(title)
            var rng = SeededGenerator(seed: 7)
            let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0...1, using: &rng) }
            let inputs = (0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) }
            var shapeJSON: [String: Any] = [:]
            for storage in storages.compactMap(CUDAJaggedWindow.Storage.init(name:)) {
                shapeJSON[storage.description] = try sweep(storage: storage, layout: layout, gates: gates, inputs: inputs,
                                                           context: context, copy: copy, summary: &summary)
            }
            json["B\(shape.batch)_L\(shape.length)"] = shapeJSON
        }
        print("\nSummary (standard: the default tuning with its automatic chunk; best: the fastest variant measured)")
        for line in summary { print(line) }
        print("(Reference BTP kernel on the same H200, bf16, this size: 0.72 ms forward; memory floor ~0.07 ms.)")
    }

    /// Times every forward and backward variant for one storage, printing a line per
    /// configuration; returns the standard tuning's figures and the best ones.
    private func sweep(storage: CUDAJaggedWindow.Storage, layout: SequenceLayout, gates: [Float], inputs: [Float],
                       context: CUDAContext, copy: Double, summary: inout [String]) throws -> [String: Any] {
        var window = try CUDAJaggedWindow(context: context, storage: storage)
        let a = try window.upload(gates), u = try window.upload(inputs)
        let y = try DeviceBuffer(context: context, byteCount: inputs.count * storage.byteCount)
        let du = try DeviceBuffer(context: context, byteCount: inputs.count * storage.byteCount)
        let da = try DeviceBuffer(context: context, byteCount: gates.count * storage.byteCount)
        let standard = CUDAJaggedWindow.Tuning()
        var result: [String: Any] = [:]

        for backward in [false, true] {
            let pass = backward ? "backward" : "forward"
            // Read a, u (and dy); write y (du, da).
            let bytes = Double((backward ? 2 * layout.gateCount + 3 * layout.elementCount
                                         : layout.gateCount + 2 * layout.elementCount) * storage.byteCount)
            let variants = backward ? CUDAJaggedWindow.Tuning.variants : [standard]
            var best: (entry: [String: Any], ms: Double, label: String)?
            for variant in variants {
                for threads in [128, 256] {
                    for chunk in [nil] + chunks.map(Optional.some) {
                        var tuning = variant
                        tuning.threadsPerBlock = threads
                        tuning.chunkBlocks = chunk
                        window.tuning = tuning
                        let ms = try measure(context) {
                            if backward {
                                // y (written by the forward runs) stands in for dy.
                                try window.backward(gates: a, inputs: u, outputGradient: y, inputGradient: du,
                                                    gateGradient: da, layout: layout)
                            } else {
                                try window.forward(gates: a, inputs: u, output: y, layout: layout)
                            }
                        }
                        let usedChunk = try window.chunkBlocks(for: layout, backward: backward)
                        let bandwidth = bytes / (ms * 1e-3)
                        let kernel = "v\(backward ? tuning.backwardChannels : 4)"
                        let label = String(format: "%-4@ %-8@ %-6@ tpb %4d chunk %@", storage.description, pass, kernel, threads,
                                           chunk == nil ? "auto(\(usedChunk))" : "\(usedChunk)")
                        let line = String(format: "  %-44@ %8.4f ms  %6.0f GB/s  %5.1f%% of copy", label, ms, bandwidth / 1e9,
                                          100 * bandwidth / copy)
                        print(line)
                        let entry: [String: Any] = ["ms": ms, "gbps": bandwidth / 1e9, "fraction_of_copy": bandwidth / copy,
                                                    "kernel": kernel, "threads_per_block": threads, "chunk_blocks": usedChunk,
                                                    "automatic_chunk": chunk == nil]
                        if tuning == standard {
                            result[pass] = entry
                            summary.append("  standard" + line)
                        }
                        if ms < best?.ms ?? .infinity { best = (entry, ms, line) }
                    }
                }
            }
            if let best {
                result["\(pass)_best"] = best.entry
                summary.append("  best    " + best.label)
            }
        }
        return result
    }

    /// Median device milliseconds per call of `body` (each sample: `launches` calls between two events).
    func measure(_ context: CUDAContext, _ body: () throws -> Void) throws -> Double {
        for _ in 0..<3 { try body() }
        try context.synchronize()
        let start = try CUDAEvent(context: context), end = try CUDAEvent(context: context)
        var samples: [Double] = []
        for _ in 0..<repeats {
            try start.record()
            for _ in 0..<launches { try body() }
            try end.record()
            samples.append(try start.milliseconds(to: end) / Double(launches))
        }
        return samples.sorted()[samples.count / 2]
    }

    /// Bytes per second read plus written by device-to-device copies of 1 GiB.
    private func copyBandwidth(_ context: CUDAContext) throws -> Double {
        let bytes = 1 << 30
        let source = try DeviceBuffer(context: context, byteCount: bytes)
        let destination = try DeviceBuffer(context: context, byteCount: bytes)
        try source.fill(byte: 1)
        let ms = try measure(context) { try destination.copy(from: source) }
        return 2 * Double(bytes) / (ms * 1e-3)
    }
}

extension CUDAJaggedWindow.Storage {
    /// `bf16` or `f32`, as the command line spells them.
    init?(name: String) {
        switch name {
        case "bf16", "bfloat16": self = .bfloat16
        case "f32", "float32": self = .float32
        default: return nil
        }
    }
}
