import Foundation
import PhalanxLayers
import PhalanxRuntime

/// The machine's own ceilings, measured at the start of every CPU benchmark run, so that every
/// result can be printed as a fraction of them.
public struct Ceilings: Sendable {
    /// Worker-pool threads (one per core unless `PHALANX_THREADS` says otherwise).
    public let threads: Int
    /// The BLAS and the kernels it runs (`Accelerate`, or OpenBLAS's core name).
    public let blasKernels: String
    /// Bytes per second read plus written by a parallel copy.
    public let copy: Double
    /// FLOP/s of the faster 1024^3 product (BLAS or the packed kernel).
    public let sgemm: Double
    /// FLOP/s of 16-lane multiply-adds on one core.
    public let fma: Double
    /// FLOP/s of register-only multiply-adds on all cores: no kernel can exceed it.
    public let peak: Double

    /// Ceilings as given (measured elsewhere, or for a check of the reports).
    public init(threads: Int, blasKernels: String, copy: Double, sgemm: Double, fma: Double, peak: Double) {
        (self.threads, self.blasKernels, self.copy, self.sgemm, self.fma, self.peak) = (threads, blasKernels, copy, sgemm, fma, peak)
    }

    /// Measures every ceiling, printing one line each.
    public static func measure() -> Ceilings {
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

    /// Ends a report: an error line for each rate (FLOP/s) above the FMA peak, the sgemm rate
    /// included; for each memory-bound result above 110% of its paired copy; and for each
    /// matrix-product-bound rate in `productRates` above 110% of the sgemm rate (a result above
    /// its ceiling means the ceiling was measured wrong, and every ratio to it with it; the 10%
    /// allows for the machine moving between two timings). Then the JSON line with those errors
    /// under `ceiling_errors`.
    /// - Returns: the error lines (empty when every result is below its ceiling).
    public func finish(_ json: [String: Any], rates: [(name: String, flops: Double)],
                       fractionsOfCopy: [(name: String, fraction: Double)] = [],
                       productRates: [(name: String, flops: Double)] = []) -> [String] {
        let errors = ([("sgemm 1024^3", sgemm)] + rates).filter { $0.1 > peak }.map {
            String(format: "ERROR: %@ at %.1f GFLOP/s exceeds the measured FMA peak of %.1f GFLOP/s: that ceiling is not a ceiling",
                   $0.0, $0.1 / 1e9, peak / 1e9)
        } + fractionsOfCopy.filter { $0.fraction > 1.1 }.map {
            String(format: "ERROR: %@ at %.0f%% of the paired copy: that ceiling is not a ceiling", $0.name, 100 * $0.fraction)
        } + productRates.filter { $0.flops > 1.1 * sgemm }.map {
            String(format: "ERROR: %@ at %.0f%% of the sgemm rate: that ceiling is not a ceiling", $0.name, 100 * $0.flops / sgemm)
        }
        for line in errors { print(line) }
        var json = json
        json["ceiling_errors"] = errors
        printJSONLine(json)
        return errors
    }

    /// The ceilings as the JSON line's fields.
    public var json: [String: Any] {
        ["threads": threads, "blas_kernels": blasKernels, "copy_gbps": copy / 1e9, "sgemm_gflops": sgemm / 1e9,
         "simd16_fma_gflops": fma / 1e9, "fma_peak_gflops": peak / 1e9]
    }
}

/// Prints one JSON object on its own line: the machine-readable end of every benchmark.
public func printJSONLine(_ object: [String: Any]) {
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else {
        print("{\"error\": \"benchmark result not representable as JSON\"}")
        return
    }
    print(String(decoding: data, as: UTF8.self))
}

/// `text` left-aligned in a column of `width` characters (`%-22@` does not pad on Linux).
func padded(_ text: String, _ width: Int = 22) -> String {
    text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
}

/// A result's name as a JSON key: no spaces, no `=`.
func jsonKey(_ name: String) -> String {
    name.replacingOccurrences(of: " ", with: "_").replacingOccurrences(of: "=", with: "")
}

/// A benchmark setting out of range: the message names the setting and what is allowed.
public struct BenchmarkSettingError: Error, CustomStringConvertible {
    /// What is out of range and what is allowed.
    public let description: String
    /// The error with its message.
    public init(_ description: String) { self.description = description }
}
