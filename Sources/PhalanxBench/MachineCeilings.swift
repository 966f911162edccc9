#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif
import CPhalanxIntrinsics
import Foundation
import PhalanxLayers
import PhalanxRuntime

/// What this machine can do, measured in the same run as the results that are divided by it.
public enum MachineCeilings {
    /// Copy bandwidth in bytes per second (bytes read plus bytes written), with every thread of
    /// `pool` copying its own slice of a buffer far larger than the caches: the faster of the two
    /// ways of `copy`, each the fastest of `repeats` (noise on a shared machine can only lower a
    /// ceiling).
    public static func copyBandwidth(bytes: Int = 512 << 20, pool: WorkerPool = .shared, repeats: Int = 7) -> Double {
        let count = bytes / MemoryLayout<Float>.stride
        let source = BenchBuffer(count: count) { Float($0 & 1023) }
        let destination = BenchBuffer(count: count) { _ in 0 }
        let src = source.pointer.baseAddress!, dst = destination.pointer.baseAddress!
        let seconds = [false, true].map { streaming in
            Timing.fastest(repeats: repeats) { copy(src, dst, count: count, streaming: streaming, pool: pool) }
        }.min()!
        return Double(2 * bytes) / seconds
    }

    /// Copies `count` floats from `source` to `destination` (both 64-byte aligned), each thread of
    /// `pool` its own slice: with `memcpy`, or, `streaming`, with 16-float loads and non-temporal
    /// stores. The C library's `memcpy` decides by size and processor whether it streams; an
    /// ordinary store first reads the line it writes, so where it does not stream, a kernel
    /// that does could pass a `memcpy` ceiling (measured on the AMD EPYC: the SWR forwards at
    /// 140-158% of it once they streamed). The ceiling is the faster of the two.
    public static func copy(_ source: UnsafePointer<Float>, _ destination: UnsafeMutablePointer<Float>, count: Int,
                            streaming: Bool, pool: WorkerPool = .shared) {
        let parts = pool.threadCount
        pool.run(parts) { p in
            // Slices start on 16-float boundaries, so that every streamed vector is one line.
            let begin = (p * count / parts) & ~15, end = p == parts - 1 ? count : ((p + 1) * count / parts) & ~15
            guard streaming else {
                memcpy(destination + begin, source + begin, (end - begin) * MemoryLayout<Float>.stride)
                return
            }
            var i = begin
            while i + 16 <= end {
                phalanx_stream16(destination + i, load16(source + i))
                i += 16
            }
            while i < end { destination[i] = source[i]; i += 1 }
            phalanx_stream_fence()
        }
    }

    /// Single-precision matrix product rates (FLOP/s), square `n x n`: the platform BLAS (the
    /// better of its own threading and `Gemm.multiply`'s split over the pool) and this package's
    /// `PackedGemm` kernel under the same split, each the fastest of `repeats`. The ceiling is the
    /// larger: no layer is compared with a rate lower than the machine's. (Medians here let a busy
    /// shared host lower the ceiling: on the Intel Xeon host the median of one run was 197 GFLOP/s
    /// against 283 in the next, and the Phalanx layer's products ran at up to 144% of it.)
    public static func sgemmRates(n: Int = 1024, repeats: Int = 7) -> (blas: Double, packed: Double) {
        let a = BenchBuffer(count: n * n) { Float($0 % 7) * 0.01 }
        let b = BenchBuffer(count: n * n) { Float($0 % 5) * 0.01 }
        let c = BenchBuffer(count: n * n) { _ in 0 }
        let ap = a.pointer.baseAddress!, bp = b.pointer.baseAddress!, cp = c.pointer.baseAddress!
        // OpenBLAS's own threading, on as many threads as the pool (with `PHALANX_THREADS=1` on
        // two cores it would otherwise use both, and the sgemm "ceiling" passed the one-thread FMA
        // peak); then back to one thread, as `Gemm` runs it.
        #if !canImport(Accelerate)
        openblas_set_num_threads(Int32(WorkerPool.shared.threadCount))
        defer { openblas_set_num_threads(1) }
        #endif
        let blasThreads = Timing.fastest(repeats: repeats) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n), 1,
                        ap, Int32(n), bp, Int32(n), 0, cp, Int32(n))
        }
        func pool(_ kernel: Gemm.Kernel) -> Double {
            Timing.fastest(repeats: repeats) { Gemm.multiply(m: n, n: n, k: n, ap, bp, into: cp, kernel: kernel) }
        }
        let flops = 2 * Double(n * n * n)
        return (flops / min(blasThreads, pool(.blas)), flops / pool(.packed))
    }

    /// The arithmetic peak (FLOP/s) of all threads of `pool`: fused multiply-adds on registers
    /// only (`acc = acc * x + y`, no memory traffic), in twelve independent chains per thread:
    /// enough to cover the instruction's latency on every x86 and Apple core (4-5 cycles, two
    /// pipes), few enough to stay in registers. The vector width that fits the machine is found
    /// by measuring: 8 lanes (one AVX2 register; 12 chains fill 14 of its 16 registers) and 16
    /// lanes (one AVX-512 register, or two narrower ones); the faster is the peak. No kernel can
    /// exceed it, which exposes a BLAS that leaves part of the vector width unused.
    ///
    /// A ceiling must not be lowered by noise: each figure is the fastest of its repeats, and the
    /// peak is the larger of all threads together and one thread's rate times the threads (on a
    /// shared machine another process may hold a core while all threads run, and a parallel
    /// pass waits for its slowest thread).
    public static func fmaPeak(iterations: Int = 2_000_000, pool: WorkerPool = .shared) -> Double {
        let single = WorkerPool(threadCount: 1)
        return max(
            fmaRate(SIMD8<Float>.self, iterations: 2 * iterations, pool: pool),
            fmaRate(SIMD16<Float>.self, iterations: iterations, pool: pool),
            Double(pool.threadCount) * fmaRate(SIMD8<Float>.self, iterations: 2 * iterations, pool: single),
            Double(pool.threadCount) * fmaRate(SIMD16<Float>.self, iterations: iterations, pool: single))
    }

    /// FLOP/s of twelve independent chains of `Vector` fused multiply-adds on every thread of
    /// `pool`, the fastest of five repeats.
    @inline(__always)
    static func fmaRate<Vector: SIMD>(_: Vector.Type, iterations: Int, pool: WorkerPool) -> Double
    where Vector.Scalar == Float {
        let parts = pool.threadCount, lanes = Vector.scalarCount
        let sink = BenchBuffer(count: lanes * parts) { _ in 0 }
        let out = sink.pointer.baseAddress!
        let seconds = Timing.fastest(repeats: 5) {
            pool.run(parts) { p in
                let x = Vector(repeating: 0.999_999), y = Vector(repeating: 1e-7)
                var a0 = Vector(repeating: Float(p)), a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5
                var a6 = a0 + 6, a7 = a0 + 7, a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11
                for _ in 0..<iterations {
                    a0 = y.addingProduct(a0, x); a1 = y.addingProduct(a1, x); a2 = y.addingProduct(a2, x)
                    a3 = y.addingProduct(a3, x); a4 = y.addingProduct(a4, x); a5 = y.addingProduct(a5, x)
                    a6 = y.addingProduct(a6, x); a7 = y.addingProduct(a7, x); a8 = y.addingProduct(a8, x)
                    a9 = y.addingProduct(a9, x); a10 = y.addingProduct(a10, x); a11 = y.addingProduct(a11, x)
                }
                let sum = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11))
                for lane in 0..<lanes { out[lanes * p + lane] = sum[lane] }
            }
        }
        return Double(parts * iterations) * 12 * Double(lanes) * 2 / seconds
    }

    /// One core's rate (FLOP/s) of a 16 x 16 tile product `C += A B` in 16-lane fused
    /// multiply-adds, the operands in memory. It proves the vector fast path is compiled in:
    /// with the target CPU's instruction set this runs at tens of GFLOP/s; without it,
    /// `addingProduct` becomes 16 calls to `fmaf` and the rate falls about 40-fold, near 1 GFLOP/s.
    public static func vectorFMARate(products: Int = 100_000) -> Double {
        let a = BenchBuffer(count: 256) { Float($0 % 17) * 1e-3 }
        let b = BenchBuffer(count: 256) { Float($0 % 13) * 1e-3 }
        let c = BenchBuffer(count: 256) { _ in 0 }
        let ap = a.pointer.baseAddress!, bp = b.pointer.baseAddress!, cp = c.pointer.baseAddress!
        let seconds = Timing.median(repeats: 5) {
            for _ in 0..<products {
                for i in 0..<16 {
                    var row = load16(cp + 16 * i)
                    for k in 0..<16 { row = row.addingProduct(SIMD16(repeating: ap[16 * i + k]), load16(bp + 16 * k)) }
                    store16(row, cp + 16 * i)
                }
            }
        }
        return Double(products) * 16 * 16 * 16 * 2 / seconds
    }
}
