import Foundation
import PhalanxRuntime

/// cuBLAS (`libcublas.so`, `libcublasLt.so`), loaded at run time, and row-major matrix products
/// on a context's stream through `cublasLtMatmul`.
///
/// Conventions: every matrix is row-major, as the layers store them. cuBLAS is column-major, and a
/// row-major `[r, c]` matrix with row stride `ld` is, to it, the column-major `[c, r]` matrix with
/// leading dimension `ld`: its transpose. So `C = op(A) op(B)` (row-major) is computed as the
/// column-major `C^T = op(B)^T op(A)^T`, that is `matmul(opB, opA, n, m, k, B, A, C)`, with
/// nothing copied.
///
/// Algorithms: the first product of each shape (sizes, transposes, strides, types, whether C is
/// read) asks cuBLASLt for its candidate algorithms, times each once on scratch output (C is not
/// touched) and keeps the fastest for every later product of that shape (`searchAlgorithms`).
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
    /// The context whose stream every product is queued on.
    public let context: CUDAContext

    /// Whether a new shape's candidate algorithms are timed (true) or cuBLASLt's first choice is
    /// taken as it is.
    public var searchAlgorithms = true

    private let handle: Handle
    private let cublasDestroy: @convention(c) (Handle?) -> Status
    private let lt: LtFunctions
    private let ltHandle: Handle
    /// The products' workspace: 32 MiB, what cuBLAS's documentation recommends on Hopper.
    private let workspace: DeviceBuffer
    private let lock = NSLock()
    private var plans: [PlanKey: Plan] = [:]

    /// One operand: a row-major matrix in a device buffer, `rows x columns` as stored (before any
    /// transpose), `stride` elements from one row to the next (`columns` when nil), starting
    /// `offset` elements into the buffer.
    public struct Matrix {
        /// The device buffer holding the matrix.
        public let buffer: DeviceBuffer
        /// How the buffer stores the matrix's numbers (`cudaDataType_t`).
        public let element: NumberFormat
        /// Rows and columns as stored, before any transpose.
        public let rows: Int, columns: Int
        /// Elements from one row to the next; at least `columns`.
        public let stride: Int
        /// Elements from the buffer's start to the first element.
        public let offset: Int

        /// An operand `rows x columns` with row `stride` (`columns` when nil), `offset` elements into `buffer`.
        public init(_ buffer: DeviceBuffer, _ element: NumberFormat, rows: Int, columns: Int, stride: Int? = nil, offset: Int = 0) {
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
        let (library, ltLibrary) = try CUBLAS.library.get()
        path = library.path
        self.context = context
        typealias Create = @convention(c) (UnsafeMutablePointer<Handle?>) -> Status
        typealias SetStream = @convention(c) (Handle?, Handle?) -> Status
        typealias GetVersion = @convention(c) (Handle?, UnsafeMutablePointer<Int32>) -> Status
        let create: Create = try library.function("cublasCreate_v2")
        let setStream: SetStream = try library.function("cublasSetStream_v2")
        let getVersion: GetVersion = try library.function("cublasGetVersion_v2")
        cublasDestroy = try library.function("cublasDestroy_v2")
        lt = try LtFunctions(ltLibrary)
        try context.makeCurrent()
        var handle: Handle?
        try CUBLAS.check(create(&handle), "cublasCreate_v2")
        self.handle = handle!
        try CUBLAS.check(setStream(handle, context.stream), "cublasSetStream_v2")
        var version: Int32 = 0
        _ = getVersion(handle, &version)
        self.version = Int(version)
        var ltHandle: Handle?
        try CUBLAS.check(lt.create(&ltHandle), "cublasLtCreate")
        self.ltHandle = ltHandle!
        workspace = try DeviceBuffer(context: context, byteCount: 32 << 20)
    }

    deinit {
        _ = context.driver.cuCtxSetCurrent(context.context)
        for plan in plans.values { plan.destroy(lt) }
        _ = lt.destroy(ltHandle)
        _ = cublasDestroy(handle)
    }

    /// `libcublas.so` and `libcublasLt.so` of one version from one folder, opened once (cuBLASLt
    /// first, so that cuBLAS found by absolute path also finds its dependency).
    static let library: Result<(DynamicLibrary, DynamicLibrary), CUDAUnavailable> = {
        let folders = CUDAToolkit.roots.flatMap { ["\($0)/targets/x86_64-linux/lib", "\($0)/lib64"] }
        var tried: [String] = []
        for version in ["13", "12"] {
            for folder in [""] + folders {
                let prefix = folder.isEmpty ? "" : folder + "/"
                tried.append("\(prefix)libcublas.so.\(version)")
                if let lt = try? DynamicLibrary.open(firstOf: ["\(prefix)libcublasLt.so.\(version)"], what: "cuBLASLt"),
                   let blas = try? DynamicLibrary.open(firstOf: ["\(prefix)libcublas.so.\(version)"], what: "cuBLAS") {
                    return .success((blas, lt))
                }
            }
        }
        return .failure(CUDAUnavailable("cuBLAS (the CUDA toolkit's libcublas.so with libcublasLt.so beside it) could not be loaded; tried "
                                        + tried.joined(separator: ", ")))
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
    /// or float32 (float32 gradients of bfloat16 activations). Accumulation is float32. The first
    /// product of a shape also searches its algorithm (see the type's summary), which waits for the
    /// stream.
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
        let key = PlanKey(m: m, n: n, k: k, transposeA: transposeA, transposeB: transposeB, input: a.element.cudaDataType,
                          output: c.element.cudaDataType, strides: [a.stride, b.stride, c.stride], readsC: beta != 0)
        lock.lock()
        defer { lock.unlock() }
        let plan = try plans[key] ?? makePlan(key, a, b, c, alpha: alpha, beta: beta)
        plans[key] = plan
        try run(plan, a, b, c, output: c.address, alpha: alpha, beta: beta)
    }

    /// FLOP/s of an `n x n x n` product `A B^T` in `format` (float32 accumulation; no TF32 for
    /// float32): the median of 7 samples of 10 products, after 3 warm-up products. The ceiling of
    /// model-FLOPs utilisation on this device.
    public func measureRate(format: NumberFormat = .bfloat16, n: Int = 8192) throws -> Double {
        let a = try DeviceBuffer(context: context, byteCount: n * n * format.byteCount)
        let c = try DeviceBuffer(context: context, byteCount: n * n * format.byteCount)
        try a.fill(byte: 0x3c)
        let matrix = Matrix(a, format, rows: n, columns: n), out = Matrix(c, format, rows: n, columns: n)
        for _ in 0..<3 { try gemm(matrix, matrix, transposeB: true, into: out) }
        let start = try CUDAEvent(context: context), end = try CUDAEvent(context: context)
        var samples: [Double] = []
        for _ in 0..<7 {
            try start.record()
            for _ in 0..<10 { try gemm(matrix, matrix, transposeB: true, into: out) }
            try end.record()
            samples.append(try start.milliseconds(to: end) / 10)
        }
        return 2 * Double(n) * Double(n) * Double(n) / (samples.sorted()[3] * 1e-3)
    }

    /// `D = alpha * op(A) op(B) + beta * C` with `plan`'s algorithm, D at `output` (C's layout).
    private func run(_ plan: Plan, _ a: Matrix, _ b: Matrix, _ c: Matrix, output: UInt64, alpha: Float, beta: Float) throws {
        var alpha = alpha, beta = beta
        // Column-major C^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m]: cuBLASLt's A is our B.
        let status = plan.algorithm.withUnsafeBytes { algorithm in
            lt.matmul(ltHandle, plan.description, &alpha, b.address, plan.layouts[0], a.address, plan.layouts[1], &beta,
                      c.address, plan.layouts[2], output, plan.layouts[2], algorithm.baseAddress, workspace.address,
                      workspace.byteCount, context.stream)
        }
        try CUBLAS.check(status, "cublasLtMatmul(\(plan.key))")
    }

    /// The descriptors of a new shape and its algorithm: cuBLASLt's candidates, each timed once on
    /// scratch output when `searchAlgorithms` (after a warm-up), the fastest kept.
    private func makePlan(_ key: PlanKey, _ a: Matrix, _ b: Matrix, _ c: Matrix, alpha: Float, beta: Float) throws -> Plan {
        var description: Handle?
        try CUBLAS.check(lt.descCreate(&description, 68 /* CUBLAS_COMPUTE_32F */, 0 /* CUDA_R_32F scale */), "cublasLtMatmulDescCreate")
        var layouts: [Handle?] = []
        let plan = Plan(key: key, description: description!)
        for (label, matrix) in [("A", b), ("B", a), ("C", c)] {
            var layout: Handle?
            try CUBLAS.check(lt.layoutCreate(&layout, matrix.element.cudaDataType, UInt64(matrix.columns), UInt64(matrix.rows),
                                             Int64(matrix.stride)), "cublasLtMatrixLayoutCreate(\(label))")
            layouts.append(layout)
        }
        plan.layouts = layouts.map { $0! }
        for (attribute, transpose) in [(Int32(3) /* TRANSA */, key.transposeB), (Int32(4) /* TRANSB */, key.transposeA)] {
            var operation: Int32 = transpose ? 1 : 0
            try CUBLAS.check(lt.descSetAttribute(description, attribute, &operation, 4), "cublasLtMatmulDescSetAttribute(\(attribute))")
        }
        var preference: Handle?
        try CUBLAS.check(lt.preferenceCreate(&preference), "cublasLtMatmulPreferenceCreate")
        defer { _ = lt.preferenceDestroy(preference) }
        var workspaceBytes = UInt64(workspace.byteCount)
        try CUBLAS.check(lt.preferenceSetAttribute(preference, 1 /* MAX_WORKSPACE_BYTES */, &workspaceBytes, 8),
                         "cublasLtMatmulPreferenceSetAttribute")
        // cublasLtMatmulHeuristicResult_t: algo (64 bytes), workspaceSize (8), state (4), wavesCount (4), reserved (16).
        let stride = 96, requested = 8
        var results = [UInt8](repeating: 0, count: stride * requested)
        var returned: Int32 = 0
        try CUBLAS.check(lt.heuristic(ltHandle, description, plan.layouts[0], plan.layouts[1], plan.layouts[2], plan.layouts[2],
                                      preference, Int32(requested), &results, &returned), "cublasLtMatmulAlgoGetHeuristic(\(key))")
        let candidates = (0..<Int(returned)).filter { index in
            results.withUnsafeBytes { $0.load(fromByteOffset: index * stride + 72, as: Int32.self) == 0 }
        }.map { index in Array(results[(index * stride)..<(index * stride + 64)]) }
        guard let first = candidates.first else {
            throw CUBLASError(call: "cublasLtMatmulAlgoGetHeuristic(\(key)): no algorithm", status: 15)
        }
        plan.algorithm = first
        guard searchAlgorithms && candidates.count > 1 else { return plan }
        let scratch = try DeviceBuffer(context: context, byteCount: c.buffer.byteCount)
        let output = scratch.address + UInt64(c.offset * c.element.byteCount)
        let start = try CUDAEvent(context: context), end = try CUDAEvent(context: context)
        var best = (milliseconds: Double.infinity, algorithm: first)
        for candidate in candidates {
            plan.algorithm = candidate
            try run(plan, a, b, c, output: output, alpha: alpha, beta: beta)
            try start.record()
            try run(plan, a, b, c, output: output, alpha: alpha, beta: beta)
            try end.record()
            let milliseconds = try start.milliseconds(to: end)
            if milliseconds < best.milliseconds { best = (milliseconds, candidate) }
        }
        plan.algorithm = best.algorithm
        return plan
    }

    static func check(_ status: Int32, _ call: @autoclosure () -> String) throws {
        if status != 0 { throw CUBLASError(call: call(), status: status) }
    }
}

/// What identifies a product's plan: everything its descriptors and algorithm depend on.
struct PlanKey: Hashable, CustomStringConvertible {
    let m: Int, n: Int, k: Int
    let transposeA: Bool, transposeB: Bool
    let input: Int32, output: Int32
    let strides: [Int]
    let readsC: Bool

    var description: String {
        "m \(m), n \(n), k \(k)\(transposeA ? ", A^T" : "")\(transposeB ? ", B^T" : ""), types \(input) -> \(output), strides \(strides)"
    }
}

/// The cuBLASLt descriptors of one product shape and the algorithm chosen for it.
final class Plan {
    let key: PlanKey
    let description: OpaquePointer
    /// cuBLASLt's A (our B), B (our A), C and D.
    var layouts: [OpaquePointer] = []
    /// `cublasLtMatmulAlgo_t`, 64 bytes.
    var algorithm: [UInt8] = []

    init(key: PlanKey, description: OpaquePointer) {
        self.key = key
        self.description = description
    }

    func destroy(_ lt: LtFunctions) {
        for layout in layouts { _ = lt.layoutDestroy(layout) }
        _ = lt.descDestroy(description)
    }
}

/// The cuBLASLt entry points used.
struct LtFunctions {
    typealias Handle = OpaquePointer
    typealias Status = Int32
    let create: @convention(c) (UnsafeMutablePointer<Handle?>) -> Status
    let destroy: @convention(c) (Handle?) -> Status
    let descCreate: @convention(c) (UnsafeMutablePointer<Handle?>, Int32, Int32) -> Status
    let descDestroy: @convention(c) (Handle?) -> Status
    let descSetAttribute: @convention(c) (Handle?, Int32, UnsafeRawPointer, Int) -> Status
    let layoutCreate: @convention(c) (UnsafeMutablePointer<Handle?>, Int32, UInt64, UInt64, Int64) -> Status
    let layoutDestroy: @convention(c) (Handle?) -> Status
    let preferenceCreate: @convention(c) (UnsafeMutablePointer<Handle?>) -> Status
    let preferenceDestroy: @convention(c) (Handle?) -> Status
    let preferenceSetAttribute: @convention(c) (Handle?, Int32, UnsafeRawPointer, Int) -> Status
    let heuristic: @convention(c) (Handle?, Handle?, Handle?, Handle?, Handle?, Handle?, Handle?, Int32,
                                   UnsafeMutableRawPointer, UnsafeMutablePointer<Int32>) -> Status
    let matmul: @convention(c) (Handle?, Handle?, UnsafeRawPointer, UInt64, Handle?, UInt64, Handle?, UnsafeRawPointer,
                                UInt64, Handle?, UInt64, Handle?, UnsafeRawPointer?, UInt64, Int, OpaquePointer?) -> Status

    init(_ library: DynamicLibrary) throws {
        create = try library.function("cublasLtCreate")
        destroy = try library.function("cublasLtDestroy")
        descCreate = try library.function("cublasLtMatmulDescCreate")
        descDestroy = try library.function("cublasLtMatmulDescDestroy")
        descSetAttribute = try library.function("cublasLtMatmulDescSetAttribute")
        layoutCreate = try library.function("cublasLtMatrixLayoutCreate")
        layoutDestroy = try library.function("cublasLtMatrixLayoutDestroy")
        preferenceCreate = try library.function("cublasLtMatmulPreferenceCreate")
        preferenceDestroy = try library.function("cublasLtMatmulPreferenceDestroy")
        preferenceSetAttribute = try library.function("cublasLtMatmulPreferenceSetAttribute")
        heuristic = try library.function("cublasLtMatmulAlgoGetHeuristic")
        matmul = try library.function("cublasLtMatmul")
    }
}

/// A cuBLAS call returned an error status.
public struct CUBLASError: Error, CustomStringConvertible {
    /// The cuBLAS or cuBLASLt entry point that failed.
    public let call: String
    /// The `cublasStatus_t`.
    public let status: Int32

    /// The error for `call` returning `status`.
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

    /// The call, the status's name and its code.
    public var description: String { "\(call) failed: \(name) (\(status))" }
}
