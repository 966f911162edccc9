import Foundation
import PhalanxCUDA
import PhalanxCUDAChecks
import PhalanxLayers
import PhalanxRuntime
import SWR

/// `phalanx bench cuda`: the SWR operators and the Phalanx layer on a CUDA GPU against the
/// device's copy bandwidth and cuBLAS rate (see `Settings` and docs/CUDA.md).
public struct CUDABenchmark {
    /// What to measure; the command line's options, one for one.
    public struct Settings: Sendable {
        /// Compare with the CPU first (the tests' cases), printing PASS/FAIL per case.
        public var check = false
        /// Phalanx heads (dim = `PhalanxLayer.headDim` * heads).
        public var heads = 128
        /// Operator shapes to time, as BATCHxLENGTH.
        public var shapes = ["4x8192", "1x32768"]
        /// Storages to time: bf16, f32.
        public var storages = ["bf16", "f32"]
        /// Chunk lengths (in blocks) swept besides the automatic one.
        public var chunks = [4, 8, 16, 32, 64]
        /// Parts to time: operator, layer, exact.
        public var parts = ["operator", "layer", "exact"]
        /// Shapes of the layer and exact-recurrence parts, as BATCHxLENGTH.
        public var layerShapes = ["8x4096", "4x8192", "2x16384", "1x32768"]
        /// Key/value heads of the Phalanx layer (nil: as many as heads).
        public var kvHeads: Int?
        /// JSON file of scripts/cuda-attention-baseline.py to compare the layer with.
        public var attention: String?
        /// Launches per timed sample.
        public var launches = 20
        /// Timed samples per figure (the median is reported).
        public var repeats = 7

        /// The defaults above.
        public init() {}

        /// Throws for a malformed shape, storage or part, or a count below 1, naming the setting.
        public func validate() throws {
            for shape in shapes + layerShapes where Self.parse(shape) == nil {
                throw BenchmarkSettingError("shapes take BATCHxLENGTH with positive numbers (4x8192); got '\(shape)'.")
            }
            for storage in storages where NumberFormat(name: storage) == nil {
                throw BenchmarkSettingError("storages take bf16 or f32; got '\(storage)'.")
            }
            for part in parts where !["operator", "layer", "exact"].contains(part) {
                throw BenchmarkSettingError("parts take operator, layer, exact; got '\(part)'.")
            }
            if let kvHeads, kvHeads < 1 || heads % kvHeads != 0 {
                throw BenchmarkSettingError("kv heads must divide the \(heads) heads; got \(kvHeads).")
            }
            guard heads >= 1, launches >= 1, repeats >= 1, chunks.allSatisfy({ $0 >= 1 }) else {
                throw BenchmarkSettingError("heads, launches, repeats and chunks must be positive.")
            }
        }

        /// `(batch, length)` of `BATCHxLENGTH`, or nil.
        static func parse(_ shape: String) -> (batch: Int, length: Int)? {
            let parts = shape.split(separator: "x").compactMap { Int($0) }
            guard parts.count == 2, parts[0] >= 1, parts[1] >= 1 else { return nil }
            return (parts[0], parts[1])
        }
    }

    let settings: Settings
    var heads: Int { settings.heads }
    var repeats: Int { settings.repeats }
    var launches: Int { settings.launches }
    var chunks: [Int] { settings.chunks }
    var kvHeads: Int? { settings.kvHeads }
    var attention: String? { settings.attention }
    var shapes: [(batch: Int, length: Int)] { settings.shapes.compactMap(Settings.parse) }
    var layerShapes: [(batch: Int, length: Int)] { settings.layerShapes.compactMap(Settings.parse) }

    /// A benchmark of `settings` (validated by the caller).
    public init(_ settings: Settings) { self.settings = settings }

    /// Runs the checks (with `check`) and the parts, printing every figure and the JSON line.
    /// - Returns: the number of failed checks (0 without `check`).
    public func run() throws -> Int {
        let nvrtc = try NVRTC.shared.get()
        _ = try KernelSources.source(named: "jagged_window")
        print("Kernels: \(KernelSources.directory?.path ?? "?"); NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) at \(nvrtc.path)")
        let device = try CUDADevice.shared.get(), context = device.context
        print("Device: \(context.deviceName), \(context.architecture), \(context.multiprocessorCount) SMs, "
              + String(format: "%.0f GiB", Double(context.totalMemory) / Double(1 << 30))
              + "; driver \(context.driver.path) (CUDA \(context.driver.version / 1000).\(context.driver.version % 1000 / 10))")
        var json: [String: Any] = [
            "benchmark": "swr-cuda", "device": context.deviceName, "architecture": context.architecture,
            "heads": heads, "head_dim": PhalanxLayer.headDim,
        ]

        var failures = 0
        if settings.check {
            let outcome = try CUDAChecks.runAll(device: device)
            json["check"] = ["passed": outcome.passed, "failed": outcome.failed]
            failures = outcome.failed
        }

        let copy = try copyBandwidth(context)
        print(String(format: "\nCopy bandwidth (cuMemcpyDtoD, 1 GiB, read + write): %.0f GB/s", copy / 1e9))
        json["copy_gbps"] = copy / 1e9
        if settings.parts.contains("operator") { try timeOperator(context, copy: copy, json: &json) }
        if settings.parts.contains("layer") { json["layer"] = try timeLayer(device, copy: copy) }
        if settings.parts.contains("exact") { json["exact"] = try timeExact(context, copy: copy) }
        printJSONLine(json)
        return failures
    }

    /// The jagged-window operator for each --shapes in each --storages: every kernel variant.
    private func timeOperator(_ context: CUDAContext, copy: Double, json: inout [String: Any]) throws {
        var summary: [String] = []
        for shape in shapes {
            let layout = SequenceLayout.batched(batch: shape.batch, length: shape.length, heads: heads, headDim: PhalanxLayer.headDim)
            let title = "B=\(shape.batch) L=\(shape.length), \(heads) heads x \(PhalanxLayer.headDim) (dim \(PhalanxLayer.headDim * heads))"
            print("\n\(title), median of \(repeats) x \(launches) launches; every kernel variant, block size and chunk length")
            summary.append(title)
            var rng = SeededGenerator(seed: 7)
            let gates = (0..<layout.gateCount).map { _ in Float.random(in: 0...1, using: &rng) }
            let inputs = (0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) }
            var shapeJSON: [String: Any] = [:]
            for storage in settings.storages.compactMap(NumberFormat.init(name:)) {
                shapeJSON[storage.description] = try sweep(storage: storage, layout: layout, gates: gates, inputs: inputs,
                                                           context: context, copy: copy, summary: &summary)
            }
            json["B\(shape.batch)_L\(shape.length)"] = shapeJSON
        }
        print("\nSummary (standard: the default tuning with its automatic chunk; best: the fastest variant measured)")
        for line in summary { print(line) }
    }

    /// Times every forward and backward variant for one storage, printing a line per
    /// configuration; returns the standard tuning's figures and the best ones.
    private func sweep(storage: NumberFormat, layout: SequenceLayout, gates: [Float], inputs: [Float],
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
