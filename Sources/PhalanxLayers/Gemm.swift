#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif

/// Single-precision matrix products on the platform BLAS, row-major.
public enum Gemm {
    /// `C = alpha * op(A) * op(B) + beta * C` with `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C` `[m, n]`,
    /// all row-major with leading dimensions equal to their stored widths.
    ///
    /// - Parameters:
    ///   - transposeA: `A` is stored `[k, m]`; `transposeB`: `B` is stored `[n, k]`.
    @inline(__always)
    public static func multiply(
        m: Int, n: Int, k: Int,
        _ a: UnsafePointer<Float>, transposeA: Bool = false,
        _ b: UnsafePointer<Float>, transposeB: Bool = false,
        into c: UnsafeMutablePointer<Float>, alpha: Float = 1, beta: Float = 0,
        lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil
    ) {
        guard m > 0, n > 0 else { return }
        if k == 0 {
            for i in 0..<(m * n) { c[i] *= beta }
            return
        }
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha,
                    a, Int32(lda ?? (transposeA ? m : k)), b, Int32(ldb ?? (transposeB ? k : n)),
                    beta, c, Int32(ldc ?? n))
    }
}
