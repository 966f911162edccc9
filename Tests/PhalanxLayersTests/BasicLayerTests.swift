import Foundation
import PhalanxLayers
import PhalanxRuntime
import PhalanxTestSupport
import Testing

@Suite("Linear, RMSNorm, Embedding, SwiGLU")
struct BasicLayerTests {
    /// Checks `dx` and every parameter gradient of a layer against central differences of `f`.
    func checkGradients(x: Tensor, dx: Tensor, dy: Tensor, parameters: [Parameter],
                        _ f: (_ x: [Double], _ params: [[Double]]) -> [Double]) {
        let x64 = x.array.map(Double.init), dy64 = dy.array.map(Double.init)
        let params = parameters.map { $0.value.array.map(Double.init) }
        func loss(_ x: [Double], _ p: [[Double]]) -> Double { dot(dy64, f(x, p)) }
        let xs = probes(x64.count)
        expectClose(xs.map { dx[$0] }, finiteDifferences(x64, probes: xs) { loss($0, params) }, tolerance: .float32Layer, "dx")
        for (i, p) in parameters.enumerated() {
            let ps = probes(params[i].count)
            let numeric = finiteDifferences(params[i], probes: ps) { v in
                var q = params
                q[i] = v
                return loss(x64, q)
            }
            expectClose(ps.map { p.gradient[$0] }, numeric, tolerance: .float32Layer, p.name)
        }
    }

    @Test("Linear with and without bias: forward and gradients", arguments: [true, false])
    func linear(bias: Bool) {
        var rng = SeededGenerator(seed: 1)
        let layer = Linear("proj", inputs: 7, outputs: 5, bias: bias, rng: &rng)
        let x = randomTensor([2, 3, 7], _: &rng), dy = randomTensor([2, 3, 5], _: &rng)
        let y = layer.forward(x)
        #expect(y.shape == [2, 3, 5])
        let f = { (x: [Double], p: [[Double]]) in
            LayerReference.linear(x, rows: 6, inputs: 7, outputs: 5, weight: p[0], bias: bias ? p[1] : nil)
        }
        expectClose(y.array, f(x.array.map(Double.init), layer.parameters.map { $0.value.array.map(Double.init) }), tolerance: .float32Layer)
        let dx = layer.backward(dy, input: x)
        checkGradients(x: x, dx: dx, dy: dy, parameters: layer.parameters, f)
    }

    @Test("RMSNorm: forward and gradients, including a row of zeros")
    func rmsNorm() {
        var rng = SeededGenerator(seed: 2)
        let norm = RMSNorm("norm", dim: 8)
        for i in 0..<8 { norm.weight.value[i] = Float.random(in: 0.5...1.5, using: &rng) }
        let x = randomTensor([5, 8], _: &rng), dy = randomTensor([5, 8], _: &rng)
        for i in 0..<8 { x[8 + i] = 0 }
        let f = { (x: [Double], p: [[Double]]) in LayerReference.rmsNorm(x, dim: 8, weight: p[0], eps: 1e-5) }
        expectClose(norm.forward(x).array, f(x.array.map(Double.init), [norm.weight.value.array.map(Double.init)]), tolerance: .float32Layer)
        let dx = norm.backward(dy, input: x)
        checkGradients(x: x, dx: dx, dy: dy, parameters: norm.parameters, f)
    }

    @Test("SwiGLU MLP: forward and gradients")
    func swiGLU() {
        var rng = SeededGenerator(seed: 3)
        let mlp = SwiGLU("mlp", dim: 6, hidden: 10, rng: &rng)
        let x = randomTensor([2, 4, 6], scale: 2, &rng), dy = randomTensor([2, 4, 6], _: &rng)
        let (y, cache) = mlp.forward(x)
        let f = { (x: [Double], p: [[Double]]) in
            LayerReference.swiGLU(x, rows: 8, dim: 6, hidden: 10, gate: p[0], up: p[1], down: p[2])
        }
        expectClose(y.array, f(x.array.map(Double.init), mlp.parameters.map { $0.value.array.map(Double.init) }), tolerance: .float32Layer)
        let dx = mlp.backward(dy, cache: cache)
        checkGradients(x: x, dx: dx, dy: dy, parameters: mlp.parameters, f)
    }

    @Test("Embedding: rows by token, gradients summed per token")
    func embedding() {
        var rng = SeededGenerator(seed: 4)
        let table = Embedding("embed", vocabulary: 5, dim: 3, rng: &rng)
        let tokens: [Int32] = [4, 0, 4, 2]
        let y = table.forward(tokens, batch: 2, length: 2)
        for (i, t) in tokens.enumerated() {
            #expect(Array(y.array[(i * 3)..<(i * 3 + 3)]) == Array(table.weight.value.array[(Int(t) * 3)..<(Int(t) * 3 + 3)]))
        }
        let dy = randomTensor([2, 2, 3], _: &rng)
        table.backward(dy, tokens: tokens)
        let g = table.weight.gradient.array
        for c in 0..<3 {
            #expect(g[4 * 3 + c] == dy[c] + dy[2 * 3 + c])
            #expect(g[0 * 3 + c] == dy[3 + c])
            #expect(g[1 * 3 + c] == 0 && g[3 * 3 + c] == 0)
        }
    }
}
