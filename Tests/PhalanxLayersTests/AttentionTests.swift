import Foundation
import PhalanxLayers
import PhalanxRuntime
import PhalanxTestSupport
import Testing

/// Causal attention in double precision, quadratic and obviously correct: the specification of
/// `AttentionKernel`.
struct AttentionReference {
    let layout: AttentionLayout
    let window: Int?
    var scale: Double { 1 / Double(layout.headDim).squareRoot() }

    /// `(output [B, L, H, D], logsumexp [B, H, L])` for `q` `[B, L, H, D]`, `k`, `v` `[B, L, KVH, D]`.
    func forward(q: [Double], k: [Double], v: [Double]) -> (output: [Double], logsumexp: [Double]) {
        let (B, L, H, KVH, D) = (layout.batch, layout.length, layout.heads, layout.kvHeads, layout.headDim)
        var output = [Double](repeating: 0, count: layout.queryCount)
        var lse = [Double](repeating: 0, count: layout.rowCount)
        for b in 0..<B { for h in 0..<H { for i in 0..<L {
            let g = h / (H / KVH), qi = ((b * L + i) * H + h) * D
            let first = window.map { max(0, i - $0 + 1) } ?? 0
            var scores = [Double]()
            for j in first...i {
                let kj = ((b * L + j) * KVH + g) * D
                scores.append(scale * (0..<D).reduce(0) { $0 + q[qi + $1] * k[kj + $1] })
            }
            let top = scores.max()!
            let sum = scores.reduce(0) { $0 + exp($1 - top) }
            lse[(b * H + h) * L + i] = top + log(sum)
            for (n, j) in (first...i).enumerated() {
                let weight = exp(scores[n] - top) / sum, vj = ((b * L + j) * KVH + g) * D
                for d in 0..<D { output[qi + d] += weight * v[vj + d] }
            }
        } } }
        return (output, lse)
    }
}

/// The attention layer in double precision: projections, rotary embedding, attention, output
/// projection, for finite differences.
struct AttentionLayerReference {
    let dim: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int?, ropeBase: Double?

    /// Parameters in `Attention.parameters` order: q, k, v, o weights.
    func forward(x: [Double], batch: Int, length: Int, parameters p: [[Double]]) -> [Double] {
        let rows = batch * length
        var q = LayerReference.linear(x, rows: rows, inputs: dim, outputs: heads * headDim, weight: p[0], bias: nil)
        var k = LayerReference.linear(x, rows: rows, inputs: dim, outputs: kvHeads * headDim, weight: p[1], bias: nil)
        let v = LayerReference.linear(x, rows: rows, inputs: dim, outputs: kvHeads * headDim, weight: p[2], bias: nil)
        if let ropeBase {
            q = Self.rotate(q, batch: batch, length: length, heads: heads, headDim: headDim, base: ropeBase)
            k = Self.rotate(k, batch: batch, length: length, heads: kvHeads, headDim: headDim, base: ropeBase)
        }
        let layout = AttentionLayout(batch: batch, length: length, heads: heads, kvHeads: kvHeads, headDim: headDim)
        let a = AttentionReference(layout: layout, window: window).forward(q: q, k: k, v: v).output
        return LayerReference.linear(a, rows: rows, inputs: heads * headDim, outputs: dim, weight: p[3], bias: nil)
    }

    /// Rotate-half RoPE: pair `(i, i + D/2)` at position `p` turned by `p * base^(-2i/D)`.
    static func rotate(_ x: [Double], batch: Int, length: Int, heads: Int, headDim: Int, base: Double,
                       startPosition: Int = 0) -> [Double] {
        var y = x
        let half = headDim / 2
        for b in 0..<batch { for t in 0..<length { for h in 0..<heads { for i in 0..<half {
            let angle = Double(startPosition + t) * pow(base, -2 * Double(i) / Double(headDim))
            let o = ((b * length + t) * heads + h) * headDim
            y[o + i] = x[o + i] * cos(angle) - x[o + i + half] * sin(angle)
            y[o + i + half] = x[o + i + half] * cos(angle) + x[o + i] * sin(angle)
        } } } }
        return y
    }
}

/// Tolerance of a float32 rotation against its double definition (a few roundings of 2^-24).
let rotationTolerance: Tolerance = 1e-6

/// The float32 kernel's forward and backward on one set of inputs.
struct KernelRun {
    let layout: AttentionLayout
    let q: Tensor, k: Tensor, v: Tensor
    let output: Tensor, logsumexp: Tensor

    init(_ kernel: AttentionKernel, _ layout: AttentionLayout, q: Tensor, k: Tensor, v: Tensor, pool: WorkerPool = .shared) {
        self.layout = layout
        (self.q, self.k, self.v) = (q, k, v)
        output = Tensor(zeros: [layout.queryCount])
        logsumexp = Tensor(zeros: [layout.rowCount])
        kernel.forward(query: q.readOnly, key: k.readOnly, value: v.readOnly, output: output.buffer,
                       logsumexp: logsumexp.buffer, layout: layout, pool: pool)
    }

    /// Random inputs of `layout` (queries and keys in `±2`, so the softmax is far from uniform).
    init(_ kernel: AttentionKernel, _ layout: AttentionLayout, seed: UInt64, pool: WorkerPool = .shared) {
        var rng = SeededGenerator(seed: seed)
        let q = randomTensor([layout.queryCount], scale: 2, &rng)
        let k = randomTensor([layout.keyCount], scale: 2, &rng), v = randomTensor([layout.keyCount], &rng)
        self.init(kernel, layout, q: q, k: k, v: v, pool: pool)
    }

    /// `(dq, dk, dv)` for output cotangent `dy`.
    func backward(_ kernel: AttentionKernel, _ dy: Tensor, pool: WorkerPool = .shared) -> (Tensor, Tensor, Tensor) {
        let dq = Tensor(zeros: [layout.queryCount]), dk = Tensor(zeros: [layout.keyCount]), dv = Tensor(zeros: [layout.keyCount])
        kernel.backward(query: q.readOnly, key: k.readOnly, value: v.readOnly, output: output.readOnly,
                        logsumexp: logsumexp.readOnly, outputGradient: dy.readOnly, queryGradient: dq.buffer,
                        keyGradient: dk.buffer, valueGradient: dv.buffer, layout: layout, pool: pool)
        return (dq, dk, dv)
    }
}

@Suite("Attention kernel")
struct AttentionKernelTests {
    /// (heads, kvHeads, headDim): multi-head, grouped, multi-query; head widths that need
    /// padding (8, 72 = 64 + 8) and one that does not.
    static let heads: [(Int, Int, Int)] = [(4, 4, 16), (4, 2, 8), (4, 1, 72)]

    @Test("forward equals the double-precision reference", arguments: [1, 15, 17, 63, 100], [nil, 1, 5, 16, 200])
    func forward(length: Int, window: Int?) {
        for (heads, kvHeads, headDim) in Self.heads {
            let layout = AttentionLayout(batch: 2, length: length, heads: heads, kvHeads: kvHeads, headDim: headDim)
            let run = KernelRun(AttentionKernel(window: window), layout, seed: UInt64(length * 31 + (window ?? 0)))
            let expected = AttentionReference(layout: layout, window: window)
                .forward(q: run.q.array.map(Double.init), k: run.k.array.map(Double.init), v: run.v.array.map(Double.init))
            let label = "\(layout), window \(window.map(String.init) ?? "none")"
            expectClose(run.output.array, expected.output, tolerance: .float32Layer, "output \(label)")
            expectClose(run.logsumexp.array, expected.logsumexp, tolerance: .float32Layer, "logsumexp \(label)")
        }
    }

    @Test("a window at least as long as the sequence is full causal attention, forward and backward",
          arguments: [17, 100])
    func longWindow(length: Int) {
        let layout = AttentionLayout(batch: 2, length: length, heads: 4, kvHeads: 2, headDim: 16)
        var rng = SeededGenerator(seed: 5)
        let dy = randomTensor([layout.queryCount], &rng)
        let full = KernelRun(AttentionKernel(), layout, seed: 3)
        let fullGradients = full.backward(AttentionKernel(), dy)
        for window in [length, length + 9] {
            let kernel = AttentionKernel(window: window)
            let windowed = KernelRun(kernel, layout, seed: 3)
            #expect(windowed.output.array == full.output.array, "output, window \(window)")
            #expect(windowed.logsumexp.array == full.logsumexp.array, "logsumexp, window \(window)")
            let gradients = windowed.backward(kernel, dy)
            #expect(gradients.0.array == fullGradients.0.array, "dq, window \(window)")
            #expect(gradients.1.array == fullGradients.1.array, "dk, window \(window)")
            #expect(gradients.2.array == fullGradients.2.array, "dv, window \(window)")
        }
    }

    /// (length, heads, kvHeads, headDim, window): ragged lengths across a tile edge (64), GQA and
    /// MQA, windows inside one tile and across tiles.
    static let gradientCases: [(Int, Int, Int, Int, Int?)] = [
        (15, 2, 2, 8, nil), (70, 4, 2, 16, nil), (70, 2, 1, 8, 5), (100, 2, 1, 16, 70),
    ]

    @Test("gradients of q, k, v against finite differences of the reference", arguments: gradientCases)
    func gradients(length: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int?) {
        let layout = AttentionLayout(batch: 1, length: length, heads: heads, kvHeads: kvHeads, headDim: headDim)
        let kernel = AttentionKernel(window: window)
        let run = KernelRun(kernel, layout, seed: UInt64(length + heads))
        var rng = SeededGenerator(seed: 11)
        let dy = randomTensor([layout.queryCount], &rng)
        let (dq, dk, dv) = run.backward(kernel, dy)

        let reference = AttentionReference(layout: layout, window: window)
        var inputs = [run.q, run.k, run.v].map { $0.array.map(Double.init) }
        let dy64 = dy.array.map(Double.init)
        for (n, (name, gradient)) in [("dq", dq), ("dk", dk), ("dv", dv)].enumerated() {
            let ps = probes(inputs[n].count, limit: 30)
            let numeric = finiteDifferences(inputs[n], probes: ps) { value in
                let saved = inputs[n]
                inputs[n] = value
                defer { inputs[n] = saved }
                return dot(dy64, reference.forward(q: inputs[0], k: inputs[1], v: inputs[2]).output)
            }
            expectClose(ps.map { gradient[$0] }, numeric, tolerance: .float32Layer, "\(name) \(layout), window \(window.map(String.init) ?? "none")")
        }
    }

    /// (length, window): 5 tiles under a window; 18 tiles of full attention, which one thread
    /// serves in a forward group of 16 query tiles and backward passes of 16 and 2 key tiles, and
    /// three threads in groups of 2 query tiles and 3 chunks of 6 key tiles (one pass each).
    static let threadCountCases: [(Int, Int?)] = [(300, 90), (1100, nil)]

    @Test("forward, dk and dv do not depend on the thread count; dq only in rounding", arguments: threadCountCases)
    func threadCounts(length: Int, window: Int?) {
        let layout = AttentionLayout(batch: 1, length: length, heads: 2, kvHeads: 1, headDim: 16)
        let kernel = AttentionKernel(window: window), serial = WorkerPool(threadCount: 1), threaded = WorkerPool(threadCount: 3)
        var rng = SeededGenerator(seed: 2)
        let dy = randomTensor([layout.queryCount], &rng)
        let one = KernelRun(kernel, layout, seed: 4, pool: serial), many = KernelRun(kernel, layout, seed: 4, pool: threaded)
        #expect(one.output.array == many.output.array)
        #expect(one.logsumexp.array == many.logsumexp.array)
        let a = one.backward(kernel, dy, pool: serial), b = many.backward(kernel, dy, pool: threaded)
        #expect(a.1.array == b.1.array, "dk")
        #expect(a.2.array == b.2.array, "dv")
        expectClose(b.0.array, a.0.array.map(Double.init), tolerance: 1e-6, "dq")
    }
}

@Suite("Rotary embedding")
struct RotaryEmbeddingTests {
    @Test("rotates pairs (i, i + D/2) by p * base^(-2i/D), at any start position", arguments: [0, 7, 100_000])
    func definition(startPosition: Int) {
        var rng = SeededGenerator(seed: 1)
        let x = randomTensor([2, 5, 3, 8], &rng)
        let rope = RotaryEmbedding(headDim: 8, base: 500)
        let y = rope.forward(x, startPosition: startPosition)
        let expected = AttentionLayerReference.rotate(x.array.map(Double.init), batch: 2, length: 5, heads: 3, headDim: 8,
                                                      base: 500, startPosition: startPosition)
        expectClose(y.array, expected, tolerance: rotationTolerance, "rotation")
        expectClose(rope.backward(y, startPosition: startPosition).array, x.array.map(Double.init),
                    tolerance: rotationTolerance, "backward is the inverse rotation")
    }

    @Test("the product of a rotated query and key depends only on their distance")
    func relativePositions() {
        var rng = SeededGenerator(seed: 2)
        let q = randomTensor([1, 1, 1, 16], &rng), k = randomTensor([1, 1, 1, 16], &rng)
        let rope = RotaryEmbedding(headDim: 16)
        func score(_ m: Int, _ n: Int) -> Double {
            let a = rope.forward(q, startPosition: m), b = rope.forward(k, startPosition: n)
            return (0..<16).reduce(0) { $0 + Double(a[$1]) * Double(b[$1]) }
        }
        for shift in [1, 40, 3000] {
            expectClose([Float(score(9 + shift, 4 + shift))], [score(9, 4)], tolerance: .float32Layer, "shift \(shift)")
        }
    }
}

@Suite("Attention layer")
struct AttentionLayerTests {
    /// (heads, kvHeads, window, rope base)
    static let cases: [(Int, Int, Int?, Float?)] = [(2, 2, nil, 10000), (4, 2, 5, 100), (4, 1, 3, nil)]

    @Test("gradients of the input and every weight against finite differences in double precision", arguments: cases)
    func gradients(heads: Int, kvHeads: Int, window: Int?, ropeBase: Float?) {
        var rng = SeededGenerator(seed: UInt64(heads * 10 + kvHeads))
        let (batch, length, dim, headDim) = (2, 13, 12, 8)
        let layer = Attention("mixer", dim: dim, heads: heads, kvHeads: kvHeads, headDim: headDim, window: window,
                              ropeBase: ropeBase, rng: &rng)
        // Larger weights than the default initialisation, so the softmax is far from uniform.
        for p in layer.parameters { for i in 0..<p.value.count { p.value[i] *= 3 } }
        let x = randomTensor([batch, length, dim], &rng), dy = randomTensor([batch, length, dim], &rng)
        let (_, cache) = layer.forward(x)
        layer.zeroGradients()
        let dx = layer.backward(dy, cache: cache)

        let reference = AttentionLayerReference(dim: dim, heads: heads, kvHeads: kvHeads, headDim: headDim,
                                                window: window, ropeBase: ropeBase.map(Double.init))
        let params = layer.parameters.map { $0.value.array.map(Double.init) }
        let x64 = x.array.map(Double.init), dy64 = dy.array.map(Double.init)
        let loss = { (x: [Double], p: [[Double]]) in dot(dy64, reference.forward(x: x, batch: batch, length: length, parameters: p)) }
        let xs = probes(x64.count, limit: 40)
        expectClose(xs.map { dx[$0] }, finiteDifferences(x64, probes: xs) { loss($0, params) }, tolerance: .float32Layer, "dx")
        for (i, p) in layer.parameters.enumerated() {
            let ps = probes(params[i].count, limit: 30)
            let numeric = finiteDifferences(params[i], probes: ps) { v in
                var q = params
                q[i] = v
                return loss(x64, q)
            }
            expectClose(ps.map { p.gradient[$0] }, numeric, tolerance: .float32Layer, p.name)
        }
    }

    @Test("forward equals the double-precision reference layer at a length of several tiles")
    func forward() {
        var rng = SeededGenerator(seed: 8)
        let (batch, length, dim) = (1, 150, 32)
        let layer = Attention("", dim: dim, heads: 4, kvHeads: 2, headDim: 16, window: 100, rng: &rng)
        let x = randomTensor([batch, length, dim], scale: 2, &rng)
        let (y, _) = layer.forward(x)
        let reference = AttentionLayerReference(dim: dim, heads: 4, kvHeads: 2, headDim: 16, window: 100, ropeBase: 10000)
        expectClose(y.array, reference.forward(x: x.array.map(Double.init), batch: batch, length: length,
                                               parameters: layer.parameters.map { $0.value.array.map(Double.init) }), tolerance: .float32Layer, "y")
    }

    @Test("a change at position p moves only the outputs at p ..< p + window", arguments: [nil, 6])
    func causality(window: Int?) {
        var rng = SeededGenerator(seed: 3)
        let (length, dim, p) = (80, 16, 30)
        let layer = Attention("", dim: dim, heads: 2, kvHeads: 1, headDim: 8, window: window, rng: &rng)
        let x = randomTensor([1, length, dim], &rng)
        let (y, _) = layer.forward(x)
        let changed = x.copy()
        for i in 0..<dim { changed[p * dim + i] += 1 }
        let (z, _) = layer.forward(changed)
        let reach = p + (window ?? length)
        for t in 0..<length {
            let same = (0..<dim).allSatisfy { y[t * dim + $0] == z[t * dim + $0] }
            #expect(same == !(p..<reach).contains(t), "position \(t)")
        }
    }

    @Test("parameter names are Llama's checkpoint keys")
    func names() {
        var rng = SeededGenerator(seed: 0)
        let layer = Attention("layers.1.mixer", dim: 16, heads: 2, kvHeads: 1, headDim: 8, rng: &rng)
        #expect(layer.parameters.map(\.name) == [
            "layers.1.mixer.q_proj.weight", "layers.1.mixer.k_proj.weight",
            "layers.1.mixer.v_proj.weight", "layers.1.mixer.o_proj.weight",
        ])
        #expect(layer.parameters.map(\.value.shape) == [[16, 16], [8, 16], [8, 16], [16, 16]])
    }
}
