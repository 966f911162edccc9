import Foundation
import PhalanxCUDA
import PhalanxCUDAChecks
import PhalanxRuntime

/// `phalanx bench cuda --attention-kernels`: the GPU attention (`CUDAAttention`, bfloat16) forward
/// and forward+backward in TFLOP/s, full causal and in a sliding window, at a fixed number of
/// tokens per call, beside cuDNN's fused attention (`CUDNNAttention`, default and deterministic
/// backward) where cuDNN loads, and PyTorch's figures from `scripts/torch-cuda-attention.py` when
/// given.
///
/// FLOP convention (the one FlashAttention and PyTorch comparisons use): forward
/// `4 * batch * heads * headDim * pairs`, `pairs` the visible query-key pairs (`L (L + 1) / 2`
/// per head and sequence for full causal, about `L * window` in a window); forward+backward 3.5
/// times that (backward counted as 2.5 forwards, though this deterministic backward does 3.5:
/// it recomputes S and dP for dq). The same count is used for PyTorch's times, so the ratio is a
/// ratio of times.
public struct CUDAAttentionBenchmark {
    /// What to measure.
    public struct Settings: Sendable {
        /// Compare every attention case of the tests with the CPU first (PASS/FAIL per case).
        public var check = false
        /// Head dims to time.
        public var headDims = [128, 16]
        /// Model width: heads = width / head dim.
        public var width = 2048
        /// Key/value heads per query head group: kvHeads = heads / group.
        public var group = 1
        /// Sequence lengths; batch = tokens / length.
        public var lengths = [4096, 8192, 16384, 32768]
        /// Tokens per call.
        public var tokens = 32768
        /// Windows to time (0: full causal).
        public var windows = [0, 512]
        /// JSON line of scripts/torch-cuda-attention.py to compare with.
        public var torch: String?
        /// Calls per timed sample.
        public var launches = 5
        /// Timed samples per figure (the median is reported).
        public var repeats = 5

        /// The defaults above.
        public init() {}

        /// Throws for a setting out of range, naming it.
        public func validate() throws {
            for headDim in headDims where !(headDim >= 16 && headDim <= 128 && headDim % 16 == 0) || width % headDim != 0 {
                throw BenchmarkSettingError("head dims must be multiples of 16 up to 128 dividing the width \(width); got \(headDim).")
            }
            for length in lengths where length < 1 || tokens % length != 0 {
                throw BenchmarkSettingError("lengths must be positive and divide the \(tokens) tokens; got \(length).")
            }
            guard windows.allSatisfy({ $0 >= 0 }), group >= 1, launches >= 1, repeats >= 1 else {
                throw BenchmarkSettingError("windows must be non-negative (0: full causal); group, launches and repeats positive.")
            }
            for headDim in headDims where (width / headDim) % group != 0 {
                throw BenchmarkSettingError("the group \(group) must divide the \(width / headDim) heads of head dim \(headDim).")
            }
        }
    }

    let settings: Settings

    /// A benchmark of `settings` (validated by the caller).
    public init(_ settings: Settings) { self.settings = settings }

    /// Runs the checks (with `check`) and the timings, printing a table and the JSON line.
    /// - Returns: the number of failed checks (0 without `check`).
    public func run() throws -> Int {
        let context = try CUDAContext.shared.get()
        print("Device: \(context.deviceName), \(context.architecture), \(context.multiprocessorCount) SMs")
        var json: [String: Any] = ["benchmark": "attention-cuda", "device": context.deviceName, "tokens": settings.tokens,
                                   "width": settings.width, "flops": "fwd 4*B*H*D*pairs, fwd+bwd 3.5x"]
        var failures = 0
        if settings.check {
            var passed = 0
            print("\nCheck: the GPU attention against the CPU AttentionKernel, and determinism")
            for testCase in CUDAAttentionCheck.standardCases {
                let outcome = try CUDAAttentionCheck.run(testCase, context: context)
                print("  \(outcome)")
                if outcome.passed { passed += 1 } else { failures += 1 }
            }
            for testCase in CUDAAttentionCheck.determinismCases {
                let same = try CUDAAttentionCheck.isDeterministic(testCase, context: context)
                print("  \(same ? "PASS" : "FAIL") \(testCase): \(same ? "bit-identical" : "outputs differ between runs")")
                if same { passed += 1 } else { failures += 1 }
            }
            for (line, ok) in try CUDNNAttentionCheck.runAll(context: context) {
                print("  \(line)")
                if ok { passed += 1 } else { failures += 1 }
            }
            print("  \(passed) passed, \(failures) failed")
            json["check"] = ["passed": passed, "failed": failures]
        }
        let torch = try settings.torch.map(loadTorch) ?? [:]

        print("\nbf16, \(settings.tokens) tokens per call, width \(settings.width), median of \(settings.repeats) x \(settings.launches) calls")
        print("cuDNN: \(CUDNNAttention.loadedVersion ?? "not loaded (\(CUDNNAttention.unavailableReason ?? "?"))")")
        print("  D    L      B   window  fwd ms  TFLOP/s  fwd+bwd ms  TFLOP/s  | cuDNN fwd  fwd+bwd  det fwd+bwd TFLOP/s"
              + (torch.isEmpty ? "" : "  | torch fwd  fwd+bwd TFLOP/s (ours/torch, cuDNN/torch fwd+bwd)"))
        // One set of operands serves every shape: batch * length * heads * headDim is the same.
        var rng = SeededGenerator(seed: 11)
        let count = settings.tokens * settings.width
        let operands = try (0..<4).map { _ in
            try NumberFormat.bfloat16.upload((0..<count).map { _ in Float.random(in: -2...2, using: &rng) }, context: context)
        }
        var rows: [[String: Any]] = []
        for headDim in settings.headDims {
            for length in settings.lengths {
                for window in settings.windows {
                    var row = try time(context, operands, headDim: headDim, length: length, window: window == 0 ? nil : window)
                    var line = String(format: "  %-4d %-6d %-3d ", headDim, length, settings.tokens / length)
                        + padded(window == 0 ? "none" : "\(window)", 7)
                        + String(format: " %7.3f  %7.1f  %10.3f  %7.1f", row["fwd_ms"] as! Double, row["fwd_tflops"] as! Double,
                                      row["fwdbwd_ms"] as! Double, row["fwdbwd_tflops"] as! Double)
                    let cudnn = row["cudnn_fwdbwd_tflops"] as? Double
                    line += "  | " + [row["cudnn_fwd_tflops"], row["cudnn_fwdbwd_tflops"], row["cudnn_det_fwdbwd_tflops"]]
                        .map { ($0 as? Double).map { String(format: "%7.1f", $0) } ?? "      -" }.joined(separator: "  ")
                    if let reference = torch[Self.key(headDim: headDim, length: length, window: window)],
                       let fwd = reference["fwd_tflops"], let all = reference["fwdbwd_tflops"] {
                        let ours = (row["fwd_tflops"] as! Double, row["fwdbwd_tflops"] as! Double)
                        line += String(format: "  | %6.1f  %6.1f   (%.2f, %.2f, ", fwd, all, ours.0 / fwd, ours.1 / all)
                            + (cudnn.map { String(format: "%.2f)", $0 / all) } ?? "-)")
                        row["torch_fwd_tflops"] = fwd
                        row["torch_fwdbwd_tflops"] = all
                    }
                    print(line)
                    rows.append(row)
                }
            }
        }
        json["results"] = rows
        printJSONLine(json)
        return failures
    }

    /// Times one shape: forward, and forward+backward, in bfloat16, over `operands` (q, k, v, dO,
    /// each of `tokens * width` numbers).
    private func time(_ context: CUDAContext, _ operands: [DeviceBuffer], headDim: Int, length: Int,
                      window: Int?) throws -> [String: Any] {
        let heads = settings.width / headDim
        let shape = AttentionLayout(batch: settings.tokens / length, length: length, heads: heads,
                                        kvHeads: heads / settings.group, headDim: headDim)
        let attention = try CUDAAttention(context: context, storage: .bfloat16, headDim: headDim, window: window)
        let (q, k, v, dO) = (operands[0], operands[1], operands[2], operands[3])
        let o = try DeviceBuffer(context: context, byteCount: shape.queryCount * 2)
        let lse = try DeviceBuffer(context: context, byteCount: shape.rowCount * 4)
        let dots = try DeviceBuffer(context: context, byteCount: shape.rowCount * 4)
        let dq = try DeviceBuffer(context: context, byteCount: shape.queryCount * 2)
        let dk = try DeviceBuffer(context: context, byteCount: shape.keyCount * 2)
        let dv = try DeviceBuffer(context: context, byteCount: shape.keyCount * 2)
        let forward = try measure(context) {
            try attention.forward(query: q, key: k, value: v, output: o, logsumexp: lse, shape: shape)
        }
        let both = try measure(context) {
            try attention.forward(query: q, key: k, value: v, output: o, logsumexp: lse, shape: shape)
            try attention.backward(query: q, key: k, value: v, output: o, logsumexp: lse, outputGradient: dO,
                                   queryGradient: dq, keyGradient: dk, valueGradient: dv, shape: shape, rowDots: dots)
        }
        let flops = shape.forwardFlops(window: window)
        var row: [String: Any] = [
            "head_dim": headDim, "length": length, "batch": shape.batch, "heads": heads, "kv_heads": shape.kvHeads,
            "window": window ?? 0, "fwd_ms": forward, "fwdbwd_ms": both,
            "fwd_tflops": flops / forward / 1e9, "fwdbwd_tflops": 3.5 * flops / both / 1e9,
        ]
        guard CUDNNAttention.unavailableReason == nil else { return row }
        for deterministic in [false, true] {
            let cudnn = try CUDNNAttention(context: context, headDim: headDim, window: window, deterministic: deterministic)
            let prefix = deterministic ? "cudnn_det" : "cudnn"
            if let reason = cudnn.unsupportedReason(shape) {
                row["\(prefix)_skipped"] = reason
                print("  (cuDNN\(deterministic ? " deterministic" : "") skips D=\(headDim) L=\(length): \(reason))")
                continue
            }
            let cudnnForward = try measure(context) {
                try cudnn.forward(query: q, key: k, value: v, output: o, logsumexp: lse, shape: shape)
            }
            let cudnnBoth = try measure(context) {
                try cudnn.forward(query: q, key: k, value: v, output: o, logsumexp: lse, shape: shape)
                try cudnn.backward(query: q, key: k, value: v, output: o, logsumexp: lse, outputGradient: dO,
                                   queryGradient: dq, keyGradient: dk, valueGradient: dv, shape: shape)
            }
            if !deterministic {
                row["cudnn_fwd_ms"] = cudnnForward
                row["cudnn_fwd_tflops"] = flops / cudnnForward / 1e9
            }
            row["\(prefix)_fwdbwd_ms"] = cudnnBoth
            row["\(prefix)_fwdbwd_tflops"] = 3.5 * flops / cudnnBoth / 1e9
        }
        return row
    }

    /// Median device milliseconds per call of `body`, after three calls of warm-up.
    private func measure(_ context: CUDAContext, _ body: () throws -> Void) throws -> Double {
        for _ in 0..<3 { try body() }
        try context.synchronize()
        let start = try CUDAEvent(context: context), end = try CUDAEvent(context: context)
        var samples: [Double] = []
        for _ in 0..<settings.repeats {
            try start.record()
            for _ in 0..<settings.launches { try body() }
            try end.record()
            samples.append(try start.milliseconds(to: end) / Double(settings.launches))
        }
        return samples.sorted()[samples.count / 2]
    }

    static func key(headDim: Int, length: Int, window: Int) -> String { "D\(headDim)_L\(length)_w\(window)" }

    /// PyTorch's TFLOP/s by shape from the script's JSON line: SDPA for full causal, flex_attention
    /// in a window.
    private func loadTorch(_ path: String) throws -> [String: [String: Double]] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let results = object["results"] as? [[String: Any]] else {
            throw BenchmarkSettingError("\(path) is not the JSON line of scripts/torch-cuda-attention.py (no results).")
        }
        var table: [String: [String: Double]] = [:]
        for row in results {
            guard let headDim = row["head_dim"] as? Int, let length = row["length"] as? Int else { continue }
            let window = row["window"] as? Int ?? 0
            var figures: [String: Double] = [:]
            if let fwd = row["fwd_tflops"] as? Double { figures["fwd_tflops"] = fwd }
            if let all = row["fwdbwd_tflops"] as? Double { figures["fwdbwd_tflops"] = all }
            table[Self.key(headDim: headDim, length: length, window: window)] = figures
        }
        return table
    }
}
