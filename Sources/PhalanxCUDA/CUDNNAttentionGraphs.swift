import PhalanxRuntime

/// The operation graphs of causal (sliding-window) grouped attention that cuDNN's fused
/// flash-attention engines recognise, for one shape. Ours is the usual "SDPA" pattern of cuDNN's
/// graph API (learned from NVIDIA's documentation and its open-source frontend; written here).
///
/// Forward, `S` `[B, H, L, L]` never leaving the chip:
///
///     S = Q K^T · scale;  S = mask(S);  M = rowmax S;  E = exp(S - M);  Z = rowsum E
///     Stats = M + log Z;  P = E / Z (bfloat16);  O = P V
///
/// Backward (from `Stats`, recomputing the probabilities):
///
///     D = rowsum(dO ∘ O)            (float32 scratch `rowDots`, [B, H, L, 1])
///     P = exp(mask(Q K^T · scale - Stats))
///     dV = P^T dO;   dS = P ∘ (dO V^T - D) · scale;   dK = dS^T Q;   dQ = dS K
///
/// (with grouped kv heads, dK and dV are summed over each group's query heads by a reduction).
/// The mask is two bands: `j <= i` (causal) and, with a window, `j + window > i`; a masked score
/// becomes `-inf`. Tensors (ids in `ID`): our `[B, L, heads, D]` buffers seen as `[B, heads, L, D]`
/// through strides; `K^T` and `V^T` are the same memory with the last two axes' strides swapped.
struct CUDNNAttentionGraphs {
    /// The unique ids of the tensors in device memory (and the by-value scalars).
    enum ID {
        static let query: Int64 = 1, key: Int64 = 2, value: Int64 = 3, output: Int64 = 4, stats: Int64 = 5
        static let outputGradient: Int64 = 6, queryGradient: Int64 = 7, keyGradient: Int64 = 8, valueGradient: Int64 = 9
        static let rowDots: Int64 = 10, queryGradientAccumulator: Int64 = 11
        static let scale: Int64 = 20, negativeInfinity: Int64 = 21, window: Int64 = 22, one: Int64 = 23
    }

    let library: CUDNNLibrary
    let shape: AttentionLayout
    let window: Int?
    let scale: Float
    let label: String

    private var b: Int64 { Int64(shape.batch) }
    private var h: Int64 { Int64(shape.heads) }
    private var hk: Int64 { Int64(shape.kvHeads) }
    private var l: Int64 { Int64(shape.length) }
    private var d: Int64 { Int64(shape.headDim) }

    /// A `[B, L, heads, D]` buffer as cuDNN's `[B, heads, L, D]`.
    private func rows(_ graph: CUDNNGraph, _ uid: Int64, heads: Int64, type: CUDNNGraph.DataType = .bfloat16) throws -> CUDNNGraph.Tensor {
        try graph.tensor(uid: uid, dims: [b, heads, l, d], strides: [l * heads * d, d, heads * d, 1], type: type)
    }

    /// A `[B, L, heads, D]` buffer as the transposed `[B, heads, D, L]`.
    private func columns(_ graph: CUDNNGraph, _ uid: Int64, heads: Int64) throws -> CUDNNGraph.Tensor {
        try graph.tensor(uid: uid, dims: [b, heads, d, l], strides: [l * heads * d, d, 1, heads * d], type: .bfloat16)
    }

    /// `[B, H, L, 1]` float32, packed: the statistics and row dots.
    private func perRow(_ graph: CUDNNGraph, _ uid: Int64) throws -> CUDNNGraph.Tensor {
        try graph.tensor(uid: uid, dims: [b, h, l, 1], strides: [h * l, l, 1, 1], type: .float)
    }

    /// `scores` with every invisible key's score replaced by `-inf`: the causal band, then the
    /// window's (`j + window > i`, the window a float32 as cuDNN's band expects).
    private func mask(_ graph: CUDNNGraph, _ scores: CUDNNGraph.Tensor, negativeInfinity: CUDNNGraph.Tensor,
                      window windowScalar: CUDNNGraph.Tensor?) throws -> CUDNNGraph.Tensor {
        func indices(_ of: CUDNNGraph.Tensor) throws -> (row: CUDNNGraph.Tensor, column: CUDNNGraph.Tensor) {
            (try graph.pointwise(.generateIndex, of, output: .int32, compute: .int32, axis: 2),
             try graph.pointwise(.generateIndex, of, output: .int32, compute: .int32, axis: 3))
        }
        let causal = try indices(scores)
        let visible = try graph.pointwise(.greaterOrEqual, causal.row, causal.column, output: .boolean, compute: .boolean)
        var masked = try graph.pointwise(.binarySelect, scores, negativeInfinity, select: visible)
        if let windowScalar {
            let band = try indices(masked)
            let shifted = try graph.pointwise(.add, band.column, windowScalar, output: .float, compute: .float)
            let inside = try graph.pointwise(.greater, shifted, band.row, output: .boolean, compute: .boolean)
            masked = try graph.pointwise(.binarySelect, masked, negativeInfinity, select: inside)
        }
        return masked
    }

    /// The forward graph: writes `output` and `stats`.
    func forward() throws -> CUDNNGraph {
        let graph = CUDNNGraph(library: library, label: label)
        let q = try rows(graph, ID.query, heads: h), kT = try columns(graph, ID.key, heads: hk)
        let v = try rows(graph, ID.value, heads: hk), o = try rows(graph, ID.output, heads: h)
        let stats = try perRow(graph, ID.stats)
        let scaleScalar = try graph.scalar(uid: ID.scale, scale)
        let negativeInfinity = try graph.scalar(uid: ID.negativeInfinity, -.infinity)
        let windowScalar = try window.map { try graph.scalar(uid: ID.window, Float($0)) }

        let scores = try graph.pointwise(.mul, try graph.matmul(q, kT), scaleScalar)
        let masked = try mask(graph, scores, negativeInfinity: negativeInfinity, window: windowScalar)
        let rowMax = try graph.reduce(.max, masked, into: try graph.virtual(dims: [b, h, l, 1]))
        let exponentials = try graph.pointwise(.exp, try graph.pointwise(.sub, masked, rowMax))
        let sum = try graph.reduce(.add, exponentials, into: try graph.virtual(dims: [b, h, l, 1]))
        try graph.pointwise(.add, rowMax, try graph.pointwise(.log, sum), into: stats)
        let probabilities = try graph.pointwise(.div, exponentials, sum, output: .bfloat16)
        try graph.matmul(probabilities, v, into: o)
        return graph
    }

    /// The backward graph: writes the three gradients, `rowDots` and (unless `deterministic`)
    /// dq's float32 accumulator, from which dq is converted.
    func backward(deterministic: Bool) throws -> CUDNNGraph {
        let graph = CUDNNGraph(library: library, label: label)
        let q = try rows(graph, ID.query, heads: h), kT = try columns(graph, ID.key, heads: hk)
        let vT = try columns(graph, ID.value, heads: hk), o = try rows(graph, ID.output, heads: h)
        let stats = try perRow(graph, ID.stats), dO = try rows(graph, ID.outputGradient, heads: h)
        let dQ = try rows(graph, ID.queryGradient, heads: h)
        let dK = try rows(graph, ID.keyGradient, heads: hk), dV = try rows(graph, ID.valueGradient, heads: hk)
        let rowDots = try perRow(graph, ID.rowDots)
        let scaleScalar = try graph.scalar(uid: ID.scale, scale)
        let negativeInfinity = try graph.scalar(uid: ID.negativeInfinity, -.infinity)
        let one = try graph.scalar(uid: ID.one, 1)
        let windowScalar = try window.map { try graph.scalar(uid: ID.window, Float($0)) }
        let square: [Int64] = [b, h, l, l], transposed: [Int64] = [h * l * l, l * l, 1, l]

        // D = rowsum(dO ∘ O), kept in memory for the dS kernel.
        let products = try graph.pointwise(.mul, dO, o)
        let dots = try graph.reduce(.add, products, into: try graph.virtual(dims: [b, h, l, 1]))
        try graph.pointwise(.mul, dots, one, into: rowDots)

        // P, recomputed; dV = P^T dO.
        let scores = try graph.pointwise(.mul, try graph.matmul(q, kT), scaleScalar)
        let shifted = try graph.pointwise(.sub, scores, stats)
        let probabilities = try graph.pointwise(.exp, try mask(graph, shifted, negativeInfinity: negativeInfinity,
                                                               window: windowScalar))
        let pT = try graph.reshape(probabilities, into: try graph.virtual(dims: square, strides: transposed, type: .bfloat16))
        try gradient(graph, pT, dO, into: dV)

        // dS = P ∘ (dO V^T - D) · scale;  dK = dS^T Q.
        let dP = try graph.pointwise(.sub, try graph.matmul(dO, vT), rowDots)
        let dS = try graph.pointwise(.mul, try graph.pointwise(.mul, dP, probabilities), scaleScalar)
        let dST = try graph.reshape(dS, into: try graph.virtual(dims: square, strides: transposed, type: .bfloat16))
        try gradient(graph, dST, q, into: dK)

        // dQ = dS K (K^T's memory read untransposed).
        let k = try graph.reshape(kT, into: try graph.virtual(dims: [b, hk, l, d], strides: [l * hk * d, d, hk * d, 1],
                                                              type: .bfloat16))
        if deterministic {
            try graph.matmul(dS, k, into: dQ)
        } else {
            let accumulator = try rows(graph, ID.queryGradientAccumulator, heads: h, type: .float)
            try graph.matmul(dS, k, into: accumulator)
            try graph.pointwise(.identity, accumulator, into: dQ)
        }
        return graph
    }

    /// `into = a b` for a key/value gradient: directly when every query head has its own kv head,
    /// else per query head (`[B, H, L, D]`) and then summed over each group.
    private func gradient(_ graph: CUDNNGraph, _ a: CUDNNGraph.Tensor, _ b: CUDNNGraph.Tensor, into target: CUDNNGraph.Tensor) throws {
        if h == hk {
            try graph.matmul(a, b, into: target)
        } else {
            let perHead = try graph.matmul(a, b, into: try graph.virtual(dims: [self.b, h, l, d], type: .bfloat16))
            try graph.reduce(.add, perHead, into: target)
        }
    }
}
