import Foundation
import PhalanxRuntime

/// `CUDAAttention`'s causal (optionally sliding-window) grouped attention, forward and backward,
/// run by cuDNN's fused flash-attention engines (cuDNN 9, the backend graph API), bfloat16
/// storage only. Same semantics, layouts and interface as `CUDAAttention`:
///
///     s_ij = scale * q_i . k_j  (scale = 1 / sqrt(headDim)),  visible keys i - window < j <= i
///     lse_i = log sum_j exp(s_ij),   o_i = sum_j exp(s_ij - lse_i) v_j
///
/// queries, outputs and their gradients `[batch, length, heads, headDim]`, keys, values and
/// their gradients `[batch, length, kvHeads, headDim]` (bfloat16), log-sum-exp `[batch, heads,
/// length]` float32, natural log. cuDNN's tensors are `[batch, heads, sequence, headDim]`; ours
/// are the same numbers with strides `(length * heads * headDim, headDim, heads * headDim, 1)`, so
/// nothing is copied. cuDNN's softmax statistics ("Stats", `[batch, heads, length, 1]`) are
/// `max_j s_ij + log sum_j exp(s_ij - max)`, the natural-log log-sum-exp: exactly our `lse`.
///
/// The graphs are the patterns cuDNN's fused attention engines recognise (`CUDNNAttentionGraphs`).
/// Each shape's forward and backward plans are built once, on first use, and cached; the
/// workspace, and the backward's float32 scratch (the row dots `D = dO . O` and, unless
/// `deterministic`, dq's float32 accumulator), come from the context's memory cache.
///
/// Determinism: the default backward accumulates dq with float atomics in cuDNN's kernel, so two
/// runs can differ in the last bits. `deterministic` asks for cuDNN's other backward (dq written
/// once from a `[batch, heads, length, length]` bfloat16 dP workspace): bit-identical runs, at a
/// workspace quadratic in the length (refused past `deterministicWorkspaceLimit`).
public final class CUDNNAttention: DeviceAttentionKernels, @unchecked Sendable {
    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// Channels per head.
    public let headDim: Int
    /// Keys a query sees, itself included; nil for full causal.
    public let window: Int?
    /// Whether the backward is bit-reproducible (see the type's comment).
    public let deterministic: Bool
    /// How queries, keys, values, outputs and gradients are stored (the log-sum-exp is float32).
    public var storage: NumberFormat { .bfloat16 }
    /// The most bytes the deterministic backward's dP workspace may take.
    public static let deterministicWorkspaceLimit = 8 << 30

    private let handle: CUDNNHandle
    private let lock = NSLock()
    private var plans: [PlanKey: Result<CUDNNPlan, CUDNNError>] = [:]

    private struct PlanKey: Hashable {
        let shape: AttentionLayout
        let backward: Bool
    }

    /// Why cuDNN cannot be loaded here, or nil when it can (needs no GPU).
    public static var unavailableReason: String? {
        if case .failure(let error) = CUDNNLibrary.shared { return error.reason }
        return nil
    }

    /// The loaded cuDNN's version and path (`9.14.0 (/usr/lib/.../libcudnn.so.9)`), or nil.
    public static var loadedVersion: String? {
        guard case .success(let library) = CUDNNLibrary.shared else { return nil }
        return "\(library.versionString) (\(library.path))"
    }

    /// cuDNN on `context` for `headDim` and `window`.
    ///
    /// - Throws: `CUDAUnavailable` without cuDNN 9, `CUDNNError` when no handle can be created.
    public init(context: CUDAContext, headDim: Int, window: Int? = nil, deterministic: Bool = false) throws {
        require(headDim >= 8 && headDim % 8 == 0, "CUDNNAttention: head dim must be a positive multiple of 8, got \(headDim)")
        if let window { require(window >= 1, "CUDNNAttention: window must be at least 1 (the query itself), got \(window)") }
        handle = try CUDNNHandle(context: context)
        (self.context, self.headDim, self.window, self.deterministic) = (context, headDim, window, deterministic)
    }

    /// Builds and finalizes every tensor and operation of `shape`'s forward and backward graphs,
    /// short of the operation graph itself (which needs a device): a graph cuDNN rejects node by
    /// node fails here, naming the node, on a machine without a GPU.
    ///
    /// - Throws: `CUDAUnavailable` without cuDNN 9, `CUDNNError` naming the node cuDNN rejected.
    public static func validateNodes(shape: AttentionLayout, window: Int?, deterministic: Bool = false) throws {
        let graphs = CUDNNAttentionGraphs(library: try CUDNNLibrary.shared.get(), shape: shape, window: window,
                                          scale: 1 / Float(shape.headDim).squareRoot(), label: "validation of \(shape)")
        _ = try graphs.forward()
        _ = try graphs.backward(deterministic: deterministic)
    }

    /// The logit scale, `1 / sqrt(headDim)`.
    public var scale: Float { 1 / Float(headDim).squareRoot() }

    /// Nil when cuDNN takes `shape` forward and backward (building and caching both plans), else
    /// why not (the status and cuDNN's message).
    public func unsupportedReason(_ shape: AttentionLayout) -> String? {
        guard shape.batch > 0 && shape.length > 0 else { return nil }
        for backward in [false, true] {
            if case .failure(let error) = plan(shape, backward: backward) { return "\(error)" }
        }
        return nil
    }

    /// `output` and `logsumexp` of attention over `query`, `key`, `value`, queued on the
    /// context's stream (layouts in the type's comment; every buffer bfloat16 but the float32
    /// log-sum-exp).
    ///
    /// - Throws: `CUDNNError` when cuDNN rejects the shape or fails.
    public func forward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                        logsumexp: DeviceBuffer, shape: AttentionLayout) throws {
        check(shape, "forward", [("query", query, shape.queryCount, 2), ("key", key, shape.keyCount, 2),
                                 ("value", value, shape.keyCount, 2), ("output", output, shape.queryCount, 2),
                                 ("logsumexp", logsumexp, shape.rowCount, 4)])
        guard shape.batch > 0 && shape.length > 0 else { return }
        let plan = try plan(shape, backward: false).get()
        let workspace = try DeviceBuffer(context: context, byteCount: max(plan.workspaceBytes, 1))
        typealias IDs = CUDNNAttentionGraphs.ID
        try plan.execute([(IDs.query, query.address), (IDs.key, key.address), (IDs.value, value.address),
                          (IDs.output, output.address), (IDs.stats, logsumexp.address)], workspace: workspace.address)
        withExtendedLifetime(workspace) {}
    }

    /// The gradients of the queries, keys and values for the output gradient, queued on the
    /// context's stream; all three are overwritten.
    ///
    /// - Parameters: as `CUDAAttention.backward` (bfloat16 but the float32 `logsumexp`).
    /// - Throws: `CUDNNError` when cuDNN rejects the shape or fails.
    public func backward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                         logsumexp: DeviceBuffer, outputGradient: DeviceBuffer, queryGradient: DeviceBuffer,
                         keyGradient: DeviceBuffer, valueGradient: DeviceBuffer, shape: AttentionLayout) throws {
        check(shape, "backward", [
            ("query", query, shape.queryCount, 2), ("key", key, shape.keyCount, 2), ("value", value, shape.keyCount, 2),
            ("output", output, shape.queryCount, 2), ("logsumexp", logsumexp, shape.rowCount, 4),
            ("outputGradient", outputGradient, shape.queryCount, 2), ("queryGradient", queryGradient, shape.queryCount, 2),
            ("keyGradient", keyGradient, shape.keyCount, 2), ("valueGradient", valueGradient, shape.keyCount, 2),
        ])
        guard shape.batch > 0 && shape.length > 0 else { return }
        let plan = try plan(shape, backward: true).get()
        let workspace = try DeviceBuffer(context: context, byteCount: max(plan.workspaceBytes, 1))
        let rowDots = try DeviceBuffer(context: context, byteCount: shape.rowCount * 4)
        typealias IDs = CUDNNAttentionGraphs.ID
        var tensors: [(uid: Int64, address: UInt64)] = [
            (IDs.query, query.address), (IDs.key, key.address), (IDs.value, value.address), (IDs.output, output.address),
            (IDs.stats, logsumexp.address), (IDs.outputGradient, outputGradient.address),
            (IDs.queryGradient, queryGradient.address), (IDs.keyGradient, keyGradient.address),
            (IDs.valueGradient, valueGradient.address), (IDs.rowDots, rowDots.address),
        ]
        var accumulator: DeviceBuffer?
        if !deterministic {
            // dq's float32 accumulator starts at zero (cuDNN adds each key tile's share into it).
            let buffer = try DeviceBuffer(context: context, byteCount: shape.queryCount * 4)
            try buffer.fill(byte: 0)
            tensors.append((IDs.queryGradientAccumulator, buffer.address))
            accumulator = buffer
        }
        try plan.execute(tensors, workspace: workspace.address)
        withExtendedLifetime((workspace, rowDots, accumulator)) {}
    }

    /// The cached plan of `shape` (built on first use; a failure is cached too).
    private func plan(_ shape: AttentionLayout, backward: Bool) -> Result<CUDNNPlan, CUDNNError> {
        lock.lock()
        defer { lock.unlock() }
        let key = PlanKey(shape: shape, backward: backward)
        if let plan = plans[key] { return plan }
        let plan: Result<CUDNNPlan, CUDNNError>
        do { plan = .success(try buildPlan(shape, backward: backward)) } catch { plan = .failure(error) }
        plans[key] = plan
        return plan
    }

    private func buildPlan(_ shape: AttentionLayout, backward: Bool) throws(CUDNNError) -> CUDNNPlan {
        let library = handle.library
        let label = "attention \(backward ? "backward" : "forward") \(shape) window \(window.map(String.init) ?? "none")"
        if backward && library.version < 91600 && shape.length % 128 != 0 {
            // cuDNN before 9.16 computes wrong gradients for key lengths off the 128-row tile
            // unless the graph adds a padding mask; rather than that, such shapes stay on our kernel.
            throw CUDNNError(call: label, status: 3000, name: "CUDNN_STATUS_NOT_SUPPORTED",
                             detail: "cuDNN \(library.versionString)'s backward needs lengths that are multiples of 128 (9.16 lifts this)")
        }
        if backward && deterministic {
            let dP = shape.batch * shape.heads * ((shape.length + 63) / 64 * 64) * ((shape.length + 127) / 128 * 128) * 2
            if dP > CUDNNAttention.deterministicWorkspaceLimit {
                throw CUDNNError(call: label, status: 3000, name: "CUDNN_STATUS_NOT_SUPPORTED",
                                 detail: "the deterministic backward's dP workspace would take \(dP >> 20) MiB")
            }
        }
        do {
            let graphs = CUDNNAttentionGraphs(library: library, shape: shape, window: window, scale: scale, label: label)
            let graph = try backward ? graphs.backward(deterministic: deterministic) : graphs.forward()
            return try graph.plan(handle: handle)
        } catch let error as CUDNNError {
            throw error
        } catch {
            throw CUDNNError(call: label, status: -1, name: "error", detail: "\(error)")
        }
    }

    /// Stops with a message naming `function` on a buffer too small or on another context.
    private func check(_ shape: AttentionLayout, _ function: String, _ buffers: [(String, DeviceBuffer, Int, Int)]) {
        require(shape.headDim == headDim, "CUDNNAttention.\(function): built for head dim \(headDim), the shape is \(shape)")
        for (label, buffer, count, bytes) in buffers {
            require(buffer.context === context, "CUDNNAttention.\(function): \(label) belongs to another CUDAContext")
            require(buffer.byteCount >= count * bytes,
                    "CUDNNAttention.\(function): \(label) holds \(buffer.byteCount) bytes, expected \(count * bytes) for \(shape)")
        }
    }
}
