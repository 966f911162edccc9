import Foundation
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import Testing

/// The model-level pieces in double precision, straight from their definitions: the tied head's
/// cross-entropy and the head path (embedding, final norm, tied head), built on `LayerReference`.
/// Each analytic gradient here is first checked against central differences in double precision;
/// the float32 model is then scored against it.
enum ModelReference {
    struct CrossEntropy {
        let loss: Double
        /// `[rows, vocabulary]`.
        let logits: [Double], dLogits: [Double]
        /// `[vocabulary, dim]` and `[rows, dim]`.
        let dEmbedding: [Double], dNormalized: [Double]
    }

    /// The tied head and its mean cross-entropy:
    ///
    ///     z = n E^T,   loss = mean_r ( logsumexp(z_r) - z_r[t_r] )
    ///     dz = (softmax(z) - onehot(t)) / rows,   dE = dz^T n,   dn = dz E
    static func crossEntropy(normalized n: [Double], embedding e: [Double], targets: [Int32], dim: Int) -> CrossEntropy {
        let rows = targets.count, V = e.count / dim
        let z = LayerReference.linear(n, rows: rows, inputs: dim, outputs: V, weight: e, bias: nil)
        var dz = z, loss = 0.0
        for r in 0..<rows {
            let row = z[(r * V)..<((r + 1) * V)]
            let top = row.max()!
            let total: Double = row.reduce(0) { $0 + exp($1 - top) }
            loss += log(total) + top - z[r * V + Int(targets[r])]
            for v in 0..<V { dz[r * V + v] = exp(z[r * V + v] - top) / total / Double(rows) }
            dz[r * V + Int(targets[r])] -= 1 / Double(rows)
        }
        var dE = [Double](repeating: 0, count: V * dim), dn = [Double](repeating: 0, count: rows * dim)
        for r in 0..<rows {
            for v in 0..<V {
                for d in 0..<dim {
                    dE[v * dim + d] += dz[r * V + v] * n[r * dim + d]
                    dn[r * dim + d] += dz[r * V + v] * e[v * dim + d]
                }
            }
        }
        return CrossEntropy(loss: loss / Double(rows), logits: z, dLogits: dz, dEmbedding: dE, dNormalized: dn)
    }

    /// A model whose blocks are identities: embedding, final norm, tied head. Returns the loss,
    /// the logits and the gradients of the embedding and of the final norm's weight.
    static func headPath(tokens: [Int32], targets: [Int32], embedding e: [Double], normWeight w: [Double], dim: Int, eps: Double)
        -> (loss: Double, logits: [Double], dLogits: [Double], dEmbedding: [Double], dNormWeight: [Double]) {
        let x = tokens.flatMap { e[(Int($0) * dim)..<((Int($0) + 1) * dim)] }
        let n = LayerReference.rmsNorm(x, dim: dim, weight: w, eps: eps)
        let ce = crossEntropy(normalized: n, embedding: e, targets: targets, dim: dim)
        let (dx, dw) = LayerReference.rmsNormBackward(ce.dNormalized, input: x, dim: dim, weight: w, eps: eps)
        var dE = ce.dEmbedding
        for (r, t) in tokens.enumerated() { for d in 0..<dim { dE[Int(t) * dim + d] += dx[r * dim + d] } }
        return (ce.loss, ce.logits, ce.dLogits, dE, dw)
    }
}

/// A tiny all-Phalanx model with `proj_c` zero, so that every mixer is the linear map
/// `proj_out(proj_v(x))` (SWR.md section 6: `s * c + v` with `c = 0` leaves `v`), written as the
/// block wiring of `ModelConfiguration`: `h = x + drop(mixer(norm(x)))`, `x' = h + drop(mlp(norm(h)))`.
struct LinearPhalanxReference {
    let dim: Int, hidden: Int, depth: Int, eps: Double
    let tokens: [Int32], targets: [Int32]
    /// Dropout masks (values 0 or 1 / (1 - rate)) per block and branch, `[rows, dim]`; nil: none.
    let masks: [[[Double]]]?

    func loss(_ p: [String: [Double]]) -> Double { forward(p).loss }

    /// Logits `[rows, vocabulary]` and the mean cross-entropy.
    func forward(_ p: [String: [Double]]) -> (logits: [Double], loss: Double) {
        let e = p["embed_tokens.weight"]!
        var x = tokens.flatMap { e[(Int($0) * dim)..<((Int($0) + 1) * dim)] }
        func residual(_ x: [Double], _ branch: [Double], block: Int, _ index: Int) -> [Double] {
            let mask = masks?[block][index] ?? [Double](repeating: 1, count: branch.count)
            return (0..<x.count).map { x[$0] + mask[$0] * branch[$0] }
        }
        for l in 0..<depth {
            let name = "layers.\(l)"
            let n1 = LayerReference.rmsNorm(x, dim: dim, weight: p["\(name).mixer_norm.weight"]!, eps: eps)
            let rows = tokens.count
            let v = LayerReference.linear(n1, rows: rows, inputs: dim, outputs: dim,
                                          weight: p["\(name).mixer.param.proj_v.weight"]!, bias: nil)
            let mixed = LayerReference.linear(v, rows: rows, inputs: dim, outputs: dim,
                                              weight: p["\(name).mixer.proj_out.weight"]!, bias: nil)
            let h = residual(x, mixed, block: l, 0)
            let n2 = LayerReference.rmsNorm(h, dim: dim, weight: p["\(name).mlp_norm.weight"]!, eps: eps)
            let f = LayerReference.swiGLU(n2, rows: rows, dim: dim, hidden: hidden, gate: p["\(name).mlp.gate_proj.weight"]!,
                                          up: p["\(name).mlp.up_proj.weight"]!, down: p["\(name).mlp.down_proj.weight"]!)
            x = residual(h, f, block: l, 1)
        }
        let n = LayerReference.rmsNorm(x, dim: dim, weight: p["norm.weight"]!, eps: eps)
        let ce = ModelReference.crossEntropy(normalized: n, embedding: e, targets: targets, dim: dim)
        return (ce.logits, ce.loss)
    }
}

@Suite("Model pieces: gradients in double precision, then the float32 model against them")
struct ModelPieceGradientTests {
    static let eps = 1e-5  // RMSNorm's default

    static func parameter(_ model: LanguageModel, _ name: String) -> Parameter {
        guard let p = model.parameters.first(where: { $0.name == name }) else {
            fatalError("no parameter \(name) in \(model.parameters.map(\.name))")
        }
        return p
    }

    @Test("cross-entropy with the tied head: dE and d(normalized) equal central differences")
    func crossEntropyReference() {
        var rng = SeededGenerator(seed: 21)
        let (rows, dim, V) = (7, 16, 11)
        let n = randomInputs(rows * dim, scale: 2, &rng).map(Double.init)
        let e = randomInputs(V * dim, &rng).map(Double.init)
        let targets = (0..<rows).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) }
        let ce = ModelReference.crossEntropy(normalized: n, embedding: e, targets: targets, dim: dim)
        let loss = { (n: [Double], e: [Double]) in
            ModelReference.crossEntropy(normalized: n, embedding: e, targets: targets, dim: dim).loss
        }
        let ns = probes(n.count), es = probes(e.count)
        expectClose(ns.map { ce.dNormalized[$0] }, finiteDifferences(n, probes: ns) { loss($0, e) },
                    tolerance: .finiteDifference64, "d normalized")
        expectClose(es.map { ce.dEmbedding[$0] }, finiteDifferences(e, probes: es) { loss(n, $0) },
                    tolerance: .finiteDifference64, "d embedding")
    }

    @Test("RMSNorm: the reference's dx and dw equal central differences; the float32 layer equals the reference")
    func rmsNorm() {
        var rng = SeededGenerator(seed: 22)
        let (rows, dim) = (6, 24)
        // Rows of very different scales: at 1e-3 the eps term is as large as mean(x^2).
        let rowScales: [Float] = [1, 30, 1e-3, 0.02, 5, 1]
        let xs = (0..<rows).flatMap { r in randomInputs(dim, scale: rowScales[r], &rng) }
        let w = randomInputs(dim, scale: 2, &rng), dy = randomInputs(rows * dim, &rng)
        let x64 = xs.map(Double.init), w64 = w.map(Double.init), dy64 = dy.map(Double.init)
        let (dx, dw) = LayerReference.rmsNormBackward(dy64, input: x64, dim: dim, weight: w64, eps: Self.eps)
        let loss = { (x: [Double], w: [Double]) in dot(dy64, LayerReference.rmsNorm(x, dim: dim, weight: w, eps: Self.eps)) }
        // Per row, with a step below the row's scale (dx of a row scales as 1 / its input scale).
        for r in 0..<rows {
            let row = Array((r * dim)..<((r + 1) * dim))
            let numeric = finiteDifferences(x64, probes: row, step: 1e-6 * Double(rowScales[r])) { loss($0, w64) }
            expectClose(row.map { dx[$0] }, numeric, tolerance: .finiteDifference64, "dx row \(r)")
        }
        expectClose(dw, finiteDifferences(w64, probes: Array(0..<dim)) { loss(x64, $0) }, tolerance: .finiteDifference64, "dw")

        let norm = RMSNorm("norm", dim: dim)
        _ = norm.weight.value.buffer.update(fromContentsOf: w)
        let x = Tensor(xs, shape: [rows, dim])
        expectClose(norm.forward(x).array, LayerReference.rmsNorm(x64, dim: dim, weight: w64, eps: Self.eps),
                    tolerance: .float32Layer, "y")
        norm.zeroGradients()
        let dxFloat = norm.backward(Tensor(dy, shape: [rows, dim]), input: x)
        for r in 0..<rows {
            expectClose(Array(dxFloat.array[(r * dim)..<((r + 1) * dim)]), Array(dx[(r * dim)..<((r + 1) * dim)]),
                        tolerance: .float32Layer, "dx row \(r)")
        }
        expectClose(norm.weight.gradient.array, dw, tolerance: .float32Layer, "dw")
    }

    /// With every mixer's and MLP's output projection zero, each block must pass its input through
    /// unchanged (the residual), so the model is embedding -> final norm -> tied head. A block that
    /// drops or doubles its residual, or whose backward drops the residual's gradient, fails here.
    @Test("blocks with zero branch outputs are identities: logits, loss, dlogits, dE and the final norm's dw equal the reference",
          arguments: ["P", "A"])
    func identityBlocks(pattern: String) throws {
        let (dim, V, batch, length) = (16, 32, 2, 9)
        let model = try LanguageModel(ModelConfiguration(vocabulary: V, dim: dim, depth: 2, pattern: pattern,
                                                         attentionHeads: 2, window: 4, mlpHidden: 24), seed: 31)
        for p in model.parameters where p.name.hasSuffix("proj_out.weight") || p.name.hasSuffix("o_proj.weight")
            || p.name.hasSuffix("down_proj.weight") {
            p.value.fill(0)
        }
        // Random final-norm weights, so a gradient that skips them shows.
        var rng = SeededGenerator(seed: 32)
        let normWeight = Self.parameter(model, "norm.weight")
        _ = normWeight.value.buffer.update(fromContentsOf: randomInputs(dim, scale: 2, &rng))
        // Tokens from the lower half of the vocabulary only: rows of the upper half get their
        // gradient from the head alone, the lower half from the head and the lookup.
        let tokens = (0..<(batch * length)).map { _ in Int32.random(in: 0..<Int32(V / 2), using: &rng) }
        let targets = (0..<(batch * length)).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) }
        let embedding = Self.parameter(model, "embed_tokens.weight")
        let e64 = embedding.value.array.map(Double.init), w64 = normWeight.value.array.map(Double.init)
        let reference = ModelReference.headPath(tokens: tokens, targets: targets, embedding: e64, normWeight: w64,
                                                dim: dim, eps: Self.eps)

        // The reference, against central differences (E enters twice: lookup and head).
        let loss = { (e: [Double], w: [Double]) in
            ModelReference.headPath(tokens: tokens, targets: targets, embedding: e, normWeight: w, dim: dim, eps: Self.eps).loss
        }
        let es = probes(e64.count)
        expectClose(es.map { reference.dEmbedding[$0] }, finiteDifferences(e64, probes: es) { loss($0, w64) },
                    tolerance: .finiteDifference64, "reference dE")
        expectClose(reference.dNormWeight, finiteDifferences(w64, probes: Array(0..<dim)) { loss(e64, $0) },
                    tolerance: .finiteDifference64, "reference d norm.weight")

        // The float32 model against the reference.
        model.zeroGradients()
        let cache = model.forward(tokens: tokens, batch: batch, length: length)
        expectClose(cache.logits.array, reference.logits, tolerance: .float32Layer, "logits")
        let modelLoss = model.loss(cache, targets: targets)
        expectClose([modelLoss], [reference.loss], tolerance: .float32Layer, "loss")
        expectClose(cache.logits.array, reference.dLogits, tolerance: .float32Layer, "dlogits")
        model.backward(cache)
        expectClose(embedding.gradient.array, reference.dEmbedding, tolerance: .float32Layer, "dE")
        let headOnly = (V / 2 * dim)..<(V * dim)
        expectClose(Array(embedding.gradient.array[headOnly]), Array(reference.dEmbedding[headOnly]),
                    tolerance: .float32Layer, "dE of rows never looked up (the head's part alone)")
        expectClose(normWeight.gradient.array, reference.dNormWeight, tolerance: .float32Layer, "d norm.weight")
    }

    /// Live branches: every block adds a nonzero mixer output and a nonzero MLP output (each
    /// behind its own dropout mask when dropout is on), so a residual that skips a branch, adds
    /// the wrong stream, or a backward that masks with the wrong mask or sign fails here.
    @Test("a linear-mixer Phalanx model equals its double reference: logits, loss and gradients, with and without dropout",
          arguments: [nil, Dropout(rate: 0.3, seed: 4, step: 2, microBatch: 1)])
    func residualWiring(dropout: Dropout?) throws {
        let (dim, hidden, V, batch, length, depth) = (16, 24, 32, 2, 9, 2)
        let model = try LanguageModel(ModelConfiguration(vocabulary: V, dim: dim, depth: depth, pattern: "P",
                                                         attentionHeads: 1, mlpHidden: hidden), seed: 41)
        var rng = SeededGenerator(seed: 42)
        for p in model.parameters {
            if p.name.contains("proj_c") { p.value.fill(0) }
            // Norm weights away from 1, so that a gradient reaching the wrong norm shows.
            if p.name.hasSuffix("norm.weight") { _ = p.value.buffer.update(fromContentsOf: randomInputs(dim, scale: 2, &rng)) }
        }
        let tokens = (0..<(batch * length)).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) }
        let targets = (0..<(batch * length)).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) }
        let masks: [[[Double]]]? = dropout.map { dropout in
            (0..<depth).map { block in
                (0..<2).map { branch in
                    let ones = Tensor([Float](repeating: 1, count: batch * length * dim), shape: [batch, length, dim])
                    dropout.apply(to: ones, block: block, branch: branch)
                    return ones.array.map(Double.init)
                }
            }
        }
        let reference = LinearPhalanxReference(dim: dim, hidden: hidden, depth: depth, eps: Self.eps,
                                               tokens: tokens, targets: targets, masks: masks)
        var values: [String: [Double]] = [:]
        for p in model.parameters { values[p.name] = p.value.array.map(Double.init) }

        model.zeroGradients()
        let cache = model.forward(tokens: tokens, batch: batch, length: length, dropout: dropout)
        let expected = reference.forward(values)
        expectClose(cache.logits.array, expected.logits, tolerance: .float32Layer, "logits")
        let modelLoss = model.loss(cache, targets: targets)
        expectClose([modelLoss], [expected.loss], tolerance: .float32Layer, "loss")
        model.backward(cache)

        // Central differences of the double reference are exact to about 1e-9 of scale here,
        // far below the float32 tolerance the model's gradient is held to.
        let checked = ["embed_tokens.weight", "norm.weight"] + (0..<depth).flatMap { l in
            ["mixer_norm.weight", "mixer.param.proj_v.weight", "mixer.proj_out.weight", "mlp_norm.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"].map { "layers.\(l).\($0)" }
        }
        for name in checked {
            let p = Self.parameter(model, name)
            let point = values[name]!
            let ps = probes(point.count, limit: 48)
            let numeric = finiteDifferences(point, probes: ps) { v in
                var q = values
                q[name] = v
                return reference.loss(q)
            }
            expectClose(ps.map { p.gradient[$0] }, numeric, tolerance: .float32Layer, name)
        }
    }

    /// Dropout is `y = m x / (1 - rate)` with `m` in {0, 1}: linear and diagonal, so its backward
    /// is the same mask on the cotangent. Scored against that definition and the adjoint identity.
    @Test("dropout: backward (the mask applied to the cotangent) is the adjoint of forward")
    func dropoutBackward() {
        var rng = SeededGenerator(seed: 51)
        let dropout = Dropout(rate: 0.25, seed: 9, step: 7)
        let count = 4096
        let x = randomInputs(count, &rng), dy = randomInputs(count, &rng)
        let y = Tensor(x, shape: [count]), dx = Tensor(dy, shape: [count])
        dropout.apply(to: y, block: 1, branch: 0)
        dropout.apply(to: dx, block: 1, branch: 0)
        // The double definition from the forward's kept positions, and its gradient.
        let kept = y.array.enumerated().map { $0.element != 0 || x[$0.offset] == 0 }
        let forward64 = (0..<count).map { kept[$0] ? Double(x[$0]) / 0.75 : 0 }
        let gradient64 = (0..<count).map { kept[$0] ? Double(dy[$0]) / 0.75 : 0 }
        let ps = probes(count, limit: 64)
        let numeric = finiteDifferences(x.map(Double.init), probes: ps) { v in
            dot(dy.map(Double.init), (0..<count).map { kept[$0] ? v[$0] / 0.75 : 0 })
        }
        expectClose(ps.map { gradient64[$0] }, numeric, tolerance: .finiteDifference64, "definition's gradient")
        expectClose(y.array, forward64, tolerance: .float32Layer, "forward")
        expectClose(dx.array, gradient64, tolerance: .float32Layer, "backward")
        let lhs = dot(dy.map(Double.init), y.array.map(Double.init)), rhs = dot(dx.array.map(Double.init), x.map(Double.init))
        #expect(abs(lhs - rhs) <= 1e-5 * (abs(lhs) + 1), "<dy, D x> = <D dy, x>: \(lhs) vs \(rhs)")
    }
}
