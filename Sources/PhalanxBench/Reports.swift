import Foundation
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime

// The CPU benchmark reports of `phalanx bench`: each measures the ceilings, runs its benchmark,
// prints a table of results as fractions of the ceilings, and ends with one JSON line.

extension OperatorBenchmark.Configuration {
    /// Throws when a size or count is below 1, naming the setting.
    public func validate() throws {
        for (name, value) in [("batch", batch), ("length", length), ("heads", heads), ("head dim", headDim), ("repeats", repeats)]
        where value < 1 {
            throw BenchmarkSettingError("\(name) must be at least 1; got \(value).")
        }
    }
}

extension OperatorBenchmark {
    /// `phalanx bench operators`: each SWR operator's median time and effective bandwidth as a
    /// fraction of the paired copy bandwidth.
    /// - Returns: the ceiling errors (empty when every rate is below its ceiling).
    @discardableResult
    public static func report(_ configuration: Configuration) -> [String] {
        let ceilings = Ceilings.measure()
        let c = configuration
        print("\nSWR operators: batch \(c.batch), length \(c.length), \(c.heads) heads x \(c.headDim), float32, median of \(c.repeats)")
        print("  operator                  time      bandwidth   of copy (paired)")
        let results = OperatorBenchmark(configuration).run { r in
            print(String(format: "  %@ %7.2f ms  %7.1f GB/s  %5.1f%%", padded(r.name), r.seconds * 1e3,
                         r.bandwidth / 1e9, 100 * r.fractionOfCopy))
        }
        let seconds = Dictionary(uniqueKeysWithValues: results.map { ($0.name, $0.seconds) })
        if let exact = seconds["exact forward"], let jagged = seconds["jagged k=2 forward"] {
            print(String(format: "  exact forward / jagged forward: %.2fx", exact / jagged))
        }
        var json = ceilings.json
        json["benchmark"] = "swr-operators"
        json["shape"] = ["batch": c.batch, "length": c.length, "heads": c.heads, "head_dim": c.headDim]
        for r in results {
            json[jsonKey(r.name)] = ["ms": r.seconds * 1e3, "gbps": r.bandwidth / 1e9, "fraction_of_copy": r.fractionOfCopy]
        }
        return ceilings.finish(json, rates: [], fractionsOfCopy: results.map { ($0.name, $0.fractionOfCopy) })
    }
}

extension LayerBenchmark {
    /// What `phalanx bench layers` measures.
    public struct Settings: Sendable {
        /// Model width (Phalanx heads of 16; attention heads of `dim / heads`).
        public var dim = 256
        /// Attention heads.
        public var heads = 4
        /// Key/value heads of the Phalanx layer (nil: as many as heads).
        public var kvHeads: Int?
        /// Length of the Phalanx floor and attention-rate measurements.
        public var length = 4096
        /// Sliding-window attention window in the sweep.
        public var window = 512
        /// Lengths of the sweep.
        public var sweep = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
        /// Timed repeats per figure (the median is reported).
        public var repeats = 5
        /// Also time each of the Phalanx layer's matrix products alone (where its time goes).
        public var profile = false
        /// The same layers in PyTorch, measured in the same run (nil: no comparison).
        public var pytorch: PyTorchBaseline?

        /// The defaults above.
        public init() {}

        /// Throws for a width, head count or length the layers cannot take, naming the setting.
        public func validate() throws {
            let D = PhalanxLayer.headDim
            guard dim >= D && dim % D == 0 else { throw BenchmarkSettingError("dim must be a positive multiple of \(D); got \(dim).") }
            guard heads >= 1 && dim % heads == 0 else { throw BenchmarkSettingError("heads must divide dim; got \(heads).") }
            if let kvHeads, kvHeads < 1 || (dim / D) % kvHeads != 0 {
                throw BenchmarkSettingError("kv heads must divide the \(dim / D) heads; got \(kvHeads).")
            }
            guard length >= 1, window >= 1, repeats >= 1, !sweep.isEmpty, sweep.allSatisfy({ $0 >= 1 }) else {
                throw BenchmarkSettingError("length, window, repeats and the sweep lengths must be positive.")
            }
        }
    }

    /// `phalanx bench layers`: the Phalanx layer against its GEMM floor, the attention kernel's
    /// rate against sgemm, and a length sweep of the three mixers with their crossings.
    /// - Returns: the ceiling errors (empty when every rate is below its ceiling).
    @discardableResult
    public static func report(_ settings: Settings) -> [String] {
        let ceilings = Ceilings.measure()
        let (dim, heads, length, window, repeats) = (settings.dim, settings.heads, settings.length, settings.window, settings.repeats)
        let kv = settings.kvHeads ?? dim / PhalanxLayer.headDim
        var json = ceilings.json
        json["benchmark"] = "layers"

        print("\n1. Phalanx layer: dim \(dim), length \(length), batch 1, float32, median of \(repeats)")
        let t = phalanx(dim: dim, kvHeads: kv, length: length, repeats: repeats)
        let floor = 3 * t.forwardGemmFlops / ceilings.sgemm
        print(String(format: "  forward %.2f ms, forward+backward %.2f ms; GEMM floor %.2f ms; ratio %.2fx",
                     t.forward * 1e3, t.forwardBackward * 1e3, floor * 1e3, t.floorRatio(sgemmRate: ceilings.sgemm)))
        var rates = [("Phalanx layer forward+backward", 3 * t.forwardGemmFlops / t.forwardBackward)]
        json["phalanx"] = ["forward_ms": t.forward * 1e3, "forward_backward_ms": t.forwardBackward * 1e3,
                           "gemm_floor_ms": floor * 1e3, "floor_ratio": t.floorRatio(sgemmRate: ceilings.sgemm)]
        if settings.profile {
            let products = phalanxProducts(dim: dim, kvHeads: kv, length: length, repeats: repeats)
            rates += products.map { ($0.name, $0.rate) }
            print("  profile: each matrix product alone at the layer's shapes (C[m, n], inner k)")
            for p in products {
                print(String(format: "    %@ m %5d n %5d k %5d  %7.3f ms  %6.1f GFLOP/s  %5.1f%% of sgemm", padded(p.name),
                             p.m, p.n, p.k, p.seconds * 1e3, p.rate / 1e9, 100 * p.rate / ceilings.sgemm))
            }
            let sum = products.reduce(0) { $0 + $1.seconds }
            print(String(format: "    products %.2f ms; the rest of forward+backward (element-wise passes, recurrence) %.2f ms",
                         sum * 1e3, (t.forwardBackward - sum) * 1e3))
            json["phalanx_profile"] = ["products": products.map { ["name": $0.name, "m": $0.m, "n": $0.n, "k": $0.k,
                                                                    "ms": $0.seconds * 1e3, "gflops": $0.rate / 1e9] },
                                       "products_ms": sum * 1e3, "rest_ms": (t.forwardBackward - sum) * 1e3]
        }

        print("\n2. Attention kernel, causal, batch 1, \(heads) heads x \(dim / heads), length \(length)")
        let a = AttentionBenchmark.kernel(heads: heads, kvHeads: heads, headDim: dim / heads, length: length, window: nil, repeats: repeats)
        print(String(format: "  forward %.2f ms = %.1f GFLOP/s = %.1f%% of sgemm, %.1f%% of the FMA peak; forward+backward %.2f ms",
                     a.forward * 1e3, a.forwardRate / 1e9, 100 * a.forwardRate / ceilings.sgemm, 100 * a.forwardRate / ceilings.peak,
                     a.forwardBackward * 1e3))
        rates += [("attention forward", a.forwardRate), ("attention forward+backward", a.forwardBackwardRate)]
        json["attention_kernel"] = ["forward_ms": a.forward * 1e3, "forward_gflops": a.forwardRate / 1e9,
                                    "fraction_of_sgemm": a.forwardRate / ceilings.sgemm, "fraction_of_fma_peak": a.forwardRate / ceilings.peak,
                                    "forward_backward_ms": a.forwardBackward * 1e3]

        print("\n3. Layers' forward+backward (ms) against length, dim \(dim)")
        print("   length    phalanx   swa-\(window)   attention   swa ms per 1K tokens")
        var rows: [[String: Any]] = []
        var previous: (length: Int, p: Double, s: Double, f: Double)?
        var crossings: [String] = []
        for length in settings.sweep {
            let p = phalanx(dim: dim, kvHeads: kv, length: length, repeats: repeats).forwardBackward
            let s = attention(dim: dim, heads: heads, window: window, length: length, repeats: repeats).forwardBackward
            let f = attention(dim: dim, heads: heads, window: nil, length: length, repeats: repeats).forwardBackward
            print(String(format: "  %7d  %9.2f  %9.2f  %10.2f   %8.3f", length, p * 1e3, s * 1e3, f * 1e3, s * 1e3 / Double(length) * 1024))
            rows.append(["length": length, "phalanx_ms": p * 1e3, "swa_ms": s * 1e3, "attention_ms": f * 1e3])
            if let q = previous {
                for (name, before, now) in [("phalanx/swa", q.p - q.s, p - s), ("phalanx/attention", q.p - q.f, p - f),
                                            ("swa/attention", q.s - q.f, s - f)] where (before < 0) != (now < 0) {
                    crossings.append("\(name) cross between \(q.length) and \(length)")
                }
            }
            previous = (length, p, s, f)
        }
        print(crossings.isEmpty ? "  no crossings in this range (the order at the first length holds throughout)"
                                : crossings.map { "  " + $0 }.joined(separator: "\n"))
        json["sweep"] = rows
        json["crossings"] = crossings
        if let pytorch = settings.pytorch {
            json["pytorch"] = compare(phalanx: t, attention: a, with: pytorch, settings, peak: ceilings.peak)
        }
        // Every rate here is bound by matrix products (the layer's GEMM FLOPs over its time, each
        // product alone, the attention kernel), so none may pass the sgemm rate either.
        return ceilings.finish(json, rates: rates, productRates: rates)
    }
}

extension LayerBenchmark {
    /// The Phalanx layer's forward+backward and the attention kernel's forward against the same
    /// in PyTorch (its Phalanx layer, and `scaled_dot_product_attention(is_causal: true)`),
    /// printed; returns the figures for the JSON line.
    static func compare(phalanx t: LayerTiming, attention a: AttentionTiming, with pytorch: PyTorchBaseline,
                        _ settings: Settings, peak: Double) -> [String: Any] {
        print("\n4. The same in PyTorch (scripts/torch-cpu-bench.py, float32, \(WorkerPool.shared.threadCount) threads, same run)")
        guard let (version, results) = pytorch.results(["layers", "--dim", "\(settings.dim)", "--heads", "\(settings.heads)",
                                                         "--length", "\(settings.length)", "--repeats", "\(settings.repeats)"])
        else { return [:] }
        func figure(_ layer: String, _ key: String) -> Double? {
            results.first { $0["layer"] as? String == layer }?[key] as? Double
        }
        var json: [String: Any] = ["torch": version]
        print("  torch \(version)")
        if let theirs = figure("phalanx", "forward_backward_ms") {
            print(String(format: "  Phalanx layer forward+backward: PyTorch %.2f ms, ours %.2f ms: %.2fx PyTorch's speed", theirs,
                         t.forwardBackward * 1e3, theirs / (t.forwardBackward * 1e3)))
            json["phalanx_forward_backward_ms"] = theirs
            json["phalanx_speedup"] = theirs / (t.forwardBackward * 1e3)
        }
        // Both kernels' rates use our FLOP count (visible pairs only), so their fractions of the
        // FMA peak say how much room each leaves: 1.3x SDPA needs ours at 1.3 times SDPA's fraction.
        func rates(_ theirs: Double, _ ours: Double, _ flops: Double) -> String {
            String(format: "%.0f%% and %.0f%% of the FMA peak", 100 * flops / (theirs / 1e3) / peak, 100 * flops / ours / peak)
        }
        if let theirs = figure("sdpa kernel, causal", "forward_ms") {
            print(String(format: "  attention kernel forward (causal): PyTorch SDPA %.2f ms, ours %.2f ms: %.2fx SDPA's speed", theirs,
                         a.forward * 1e3, theirs / (a.forward * 1e3)) + " (\(rates(theirs, a.forward, a.forwardFlops)))")
            json["sdpa_forward_ms"] = theirs
            json["attention_speedup"] = theirs / (a.forward * 1e3)
        }
        if let theirs = figure("sdpa kernel, causal", "forward_backward_ms") {
            print(String(format: "  attention kernel forward+backward: PyTorch SDPA %.2f ms, ours %.2f ms: %.2fx SDPA's speed", theirs,
                         a.forwardBackward * 1e3, theirs / (a.forwardBackward * 1e3))
                  + " (\(rates(theirs, a.forwardBackward, a.forwardBackwardFlops)))")
            json["sdpa_forward_backward_ms"] = theirs
            json["attention_forward_backward_speedup"] = theirs / (a.forwardBackward * 1e3)
        }
        return json
    }
}

/// Presets, context lengths and repeats of a model-level benchmark (`bench train`, `bench decode`).
public struct ModelBenchmarkSettings: Sendable {
    /// Presets to compare (the first is the baseline of the ratios).
    public var presets = ["transformer-small", "swa-hybrid-small", "phalanx-hybrid-small"]
    /// Context lengths.
    public var contexts: [Int]
    /// Timed steps per figure.
    public var steps: Int
    /// Sliding-window attention window of `S` layers.
    public var window = 512
    /// The same models in PyTorch, measured in the same run (nil: no comparison).
    public var pytorch: PyTorchBaseline?

    /// The three small presets at `contexts`, `steps` timed steps each.
    public init(contexts: [Int], steps: Int) {
        self.contexts = contexts
        self.steps = steps
    }

    /// Throws for an unknown preset, a context below `minimumContext` or a count below 1.
    public func validate(minimumContext: Int = 1) throws {
        guard !presets.isEmpty else { throw BenchmarkSettingError("name at least one preset.") }
        for p in presets { _ = try ModelConfiguration.preset(p) }
        guard !contexts.isEmpty, contexts.allSatisfy({ $0 >= minimumContext }) else {
            throw BenchmarkSettingError("contexts must be at least \(minimumContext); got \(contexts).")
        }
        guard steps >= 1, window >= 1 else { throw BenchmarkSettingError("steps and window must be at least 1.") }
    }
}

extension TrainingBenchmark {
    /// `phalanx bench train`: tokens/s and model-FLOPs utilisation of each preset's training step
    /// at each context, and each preset's speed-up over the first.
    /// - Returns: the ceiling errors (empty when every rate is below its ceiling).
    @discardableResult
    public static func report(_ settings: ModelBenchmarkSettings) throws -> [String] {
        let ceilings = Ceilings.measure()
        let presets = settings.presets
        print("\nTraining step, batch 1, median of \(settings.steps) (window \(settings.window) for S layers)")
        print("  MFU: model FLOPs per second over the sgemm rate; 'of peak': over the FMA peak")
        print("  preset                 context   ms/step    tokens/s    MFU   of peak   vs \(presets[0])")
        var json = ceilings.json
        json["benchmark"] = "training-step"
        var rates: [(name: String, flops: Double)] = []
        var rows: [[String: Any]] = []
        for context in settings.contexts {
            var baseline: Double?
            for preset in presets {
                let r = try measure(preset: preset, context: context, steps: settings.steps, window: settings.window)
                let speedup = r.tokensPerSecond / (baseline ?? r.tokensPerSecond)
                if baseline == nil { baseline = r.tokensPerSecond }
                print(String(format: "  %@ %7d %9.1f %11.0f  %5.1f%%   %5.1f%%   %6.2fx", padded(preset), context,
                             r.secondsPerStep * 1e3, r.tokensPerSecond, 100 * r.utilisation(sgemmRate: ceilings.sgemm),
                             100 * r.utilisation(sgemmRate: ceilings.peak), speedup))
                rates.append(("\(preset) training step at \(context)", r.utilisation(sgemmRate: 1)))
                rows.append(["preset": preset, "context": context, "tokens_per_second": r.tokensPerSecond,
                             "mfu": r.utilisation(sgemmRate: ceilings.sgemm),
                             "fraction_of_fma_peak": r.utilisation(sgemmRate: ceilings.peak), "speedup_vs_first": speedup])
            }
        }
        if let pytorch = settings.pytorch {
            compare(&rows, with: pytorch, settings)
        }
        json["results"] = rows
        // Model FLOPs per second are bound by the matrix products too.
        return ceilings.finish(json, rates: rates, productRates: rates)
    }

    /// Adds `speedup_vs_pytorch` to each row that PyTorch measured, printing the comparison.
    static func compare(_ rows: inout [[String: Any]], with pytorch: PyTorchBaseline, _ settings: ModelBenchmarkSettings) {
        print("\nThe same models in PyTorch (scripts/torch-cpu-bench.py, float32, \(WorkerPool.shared.threadCount) threads, same run)")
        guard let (version, results) = pytorch.results(["train", "--presets"] + settings.presets
                + ["--contexts"] + settings.contexts.map(String.init) + ["--steps", "\(settings.steps)", "--window", "\(settings.window)"])
        else { return }
        print("  torch \(version)")
        addPyTorch(results, to: &rows, width: 22)
    }

    /// Prints each row's tokens/s beside PyTorch's for the same preset and context, and adds
    /// `pytorch_tokens_per_second` and `speedup_vs_pytorch` to it.
    static func addPyTorch(_ results: [[String: Any]], to rows: inout [[String: Any]], width: Int) {
        print("  " + padded("preset", width) + " context   PyTorch tok/s   ours tok/s   ours / PyTorch")
        for (i, row) in rows.enumerated() {
            guard let preset = row["preset"] as? String, let context = row["context"] as? Int,
                  let ours = row["tokens_per_second"] as? Double,
                  let theirs = pyTorchRate(results, preset: preset, context: context)
            else { continue }
            print(String(format: "  %@ %7d %15.0f %12.0f   %6.2fx", padded(preset, width), context, theirs, ours, ours / theirs))
            rows[i]["pytorch_tokens_per_second"] = theirs
            rows[i]["speedup_vs_pytorch"] = ours / theirs
        }
    }

    /// PyTorch's tokens/s for `preset` at `context` in `results`, if it measured them.
    static func pyTorchRate(_ results: [[String: Any]], preset: String, context: Int) -> Double? {
        results.first(where: { $0["preset"] as? String == preset && $0["context"] as? Int == context })?["tokens_per_second"] as? Double
    }
}

extension DecodeBenchmark {
    /// `phalanx bench decode`: prefill and decode tokens/s of each preset at each context, the
    /// decode state's size, and each preset's decode speed-up over the first.
    /// - Returns: the ceiling errors (empty when every rate is below its ceiling).
    @discardableResult
    public static func report(_ settings: ModelBenchmarkSettings) throws -> [String] {
        let ceilings = Ceilings.measure()
        let presets = settings.presets
        print("\nPrefill and decode, batch 1 (\(settings.steps) decode steps per figure)")
        print("  preset                 context   prefill tok/s   decode tok/s   state        of it Phalanx   decode vs \(presets[0])")
        var json = ceilings.json
        json["benchmark"] = "decode"
        var rows: [[String: Any]] = []
        for context in settings.contexts {
            var baseline: Double?
            for preset in presets {
                let r = try measure(preset: preset, context: context, steps: settings.steps, window: settings.window)
                let ratio = r.decodeTokensPerSecond / (baseline ?? r.decodeTokensPerSecond)
                if baseline == nil { baseline = r.decodeTokensPerSecond }
                print(String(format: "  %@ %7d %15.0f %14.1f   %8.2f MB  %9.1f KB   %6.2fx", padded(preset), context,
                             r.prefillTokensPerSecond, r.decodeTokensPerSecond, Double(r.stateBytes) / 1e6,
                             Double(r.phalanxStateBytes) / 1e3, ratio))
                rows.append(["preset": preset, "context": context, "prefill_tokens_per_second": r.prefillTokensPerSecond,
                             "decode_tokens_per_second": r.decodeTokensPerSecond, "state_bytes": r.stateBytes,
                             "phalanx_state_bytes": r.phalanxStateBytes,
                             "decode_speedup_vs_first": ratio])
            }
        }
        json["results"] = rows
        return ceilings.finish(json, rates: [])
    }
}
