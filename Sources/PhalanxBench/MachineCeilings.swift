#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif
import Foundation
import PhalanxRuntime

/// What this machine can do, measured in the same run as the results that are divided by it.
public enum MachineCeilings {
    /// Copy bandwidth in bytes per second (bytes read plus bytes written), with every thread of
    /// `pool` copying its own slice of a buffer far larger than the caches.
    public static func copyBandwidth(bytes: Int = 512 << 20, pool: WorkerPool = .shared, repeats: Int = 7) -> Double {
        let count = bytes / MemoryLayout<Float>.stride
        let source = BenchBuffer(count: count) { Float($0 & 1023) }
        let destination = BenchBuffer(count: count) { _ in 0 }
        let parts = pool.threadCount
        let src = source.pointer.baseAddress!, dst = destination.pointer.baseAddress!
        let seconds = Timing.median(repeats: repeats) {
            pool.run(parts) { p in
                let begin = p * count / parts, end = (p + 1) * count / parts
                memcpy(dst + begin, src + begin, (end - begin) * MemoryLayout<Float>.stride)
            }
        }
        return Double(2 * bytes) / seconds
    }

    /// Single-precision matrix product rate (FLOP/s) of the platform BLAS, square `n x n`.
    public static func sgemmRate(n: Int = 1024, repeats: Int = 7) -> Double {
        let a = BenchBuffer(count: n * n) { Float($0 % 7) * 0.01 }
        let b = BenchBuffer(count: n * n) { Float($0 % 5) * 0.01 }
        let c = BenchBuffer(count: n * n) { _ in 0 }
        let seconds = Timing.median(repeats: repeats) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n), 1,
                        a.pointer.baseAddress, Int32(n), b.pointer.baseAddress, Int32(n), 0,
                        c.pointer.baseAddress, Int32(n))
        }
        return 2 * Double(n * n * n) / seconds
    }

    /// One core's rate (FLOP/s) of 16-lane fused multiply-adds on a 16 x 16 tile product held in
    /// registers. It proves the vector fast path is compiled in: with the target CPU's
    /// instruction set this runs at tens of GFLOP/s; without it, `addingProduct` becomes 16 calls
    /// to `fmaf` and the rate falls about 40-fold, to near 1 GFLOP/s.
    public static func vectorFMARate(iterations: Int = 2_000_000) -> Double {
        var rows = (0..<16).map { SIMD16<Float>(repeating: Float($0) * 1e-3) }
        let columns = (0..<16).map { Float($0) * 1e-4 }
        var accumulators = [SIMD16<Float>](repeating: .zero, count: 16)
        let seconds = Timing.median(repeats: 5) {
            rows.withUnsafeMutableBufferPointer { r in
                accumulators.withUnsafeMutableBufferPointer { acc in
                    var c0 = acc[0], c1 = acc[1], c2 = acc[2], c3 = acc[3]
                    var c4 = acc[4], c5 = acc[5], c6 = acc[6], c7 = acc[7]
                    for i in 0..<iterations {
                        let x = r[i & 15]
                        let k = columns[i & 15]
                        c0 = c0.addingProduct(x, SIMD16(repeating: k))
                        c1 = c1.addingProduct(x, SIMD16(repeating: k + 1))
                        c2 = c2.addingProduct(x, SIMD16(repeating: k + 2))
                        c3 = c3.addingProduct(x, SIMD16(repeating: k + 3))
                        c4 = c4.addingProduct(x, SIMD16(repeating: k + 4))
                        c5 = c5.addingProduct(x, SIMD16(repeating: k + 5))
                        c6 = c6.addingProduct(x, SIMD16(repeating: k + 6))
                        c7 = c7.addingProduct(x, SIMD16(repeating: k + 7))
                    }
                    acc[0] = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7
                }
            }
        }
        // Keep the result alive so the loop cannot be removed.
        if accumulators[0].sum() == .infinity { print("") }
        return Double(iterations) * 8 * 16 * 2 / seconds
    }
}
