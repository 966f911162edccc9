/// A cuDNN backend-API operation graph under construction: tensors (by unique id), operations
/// (pointwise, matmul, reduction, reshape), then `plan(handle:)`, which finalizes the graph, asks
/// cuDNN's heuristics for engine configurations and keeps the first whose execution plan
/// finalizes.
///
/// Tensors are 4-d `[batch, heads, rows, columns]` with explicit strides. Virtual tensors (the
/// graph's intermediates, which a fused engine never writes to memory) get ids from 1000 up;
/// by-value tensors are host scalars, passed by pointer at execution.
final class CUDNNGraph {
    /// cuDNN's `cudnnDataType_t` values used here.
    enum DataType: Int32 { case float = 0, int32 = 4, bfloat16 = 9, boolean = 11 }

    /// `cudnnPointwiseMode_t` values used here.
    enum Pointwise: Int32 {
        case add = 0, mul = 1, div = 6, sub = 9, exp = 13, log = 15, identity = 21
        case greater = 302, greaterOrEqual = 303, generateIndex = 501, binarySelect = 601
    }

    /// `cudnnReduceTensorOp_t` values used here.
    enum Reduction: Int32 { case add = 0, max = 3 }

    /// A tensor of the graph: its descriptor and what the operations need to know of it.
    struct Tensor {
        let descriptor: CUDNNDescriptor
        let uid: Int64
        let dims: [Int64]
        let strides: [Int64]
        let type: DataType
    }

    let library: CUDNNLibrary
    /// What the graph computes, for error messages.
    let label: String
    private var operations: [CUDNNDescriptor] = []
    /// Descriptors the operations refer to (kept alive until the plan is built).
    private var parts: [CUDNNDescriptor] = []
    private var nextVirtualUID: Int64 = 1000
    /// Host scalars of by-value tensors, by uid.
    private(set) var scalars: [(uid: Int64, bits: UInt64)] = []

    init(library: CUDNNLibrary, label: String) {
        (self.library, self.label) = (library, label)
    }

    /// Packed row-major strides of `dims`.
    static func packed(_ dims: [Int64]) -> [Int64] {
        var strides = [Int64](repeating: 1, count: dims.count)
        for axis in stride(from: dims.count - 2, through: 0, by: -1) { strides[axis] = strides[axis + 1] * dims[axis + 1] }
        return strides
    }

    /// A tensor in device memory (`uid` > 0, below 1000), given at execution.
    func tensor(uid: Int64, dims: [Int64], strides: [Int64], type: DataType) throws -> Tensor {
        try makeTensor(uid: uid, dims: dims, strides: strides, type: type, isVirtual: false, byValue: false)
    }

    /// An intermediate of `dims` (packed unless `strides` are given).
    func virtual(dims: [Int64], strides: [Int64]? = nil, type: DataType = .float) throws -> Tensor {
        defer { nextVirtualUID += 1 }
        return try makeTensor(uid: nextVirtualUID, dims: dims, strides: strides ?? CUDNNGraph.packed(dims), type: type,
                              isVirtual: true, byValue: false)
    }

    /// A float32 host scalar, `[1, 1, 1, 1]`.
    func scalar(uid: Int64, _ value: Float) throws -> Tensor {
        scalars.append((uid, UInt64(value.bitPattern)))
        return try makeTensor(uid: uid, dims: [1, 1, 1, 1], strides: [1, 1, 1, 1], type: .float, isVirtual: false, byValue: true)
    }

    private func makeTensor(uid: Int64, dims: [Int64], strides: [Int64], type: DataType, isVirtual: Bool,
                            byValue: Bool) throws -> Tensor {
        let what = "tensor \(uid) dims \(dims) strides \(strides)"
        let descriptor = try CUDNNDescriptor(library, type: .tensor, label: what)
        try descriptor.set(.tensorDataType, dataType: type)
        try descriptor.set(.tensorDimensions, int64s: dims)
        try descriptor.set(.tensorStrides, int64s: strides)
        try descriptor.set(.tensorUniqueID, int64s: [uid])
        try descriptor.set(.tensorByteAlignment, int64s: [16])
        try descriptor.set(.tensorIsVirtual, bool: isVirtual)
        if byValue { try descriptor.set(.tensorIsByValue, bool: true) }
        try descriptor.finalize()
        parts.append(descriptor)
        return Tensor(descriptor: descriptor, uid: uid, dims: dims, strides: strides, type: type)
    }

    /// `y = mode(x)`, `mode(x, b)` or, for `binarySelect`, `t ? x : b`; `y` virtual with the
    /// broadcast dims of the operands unless given. `compute` is the operation's precision;
    /// `axis` the axis of `generateIndex`.
    @discardableResult
    func pointwise(_ mode: Pointwise, _ x: Tensor, _ b: Tensor? = nil, select t: Tensor? = nil, into y: Tensor? = nil,
                   output: DataType = .float, compute: DataType = .float, axis: Int64? = nil) throws -> Tensor {
        let what = "pointwise \(mode) of tensor \(x.uid)" + (b.map { " and \($0.uid)" } ?? "")
        let y = try y ?? virtual(dims: b.map { zip(x.dims, $0.dims).map(max) } ?? x.dims, type: output)
        let description = try CUDNNDescriptor(library, type: .pointwise, label: what)
        try description.set(.pointwiseMode, int32: mode.rawValue, as: .pointwiseMode)
        try description.set(.pointwiseMathPrecision, dataType: compute)
        if let axis { try description.set(.pointwiseAxis, int64s: [axis]) }
        try description.finalize()
        let operation = try CUDNNDescriptor(library, type: .pointwiseOperation, label: what)
        try operation.set(.pointwisePWDescriptor, descriptor: description)
        try operation.set(.pointwiseX, descriptor: x.descriptor)
        if let b { try operation.set(.pointwiseB, descriptor: b.descriptor) }
        if let t { try operation.set(.pointwiseT, descriptor: t.descriptor) }
        try operation.set(.pointwiseY, descriptor: y.descriptor)
        try operation.finalize()
        parts.append(description)
        operations.append(operation)
        return y
    }

    /// `c = a b` over the last two axes, batched (and broadcast) over the first two; float32
    /// accumulation. `c` virtual float32 unless given.
    @discardableResult
    func matmul(_ a: Tensor, _ b: Tensor, into c: Tensor? = nil) throws -> Tensor {
        let what = "matmul of tensors \(a.uid) \(a.dims) and \(b.uid) \(b.dims)"
        let c = try c ?? virtual(dims: [max(a.dims[0], b.dims[0]), max(a.dims[1], b.dims[1]), a.dims[2], b.dims[3]])
        let description = try CUDNNDescriptor(library, type: .matmul, label: what)
        try description.set(.matmulComputeType, dataType: .float)
        try description.finalize()
        let operation = try CUDNNDescriptor(library, type: .matmulOperation, label: what)
        try operation.set(.matmulA, descriptor: a.descriptor)
        try operation.set(.matmulB, descriptor: b.descriptor)
        try operation.set(.matmulC, descriptor: c.descriptor)
        try operation.set(.matmulDescriptor, descriptor: description)
        try operation.finalize()
        parts.append(description)
        operations.append(operation)
        return c
    }

    /// `y = reduce(x)` over the axes where `y`'s dims are 1 and `x`'s are not.
    @discardableResult
    func reduce(_ mode: Reduction, _ x: Tensor, into y: Tensor) throws -> Tensor {
        let what = "reduction \(mode) of tensor \(x.uid) into \(y.uid)"
        let description = try CUDNNDescriptor(library, type: .reduction, label: what)
        try description.set(.reductionOperator, int32: mode.rawValue, as: .reductionOperator)
        try description.set(.reductionComputeType, dataType: .float)
        try description.finalize()
        let operation = try CUDNNDescriptor(library, type: .reductionOperation, label: what)
        try operation.set(.reductionX, descriptor: x.descriptor)
        try operation.set(.reductionY, descriptor: y.descriptor)
        try operation.set(.reductionDescriptor, descriptor: description)
        try operation.finalize()
        parts.append(description)
        operations.append(operation)
        return y
    }

    /// `y`, a view of `x`'s elements with other dims and strides (a transpose here).
    @discardableResult
    func reshape(_ x: Tensor, into y: Tensor) throws -> Tensor {
        let operation = try CUDNNDescriptor(library, type: .reshapeOperation, label: "reshape of tensor \(x.uid) into \(y.uid)")
        try operation.set(.reshapeX, descriptor: x.descriptor)
        try operation.set(.reshapeY, descriptor: y.descriptor)
        try operation.finalize()
        operations.append(operation)
        return y
    }

    /// Finalizes the operation graph on `handle` and returns the execution plan of the first
    /// engine configuration (heuristics mode A, then the fallback list) that finalizes.
    ///
    /// - Throws: `CUDNNError`; `isNotSupported` when no engine takes the graph.
    func plan(handle: CUDNNHandle) throws -> CUDNNPlan {
        let graph = try CUDNNDescriptor(library, type: .operationGraph, label: "operation graph (\(label))")
        try graph.set(.operationGraphHandle, handle: handle.handle)
        try graph.set(.operationGraphOps, descriptors: operations)
        try graph.finalize()
        var failures: [String] = []
        for mode: Int32 in [3 /* CUDNN_HEUR_MODE_A */, 2 /* CUDNN_HEUR_MODE_FALLBACK */] {
            let heuristics = try CUDNNDescriptor(library, type: .engineHeuristics, label: "engine heuristics (\(label))")
            try heuristics.set(.engineHeuristicsOperationGraph, descriptor: graph)
            try heuristics.set(.engineHeuristicsMode, int32: mode, as: .heuristicsMode)
            guard (try? heuristics.finalize()) != nil else { failures.append("heuristics mode \(mode) did not finalize"); continue }
            for config in try heuristics.engineConfigs() {
                let plan = try CUDNNDescriptor(library, type: .executionPlan, label: "execution plan (\(label))")
                try plan.set(.executionPlanHandle, handle: handle.handle)
                try plan.set(.executionPlanEngineConfig, descriptor: config)
                do {
                    try plan.finalize()
                } catch let error as CUDNNError {
                    failures.append("\(error.name): \(error.detail)")
                    continue
                }
                return CUDNNPlan(handle: handle, plan: plan, workspaceBytes: Int(try plan.int64(.executionPlanWorkspaceSize)),
                                 scalars: scalars, keepAlive: [graph, heuristics, config] + operations + parts)
            }
        }
        throw CUDNNError(call: "building an execution plan (\(label))", status: 3000, name: "CUDNN_STATUS_NOT_SUPPORTED",
                         detail: failures.isEmpty ? "the heuristics offered no engine" : failures.prefix(4).joined(separator: "; "))
    }
}

/// A finalized execution plan, run with device addresses for its tensors' uids.
final class CUDNNPlan: @unchecked Sendable {
    let handle: CUDNNHandle
    let plan: CUDNNDescriptor
    /// Bytes of device workspace each execution needs.
    let workspaceBytes: Int
    /// The graph's by-value scalars, in host memory that lives as long as the plan.
    private let scalarUIDs: [Int64]
    private let scalarValues: UnsafeMutablePointer<UInt64>
    private let keepAlive: [CUDNNDescriptor]

    init(handle: CUDNNHandle, plan: CUDNNDescriptor, workspaceBytes: Int, scalars: [(uid: Int64, bits: UInt64)],
         keepAlive: [CUDNNDescriptor]) {
        (self.handle, self.plan, self.workspaceBytes, self.keepAlive) = (handle, plan, workspaceBytes, keepAlive)
        scalarUIDs = scalars.map(\.uid)
        scalarValues = .allocate(capacity: max(scalars.count, 1))
        for (index, scalar) in scalars.enumerated() { scalarValues[index] = scalar.bits }
    }

    deinit { scalarValues.deallocate() }

    /// Queues the plan on the handle's stream with `tensors` (uid, device address) and `workspace`
    /// (at least `workspaceBytes`).
    func execute(_ tensors: [(uid: Int64, address: UInt64)], workspace: UInt64) throws {
        let library = handle.library
        let pack = try CUDNNDescriptor(library, type: .variantPack, label: "variant pack")
        let uids = tensors.map(\.uid) + scalarUIDs
        var pointers = tensors.map { UnsafeMutableRawPointer(bitPattern: UInt($0.address)) }
        for index in scalarUIDs.indices { pointers.append(UnsafeMutableRawPointer(scalarValues + index)) }
        try pack.set(.variantPackUniqueIDs, int64s: uids)
        let voidPointer = CUDNNDescriptor.ValueType.voidPointer.rawValue
        try pointers.withUnsafeBufferPointer {
            try pack.set(.variantPackDataPointers, type: voidPointer, count: $0.count, $0.baseAddress)
        }
        var workspacePointer = UnsafeMutableRawPointer(bitPattern: UInt(workspace))
        try pack.set(.variantPackWorkspace, type: voidPointer, count: 1, &workspacePointer)
        try pack.finalize()
        try handle.context.makeCurrent()
        try library.check(library.execute(handle.handle, plan.pointer, pack.pointer), "cudnnBackendExecute")
    }
}
