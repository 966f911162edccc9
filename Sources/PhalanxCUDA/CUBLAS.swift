import Foundation
import PhalanxRuntime

/// cuBLAS (`libcublas.so`), loaded at run time, and row-major matrix products on a context's
/// stream through `cublasGemmEx`.
///
/// Conventions: every matrix is row-major, as the layers store them. cuBLAS is column-major, and a
/// row-major `[r, c]` matrix with row stride `ld` is, to it, the column-major `[c, r]` matrix with
/// leading dimension `ld`: its transpose. So `C = op(A) op(B)` (row-major) is computed as the
/// column-major `C^T = op(B)^T op(A)^T`, that is `cublasGemmEx(opB, opA, n, m, k, B, A, C)`, with
/// nothing copied.
///
/// Precision: `bfloat16` operands accumulate in float32 (`CUBLAS_COMPUTE_32F`) and write
/// bfloat16 or float32; `float32` operands compute in float32 without TF32, so float32 results
/// equal a CPU product up to summation order.
public final class CUBLAS: @unchecked Sendable {
    typealias Handle = OpaquePointer
    typealias Status = Int32

    /// The library that was loaded.
    public let path: String
    /// `cublasGetVersion`: 10000 * major + 100 * minor + patch.
    public let version: Int
    public let context: CUDAContext

    private let handle: Handle
    private let cublasDestroy: @convention(c) (Handle?) -> Status
    private let cublasGemmEx: @convention(c) (
        Handle?, Int32, Int32, Int32, Int32, Int32, UnsafeRawPointer, UInt64, Int32, Int32, UInt64, Int32, Int32,
        UnsafeRawPointer, UInt64, Int32, Int32, Int32, Int32) -> Status

    /// A number format of a matrix (`cudaDataType_t`).
    public enum Element: Int32, Sendable, CustomStringConvertible {
        case float32 = 0    // CUDA_R_32F
        case bfloat16 = 14  // CUDA_R_16BF

        public var byteCount: Int { self == .float32 ? 4 : 2 }
        public var description: String { self == .float32 ? "f32" : "bf16" }
    }

    /// One operand: a row-major matrix in a device buffer, `rows x columns` as stored (before any
    /// transpose), `stride` elements from one row to the next (`columns` when nil), starting
    /// `offset` elements into the buffer.
    public struct Matrix {
        public let buffer: DeviceBuffer
        public let element: Element
        public let rows: Int, columns: Int
        public let stride: Int
        public let offset: Int

        public init(_ buffer: DeviceBuffer, _ element: Element, rows: Int, columns: Int, stride: Int? = nil, offset: Int = 0) {
            self.buffer = buffer
            self.element = element
            self.rows = rows
            self.columns = columns
            self.stride = stride ?? columns
            self.offset = offset
        }

        var address: UInt64 { buffer.address + UInt64(offset * element.byteCount) }

        /// Stops unless the matrix lies inside its buffer with a valid stride.
        func validate(_ label: String) {
            require(rows >= 0 && columns >= 0 && stride >= max(columns, 1),
                    "CUBLAS.gemm: \(label) is \(rows)x\(columns) with row stride \(stride); the stride must be at least the columns")
            let last = rows == 0 ? 0 : offset + (rows - 1) * stride + columns
            require(last * element.byteCount <= buffer.byteCount,
                    "CUBLAS.gemm: \(label) (\(rows)x\(columns) \(element), stride \(stride), offset \(offset)) needs \(last * element.byteCount) bytes, its buffer holds \(buffer.byteCount)")
        }
    }

    /// cuBLAS on `context`, loaded once per process (`loadLibrary`), with a handle bound to the
    /// context's stream.
    ///
    /// - Throws: `CUDAUnavailable` when the library is missing (naming every place tried),
    ///   `CUBLASError` when `cublasCreate` fails.
    public init(context: CUDAContext) throws {
        let library = try CUBLAS.library.get()
        path = library.path
        self.context = context
        typealias Create = @convention(c) (UnsafeMutablePointer<Handle?>) -> Status
        typealias SetStream = @convention(c) (Handle?, Handle?) -> Status
        typealias GetVersion = @convention(c) (Handle?, UnsafeMutablePointer<Int32>) -> Status
        let create: Create = try library.function("cublasCreate_v2")
        let setStream: SetStream = try library.function("cublasSetStream_v2")
        let getVersion: GetVersion = try library.function("cublasGetVersion_v2")
        cublasDestroy = try library.function("cublasDestroy_v2")
        cublasGemmEx = try library.function("cublasGemmEx")
        try context.makeCurrent()
        var handle: Handle?
        try CUBLAS.check(create(&handle), "cublasCreate_v2")
        self.handle = handle!
        try CUBLAS.check(setStream(handle, context.stream), "cublasSetStream_v2")
        var version: Int32 = 0
        _ = getVersion(handle, &version)
        self.version = Int(version)
    }

    deinit {
        _ = context.driver.cuCtxSetCurrent(context.context)
        _ = cublasDestroy(handle)
    }

    /// `libcublas.so` opened once. It needs `libcublasLt` from its own folder, which is opened
    /// first so that a library found by absolute path also finds its dependency.
    static let library: Result<DynamicLibrary, CUDAUnavailable> = {
        let folders = CUDAToolkit.roots.flatMap { ["\($0)/targets/x86_64-linux/lib", "\($0)/lib64"] }
        for version in ["13", "12"] {
            for folder in [""] + folders {
                let prefix = folder.isEmpty ? "" : folder + "/"
                if let lt = try? DynamicLibrary.open(firstOf: ["\(prefix)libcublasLt.so.\(version)"], what: "cuBLASLt"),
                   let blas = try? DynamicLibrary.open(firstOf: ["\(prefix)libcublas.so.\(version)"], what: "cuBLAS") {
                    withExtendedLifetime(lt) {}
                    return .success(blas)
                }
            }
        }
        let candidates = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
            + folders.flatMap { folder in ["13", "12"].map { "\(folder)/libcublas.so.\($0)" } }
        do { return .success(try DynamicLibrary.open(firstOf: candidates, what: "cuBLAS (the CUDA toolkit's libcublas.so)")) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// Whether cuBLAS can be loaded here (it needs no GPU to load), or why not.
    public static var unavailableReason: String? {
        if case .failure(let error) = library { return error.reason }
        return nil
    }

    /// Queues the row-major product
    ///
    ///     C = alpha * op(A) * op(B) + beta * C,    op(X) = X or X^T,   C [m, n],  op(A) [m, k],  op(B) [k, n]
    ///
    /// on the context's stream. `A` and `B` must have the same element type; `C` may be that type
    /// or float32 (float32 gradients of bfloat16 activations). Accumulation is float32.
    public func gemm(_ a: Matrix, transposeA: Bool = false, _ b: Matrix, transposeB: Bool = false,
                     into c: Matrix, alpha: Float = 1, beta: Float = 0) throws {
        let (m, k) = transposeA ? (a.columns, a.rows) : (a.rows, a.columns)
        let (kb, n) = transposeB ? (b.columns, b.rows) : (b.rows, b.columns)
        require(k == kb && c.rows == m && c.columns == n,
                "CUBLAS.gemm: op(A) is \(m)x\(k), op(B) \(kb)x\(n), C \(c.rows)x\(c.columns): shapes do not chain")
        require(a.element == b.element && (c.element == a.element || c.element == .float32),
                "CUBLAS.gemm: A \(a.element), B \(b.element), C \(c.element): A and B must match, C match them or be f32")
        a.validate("A"); b.validate("B"); c.validate("C")
        for (label, buffer) in [("A", a.buffer), ("B", b.buffer), ("C", c.buffer)] {
            require(buffer.context === context, "CUBLAS.gemm: \(label) belongs to another CUDAContext")
        }
        require(max(m, n, k, a.stride, b.stride, c.stride) <= Int(Int32.max), "CUBLAS.gemm: sizes exceed cuBLAS's 32-bit ints")
        guard m > 0 && n > 0 else { return }
        try context.makeCurrent()
        var alpha = alpha, beta = beta
        // Column-major C^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m].
        let status = withUnsafePointer(to: &alpha) { alphaPointer in
            withUnsafePointer(to: &beta) { betaPointer in
                cublasGemmEx(handle, transposeB ? 1 : 0, transposeA ? 1 : 0, Int32(n), Int32(m), Int32(k),
                             alphaPointer, b.address, b.element.rawValue, Int32(b.stride),
                             a.address, a.element.rawValue, Int32(a.stride),
                             betaPointer, c.address, c.element.rawValue, Int32(c.stride),
                             68 /* CUBLAS_COMPUTE_32F */, -1 /* CUBLAS_GEMM_DEFAULT */)
            }
        }
        try CUBLAS.check(status, "cublasGemmEx(m \(m), n \(n), k \(k), \(a.element) -> \(c.element))")
    }

    static func check(_ status: Int32, _ call: @autoclosure () -> String) throws {
        if status != 0 { throw CUBLASError(call: call(), status: status) }
    }
}

/// A cuBLAS call returned an error status.
public struct CUBLASError: Error, CustomStringConvertible {
    public let call: String
    /// The `cublasStatus_t`.
    public let status: Int32

    public init(call: String, status: Int32) {
        self.call = call
        self.status = status
    }

    /// cuBLAS's name for the status (`CUBLAS_STATUS_NOT_SUPPORTED`).
    public var name: String {
        switch status {
        case 1: "CUBLAS_STATUS_NOT_INITIALIZED"
        case 3: "CUBLAS_STATUS_ALLOC_FAILED"
        case 7: "CUBLAS_STATUS_INVALID_VALUE"
        case 8: "CUBLAS_STATUS_ARCH_MISMATCH"
        case 11: "CUBLAS_STATUS_MAPPING_ERROR"
        case 13: "CUBLAS_STATUS_EXECUTION_FAILED"
        case 14: "CUBLAS_STATUS_INTERNAL_ERROR"
        case 15: "CUBLAS_STATUS_NOT_SUPPORTED"
        case 16: "CUBLAS_STATUS_LICENSE_ERROR"
        default: "cublasStatus_t \(status)"
        }
    }

    public var description: String { "\(call) failed: \(name) (\(status))" }
}
