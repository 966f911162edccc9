import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining

/// `phalanx bench train --device cuda`: training-step speed of the presets on a GPU at a fixed
/// number of tokens per step (batch = tokens / context), the way GPU training runs: forward,
/// loss, backward, gradient clipping and AdamW, in bfloat16 mixed precision (or float32).
///
/// The ceiling is measured in the same run: cuBLAS's rate on an 8192^3 product in the compute
/// format (float32 accumulation; `CUBLAS.measureRate`). Model-FLOPs utilisation is the model's FLOPs per second
/// (`LanguageModel.trainingFlops`) over it. With `pytorch`, `scripts/torch-cuda-train.py` times
/// the same models in PyTorch (eager, bfloat16 autocast, fused AdamW; SDPA for attention,
/// flex attention for the window) in the same run.
public enum CUDATrainingBenchmark {
    /// What to measure.
    public struct Settings: Sendable {
        /// Presets, contexts, timed steps, window (`ModelBenchmarkSettings`).
        public var models: ModelBenchmarkSettings
        /// Tokens per step: batch = tokensPerStep / context.
        public var tokensPerStep = 65536
        /// The compute format.
        public var compute = NumberFormat.bfloat16
        /// `scripts/torch-cuda-train.py` with this interpreter, or nil for no PyTorch figures.
        public var pytorch: PyTorchBaseline?

        /// `models` at 64K tokens per step in bfloat16.
        public init(models: ModelBenchmarkSettings) { self.models = models }

        /// Throws when a context does not divide the tokens per step, or the models' settings are out of range.
        public func validate() throws {
            try models.validate(minimumContext: 16)
            guard tokensPerStep >= 1, models.contexts.allSatisfy({ tokensPerStep % $0 == 0 }) else {
                throw BenchmarkSettingError("tokens per step (\(tokensPerStep)) must be a multiple of every context (\(models.contexts)).")
            }
        }
    }

    /// One preset at one context.
    public struct Result: Sendable {
        /// Median seconds per step, tokens per step, model FLOPs per step, parameters.
        public let secondsPerStep: Double, tokensPerStep: Int, modelFlopsPerStep: Double, parameters: Int
        /// Tokens per second.
        public var tokensPerSecond: Double { Double(tokensPerStep) / secondsPerStep }
    }

    /// Times `settings.models.steps` steps (after two warm-up steps) of `preset` at `context` on `device`.
    public static func measure(preset: String, context: Int, settings: Settings, device: CUDADevice) throws -> Result {
        var configuration = try ModelConfiguration.preset(preset)
        configuration.window = settings.models.window
        let model = try LanguageModel(configuration, seed: 1)
        let placement = Placement(.cuda(device), compute: settings.compute)
        model.move(to: placement.device, compute: placement.compute)
        let optimizer = AdamW(model.parameters)
        optimizer.move(to: placement.device)
        let batch = settings.tokensPerStep / context
        var rng = SeededGenerator(seed: 2)
        let tokens = (0..<(batch * (context + 1))).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        var inputs: [Int32] = [], targets: [Int32] = []
        for b in 0..<batch {
            let row = tokens[(b * (context + 1))..<((b + 1) * (context + 1))]
            inputs += row.dropLast()
            targets += row.dropFirst()
        }
        func step() {
            model.zeroGradients()
            let cache = model.forward(tokens: inputs, batch: batch, length: context)
            _ = model.loss(cache, targets: targets)
            model.backward(cache)
            _ = optimizer.clipGradients(maxNorm: 1)
            optimizer.update(learningRate: 1e-4)
            try? device.checkFailure()  // waits for the step; a failure is thrown below
        }
        let seconds = Timing.median(repeats: settings.models.steps, warmUp: 2, step)
        try device.checkFailure()
        let result = Result(secondsPerStep: seconds, tokensPerStep: batch * context,
                            modelFlopsPerStep: model.trainingFlops(tokens: batch * context, context: context),
                            parameters: model.parameterCount)
        try device.context.releaseCachedMemory()  // the next model starts from an empty device
        return result
    }

    /// Runs the comparison and prints it; returns the JSON object of its last line.
    @discardableResult
    public static func report(_ settings: Settings) throws -> [String: Any] {
        let device = try CUDADevice.shared.get()
        let rate = try device.blas.measureRate(format: settings.compute)
        let presets = settings.models.presets
        print("Device: \(device); cuBLAS \(settings.compute) GEMM 8192^3 (fp32 accumulation): \(String(format: "%.0f", rate / 1e12)) TFLOP/s (the MFU ceiling)")
        print("\nTraining step on the GPU, \(settings.tokensPerStep) tokens per step, \(settings.compute), median of \(settings.models.steps) (window \(settings.models.window) for S layers)")
        print("  preset                    context  batch   ms/step     tokens/s    MFU    vs \(presets[0])")
        var rows: [[String: Any]] = []
        for context in settings.models.contexts {
            var baseline: Double?
            for preset in presets {
                let r = try measure(preset: preset, context: context, settings: settings, device: device)
                let speedup = r.tokensPerSecond / (baseline ?? r.tokensPerSecond)
                if baseline == nil { baseline = r.tokensPerSecond }
                let mfu = r.modelFlopsPerStep / r.secondsPerStep / rate
                print(String(format: "  %@ %7d %6d %9.1f %12.0f  %5.1f%%   %6.2fx", padded(preset, 25), context, r.tokensPerStep / context,
                             r.secondsPerStep * 1e3, r.tokensPerSecond, 100 * mfu, speedup))
                rows.append(["preset": preset, "context": context, "batch": r.tokensPerStep / context, "parameters": r.parameters,
                             "tokens_per_second": r.tokensPerSecond, "ms_per_step": r.secondsPerStep * 1e3, "mfu": mfu,
                             "speedup_vs_first": speedup])
            }
        }
        if let pytorch = settings.pytorch { compare(&rows, with: pytorch, settings) }
        let json: [String: Any] = ["benchmark": "training-step-cuda", "device": device.context.deviceName,
                                   "gemm_tflops": rate / 1e12, "tokens_per_step": settings.tokensPerStep,
                                   "compute": "\(settings.compute)", "results": rows]
        if let data = try? JSONSerialization.data(withJSONObject: json, options: [.sortedKeys]) {
            print(String(decoding: data, as: UTF8.self))
        }
        return json
    }

    /// Adds PyTorch's tokens/s and our ratio to each row it measured, printing the comparison.
    static func compare(_ rows: inout [[String: Any]], with pytorch: PyTorchBaseline, _ settings: Settings) {
        print("\nThe same models in PyTorch (\(pytorch.script), eager, bf16 autocast, fused AdamW, same run)")
        guard let (version, results) = pytorch.results(
            ["--presets"] + settings.models.presets.filter { !$0.hasPrefix("phalanx") }
                + ["--contexts"] + settings.models.contexts.map(String.init)
                + ["--tokens-per-step", "\(settings.tokensPerStep)", "--steps", "\(settings.models.steps)",
                   "--window", "\(settings.models.window)"], threads: false)
        else { return }
        print("  torch \(version)")
        TrainingBenchmark.addPyTorch(results, to: &rows, width: 25)
        // Every preset against PyTorch's transformer and sliding-window hybrid of its size.
        print("  preset                    context   / PyTorch transformer   / PyTorch swa-hybrid")
        for (i, row) in rows.enumerated() {
            guard let preset = row["preset"] as? String, let context = row["context"] as? Int,
                  let ours = row["tokens_per_second"] as? Double, let size = preset.split(separator: "-").last else { continue }
            var line = "  " + padded(preset, 25) + String(format: " %7d", context)
            for family in ["transformer", "swa-hybrid"] {
                guard let theirs = TrainingBenchmark.pyTorchRate(results, preset: "\(family)-\(size)", context: context) else { continue }
                rows[i]["vs_pytorch_\(family)"] = ours / theirs
                line += String(format: "   %20.2fx", ours / theirs)
            }
            print(line)
        }
    }

}
