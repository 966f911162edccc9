import PhalanxCUDA
import PhalanxRuntime

/// Matrix products of device tensors on their device's cuBLAS handle, in the CPU `Gemm`'s terms:
///
///     C = alpha * op(A) op(B) + beta * C        op(X) = X or X^T,   C [m, n]
///
/// Operands are tensors seen as row-major matrices (`rows x columns` as stored, `stride`
/// elements per row); A and B must share a format, C has theirs or float32 (gradients of
/// bfloat16 activations). Accumulation is float32.
public enum DeviceMatrix {
    /// `tensor` as a `rows x columns` matrix with rows `stride` apart (`columns` when nil).
    public static func of(_ tensor: Tensor, rows: Int, columns: Int, stride: Int? = nil) -> CUBLAS.Matrix {
        CUBLAS.Matrix(tensor.deviceBuffer, tensor.format, rows: rows, columns: columns, stride: stride)
    }

    /// `tensor` `[..., columns]` as a `rows x columns` matrix (rows: all leading dimensions).
    public static func of(_ tensor: Tensor) -> CUBLAS.Matrix { of(tensor, rows: tensor.rows, columns: tensor.columns) }

    /// Queues `C = alpha * op(A) op(B) + beta * C` on `device`.
    public static func multiply(on device: CUDADevice, _ a: CUBLAS.Matrix, transposeA: Bool = false, _ b: CUBLAS.Matrix,
                         transposeB: Bool = false, into c: CUBLAS.Matrix, beta: Float = 0) throws {
        try device.blas.gemm(a, transposeA: transposeA, b, transposeB: transposeB, into: c, beta: beta)
    }
}
