import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime

/// `phalanx bench decode --device cuda`: prefill and decode speed of the presets on a GPU against
/// context length, at several batch sizes, with the model's parallel forward over the same prompt
/// as the prefill's yardstick.
///
/// Per preset and context: random prompt tokens; the parallel forward over them (the training
/// forward: tokens/s, median of 3); a prefill of the whole prompt from empty into a decode state
/// (median of 3); then greedy one-token steps, timed together after one untimed step, at batch 1
/// (the prefilled state) and at each larger batch (that many copies of it, stacked: every sequence
/// at the full context). A step ends when its logits are on the host (one wait per token). Kernels are compiled by a
/// warm-up on a short prompt first. With `pytorch`, `scripts/torch-cuda-decode.py` times the
/// PyTorch transformer of the same shape (SDPA, a pre-allocated key/value cache, bfloat16) in the
/// same run.
public enum CUDADecodeBenchmark {
    /// What to measure.
    public struct Settings: Sendable {
        /// Presets, contexts, decode steps per figure (`steps`), window.
        public var models: ModelBenchmarkSettings
        /// Sequences decoded together.
        public var batches = [1, 32]
        /// The compute format.
        public var compute = NumberFormat.bfloat16
        /// `scripts/torch-cuda-decode.py` with this interpreter, or nil for no PyTorch figures.
        public var pytorch: PyTorchBaseline?

        /// `models` at batches 1 and 32 in bfloat16.
        public init(models: ModelBenchmarkSettings) { self.models = models }

        /// Throws for settings out of range.
        public func validate() throws {
            try models.validate(minimumContext: 1)
            guard !batches.isEmpty, batches.allSatisfy({ $0 >= 1 }) else {
                throw BenchmarkSettingError("batches must be at least 1; got \(batches).")
            }
        }
    }

    /// One preset at one context.
    public struct Result: Sendable {
        /// Prompt tokens per second of the parallel forward and of the prefill into a state.
        public let forwardTokensPerSecond: Double, prefillTokensPerSecond: Double
        /// Generated tokens per second (all sequences together), per batch size.
        public let decodeTokensPerSecond: [Int: Double]
        /// Bytes of one sequence's decode state after the prefill, and of it the Phalanx blocks'.
        public let stateBytes: Int, phalanxStateBytes: Int
    }

    /// Measures `preset` at `context` on `device`.
    public static func measure(preset: String, context: Int, settings: Settings, device: CUDADevice) throws -> Result {
        var configuration = try ModelConfiguration.preset(preset)
        configuration.window = settings.models.window
        let model = try LanguageModel(configuration, seed: 1)
        model.move(to: .cuda(device), compute: settings.compute)
        var rng = SeededGenerator(seed: 3)
        let prompt = (0..<context).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        let V = configuration.vocabulary

        // Warm-up: every kernel of the forward, a prefill, a step, a stacked step.
        let short = Array(prompt.prefix(64))
        _ = model.forward(tokens: short, batch: 1, length: short.count)
        var (warm, _) = model.prefill(short, chunk: short.count)
        _ = model.infer(tokens: [1], length: 1, state: &warm).array
        var warmPair = LanguageModel.DecodeState.stacking([warm, warm])
        _ = model.infer(tokens: [1, 2], length: 1, state: &warmPair).array
        try device.checkFailure()

        let forward = Timing.median(repeats: 3, warmUp: 0) {
            _ = model.forward(tokens: prompt, batch: 1, length: context)
            try? device.checkFailure()
        }
        var prefilled = model.makeDecodeState(batch: 1)
        var logits: [Float] = []
        let prefill = Timing.median(repeats: 3, warmUp: 0) {
            var state = model.makeDecodeState(batch: 1)
            let out = model.infer(tokens: prompt, length: context, state: &state)
            logits = Tensor(viewing: out, offset: (context - 1) * V, shape: [V]).array
            prefilled = state
        }
        try device.checkFailure()
        let stateBytes = prefilled.byteCount, phalanxStateBytes = prefilled.byteCount(of: .phalanx)

        var decode: [Int: Double] = [:]
        for batch in settings.batches.sorted(by: >) {
            var state = batch == 1 ? prefilled : LanguageModel.DecodeState.stacking(Array(repeating: prefilled, count: batch))
            var tokens = [Int32](repeating: argmax(logits[...]), count: batch)
            func step() {
                let next = model.infer(tokens: tokens, length: 1, state: &state).array
                tokens = (0..<batch).map { argmax(next[($0 * V)..<(($0 + 1) * V)]) }
            }
            // Untimed: waits for the stacked copies, and adds the cache page the first step past the
            // prompt needs (once per 1024 positions; the PyTorch baseline allocates its whole cache
            // before timing).
            step()
            let seconds = Timing.seconds {
                for _ in 0..<settings.models.steps { step() }
            }
            try device.checkFailure()
            decode[batch] = Double(batch * settings.models.steps) / seconds
        }
        try device.context.releaseCachedMemory()  // the next model starts from an empty device
        return Result(forwardTokensPerSecond: Double(context) / forward, prefillTokensPerSecond: Double(context) / prefill,
                      decodeTokensPerSecond: decode, stateBytes: stateBytes, phalanxStateBytes: phalanxStateBytes)
    }

    private static func argmax(_ values: ArraySlice<Float>) -> Int32 {
        Int32(values.indices.max { values[$0] < values[$1] }! - values.startIndex)
    }

    /// Runs the comparison and prints it; returns the JSON object of its last line.
    @discardableResult
    public static func report(_ settings: Settings) throws -> [String: Any] {
        let device = try CUDADevice.shared.get()
        let presets = settings.models.presets, batches = settings.batches.sorted()
        print("\nPrefill and decode on \(device), \(settings.compute) (\(settings.models.steps) greedy steps per decode figure)")
        print("  preset                    context   forward tok/s   prefill tok/s" + batches.map { String(format: "  decode b%-3d tok/s", $0) }.joined()
              + "   state/seq     of it Phalanx")
        var rows: [[String: Any]] = []
        for context in settings.models.contexts {
            for preset in presets {
                let r = try measure(preset: preset, context: context, settings: settings, device: device)
                print(String(format: "  %@ %7d %15.0f %15.0f", padded(preset, 25), context, r.forwardTokensPerSecond, r.prefillTokensPerSecond)
                      + batches.map { String(format: " %18.1f", r.decodeTokensPerSecond[$0] ?? 0) }.joined()
                      + String(format: "   %8.2f MB  %9.1f KB", Double(r.stateBytes) / 1e6, Double(r.phalanxStateBytes) / 1e3))
                var row: [String: Any] = ["preset": preset, "context": context, "forward_tokens_per_second": r.forwardTokensPerSecond,
                                          "prefill_tokens_per_second": r.prefillTokensPerSecond, "state_bytes": r.stateBytes,
                                          "phalanx_state_bytes": r.phalanxStateBytes]
                for batch in batches { row["decode_tokens_per_second_b\(batch)"] = r.decodeTokensPerSecond[batch] }
                rows.append(row)
            }
        }
        compare(&rows, batches: batches, presets: presets)
        if let pytorch = settings.pytorch { compareWithPyTorch(&rows, pytorch, settings) }
        let json: [String: Any] = ["benchmark": "decode-cuda", "device": device.context.deviceName, "compute": "\(settings.compute)",
                                   "steps": settings.models.steps, "window": settings.models.window, "results": rows]
        if let data = try? JSONSerialization.data(withJSONObject: json, options: [.sortedKeys]) {
            print(String(decoding: data, as: UTF8.self))
        }
        return json
    }

    /// Each preset's decode speed over the first preset's of its size at the same context and batch.
    private static func compare(_ rows: inout [[String: Any]], batches: [Int], presets: [String]) {
        guard presets.count > 1 else { return }
        print("\nDecode tokens/s over \(presets[0]) (same context and batch); prefill over the parallel forward")
        for i in rows.indices {
            guard let context = rows[i]["context"] as? Int, let preset = rows[i]["preset"] as? String,
                  let base = rows.first(where: { $0["preset"] as? String == presets[0] && $0["context"] as? Int == context }) else { continue }
            var line = "  " + padded(preset, 25) + String(format: " %7d", context)
            for batch in batches {
                let key = "decode_tokens_per_second_b\(batch)"
                guard let ours = rows[i][key] as? Double, let theirs = base[key] as? Double else { continue }
                rows[i]["decode_speedup_vs_first_b\(batch)"] = ours / theirs
                line += String(format: "   b%d %6.2fx", batch, ours / theirs)
            }
            if let prefill = rows[i]["prefill_tokens_per_second"] as? Double, let forward = rows[i]["forward_tokens_per_second"] as? Double {
                rows[i]["prefill_over_forward"] = prefill / forward
                line += String(format: "   prefill/forward %5.2f", prefill / forward)
            }
            print(line)
        }
    }

    /// Adds PyTorch's decode tokens/s for the transformer of each preset's size, and our ratios.
    private static func compareWithPyTorch(_ rows: inout [[String: Any]], _ pytorch: PyTorchBaseline, _ settings: Settings) {
        let sizes = Set(settings.models.presets.compactMap { $0.split(separator: "-").last.map(String.init) })
        print("\nThe PyTorch transformer of the same shape (\(pytorch.script): SDPA, pre-allocated key/value cache, bf16, same run)")
        guard let (version, results) = pytorch.results(
            ["--presets"] + sizes.sorted().map { "transformer-\($0)" } + ["--contexts"] + settings.models.contexts.map(String.init)
                + ["--batches"] + settings.batches.map(String.init) + ["--steps", "\(settings.models.steps)"], threads: false)
        else { return }
        print("  torch \(version)")
        print("  preset                    context" + settings.batches.sorted().map { String(format: "   PyTorch b%-3d tok/s   ours / PyTorch", $0) }.joined())
        for i in rows.indices {
            guard let preset = rows[i]["preset"] as? String, let context = rows[i]["context"] as? Int,
                  let size = preset.split(separator: "-").last else { continue }
            var line = "  " + padded(preset, 25) + String(format: " %7d", context)
            for batch in settings.batches.sorted() {
                guard let theirs = results.first(where: {
                    $0["preset"] as? String == "transformer-\(size)" && $0["context"] as? Int == context && $0["batch"] as? Int == batch
                })?["decode_tokens_per_second"] as? Double,
                    let ours = rows[i]["decode_tokens_per_second_b\(batch)"] as? Double else { continue }
                rows[i]["pytorch_transformer_decode_tokens_per_second_b\(batch)"] = theirs
                rows[i]["decode_vs_pytorch_transformer_b\(batch)"] = ours / theirs
                line += String(format: " %20.1f %15.2fx", theirs, ours / theirs)
            }
            print(line)
        }
    }
}
