import Foundation
import PhalanxRuntime
import SWR

/// The Phalanx token mixer (SWR.md section 6): gated projections around a jagged-window
/// recurrence (block length 16, k = 2).
///
/// Input `x` `[batch, length, dim]`; `H = dim / 16` heads of `D = 16` channels; `KVH` key/value
/// heads (head `h` reads kv head `h / (H / KVH)`):
///
///     a   = gateScale * sigmoid(proj_a(x))      [B, L, H]       one gate per head and position
///     b   = sigmoid(repeat_kv(proj_b(x)))       [B, L, H, 16]
///     c   = repeat_kv(proj_c(x))                [B, L, H, 16]   (no sigmoid)
///     v   = proj_v(x)                           [B, L, H, 16]
///     s   = SWR_jagged(a, b * v)                [B, L, H, 16]
///     y   = proj_out(flatten(s * c + v))        [B, L, dim]
///
/// Parameters, named as in the reference checkpoints under `name`: `param.proj_a` `(H, dim)`
/// with bias, `param.proj_b` and `param.proj_c` `(KVH*16, dim)` with bias, `param.proj_v`
/// `(H*16, dim)` and `proj_out` `(dim, dim)` without.
///
/// The four input projections write into one `[rows, H + 2*KVH*16 + H*16]` buffer; the gates,
/// the products `b * v` and the post-gating `s * c + v` are each one fused, row-parallel pass.
public final class PhalanxLayer: ParameterContainer {
    public struct Configuration: Codable, Hashable, Sendable {
        public var dim: Int
        public var kvHeads: Int
        /// Multiplies the gate sigmoid; the paper's models bound gates near 0.8. Default 1.
        public var gateScale: Float = 1
        public var blockLength: Int = 16

        public init(dim: Int, kvHeads: Int, gateScale: Float = 1, blockLength: Int = 16) {
            self.dim = dim
            self.kvHeads = kvHeads
            self.gateScale = gateScale
            self.blockLength = blockLength
        }

        public static let headDim = 16
        public var heads: Int { dim / Self.headDim }
    }

    /// What backward needs from forward, for one call; its intermediates can be inspected.
    public struct Cache {
        public let input: Tensor
        public let shape: (batch: Int, length: Int)
        /// `[rows, H]` gates after the sigmoid and scale.
        public let gates: Tensor
        /// `[rows, KVH*16]` sigmoid(proj_b), `[rows, KVH*16]` proj_c, `[rows, H*16]` proj_v.
        public let b: Tensor, c: Tensor, v: Tensor
        /// `[rows, H*16]`: `b * v` (the recurrence input), `s`, and `s * c + v`.
        public let recurrenceInput: Tensor, recurrence: Tensor, mixed: Tensor
    }

    public let configuration: Configuration
    public let projA: Linear, projB: Linear, projC: Linear, projV: Linear, projOut: Linear
    public let window: JaggedWindow
    let pool: WorkerPool

    public init(_ name: String, _ configuration: Configuration, rng: inout SeededGenerator, pool: WorkerPool = .shared) {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        require(dim % Configuration.headDim == 0 && dim > 0,
                     "PhalanxLayer \(name): dim must be a positive multiple of 16 (heads of 16 channels), got \(dim)")
        require(KVH >= 1 && H % KVH == 0, "PhalanxLayer \(name): \(H) heads are not divisible into \(KVH) key/value heads")
        require(configuration.gateScale > 0 && configuration.gateScale <= 1,
                     "PhalanxLayer \(name): gateScale must be in (0, 1], got \(configuration.gateScale)")
        self.configuration = configuration
        let p = qualified(name, "param")
        projA = Linear(qualified(p, "proj_a"), inputs: dim, outputs: H, bias: true, rng: &rng)
        projB = Linear(qualified(p, "proj_b"), inputs: dim, outputs: KVH * 16, bias: true, rng: &rng)
        projC = Linear(qualified(p, "proj_c"), inputs: dim, outputs: KVH * 16, bias: true, rng: &rng)
        projV = Linear(qualified(p, "proj_v"), inputs: dim, outputs: H * 16, bias: false, rng: &rng)
        projOut = Linear(qualified(name, "proj_out"), inputs: dim, outputs: dim, bias: false, rng: &rng)
        window = JaggedWindow(blockLength: configuration.blockLength, blocksSeen: 2)
        self.pool = pool
    }

    public var parameters: [Parameter] { [projA, projB, projC, projV, projOut].flatMap(\.parameters) }

    /// `x` `[batch, length, dim]` to `y` `[batch, length, dim]`.
    public func forward(_ x: Tensor) -> (Tensor, Cache) {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        require(x.shape.count == 3 && x.shape[2] == dim,
                     "PhalanxLayer: input must be [batch, length, \(dim)], got \(x.shape)")
        let (batch, length) = (x.shape[0], x.shape[1])
        let rows = batch * length
        let gates = Tensor(zeros: [rows, H])
        let b = Tensor(zeros: [rows, KVH * 16]), c = Tensor(zeros: [rows, KVH * 16]), v = Tensor(zeros: [rows, H * 16])
        projA.forward(x.pointer, rows: rows, into: gates.pointer)
        projB.forward(x.pointer, rows: rows, into: b.pointer)
        projC.forward(x.pointer, rows: rows, into: c.pointer)
        projV.forward(x.pointer, rows: rows, into: v.pointer)

        // Gates and the recurrence input b * v, one pass over rows.
        let recurrenceInput = Tensor(zeros: [rows, H * 16])
        let scale = configuration.gateScale, group = H / KVH
        let gp = gates.pointer, bp = b.pointer, vp = v.pointer, ip = recurrenceInput.pointer
        forEachRowChunk(rows) { range in
            for r in range {
                for h in 0..<H { gp[r * H + h] = scale * sigmoid(gp[r * H + h]) }
                for k in 0..<(KVH * 16) { bp[r * KVH * 16 + k] = sigmoid(bp[r * KVH * 16 + k]) }
                for h in 0..<H {
                    let bh = load16(bp + r * KVH * 16 + (h / group) * 16)
                    store16(bh * load16(vp + (r * H + h) * 16), ip + (r * H + h) * 16)
                }
            }
        }

        let recurrence = Tensor(zeros: [rows, H * 16])
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: H, headDim: 16)
        var state = JaggedState(for: layout, blockLength: configuration.blockLength)
        window.forward(gates: gates.readOnly, inputs: recurrenceInput.readOnly, output: recurrence.buffer,
                       layout: layout, state: &state, pool: pool)

        // Post-gating s * c + v.
        let mixed = Tensor(zeros: [rows, H * 16])
        let sp = recurrence.pointer, cp = c.pointer, mp = mixed.pointer
        forEachRowChunk(rows) { range in
            for r in range {
                for h in 0..<H {
                    let o = (r * H + h) * 16
                    let ch = load16(cp + r * KVH * 16 + (h / group) * 16)
                    store16(load16(vp + o).addingProduct(load16(sp + o), ch), mp + o)
                }
            }
        }
        let y = Tensor(zeros: [batch, length, dim])
        projOut.forward(mixed.pointer, rows: rows, into: y.pointer)
        return (y, Cache(input: x, shape: (batch, length), gates: gates, b: b, c: c, v: v,
                         recurrenceInput: recurrenceInput, recurrence: recurrence, mixed: mixed))
    }

    /// Adds every parameter gradient for output cotangent `dy` `[batch, length, dim]`; returns `dx`.
    public func backward(_ dy: Tensor, cache: Cache) -> Tensor {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        let (batch, length) = cache.shape
        let rows = batch * length
        require(dy.shape == [batch, length, dim], "PhalanxLayer.backward: cotangent \(dy.shape), expected \([batch, length, dim])")
        let group = H / KVH, scale = configuration.gateScale

        // d(mixed) = dy W_out; dW_out += dy^T mixed.
        let dMixed = Tensor(zeros: [rows, H * 16])
        projOut.backward(dy.pointer, input: cache.mixed.pointer, rows: rows, inputGradient: dMixed.pointer)

        // ds = dmixed * c; dc = sum over the group of dmixed * s; dv = dmixed (direct path).
        let ds = Tensor(zeros: [rows, H * 16]), dc = Tensor(zeros: [rows, KVH * 16])
        let dmp = dMixed.pointer, dsp = ds.pointer, dcp = dc.pointer
        let sp = cache.recurrence.pointer, cp = cache.c.pointer
        forEachRowChunk(rows) { range in
            for r in range {
                for h in 0..<H {
                    let o = (r * H + h) * 16, kv = r * KVH * 16 + (h / group) * 16
                    let dm = load16(dmp + o)
                    store16(dm * load16(cp + kv), dsp + o)
                    store16(load16(dcp + kv).addingProduct(dm, load16(sp + o)), dcp + kv)
                }
            }
        }

        // Through the recurrence.
        let dInput = Tensor(zeros: [rows, H * 16]), dGates = Tensor(zeros: [rows, H])
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: H, headDim: 16)
        window.backward(gates: cache.gates.readOnly, inputs: cache.recurrenceInput.readOnly,
                        outputGradient: ds.readOnly, layout: layout,
                        initialState: JaggedState(for: layout, blockLength: configuration.blockLength),
                        inputGradient: dInput.buffer, gateGradient: dGates.buffer, pool: pool)

        // Pre-activation gradients: a = scale*sigmoid(z) -> dz = da * a * (1 - a/scale);
        // input = b*v -> db = sum_group dinput*v, dv = dmixed + dinput*b; b = sigmoid -> * b(1-b).
        let dv = dMixed  // reused in place: dv = dmixed + dinput * b
        let db = Tensor(zeros: [rows, KVH * 16])
        let gp = cache.gates.pointer, dgp = dGates.pointer, bp = cache.b.pointer, vp = cache.v.pointer
        let dip = dInput.pointer, dbp = db.pointer, dvp = dv.pointer
        forEachRowChunk(rows) { range in
            for r in range {
                for h in 0..<H {
                    let a = gp[r * H + h]
                    dgp[r * H + h] *= a * (1 - a / scale)
                    let o = (r * H + h) * 16, kv = r * KVH * 16 + (h / group) * 16
                    let di = load16(dip + o), bh = load16(bp + kv)
                    store16(load16(dbp + kv).addingProduct(di, load16(vp + o)), dbp + kv)
                    store16(load16(dvp + o).addingProduct(di, bh), dvp + o)
                }
                for k in 0..<(KVH * 16) {
                    let s = bp[r * KVH * 16 + k]
                    dbp[r * KVH * 16 + k] *= s * (1 - s)
                }
            }
        }

        // Into the input projections: dx = sum of dz W; dW += dz^T x.
        let dx = Tensor(zeros: [batch, length, dim])
        let x = cache.input.pointer
        projA.backward(dGates.pointer, input: x, rows: rows, inputGradient: dx.pointer, accumulate: true)
        projB.backward(db.pointer, input: x, rows: rows, inputGradient: dx.pointer, accumulate: true)
        projC.backward(dc.pointer, input: x, rows: rows, inputGradient: dx.pointer, accumulate: true)
        projV.backward(dv.pointer, input: x, rows: rows, inputGradient: dx.pointer, accumulate: true)
        return dx
    }

    /// Runs `body` over `rows` split into one contiguous range per pool thread.
    private func forEachRowChunk(_ rows: Int, _ body: (Range<Int>) -> Void) {
        let parts = min(pool.threadCount, max(rows / 64, 1))
        pool.run(parts) { p in body((p * rows / parts)..<((p + 1) * rows / parts)) }
    }
}

@inline(__always) func sigmoid(_ z: Float) -> Float { 1 / (1 + exp(-z)) }
