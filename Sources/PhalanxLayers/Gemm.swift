#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif
import Foundation
import PhalanxRuntime

/// Single-precision matrix products on the platform BLAS, row-major, spread over the worker pool.
///
/// The BLAS runs single-threaded and `WorkerPool` splits each product into one block of rows (or
/// columns) per thread. One threading system for the whole process: when OpenBLAS ran its own
/// threads, they and the pool's spinning workers fought over the same cores between calls.
public enum Gemm {
    /// Which single-threaded product runs inside each pool thread.
    public enum Kernel: String, Sendable, CaseIterable {
        /// The platform BLAS (OpenBLAS, Accelerate).
        case blas
        /// `PackedGemm`, this package's 16-lane register tile.
        case packed
    }

    /// The kernel used unless a call names one: `PHALANX_GEMM=blas` or `packed` if set; else,
    /// with OpenBLAS, the faster of the two, measured once per process (`measuredKernel`);
    /// Accelerate's BLAS on Apple machines.
    ///
    /// Measured, not inferred from the processor: OpenBLAS picks its kernels when it loads, from
    /// `OPENBLAS_CORETYPE` or the processor's identity, and gets it wrong in both directions
    /// (AVX2 kernels on an AVX-512 processor when the environment says Haswell; its SSE3
    /// "Prescott" fallback, at a fifth of the machine's rate, on a virtual machine whose processor
    /// model it does not know).
    public static let kernel: Kernel = {
        if let name = ProcessInfo.processInfo.environment["PHALANX_GEMM"] {
            require(Kernel(rawValue: name) != nil, "PHALANX_GEMM must be blas or packed, got '\(name)'")
            return Kernel(rawValue: name)!
        }
        #if canImport(Accelerate)
        return .blas
        #else
        return measuredKernel()
        #endif
    }()

    /// `packed` when its best of seven single-threaded products `[256, 1024] = [256, 256] [256,
    /// 1024]` (the shape of one thread's share of a layer's products) is more than 25% faster
    /// than the BLAS's best, else `blas`. The margin keeps the choice from flipping between
    /// processes on a noisy machine when the two are close (with 10%, alternate runs on a shared
    /// machine flipped; the kernels' results differ in the last bits); the cases that matter
    /// differ by 1.4-2x. The whole measurement takes 5-30 ms.
    static func measuredKernel() -> Kernel {
        _ = singleThreadedBLAS
        let m = 256, n = 1024, k = 256
        let a = UnsafeMutablePointer<Float>.allocate(capacity: m * k + k * n + m * n)
        defer { a.deallocate() }
        for i in 0..<(m * k + k * n) { a[i] = Float(i % 7) * 0.01 }
        let b = a + m * k, c = b + k * n
        var best: [Kernel: UInt64] = [:]
        for _ in 0..<7 {
            for kernel in Kernel.allCases {
                let start = DispatchTime.now().uptimeNanoseconds
                product(kernel, m, n, k, a, false, k, b, false, n, c, n, 1, 0)
                let elapsed = DispatchTime.now().uptimeNanoseconds - start
                best[kernel] = min(best[kernel] ?? .max, elapsed)
            }
        }
        return Double(best[.packed]!) * 1.25 < Double(best[.blas]!) ? .packed : .blas
    }

    /// `C = alpha * op(A) * op(B) + beta * C` with `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`,
    /// all row-major; leading dimensions default to the stored widths.
    ///
    /// - Parameters:
    ///   - transposeA: `A` is stored `[k, m]`; `transposeB`: `B` is stored `[n, k]`.
    ///   - kernel: nil for `Gemm.kernel` on products of 64 rows or more and the BLAS below.
    public static func multiply(
        m: Int, n: Int, k: Int,
        _ a: UnsafePointer<Float>, transposeA: Bool = false,
        _ b: UnsafePointer<Float>, transposeB: Bool = false,
        into c: UnsafeMutablePointer<Float>, alpha: Float = 1, beta: Float = 0,
        lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil, pool: WorkerPool = .shared, kernel requested: Kernel? = nil
    ) {
        guard m > 0, n > 0 else { return }
        // Packing costs a pass over op(B) per product: worth it only over many rows of A (a
        // decode step's one-row products stay on the BLAS, whose matrix-vector path reads B once).
        let kernel = requested ?? (m >= 64 ? Gemm.kernel : .blas)
        _ = singleThreadedBLAS
        let lda = lda ?? (transposeA ? m : k), ldb = ldb ?? (transposeB ? k : n), ldc = ldc ?? n
        if k == 0 {
            for i in 0..<m { for j in 0..<n { c[i * ldc + j] *= beta } }
            return
        }
        // Split the longer side of C; blocks of 16 keep the BLAS kernels on full tiles.
        let parts = min(pool.threadCount, max(m, n) / 32)
        guard parts > 1 else {
            product(kernel, m, n, k, a, transposeA, lda, b, transposeB, ldb, c, ldc, alpha, beta)
            return
        }
        let splitRows = m >= n
        let total = splitRows ? m : n
        pool.run(parts) { p in
            let lower = (p * total / parts) & ~15, upper = p == parts - 1 ? total : ((p + 1) * total / parts) & ~15
            guard upper > lower else { return }
            if splitRows {
                // Rows lower..<upper of op(A) and of C.
                let aBlock = transposeA ? a + lower : a + lower * lda
                product(kernel, upper - lower, n, k, aBlock, transposeA, lda, b, transposeB, ldb, c + lower * ldc, ldc, alpha, beta)
            } else {
                // Columns lower..<upper of op(B) and of C.
                let bBlock = transposeB ? b + lower * ldb : b + lower
                product(kernel, m, upper - lower, k, a, transposeA, lda, bBlock, transposeB, ldb, c + lower, ldc, alpha, beta)
            }
        }
    }

    @inline(__always)
    private static func product(_ kernel: Kernel, _ m: Int, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ ta: Bool, _ lda: Int,
                                _ b: UnsafePointer<Float>, _ tb: Bool, _ ldb: Int,
                                _ c: UnsafeMutablePointer<Float>, _ ldc: Int, _ alpha: Float, _ beta: Float) {
        switch kernel {
        case .blas: sgemm(m, n, k, a, ta, lda, b, tb, ldb, c, ldc, alpha, beta)
        case .packed: PackedGemm.multiply(m: m, n: n, k: k, a, ta, lda, b, tb, ldb, c, ldc, alpha: alpha, beta: beta)
        }
    }

    @inline(__always)
    private static func sgemm(_ m: Int, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ ta: Bool, _ lda: Int,
                              _ b: UnsafePointer<Float>, _ tb: Bool, _ ldb: Int,
                              _ c: UnsafeMutablePointer<Float>, _ ldc: Int, _ alpha: Float, _ beta: Float) {
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    private static let singleThreadedBLAS: Void = {
        #if !canImport(Accelerate)
        openblas_set_num_threads(1)
        #endif
    }()
}
