import Foundation
import PhalanxRuntime
import SWR

/// `PhalanxLayer.headDim`, short for the layouts below.
private let D = PhalanxLayer.headDim

/// The Phalanx token mixer (SWR.md section 6): gated projections around a jagged-window
/// recurrence (block length `l` and window `k` from the configuration; the paper's 16 and 2).
///
/// Input `x` `[batch, length, dim]`; `H = dim / D` heads of `D = PhalanxLayer.headDim = 16`
/// channels; `KVH` key/value heads (head `h` reads kv head `h / (H / KVH)`):
///
///     a   = gateScale * sigmoid(proj_a(x))      [B, L, H]       one gate per head and position
///     b   = sigmoid(repeat_kv(proj_b(x)))       [B, L, H, D]
///     c   = repeat_kv(proj_c(x))                [B, L, H, D]    (no sigmoid)
///     v   = proj_v(x)                           [B, L, H, D]
///     s   = SWR_jagged(a, b * v)                [B, L, H, D]
///     y   = proj_out(flatten(s * c + v))        [B, L, dim]
///
/// Parameters, named as in the reference checkpoints under `name`: `param.proj_a` `(H, dim)`
/// with bias, `param.proj_b` and `param.proj_c` `(KVH*D, dim)` with bias, `param.proj_v`
/// `(H*D, dim)` and `proj_out` `(dim, dim)` without.
///
/// Speed: the four input projections are views into one `[P, dim]` matrix,
/// `P = 2*KVH*D + H*D + H`, so forward is one matrix product into `z` `[rows, P]` (columns
/// `b | c | v | a`, `Columns`) and backward one for `dx` and one for the weights. Gates, `b * v` and the
/// post-gating are each one row-parallel pass; backward mirrors it.
public final class PhalanxLayer: ParameterContainer {
    /// Channels per head, `D` (`JaggedWindow.standardHeadDim`). Fixed: the CPU kernels hold one
    /// head in one 16-lane vector (`SIMD16<Float>`), and the GPU kernels assign lanes per head by it.
    public static let headDim = JaggedWindow.standardHeadDim

    /// The shape of a layer: width, key/value heads, gate scale and jagged window.
    public struct Configuration: Codable, Hashable, Sendable {
        /// Model width; a multiple of `PhalanxLayer.headDim`.
        public var dim: Int
        /// Key/value heads, `KVH`, shared by the `b` and `c` projections; divides `heads`.
        public var kvHeads: Int
        /// Multiplies the gate sigmoid; the paper's models bound gates near 0.8. Default 1.
        public var gateScale: Float = 1
        /// Positions per block of the jagged window, `l`.
        public var blockLength: Int
        /// Blocks each position sees, `k` (1: its own; 2: its own and the previous one).
        public var blocksSeen: Int

        /// A layer of width `dim` (a multiple of `PhalanxLayer.headDim`) with `kvHeads` key/value heads.
        public init(dim: Int, kvHeads: Int, gateScale: Float = 1, blockLength: Int = JaggedWindow.standardBlockLength,
                    blocksSeen: Int = JaggedWindow.standardBlocksSeen) {
            self.dim = dim
            self.kvHeads = kvHeads
            self.gateScale = gateScale
            self.blockLength = blockLength
            self.blocksSeen = blocksSeen
        }

        /// `dim / headDim`.
        public var heads: Int { dim / D }
    }

    /// Column offsets of `b`, `c`, `v`, `a` inside the fused projection `z` `[rows, P]`, in this
    /// order on every backend: each head's `D` channels start at a multiple of `D`.
    ///
    ///     b [KVH*D] | c [KVH*D] | v [H*D] | a [H]        width P = 2*KVH*D + H*D + H
    ///
    /// `stride` is `P` rounded up to a multiple of 8: the GPU's row pitch (16- or 32-byte aligned
    /// rows for its vector loads); the CPU keeps rows `width` apart.
    public struct Columns: Hashable, Sendable {
        /// First column of `b`, `c`, `v` and `a`; `width` is `P`, `stride` the GPU row pitch.
        public let b: Int, c: Int, v: Int, a: Int, width: Int, stride: Int

        /// The columns of a layer with `heads` heads and `kvHeads` key/value heads.
        public init(heads: Int, kvHeads: Int) {
            b = 0
            c = kvHeads * D
            v = 2 * kvHeads * D
            a = v + heads * D
            width = a + heads
            stride = (width + 7) / 8 * 8
        }

        /// The columns of `configuration`.
        public init(_ configuration: Configuration) { self.init(heads: configuration.heads, kvHeads: configuration.kvHeads) }
    }

    /// The layer's six matrix products, forward then backward, on every backend: the one list
    /// that the layers run (`PhalanxLayer.multiply`, in its pointer form on the CPU and its tensor form on a GPU) and that the
    /// benchmarks time one by one (the GEMM floor). `rows = batch * length`, `P = Columns.width`.
    public enum Product: String, CaseIterable, Sendable {
        /// `z = x W_in^T` `[rows, P]`, inner k = dim.
        case z = "z = x W_in^T"
        /// `y = mixed W_out^T` `[rows, dim]`, inner k = H*D.
        case y = "y = mixed W_out^T"
        /// `dmixed = dy W_out` `[rows, H*D]`, inner k = dim.
        case dMixed = "dmixed = dy W_out"
        /// `dW_out += dy^T mixed` `[dim, H*D]`, inner k = rows.
        case dOutputWeight = "dW_out += dy^T mixed"
        /// `dW_in += dz^T x` `[P, dim]`, inner k = rows.
        case dInputWeight = "dW_in += dz^T x"
        /// `dx = dz W_in` `[rows, dim]`, inner k = P.
        case dx = "dx = dz W_in"

        /// Whether the product belongs to the backward pass.
        public var isBackward: Bool { ![.z, .y].contains(self) }
        /// What it computes, in one word (`z`, `y`, `dmixed`, `dW_out`, `dW_in`, `dx`).
        public var symbol: String { String(rawValue.prefix { $0 != " " }) }
    }

    /// `(m, n, k)` of `product` over `rows` rows: its result is `m x n`, its inner dimension `k`.
    public func shape(of product: Product, rows: Int) -> (m: Int, n: Int, k: Int) {
        let dim = configuration.dim, width = configuration.heads * D, P = columns.width
        switch product {
        case .z: return (rows, P, dim)
        case .y: return (rows, dim, width)
        case .dMixed: return (rows, width, dim)
        case .dOutputWeight: return (dim, width, rows)
        case .dInputWeight: return (P, dim, rows)
        case .dx: return (rows, dim, P)
        }
    }

    /// Runs `product` over `rows` rows: `a` is its row operand (`x`, `mixed`, `dy` or `dz` as the
    /// product names it), `b` the second activation of the weight gradients (`mixed` for
    /// `dW_out`, `x` for `dW_in`), `out` its result (unused by the weight gradients, which add
    /// into this layer's gradients).
    public func multiply(_ product: Product, rows: Int, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>? = nil,
                         into out: UnsafeMutablePointer<Float>? = nil) {
        require(product == .dOutputWeight || product == .dInputWeight ? b != nil : out != nil,
                "PhalanxLayer.multiply(\(product.rawValue)): missing operand")
        let (m, n, k) = shape(of: product, rows: rows)
        let inputWeight = inputWeight.value.pointer, outputWeight = projOut.weight.value.pointer
        switch product {
        case .z: Gemm.multiply(m: m, n: n, k: k, a, inputWeight, transposeB: true, into: out!, pool: pool)
        case .y: Gemm.multiply(m: m, n: n, k: k, a, outputWeight, transposeB: true, into: out!, pool: pool)
        case .dMixed: Gemm.multiply(m: m, n: n, k: k, a, outputWeight, into: out!, pool: pool)
        case .dOutputWeight:
            Gemm.multiply(m: m, n: n, k: k, a, transposeA: true, b!, into: projOut.weight.gradient.pointer, beta: 1, pool: pool)
        case .dInputWeight:
            Gemm.multiply(m: m, n: n, k: k, a, transposeA: true, b!, into: self.inputWeight.gradient.pointer, beta: 1, pool: pool)
        case .dx: Gemm.multiply(m: m, n: n, k: k, a, inputWeight, into: out!, pool: pool)
        }
    }

    /// What backward needs from forward, for one call.
    public struct Cache {
        /// `x` `[batch, length, dim]`.
        public let input: Tensor
        /// Batch and length of the call.
        public let shape: (batch: Int, length: Int)
        /// `[rows, P]` on the CPU: the activated projections in `Columns` order (a after the
        /// sigmoid and scale, b after the sigmoid); `[rows, stride]` on a GPU: the projections
        /// before bias and activation (the kernels recompute the rest from them).
        public let projections: Tensor
        /// `[rows, H*D]`: `s * c + v`, `proj_out`'s input.
        public let mixed: Tensor
        /// What only the CPU pass keeps, or only the GPU pass.
        let intermediates: Intermediates
        let columns: Columns

        enum Intermediates {
            /// The gates `[rows, H]` (contiguous for the recurrence), `b * v` and `s` `[rows, H*D]`,
            /// and the recurrence state the call started from.
            case host(gates: Tensor, recurrenceInput: Tensor, recurrence: Tensor, initialState: JaggedState)
            /// Each block's terminal local state `[batch, ceil(length / l), H, D]` float32.
            case device(carriers: Tensor)
        }

        private var host: (gates: Tensor, recurrenceInput: Tensor, recurrence: Tensor, initialState: JaggedState) {
            guard case .host(let gates, let input, let recurrence, let state) = intermediates else {
                fatalError("PhalanxLayer.Cache: the GPU pass keeps no gates, b * v or s (the kernels recompute them)")
            }
            return (gates, input, recurrence, state)
        }
        /// `[rows, H]`: the gates (CPU passes).
        public var gates: Tensor { host.gates }
        /// `[rows, H*D]`: `b * v`, the recurrence input (CPU passes).
        public var recurrenceInput: Tensor { host.recurrenceInput }
        /// `[rows, H*D]`: `s`, the recurrence output (CPU passes).
        public var recurrence: Tensor { host.recurrence }
        /// The recurrence state the call started from (CPU passes).
        var initialState: JaggedState { host.initialState }

        /// `[rows, KVH*D]` sigmoid(proj_b(x)), a copy for inspection (CPU passes).
        public var b: Tensor { slice(columns.b, columns.c) }
        /// `[rows, KVH*D]` proj_c(x), a copy for inspection (CPU passes).
        public var c: Tensor { slice(columns.c, columns.v) }
        /// `[rows, H*D]` proj_v(x), a copy for inspection (CPU passes).
        public var v: Tensor { slice(columns.v, columns.a) }

        private func slice(_ from: Int, _ to: Int) -> Tensor {
            let rows = projections.rows
            let out = Tensor(uninitialized: [rows, to - from])
            for r in 0..<rows {
                (out.pointer + r * (to - from)).update(from: projections.pointer + r * columns.width + from, count: to - from)
            }
            return out
        }
    }

    /// The layer's shape, as given at creation.
    public let configuration: Configuration
    /// The fused input projection `[P, dim]` and its bias `[P]` (zero and never trained in the
    /// `v` columns: proj_v has no bias), both in `Columns` order.
    let inputWeight: Parameter, inputBias: Parameter
    /// `proj_a` `[H, dim]` and `proj_b` `[KVH*D, dim]` with their biases: views into the fused matrix.
    public let projA: Parameter, projABias: Parameter, projB: Parameter, projBBias: Parameter
    /// `proj_c` `[KVH*D, dim]` with its bias, and `proj_v` `[H*D, dim]` without: views into the fused matrix.
    public let projC: Parameter, projCBias: Parameter, projV: Parameter
    /// `proj_out` `[dim, dim]`, no bias.
    public let projOut: Linear
    /// The jagged window of the recurrence, from the configuration.
    public let window: JaggedWindow
    /// Where each projection sits in `z`.
    public let columns: Columns
    let pool: WorkerPool

    /// Initialises every projection as PyTorch's `nn.Linear` does (uniform in `±1/sqrt(dim)`).
    public init(_ name: String, _ configuration: Configuration, rng: inout SeededGenerator, pool: WorkerPool = .shared) {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        require(dim % D == 0 && dim > 0,
                "PhalanxLayer \(name): dim must be a positive multiple of \(D) (heads of \(D) channels), got \(dim)")
        require(KVH >= 1 && H % KVH == 0, "PhalanxLayer \(name): \(H) heads are not divisible into \(KVH) key/value heads")
        require(configuration.gateScale > 0 && configuration.gateScale <= 1,
                "PhalanxLayer \(name): gateScale must be in (0, 1], got \(configuration.gateScale)")
        self.configuration = configuration
        let cols = Columns(configuration)
        columns = cols
        let p = qualified(name, "param")
        let weight = Tensor(zeros: [cols.width, dim]), weightGradient = Tensor(zeros: [cols.width, dim])
        let bias = Tensor(zeros: [cols.width]), biasGradient = Tensor(zeros: [cols.width])
        func view(_ key: String, rows: Range<Int>, bias hasBias: Bool) -> (Parameter, Parameter?) {
            let w = Parameter(qualified(p, "\(key).weight"),
                              Tensor(viewing: weight, offset: rows.lowerBound * dim, shape: [rows.count, dim]),
                              gradient: Tensor(viewing: weightGradient, offset: rows.lowerBound * dim, shape: [rows.count, dim]),
                              decays: true)
            let b = hasBias ? Parameter(qualified(p, "\(key).bias"),
                                        Tensor(viewing: bias, offset: rows.lowerBound, shape: [rows.count]),
                                        gradient: Tensor(viewing: biasGradient, offset: rows.lowerBound, shape: [rows.count]),
                                        decays: false) : nil
            let bound = 1 / Float(dim).squareRoot()
            for i in 0..<w.value.count { w.value[i] = Float.random(in: -bound...bound, using: &rng) }
            if let b { for i in 0..<b.value.count { b.value[i] = Float.random(in: -bound...bound, using: &rng) } }
            return (w, b)
        }
        // Drawn in the reference's parameter order a, b, c, v, whatever the storage order.
        let a = view("proj_a", rows: cols.a..<cols.width, bias: true)
        let b = view("proj_b", rows: cols.b..<cols.c, bias: true)
        let c = view("proj_c", rows: cols.c..<cols.v, bias: true)
        (projA, projABias, projB, projBBias, projC, projCBias) = (a.0, a.1!, b.0, b.1!, c.0, c.1!)
        projV = view("proj_v", rows: cols.v..<cols.a, bias: false).0
        inputWeight = Parameter(qualified(p, "fused_input.weight"), weight, gradient: weightGradient, decays: true)
        inputBias = Parameter(qualified(p, "fused_input.bias"), bias, gradient: biasGradient, decays: false)
        projOut = Linear(qualified(name, "proj_out"), inputs: dim, outputs: dim, bias: false, rng: &rng)
        window = JaggedWindow(blockLength: configuration.blockLength, blocksSeen: configuration.blocksSeen)
        self.pool = pool
    }

    /// In checkpoint order, as the reference names them (the fused matrix is storage only).
    public var parameters: [Parameter] {
        [projA, projABias, projB, projBBias, projC, projCBias, projV] + projOut.parameters
    }

    /// `x` `[batch, length, dim]` to `y` `[batch, length, dim]`, every sequence from the start.
    public func forward(_ x: Tensor) -> (Tensor, Cache) {
        if case .cuda(let gpu) = x.device { return forward(x, on: gpu) }
        var state = JaggedState(sequences: x.shape.first ?? 0, heads: configuration.heads, headDim: D,
                                blockLength: configuration.blockLength)
        return forward(x, state: &state)
    }

    /// The recurrence state of `batch` sequences at their start, where the layer's weights live:
    /// what decoding carries from one call to the next (`(2 * D + 1) * heads` floats per
    /// sequence, whatever the context).
    public func makeState(batch: Int) -> PhalanxState {
        let H = configuration.heads, l = configuration.blockLength
        let storage: PhalanxState.Storage
        switch inputWeight.value.device {
        case .cpu: storage = .host(JaggedState(sequences: batch, heads: H, headDim: D, blockLength: l))
        case .cuda(let gpu):
            storage = .device(local: Tensor(zeros: [batch, H, D], on: .cuda(gpu)),
                              gateProduct: Tensor([Float](repeating: 1, count: batch * H), shape: [batch, H], on: .cuda(gpu)),
                              carrier: Tensor(zeros: [batch, H, D], on: .cuda(gpu)))
        }
        return PhalanxState(storage: storage, positions: Array(repeating: 0, count: batch), heads: H, headDim: D, blockLength: l)
    }

    /// Continues every sequence from `state` and leaves in it the state after the last position:
    /// a prefill split into chunks of any size, or one-position decode steps, equal one pass.
    public func forward(_ x: Tensor, state: inout JaggedState) -> (Tensor, Cache) {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        require(x.shape.count == 3 && x.shape[2] == dim, "PhalanxLayer: input must be [batch, length, \(dim)], got \(x.shape)")
        require(x.device.isSame(as: .cpu), "PhalanxLayer.forward(_:state:): decoding from a state runs on the CPU; x is on \(x.device)")
        let (batch, length) = (x.shape[0], x.shape[1])
        let initialState = state
        let rows = batch * length, P = columns.width, cols = columns

        // z = x W^T, all four projections in one product; the biases join in the next pass.
        let z = Tensor(uninitialized: [rows, P])
        let zp = z.pointer, bias = inputBias.value.pointer
        multiply(.z, rows: rows, x.pointer, into: zp)

        // Biases and activations in place, the gates copied out contiguous, and the recurrence
        // input b * v.
        let gates = Tensor(uninitialized: [rows, H]), recurrenceInput = Tensor(uninitialized: [rows, H * D])
        let scale = configuration.gateScale, group = H / KVH
        let gp = gates.pointer, ip = recurrenceInput.pointer
        forEachRowChunk(rows) { _, range in
            for r in range {
                let row = zp + r * P
                addBias(row, bias, range: cols.b..<cols.v)
                addBias(row, bias, range: cols.a..<cols.width)
                applySigmoid(row + cols.a, count: H, scale: scale)
                (gp + r * H).update(from: row + cols.a, count: H)
                applySigmoid(row + cols.b, count: cols.c - cols.b)
                for h in 0..<H {
                    let bh = load16(row + cols.b + (h / group) * D)
                    store16(bh * load16(row + cols.v + h * D), ip + (r * H + h) * D)
                }
            }
        }

        let recurrence = Tensor(uninitialized: [rows, H * D])
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: H, headDim: D)
        window.forward(gates: gates.readOnly, inputs: recurrenceInput.readOnly, output: recurrence.buffer,
                       layout: layout, state: &state, pool: pool)

        // Post-gating s * c + v.
        let mixed = Tensor(uninitialized: [rows, H * D])
        let sp = recurrence.pointer, mp = mixed.pointer
        forEachRowChunk(rows) { _, range in
            for r in range {
                let row = zp + r * P
                for h in 0..<H {
                    let o = (r * H + h) * D
                    store16(load16(row + cols.v + h * D).addingProduct(load16(sp + o), load16(row + cols.c + (h / group) * D)), mp + o)
                }
            }
        }
        let y = Tensor(uninitialized: [batch, length, dim])
        multiply(.y, rows: rows, mixed.pointer, into: y.pointer)
        return (y, Cache(input: x, shape: (batch, length), projections: z, mixed: mixed,
                         intermediates: .host(gates: gates, recurrenceInput: recurrenceInput, recurrence: recurrence,
                                              initialState: initialState),
                         columns: cols))
    }

    /// Adds every parameter gradient for output cotangent `dy` `[batch, length, dim]`; returns `dx`.
    ///
    ///     dmixed = dy W_out;   ds = dmixed * c;   dc = sum_group dmixed * s
    ///     (du, da) = SWR_jagged backward of ds
    ///     dz_a = da * a * (1 - a / gateScale);   dz_b = sum_group du * v * b * (1 - b)
    ///     dz_v = dmixed + du * b;   dz_c = dc
    ///     dW_in += dz^T x;   db_in += sum_rows dz;   dx = dz W_in
    public func backward(_ dy: Tensor, cache: Cache) -> Tensor {
        let dim = configuration.dim, H = configuration.heads, KVH = configuration.kvHeads
        let (batch, length) = cache.shape
        let rows = batch * length, P = columns.width, cols = columns
        require(dy.shape == [batch, length, dim], "PhalanxLayer.backward: cotangent \(dy.shape), expected \([batch, length, dim])")
        if case .device = cache.intermediates { return backwardOnDevice(dy, cache: cache) }
        let group = H / KVH, scale = configuration.gateScale

        let dMixed = Tensor(uninitialized: [rows, H * D])
        multiply(.dMixed, rows: rows, dy.pointer, into: dMixed.pointer)
        multiply(.dOutputWeight, rows: rows, dy.pointer, cache.mixed.pointer)

        // dz collects the gradient of every projection; the c columns get sum_group dmixed * s.
        let dz = Tensor(uninitialized: [rows, P]), ds = Tensor(uninitialized: [rows, H * D])
        let z = cache.projections.pointer, dzp = dz.pointer, dmp = dMixed.pointer, dsp = ds.pointer
        let sp = cache.recurrence.pointer
        forEachRowChunk(rows) { _, range in
            for r in range {
                let row = z + r * P, drow = dzp + r * P
                (drow + cols.c).update(repeating: 0, count: cols.v - cols.c)
                for h in 0..<H {
                    let o = (r * H + h) * D, kv = (h / group) * D
                    let dm = load16(dmp + o)
                    store16(dm * load16(row + cols.c + kv), dsp + o)
                    store16(load16(drow + cols.c + kv).addingProduct(dm, load16(sp + o)), drow + cols.c + kv)
                }
            }
        }

        let dInput = Tensor(uninitialized: [rows, H * D]), dGates = Tensor(uninitialized: [rows, H])
        let layout = SequenceLayout.batched(batch: batch, length: length, heads: H, headDim: D)
        window.backward(gates: cache.gates.readOnly, inputs: cache.recurrenceInput.readOnly,
                        outputGradient: ds.readOnly, layout: layout,
                        initialState: cache.initialState, inputGradient: dInput.buffer, gateGradient: dGates.buffer, pool: pool)

        // dz of a, b and v; each thread also sums its rows of dz's b, c and a columns (the
        // bias gradients), while the row is in cache.
        let dip = dInput.pointer, dgp = dGates.pointer
        let parts = rowChunks(rows)
        let biasSums = Tensor(zeros: [parts, P])
        let bsp = biasSums.pointer
        forEachRowChunk(rows) { part, range in
            let sum = bsp + part * P
            for r in range {
                let row = z + r * P, drow = dzp + r * P
                for h in 0..<H {
                    let a = row[cols.a + h]
                    drow[cols.a + h] = dgp[r * H + h] * a * (1 - a / scale)
                }
                (drow + cols.b).update(repeating: 0, count: cols.c - cols.b)
                for h in 0..<H {
                    let o = (r * H + h) * D, kv = cols.b + (h / group) * D
                    let di = load16(dip + o)
                    store16(load16(drow + kv).addingProduct(di, load16(row + cols.v + h * D)), drow + kv)
                    store16(load16(dmp + o).addingProduct(di, load16(row + kv)), drow + cols.v + h * D)
                }
                for k in cols.b..<cols.c {
                    let b = row[k]
                    drow[k] *= b * (1 - b)
                }
                addBias(sum, drow, range: cols.b..<cols.v)
                addBias(sum, drow, range: cols.a..<cols.width)
            }
        }
        let db = inputBias.gradient.pointer
        for part in 0..<parts {
            for j in Array(cols.b..<cols.v) + Array(cols.a..<cols.width) { db[j] += bsp[part * P + j] }
        }

        // Weights of all four projections at once, then dx.
        multiply(.dInputWeight, rows: rows, dzp, cache.input.pointer)
        let dx = Tensor(uninitialized: [batch, length, dim])
        multiply(.dx, rows: rows, dzp, into: dx.pointer)
        return dx
    }

    /// `row[j] += bias[j]` for `j` in `range`.
    @inline(__always)
    private func addBias(_ row: UnsafeMutablePointer<Float>, _ bias: UnsafePointer<Float>, range: Range<Int>) {
        let (r, b) = (row + range.lowerBound, bias + range.lowerBound)
        forEachChannelChunk(range.count, vector: { j in store16(load16(r + j) + load16(b + j), r + j) },
                            scalar: { j in r[j] += b[j] })
    }

    /// Runs `body(part, range)` over `rows` split into `rowChunks(rows)` contiguous ranges.
    private func forEachRowChunk(_ rows: Int, _ body: (_ part: Int, Range<Int>) -> Void) {
        let parts = rowChunks(rows)
        pool.run(parts) { p in body(p, (p * rows / parts)..<((p + 1) * rows / parts)) }
    }

    /// Ranges a pass over `rows` rows is cut into: one per pool thread, at least 64 rows each.
    private func rowChunks(_ rows: Int) -> Int { min(pool.threadCount, max(rows / 64, 1)) }
}

