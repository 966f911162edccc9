import ArgumentParser
import Foundation
import PhalanxBench
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks that measure this machine's ceilings and report every result as a fraction of them.",
        subcommands: [BenchOperators.self, BenchLayers.self, BenchTraining.self, BenchDecode.self, BenchCUDA.self],
        defaultSubcommand: BenchOperators.self)
}

/// The machine's own ceilings, measured at the start of every benchmark run.
struct Ceilings {
    let threads: Int, blasKernels: String, copy: Double, sgemm: Double, fma: Double, peak: Double

    static func measure() -> Ceilings {
        let pool = WorkerPool.shared
        #if canImport(Accelerate)
        let kernels = "Accelerate"
        print("Machine: \(pool.threadCount) threads, Accelerate")
        #else
        let kernels = BLASKernels.current
        print("Machine: \(pool.threadCount) threads, OpenBLAS kernels \(kernels)")
        if let wider = BLASKernels.wider {
            print("  (narrower than this processor allows\(BLASKernels.requested.map { ", set by OPENBLAS_CORETYPE=\($0)" } ?? ""): "
                  + "OPENBLAS_CORETYPE=\(wider), or unset, gives about 1.8x the sgemm rate)")
        }
        #endif
        let copy = MachineCeilings.copyBandwidth(pool: pool)
        print(String(format: "  copy bandwidth      %7.1f GB/s (read + write, all threads)", copy / 1e9))
        let rates = MachineCeilings.sgemmRates()
        let sgemm = max(rates.blas, rates.packed)
        print(String(format: "  sgemm 1024^3        %7.1f GFLOP/s  (BLAS %.1f, packed kernel %.1f; layers use %@)",
                     sgemm / 1e9, rates.blas / 1e9, rates.packed / 1e9, Gemm.kernel.rawValue))
        let fma = MachineCeilings.vectorFMARate()
        print(String(format: "  SIMD16 FMA, 1 core  %7.1f GFLOP/s  (%@)", fma / 1e9,
                     fma > 8e9 ? "vector fast path compiled in" : "SLOW: built without the target CPU's vector instructions"))
        let peak = MachineCeilings.fmaPeak(pool: pool)
        print(String(format: "  FMA peak, all       %7.1f GFLOP/s  (registers only: no kernel can exceed it)", peak / 1e9))
        return Ceilings(threads: pool.threadCount, blasKernels: kernels, copy: copy, sgemm: sgemm, fma: fma, peak: peak)
    }

    var json: [String: Any] {
        ["threads": threads, "blas_kernels": blasKernels, "copy_gbps": copy / 1e9, "sgemm_gflops": sgemm / 1e9, "simd16_fma_gflops": fma / 1e9,
         "fma_peak_gflops": peak / 1e9]
    }
}

/// Prints one JSON object on its own line: the machine-readable end of every benchmark.
func printJSONLine(_ object: [String: Any]) {
    let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    print(String(decoding: data, as: UTF8.self))
}

/// `text` left-aligned in a column of `width` characters (`%-22@` does not pad on Linux).
func padded(_ text: String, _ width: Int = 22) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
}

func jsonKey(_ name: String) -> String {
    name.replacingOccurrences(of: " ", with: "_").replacingOccurrences(of: "=", with: "")
}

struct BenchOperators: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "operators",
        abstract: "The SWR operators against the measured copy bandwidth (the default benchmark).",
        discussion: """
        Each operator's median time and effective bandwidth (bytes it must read and write / time) \
        as a fraction of the copy bandwidth: every repeat copies the same number of bytes with all \
        threads right before the operator, and the median of those paired ratios is reported \
        (the machine is shared; its bandwidth drifts). Ends with one JSON line.
        """)

    @Option(help: "Sequences per call.") var batch = 4
    @Option(help: "Positions per sequence.") var length = 65536
    @Option(help: "Heads.") var heads = 16
    @Option(help: "Channels per head.") var headDim = 16
    @Option(help: "Timed repeats per figure (the median is reported).") var repeats = 9
    @Option(help: "Only the operators whose name contains this text (for example 'backward').") var only: String?

    func validate() throws {
        for (name, value) in [("--batch", batch), ("--length", length), ("--heads", heads),
                              ("--head-dim", headDim), ("--repeats", repeats)] where value < 1 {
            throw ValidationError("\(name) must be at least 1; got \(value).")
        }
    }

    func run() {
        let ceilings = Ceilings.measure()
        var configuration = OperatorBenchmark.Configuration()
        configuration.batch = batch
        configuration.length = length
        configuration.heads = heads
        configuration.headDim = headDim
        configuration.repeats = repeats
        configuration.only = only
        print("\nSWR operators: batch \(batch), length \(length), \(heads) heads x \(headDim), float32, median of \(repeats)")
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
        json["shape"] = ["batch": batch, "length": length, "heads": heads, "head_dim": headDim]
        for r in results {
            json[jsonKey(r.name)] = ["ms": r.seconds * 1e3, "gbps": r.bandwidth / 1e9, "fraction_of_copy": r.fractionOfCopy]
        }
        printJSONLine(json)
    }
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
    @Option(parsing: .upToNextOption, help: "Lengths of the sweep.") var sweep = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    @Option(help: "Timed repeats per figure (the median is reported).") var repeats = 5

    func validate() throws {
        guard dim >= 16 && dim % 16 == 0 else { throw ValidationError("--dim must be a positive multiple of 16; got \(dim).") }
        guard heads >= 1 && dim % heads == 0 else { throw ValidationError("--heads must divide --dim; got \(heads).") }
        if let kvHeads, kvHeads < 1 || (dim / 16) % kvHeads != 0 {
            throw ValidationError("--kv-heads must divide the \(dim / 16) heads; got \(kvHeads).")
        }
        guard length >= 1, window >= 1, repeats >= 1, sweep.allSatisfy({ $0 >= 1 }) else {
            throw ValidationError("--length, --window, --repeats and --sweep must be positive.")
        }
    }

    func run() {
        let ceilings = Ceilings.measure()
        let kv = kvHeads ?? dim / 16
        var json = ceilings.json
        json["benchmark"] = "layers"

        print("\n1. Phalanx layer: dim \(dim), length \(length), batch 1, float32, median of \(repeats)")
        let t = LayerBenchmark.phalanx(dim: dim, kvHeads: kv, length: length, repeats: repeats)
        let floor = 3 * t.forwardGemmFlops / ceilings.sgemm
        print(String(format: "  forward %.2f ms, forward+backward %.2f ms; GEMM floor %.2f ms; ratio %.2fx",
                     t.forward * 1e3, t.forwardBackward * 1e3, floor * 1e3, t.floorRatio(sgemmRate: ceilings.sgemm)))
        json["phalanx"] = ["forward_ms": t.forward * 1e3, "forward_backward_ms": t.forwardBackward * 1e3,
                           "gemm_floor_ms": floor * 1e3, "floor_ratio": t.floorRatio(sgemmRate: ceilings.sgemm)]

        print("\n2. Attention kernel, causal, batch 1, \(heads) heads x \(dim / heads), length \(length)")
        let a = AttentionBenchmark.kernel(heads: heads, kvHeads: heads, headDim: dim / heads, length: length, window: nil, repeats: repeats)
        print(String(format: "  forward %.2f ms = %.1f GFLOP/s = %.1f%% of sgemm, %.1f%% of the FMA peak; forward+backward %.2f ms",
                     a.forward * 1e3, a.forwardRate / 1e9, 100 * a.forwardRate / ceilings.sgemm, 100 * a.forwardRate / ceilings.peak,
                     a.forwardBackward * 1e3))
        json["attention_kernel"] = ["forward_ms": a.forward * 1e3, "forward_gflops": a.forwardRate / 1e9,
                                    "fraction_of_sgemm": a.forwardRate / ceilings.sgemm, "fraction_of_fma_peak": a.forwardRate / ceilings.peak,
                                    "forward_backward_ms": a.forwardBackward * 1e3]

        print("\n3. Layers' forward+backward (ms) against length, dim \(dim)")
        print("   length    phalanx   swa-\(window)   attention   swa ms per 1K tokens")
        var rows: [[String: Any]] = []
        var previous: (length: Int, p: Double, s: Double, f: Double)?
        var crossings: [String] = []
        for length in sweep {
            let p = LayerBenchmark.phalanx(dim: dim, kvHeads: kv, length: length, repeats: repeats).forwardBackward
            let s = LayerBenchmark.attention(dim: dim, heads: heads, window: window, length: length, repeats: repeats).forwardBackward
            let f = LayerBenchmark.attention(dim: dim, heads: heads, window: nil, length: length, repeats: repeats).forwardBackward
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
        printJSONLine(json)
    }
}

struct BenchTraining: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Training-step speed (forward, backward, AdamW) of the presets at several context lengths.",
        discussion: """
        Batch 1, random byte tokens. Reports tokens/s, model-FLOPs utilisation (model FLOPs per \
        second over the sgemm rate measured in the same run, and over the FMA peak), each preset's speed-up over the \
        first preset, and over PyTorch 2.15 on this machine for the same models (2 threads, \
        float32; figures measured outside this program and quoted in the issue). Ends with one JSON line.
        """)

    @Option(parsing: .upToNextOption, help: "Presets to compare (the first is the baseline of the ratios).")
    var presets = ["transformer-small", "swa-hybrid-small", "phalanx-hybrid-small"]
    @Option(parsing: .upToNextOption, help: "Context lengths.") var contexts = [2048, 8192, 32768]
    @Option(help: "Timed steps per figure (the median is reported).") var steps = 3
    @Option(help: "Sliding-window attention window.") var window = 512

    /// PyTorch 2.15, 2 threads, float32, batch 1, forward+backward+AdamW, tokens/s (issue 4).
    static let pytorch: [String: [Int: Double]] = [
        "transformer-small": [2048: 3971, 8192: 1569, 32768: 450],
        "swa-hybrid-small": [2048: 3671, 8192: 2412, 32768: 1062],
        "phalanx-hybrid-small": [2048: 4710, 8192: 3102, 32768: 1243],
    ]

    func validate() throws {
        for p in presets { _ = try ModelConfiguration.preset(p) }
        guard contexts.allSatisfy({ $0 >= 16 }), steps >= 1 else { throw ValidationError("--contexts must be >= 16 and --steps >= 1.") }
    }

    func run() throws {
        let ceilings = Ceilings.measure()
        print("\nTraining step, batch 1, median of \(steps) (window \(window) for S layers)")
        print("  MFU: model FLOPs per second over the sgemm rate (the issue's definition); 'of peak': over the FMA peak")
        print("  preset                 context   ms/step    tokens/s    MFU   of peak   vs \(presets[0])   vs PyTorch")
        var json = ceilings.json
        json["benchmark"] = "training-step"
        var baseline: [Int: Double] = [:]
        var rows: [[String: Any]] = []
        for context in contexts {
            for preset in presets {
                let r = try TrainingBenchmark.measure(preset: preset, context: context, steps: steps, window: window)
                if preset == presets[0] { baseline[context] = r.tokensPerSecond }
                let speedup = r.tokensPerSecond / (baseline[context] ?? r.tokensPerSecond)
                let torch = Self.pytorch[preset]?[context]
                print(String(format: "  %@ %7d %9.1f %11.0f  %5.1f%%   %5.1f%%   %6.2fx       %@", padded(preset), context,
                             r.secondsPerStep * 1e3, r.tokensPerSecond, 100 * r.utilisation(sgemmRate: ceilings.sgemm),
                             100 * r.utilisation(sgemmRate: ceilings.peak), speedup,
                             torch.map { String(format: "%.2fx", r.tokensPerSecond / $0) } ?? "-"))
                var row: [String: Any] = ["preset": preset, "context": context, "tokens_per_second": r.tokensPerSecond,
                                          "mfu": r.utilisation(sgemmRate: ceilings.sgemm),
                                          "fraction_of_fma_peak": r.utilisation(sgemmRate: ceilings.peak), "speedup_vs_first": speedup]
                if let torch { row["speedup_vs_pytorch"] = r.tokensPerSecond / torch }
                rows.append(row)
            }
        }
        json["results"] = rows
        printJSONLine(json)
    }
}

struct BenchDecode: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decode",
        abstract: "Prefill and decode tokens/s of the presets against context length.",
        discussion: """
        Batch 1, random tokens: a prefill of the whole context from empty, then one-token decode \
        steps, each through every mixer's state (Phalanx: constant-size recurrence state; \
        attention: a key/value cache that grows; sliding window: a fixed ring). Ends with one JSON line.
        """)

    @Option(parsing: .upToNextOption, help: "Presets to compare (the first is the baseline of the ratios).")
    var presets = ["transformer-small", "swa-hybrid-small", "phalanx-hybrid-small"]
    @Option(parsing: .upToNextOption, help: "Context lengths.") var contexts = [1024, 4096, 16384, 32768]
    @Option(help: "Decode steps timed after each prefill.") var steps = 32
    @Option(help: "Sliding-window attention window.") var window = 512

    func validate() throws {
        for p in presets { _ = try ModelConfiguration.preset(p) }
        guard contexts.allSatisfy({ $0 >= 1 }), steps >= 1 else { throw ValidationError("--contexts and --steps must be positive.") }
    }

    func run() throws {
        let ceilings = Ceilings.measure()
        print("\nPrefill and decode, batch 1 (\(steps) decode steps per figure)")
        print("  preset                 context   prefill tok/s   decode tok/s   state        decode vs \(presets[0])")
        var json = ceilings.json
        json["benchmark"] = "decode"
        var rows: [[String: Any]] = []
        for context in contexts {
            var baseline: Double?
            for preset in presets {
                let r = try DecodeBenchmark.measure(preset: preset, context: context, steps: steps, window: window)
                if baseline == nil { baseline = r.decodeTokensPerSecond }
                let ratio = r.decodeTokensPerSecond / baseline!
                print(String(format: "  %@ %7d %15.0f %14.1f   %8.2f MB   %6.2fx", padded(preset), context, r.prefillTokensPerSecond,
                             r.decodeTokensPerSecond, Double(r.stateBytes) / 1e6, ratio))
                rows.append(["preset": preset, "context": context, "prefill_tokens_per_second": r.prefillTokensPerSecond,
                             "decode_tokens_per_second": r.decodeTokensPerSecond, "state_bytes": r.stateBytes,
                             "decode_speedup_vs_first": ratio])
            }
        }
        json["results"] = rows
        printJSONLine(json)
    }
}
