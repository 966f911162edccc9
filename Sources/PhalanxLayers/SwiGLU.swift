import Foundation
import PhalanxCUDA
import PhalanxRuntime

/// The SwiGLU feed-forward block:
///
///     y = down( silu(gate(x)) * up(x) )      gate, up: dim -> hidden;  down: hidden -> dim
///     silu(z) = z * sigmoid(z)
///
/// Backward, with `g = gate(x)`, `u = up(x)`, `dh = dy W_down`:
///
///     du = dh * silu(g),   dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
///
/// Parameters `<name>.gate_proj.weight`, `<name>.up_proj.weight`, `<name>.down_proj.weight`
/// (no biases, as in Llama).
public final class SwiGLU: ParameterContainer {
    /// What backward needs from forward, for one call.
    public struct Cache {
        let input: Tensor
        /// `[rows, hidden]` pre-activations of the gate and up projections, and `silu(gate) * up`.
        let gate: Tensor, up: Tensor, hidden: Tensor
    }

    /// `gate_proj` and `up_proj` `[hidden, dim]`, `down_proj` `[dim, hidden]`, all without bias.
    public let gateProj: Linear, upProj: Linear, downProj: Linear
    let pool: WorkerPool

    /// A block of width `dim` with `hidden` intermediate features, initialised as PyTorch's `nn.Linear`.
    public init(_ name: String, dim: Int, hidden: Int, rng: inout SeededGenerator, pool: WorkerPool = .shared) {
        gateProj = Linear(qualified(name, "gate_proj"), inputs: dim, outputs: hidden, bias: false, rng: &rng)
        upProj = Linear(qualified(name, "up_proj"), inputs: dim, outputs: hidden, bias: false, rng: &rng)
        downProj = Linear(qualified(name, "down_proj"), inputs: hidden, outputs: dim, bias: false, rng: &rng)
        self.pool = pool
    }

    /// `gate_proj`, `up_proj`, `down_proj` weights, in that order.
    public var parameters: [Parameter] { [gateProj, upProj, downProj].flatMap(\.parameters) }

    /// `x` `[..., dim]` to `y` of the same shape; rows are independent.
    public func forward(_ x: Tensor) -> (Tensor, Cache) {
        if case .cuda(let gpu) = x.device {
            let gate = gateProj.forward(x), up = upProj.forward(x)
            let hidden = DeviceOps.swiGLU(gate: gate, up: up, on: gpu)
            return (downProj.forward(hidden), Cache(input: x, gate: gate, up: up, hidden: hidden))
        }
        let rows = x.rows, hiddenSize = gateProj.outputs
        let gate = Tensor(uninitialized: [rows, hiddenSize]), up = Tensor(uninitialized: [rows, hiddenSize])
        gateProj.forward(x.pointer, rows: rows, into: gate.pointer)
        upProj.forward(x.pointer, rows: rows, into: up.pointer)
        let hidden = Tensor(uninitialized: [rows, hiddenSize])
        let gp = gate.pointer, up_ = up.pointer, hp = hidden.pointer, n = rows * hiddenSize
        forEachRange(n) { range in
            let o = range.lowerBound
            forEachChannelChunk(range.count, vector: { i in
                let g = load16(gp + o + i)
                store16(g * sigmoid(g) * load16(up_ + o + i), hp + o + i)
            }, scalar: { i in hp[o + i] = gp[o + i] * sigmoid(gp[o + i]) * up_[o + i] })
        }
        let y = Tensor(uninitialized: x.shape)
        downProj.forward(hidden.pointer, rows: rows, into: y.pointer)
        return (y, Cache(input: x, gate: gate, up: up, hidden: hidden))
    }

    /// Adds every parameter gradient for output cotangent `dy` `[..., dim]`; returns `dx`.
    public func backward(_ dy: Tensor, cache: Cache) -> Tensor {
        if case .cuda(let gpu) = dy.device {
            let dh = downProj.backward(dy, input: cache.hidden)
            let dUp = DeviceOps.swiGLUBackward(dh, gate: cache.gate, up: cache.up, on: gpu)  // dh becomes d(gate)
            let dx = Tensor(uninitialized: cache.input.shape, like: dy)
            gateProj.backward(dh, input: cache.input, inputGradient: dx)
            upProj.backward(dUp, input: cache.input, inputGradient: dx, accumulate: true)
            return dx
        }
        let rows = cache.input.rows, hiddenSize = gateProj.outputs
        let dh = Tensor(uninitialized: [rows, hiddenSize])
        downProj.backward(dy.pointer, input: cache.hidden.pointer, rows: rows, inputGradient: dh.pointer)
        // dh becomes d(gate); d(up) goes to its own buffer.
        let dUp = Tensor(uninitialized: [rows, hiddenSize])
        let gp = cache.gate.pointer, up = cache.up.pointer, dhp = dh.pointer, dup = dUp.pointer
        forEachRange(rows * hiddenSize) { range in
            let o = range.lowerBound
            forEachChannelChunk(range.count, vector: { i in
                let g = load16(gp + o + i), s = sigmoid(g), d = load16(dhp + o + i)
                store16(d * g * s, dup + o + i)
                store16(d * load16(up + o + i) * s * (1 + g * (1 - s)), dhp + o + i)
            }, scalar: { i in
                let g = gp[o + i], s = sigmoid(g), d = dhp[o + i]
                dup[o + i] = d * g * s
                dhp[o + i] = d * up[o + i] * s * (1 + g * (1 - s))
            })
        }
        let dx = Tensor(uninitialized: cache.input.shape)
        gateProj.backward(dh.pointer, input: cache.input.pointer, rows: rows, inputGradient: dx.pointer)
        upProj.backward(dUp.pointer, input: cache.input.pointer, rows: rows, inputGradient: dx.pointer, accumulate: true)
        return dx
    }

    private func forEachRange(_ count: Int, _ body: (Range<Int>) -> Void) {
        let parts = min(pool.threadCount, max(count / 4096, 1))
        pool.run(parts) { p in body((p * count / parts)..<((p + 1) * count / parts)) }
    }
}
