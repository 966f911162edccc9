import ArgumentParser
import Foundation
import PhalanxBench
import PhalanxRuntime

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure the machine's ceilings, then the SWR operators as fractions of them.",
        discussion: """
        Prints the copy bandwidth and sgemm rate of this machine, a check that 16-lane vector \
        multiply-adds are compiled in, then each operator's median time and effective bandwidth \
        (bytes it must read and write / time) as a fraction of the copy bandwidth. The last line \
        is one JSON object with every figure.
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
        let pool = WorkerPool.shared
        print("Machine: \(pool.threadCount) threads")
        let copy = MachineCeilings.copyBandwidth(pool: pool)
        print(String(format: "  copy bandwidth      %7.1f GB/s (read + write, all threads)", copy / 1e9))
        let sgemm = MachineCeilings.sgemmRate()
        print(String(format: "  sgemm 1024^3        %7.1f GFLOP/s", sgemm / 1e9))
        let fma = MachineCeilings.vectorFMARate()
        let vectorOK = fma > 8e9
        print(String(format: "  SIMD16 FMA, 1 core  %7.1f GFLOP/s  (%@)", fma / 1e9,
                     vectorOK ? "vector fast path compiled in" : "SLOW: built without the target CPU's vector instructions"))

        var configuration = OperatorBenchmark.Configuration()
        configuration.batch = batch
        configuration.length = length
        configuration.heads = heads
        configuration.headDim = headDim
        configuration.repeats = repeats
        configuration.only = only
        print("\nSWR operators: batch \(batch), length \(length), \(heads) heads x \(headDim), float32, median of \(repeats)")
        print("  operator                  time      bandwidth   of copy")
        let results = OperatorBenchmark(configuration, pool: pool).run { r in
            print(String(format: "  %-22@ %7.2f ms  %7.1f GB/s  %5.1f%%", r.name, r.seconds * 1e3,
                         r.bandwidth / 1e9, 100 * r.bandwidth / copy))
        }
        let seconds = Dictionary(uniqueKeysWithValues: results.map { ($0.name, $0.seconds) })
        if let exact = seconds["exact forward"], let jagged = seconds["jagged k=2 forward"] {
            print(String(format: "  exact forward / jagged forward: %.2fx", exact / jagged))
        }
        var json: [String: Any] = [
            "benchmark": "swr-operators", "threads": pool.threadCount,
            "copy_gbps": copy / 1e9, "sgemm_gflops": sgemm / 1e9, "simd16_fma_gflops": fma / 1e9,
            "shape": ["batch": batch, "length": length, "heads": heads, "head_dim": headDim],
        ]
        for r in results {
            let key = r.name.replacingOccurrences(of: " ", with: "_").replacingOccurrences(of: "=", with: "")
            json[key] = ["ms": r.seconds * 1e3, "gbps": r.bandwidth / 1e9, "fraction_of_copy": r.bandwidth / copy]
        }
        let data = try! JSONSerialization.data(withJSONObject: json, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }
}
