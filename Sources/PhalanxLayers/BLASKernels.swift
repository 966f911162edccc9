#if !canImport(Accelerate)
import CBLAS
import CPhalanxIntrinsics
import Foundation

/// Which matrix kernels OpenBLAS runs, and whether the processor allows wider ones.
///
/// OpenBLAS builds for many processors pick their kernels once, when the library loads: from the
/// environment variable `OPENBLAS_CORETYPE` if set, else from the processor's identity. A value
/// of "Haswell" (AVX2) on an AVX-512 processor leaves half of each vector unit idle: on this
/// project's 2-core Zen machine sgemm runs at about 235 GFLOP/s with it and about 430 with the
/// automatic choice ("Cooperlake"). Benchmarks print this so that no figure hides it.
public enum BLASKernels {
    /// The kernel family OpenBLAS chose, such as "Haswell" or "Cooperlake".
    public static var current: String { String(cString: openblas_get_corename()) }

    /// The family named by `OPENBLAS_CORETYPE`, if the environment sets it.
    public static var requested: String? { getenv("OPENBLAS_CORETYPE").map { String(cString: $0) } }

    /// An AVX-512 family ("SkylakeX") when the processor runs AVX-512 but `current` is an AVX2
    /// family, else nil.
    public static var wider: String? {
        guard phalanx_cpu_has_avx512() != 0 else { return nil }
        return ["haswell", "zen"].contains(current.lowercased()) ? "SkylakeX" : nil
    }
}
#endif
