import PhalanxRuntime

/// Causal softmax attention, full or in a sliding window, with grouped key/value heads, forward and
/// backward on a CUDA device: the semantics of the CPU `AttentionKernel` (PhalanxLayers) with its
/// default scale, tiled with an online softmax so that no `L x L` matrix ever exists
/// (FlashAttention-2).
///
/// For query `i`, head `h` (key/value head `h / (heads / kvHeads)`), over the visible keys
/// `j <= i` (and `j > i - window` with a window):
///
///     s_ij  = scale * q_i . k_j,   scale = 1 / sqrt(headDim)
///     lse_i = log sum_j exp(s_ij)
///     o_i   = sum_j exp(s_ij - lse_i) v_j
///
/// Backward, from the output gradient `dO` (probabilities recomputed from the saved `lse`):
///
///     D_i  = dO_i . O_i,   P_ij = exp(s_ij - lse_i),   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
///     dq_i = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i
///
/// (dk and dv summed over every query head of the group.) Every output is overwritten.
///
/// Layout (row-major, channels contiguous): queries, outputs and their gradients
/// `[batch, length, heads, headDim]`; keys, values and their gradients `[batch, length, kvHeads,
/// headDim]`; the log-sum-exp `[batch, heads, length]`, always float32. Storage of every other
/// buffer is float32 or bfloat16; arithmetic and accumulation are float32 either way.
///
/// Kernels (`Kernels/attention.cu`, the head dim compiled in as `-DATTN_HEAD_DIM`):
/// - bfloat16: tensor cores (`mma.sync` m16n8k16, operands through `ldmatrix`, tiles staged by
///   `cp.async`; at most 34 KiB of static shared memory per block). Forward: one block of 4 warps
///   per query tile of 64, a warp per 16 rows, key and value tiles of 64 (the next key tile
///   loading while the current one's P V runs), online softmax in registers. Backward: a row-dot kernel for `D`, then one
///   kernel per key tile of 64 (dk, dv; looping over the group's query heads and the query tiles
///   that see it) and one per query tile of 64 (dq; looping over the visible key tiles).
/// - float32: SIMT, one warp per row (the exact mode for checks).
///
/// Determinism: every output element is accumulated by one thread in a fixed order (no atomics,
/// no split reductions), so the same inputs give bit-identical outputs on every run. The price is
/// that backward recomputes `S` and `dP` in both its kernels: 7 tile products instead of the 5 of
/// FlashAttention-2 with float atomics for dq.
///
/// Work: forward `4 * visiblePairs * headDim` FLOPs (`AttentionLayout.forwardFlops`), backward 2.5 times
/// that in the usual count (this backward does 3.5 times: the two recomputed products). Memory
/// beyond the operands: `D`, `[batch, heads, length]` float32, allocated by `backward` from the
/// context's cache (or passed in as `rowDots`).
///
/// References: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023).
public struct CUDAAttention: DeviceAttentionKernels, Sendable {
    /// The head dims the checks and benchmarks use; the kernels take any multiple of 16 up to 128.
    public static let headDims = [16, 32, 64, 128]

    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// How queries, keys, values, outputs and gradients are stored (the log-sum-exp is float32).
    public let storage: NumberFormat
    /// Channels per head, compiled into the kernels.
    public let headDim: Int
    /// Keys a query sees, itself included (`i - window < j <= i`); nil for full causal.
    public let window: Int?

    private let forwardKernel, dotKernel, keyKernel, queryKernel: CUDAContext.Function

    /// Query rows (key rows) per thread block of the forward and dq (dk/dv) kernels.
    private var rowsPerBlock: Int { storage == .bfloat16 ? 64 : 4 }

    /// Compiles (once per context and head dim, then from its cache) and loads the kernels.
    ///
    /// - Parameters:
    ///   - headDim: a multiple of 16 up to 128 (the accumulators of a row live in registers).
    ///   - window: at least 1, or nil for full causal attention.
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel sources, `NVRTCError`, `CUDAError`.
    public init(context: CUDAContext, storage: NumberFormat, headDim: Int, window: Int? = nil) throws {
        require(headDim >= 16 && headDim <= 128 && headDim % 16 == 0,
                "CUDAAttention: the kernels take head dims that are multiples of 16 up to 128, got \(headDim)")
        if let window {
            require(window >= 1 && window <= Int(Int32.max), "CUDAAttention: window must be at least 1 (the query itself), got \(window)")
        }
        (self.context, self.storage, self.headDim, self.window) = (context, storage, headDim, window)
        let names = ["attn_forward", "attn_dot", "attn_dkdv", "attn_dq"].map { "\($0)_\(storage)" }
        let functions = try context.functions(names, source: try KernelSources.source(named: "attention"),
                                              sourceName: "attention.cu", options: ["-DATTN_HEAD_DIM=\(headDim)"])
        (forwardKernel, dotKernel, keyKernel, queryKernel) = (functions[0], functions[1], functions[2], functions[3])
    }

    /// The logit scale, `1 / sqrt(headDim)`.
    public var scale: Float { 1 / Float(headDim).squareRoot() }

    /// `output` and `logsumexp` of attention over `query`, `key`, `value`, queued on the context's
    /// stream.
    ///
    /// - Parameters:
    ///   - query: `[batch, length, heads, headDim]` in `storage`.
    ///   - key, value: `[batch, length, kvHeads, headDim]` in `storage`.
    ///   - output: `[batch, length, heads, headDim]` in `storage`, overwritten; may not overlap the inputs.
    ///   - logsumexp: `[batch, heads, length]` float32, overwritten.
    public func forward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                        logsumexp: DeviceBuffer, shape: AttentionLayout) throws {
        check(shape, "forward", [("query", query, shape.queryCount, storage), ("key", key, shape.keyCount, storage),
                                 ("value", value, shape.keyCount, storage), ("output", output, shape.queryCount, storage),
                                 ("logsumexp", logsumexp, shape.rowCount, .float32)])
        guard shape.batch > 0 && shape.length > 0 else { return }
        try context.launch(forwardKernel, grid: (blocks(shape.length), shape.heads, shape.batch), block: (128, 1, 1), arguments: [
            .buffer(query), .buffer(key), .buffer(value), .buffer(output), .buffer(logsumexp),
        ] + sizes(shape))
    }

    /// The gradients of the queries, keys and values for the output gradient, queued on the
    /// context's stream; all three are overwritten (not accumulated).
    ///
    /// - Parameters:
    ///   - query, key, value: as given to `forward`.
    ///   - output, logsumexp: as `forward` wrote them.
    ///   - outputGradient: `dO`, `[batch, length, heads, headDim]` in `storage`.
    ///   - queryGradient: `[batch, length, heads, headDim]` in `storage`.
    ///   - keyGradient, valueGradient: `[batch, length, kvHeads, headDim]` in `storage`.
    ///   - rowDots: scratch for `D`, `[batch, heads, length]` float32; nil to allocate it here
    ///     (from the context's memory cache, returned when the call has been queued: the stream
    ///     orders its reuse).
    public func backward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                         logsumexp: DeviceBuffer, outputGradient: DeviceBuffer, queryGradient: DeviceBuffer,
                         keyGradient: DeviceBuffer, valueGradient: DeviceBuffer, shape: AttentionLayout,
                         rowDots: DeviceBuffer?) throws {
        check(shape, "backward", [
            ("query", query, shape.queryCount, storage), ("key", key, shape.keyCount, storage),
            ("value", value, shape.keyCount, storage), ("output", output, shape.queryCount, storage),
            ("logsumexp", logsumexp, shape.rowCount, .float32), ("outputGradient", outputGradient, shape.queryCount, storage),
            ("queryGradient", queryGradient, shape.queryCount, storage), ("keyGradient", keyGradient, shape.keyCount, storage),
            ("valueGradient", valueGradient, shape.keyCount, storage),
        ] + (rowDots.map { [("rowDots", $0, shape.rowCount, NumberFormat.float32)] } ?? []))
        guard shape.batch > 0 && shape.length > 0 else { return }
        let dots = try rowDots ?? DeviceBuffer(context: context, byteCount: shape.rowCount * 4)
        let rows = shape.batch * shape.length * shape.heads
        try context.launch(dotKernel, grid: ((rows + 3) / 4, 1, 1), block: (128, 1, 1), arguments: [
            .buffer(output), .buffer(outputGradient), .buffer(dots), .int32(Int32(shape.length)), .int32(Int32(shape.heads)),
            .int64(Int64(rows)),
        ])
        try context.launch(keyKernel, grid: (blocks(shape.length), shape.kvHeads, shape.batch), block: (128, 1, 1), arguments: [
            .buffer(query), .buffer(key), .buffer(value), .buffer(outputGradient), .buffer(logsumexp), .buffer(dots),
            .buffer(keyGradient), .buffer(valueGradient),
        ] + sizes(shape))
        try context.launch(queryKernel, grid: (blocks(shape.length), shape.heads, shape.batch), block: (128, 1, 1), arguments: [
            .buffer(query), .buffer(key), .buffer(value), .buffer(outputGradient), .buffer(logsumexp), .buffer(dots),
            .buffer(queryGradient),
        ] + sizes(shape))
        withExtendedLifetime(dots) {}
    }

    /// `backward` with its scratch for `D` from the context's memory cache.
    public func backward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                         logsumexp: DeviceBuffer, outputGradient: DeviceBuffer, queryGradient: DeviceBuffer,
                         keyGradient: DeviceBuffer, valueGradient: DeviceBuffer, shape: AttentionLayout) throws {
        try backward(query: query, key: key, value: value, output: output, logsumexp: logsumexp, outputGradient: outputGradient,
                     queryGradient: queryGradient, keyGradient: keyGradient, valueGradient: valueGradient, shape: shape,
                     rowDots: nil)
    }

    /// Thread blocks along the length.
    private func blocks(_ length: Int) -> Int { (length + rowsPerBlock - 1) / rowsPerBlock }

    /// The kernels' trailing arguments: length, heads, kv heads, window (0: none), scale.
    private func sizes(_ shape: AttentionLayout) -> [CUDAContext.Argument] {
        [.int32(Int32(shape.length)), .int32(Int32(shape.heads)), .int32(Int32(shape.kvHeads)),
         .int32(Int32(window ?? 0)), .float32(scale)]
    }

    /// Stops with a message naming `function` on a shape or buffer the kernels cannot take.
    private func check(_ shape: AttentionLayout, _ function: String, _ buffers: [(String, DeviceBuffer, Int, NumberFormat)]) {
        let name = "CUDAAttention.\(function)"
        require(shape.headDim == headDim, "\(name): the kernels were compiled for head dim \(headDim), the shape is \(shape)")
        require(shape.length <= Int(Int32.max) && shape.heads <= 65535 && shape.batch <= 65535
                    && shape.batch * shape.length * shape.heads <= Int(Int32.max) * 4,
                "\(name): length must fit 32 bits and heads and batch 65535 (the launch grid), got \(shape)")
        for (label, buffer, count, format) in buffers {
            require(buffer.context === context, "\(name): \(label) belongs to another CUDAContext")
            require(buffer.byteCount >= count * format.byteCount,
                    "\(name): \(label) holds \(buffer.byteCount) bytes, expected \(count) \(format) numbers (\(count * format.byteCount) bytes) for \(shape)")
        }
    }
}
