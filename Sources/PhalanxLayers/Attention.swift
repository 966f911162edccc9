import PhalanxCUDA
import PhalanxRuntime

/// Causal multi-head attention with grouped key/value heads, rotary position embedding and an
/// optional sliding window.
///
/// Input `x` `[batch, length, dim]`; `H` query heads and `KVH` key/value heads of width `D`:
///
///     q = rope(x Wq^T)             [B, L, H, D]      Wq [H*D, dim]
///     k = rope(x Wk^T)             [B, L, KVH, D]    Wk [KVH*D, dim]
///     v = x Wv^T                   [B, L, KVH, D]    Wv [KVH*D, dim]
///     a = attention(q, k, v)       [B, L, H, D]      causal, window w: i - w < j <= i
///     y = a Wo^T                   [B, L, dim]       Wo [dim, H*D]
///
/// (`AttentionKernel` defines `attention`, `RotaryEmbedding` defines `rope`.) Backward runs the
/// same steps in reverse: `Wo`'s product, the kernel's backward, the inverse rotation of dq and
/// dk, and the three projections, whose input gradients add into `dx`.
///
/// Parameters (no biases), named as in Llama-style checkpoints under `name`: `q_proj.weight`,
/// `k_proj.weight`, `v_proj.weight`, `o_proj.weight`, initialised as PyTorch's `nn.Linear`.
///
/// Cost: the four projections (`2 * rows * dim * (2 H + 2 KVH) * D` FLOPs forward) and the
/// kernel (`4 * D` FLOPs per visible query-key pair); memory linear in the length.
public final class Attention: ParameterContainer {
    /// Model width: features of the input and output rows.
    public let dim: Int
    /// Query heads, `H`.
    public let heads: Int
    /// Key/value heads, `KVH`; divides `heads`.
    public let kvHeads: Int
    /// Channels per head, `D`.
    public let headDim: Int
    /// The attention kernel, carrying the window.
    public let kernel: AttentionKernel
    /// nil when positions are not encoded.
    public let rotary: RotaryEmbedding?
    /// The projections `q_proj` `[H*D, dim]`, `k_proj` and `v_proj` `[KVH*D, dim]`, `o_proj` `[dim, H*D]`.
    public let qProj: Linear, kProj: Linear, vProj: Linear, oProj: Linear
    let pool: WorkerPool

    /// What backward needs from forward, for one call.
    public struct Cache {
        /// `x` `[batch, length, dim]`, the projections' input.
        public let input: Tensor
        /// The kernel's shapes for this call.
        public let layout: AttentionLayout
        /// Queries and keys after the rotation, and values: the kernel's inputs.
        let query: Tensor, key: Tensor, value: Tensor
        /// `[B, L, H*D]`: the kernel's output, `o_proj`'s input.
        public let attended: Tensor
        /// `[B, H, L]`.
        let logsumexp: Tensor
    }

    /// - Parameters:
    ///   - window: keys a query sees, itself included (`i - window < j <= i`); nil for full causal.
    ///   - ropeBase: the rotary embedding's base (10000 in Llama); nil for no position encoding.
    public init(_ name: String, dim: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int? = nil,
                ropeBase: Float? = 10000, rng: inout SeededGenerator, pool: WorkerPool = .shared) {
        require(dim >= 1, "Attention \(name): dim must be positive, got \(dim)")
        require(heads >= 1 && kvHeads >= 1 && heads % kvHeads == 0,
                "Attention \(name): \(heads) query heads are not divisible into \(kvHeads) key/value heads")
        self.dim = dim
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
        kernel = AttentionKernel(window: window)
        rotary = ropeBase.map { RotaryEmbedding(headDim: headDim, base: $0) }
        qProj = Linear(qualified(name, "q_proj"), inputs: dim, outputs: heads * headDim, bias: false, rng: &rng)
        kProj = Linear(qualified(name, "k_proj"), inputs: dim, outputs: kvHeads * headDim, bias: false, rng: &rng)
        vProj = Linear(qualified(name, "v_proj"), inputs: dim, outputs: kvHeads * headDim, bias: false, rng: &rng)
        oProj = Linear(qualified(name, "o_proj"), inputs: heads * headDim, outputs: dim, bias: false, rng: &rng)
        self.pool = pool
    }

    /// Keys a query sees, itself included; nil for full causal.
    public var window: Int? { kernel.window }

    /// `q_proj`, `k_proj`, `v_proj`, `o_proj` weights, in that order.
    public var parameters: [Parameter] {
        qProj.parameters + kProj.parameters + vProj.parameters + oProj.parameters
    }

    /// `x` `[batch, length, dim]` to `y` `[batch, length, dim]`, every sequence from position 0.
    public func forward(_ x: Tensor) -> (Tensor, Cache) {
        require(x.shape.count == 3 && x.shape[2] == dim, "Attention: input must be [batch, length, \(dim)], got \(x.shape)")
        let layout = AttentionLayout(batch: x.shape[0], length: x.shape[1], heads: heads, kvHeads: kvHeads, headDim: headDim)
        let q = qProj.forward(x), k = kProj.forward(x), v = vProj.forward(x)
        if let rotary {
            rotary.rotate(q, inverse: false, pool: pool)
            rotary.rotate(k, inverse: false, pool: pool)
        }
        let attended = Tensor(uninitialized: [layout.batch, layout.length, heads * headDim], like: q)
        let lse = Tensor(uninitialized: [layout.batch, heads, layout.length], on: q.device)
        switch q.device {
        case .cpu:
            kernel.forward(query: q.readOnly, key: k.readOnly, value: v.readOnly, output: attended.buffer,
                           logsumexp: lse.buffer, layout: layout, pool: pool)
        case .cuda(let gpu):
            DeviceOps.attention(query: q, key: k, value: v, output: attended, logsumexp: lse, layout: layout, window: window, on: gpu)
        }
        let y = oProj.forward(attended)
        return (y, Cache(input: x, layout: layout, query: q, key: k, value: v, attended: attended, logsumexp: lse))
    }

    /// Adds every parameter gradient for output cotangent `dy` `[batch, length, dim]`; returns `dx`.
    public func backward(_ dy: Tensor, cache: Cache) -> Tensor {
        let layout = cache.layout, x = cache.input
        require(dy.shape == [layout.batch, layout.length, dim],
                "Attention.backward: cotangent \(dy.shape), expected \([layout.batch, layout.length, dim])")
        let dAttended = oProj.backward(dy, input: cache.attended)
        let dq = Tensor(uninitialized: cache.query.shape, like: dy)
        let dk = Tensor(uninitialized: cache.key.shape, like: dy), dv = Tensor(uninitialized: cache.value.shape, like: dy)
        switch dy.device {
        case .cpu:
            kernel.backward(query: cache.query.readOnly, key: cache.key.readOnly, value: cache.value.readOnly,
                            output: cache.attended.readOnly, logsumexp: cache.logsumexp.readOnly,
                            outputGradient: dAttended.readOnly, queryGradient: dq.buffer, keyGradient: dk.buffer,
                            valueGradient: dv.buffer, layout: layout, pool: pool)
        case .cuda(let gpu):
            DeviceOps.attentionBackward(query: cache.query, key: cache.key, value: cache.value, output: cache.attended,
                                        logsumexp: cache.logsumexp, outputGradient: dAttended, queryGradient: dq,
                                        keyGradient: dk, valueGradient: dv, layout: layout, window: window, on: gpu)
        }
        if let rotary {
            rotary.rotate(dq, inverse: true, pool: pool)
            rotary.rotate(dk, inverse: true, pool: pool)
        }
        let dx = Tensor(uninitialized: x.shape, like: dy)
        qProj.backward(dq, input: x, inputGradient: dx)
        kProj.backward(dk, input: x, inputGradient: dx, accumulate: true)
        vProj.backward(dv, input: x, inputGradient: dx, accumulate: true)
        return dx
    }
}

extension Attention: SequenceMixer {}
