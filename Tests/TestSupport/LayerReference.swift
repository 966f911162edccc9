import Foundation

/// Double-precision definitions of the basic layers, for forward checks and finite differences.
public enum LayerReference {
    /// `y = x W^T + b`, `x` `[rows, inputs]`, `W` `[outputs, inputs]`.
    public static func linear(_ x: [Double], rows: Int, inputs: Int, outputs: Int, weight w: [Double], bias: [Double]?) -> [Double] {
        (0..<(rows * outputs)).map { k in
            let (r, o) = (k / outputs, k % outputs)
            return (0..<inputs).reduce(bias?[o] ?? 0) { $0 + w[o * inputs + $1] * x[r * inputs + $1] }
        }
    }

    /// `y = x / sqrt(mean(x^2) + eps) * w` per row of `dim`.
    public static func rmsNorm(_ x: [Double], dim: Int, weight: [Double], eps: Double) -> [Double] {
        var y = x
        for r in 0..<(x.count / dim) {
            let row = x[(r * dim)..<((r + 1) * dim)]
            let scale = 1 / (row.reduce(0) { $0 + $1 * $1 } / Double(dim) + eps).squareRoot()
            for i in 0..<dim { y[r * dim + i] = x[r * dim + i] * scale * weight[i] }
        }
        return y
    }

    /// RMSNorm's backward, with `r = 1/sqrt(mean(x^2) + eps)`, `xhat = x r`, `g = dy w`:
    /// `dx = r (g - xhat mean(g xhat))`, `dw = sum_rows dy xhat`.
    public static func rmsNormBackward(_ dy: [Double], input x: [Double], dim: Int, weight w: [Double], eps: Double)
        -> (dx: [Double], dw: [Double]) {
        var dx = x, dw = [Double](repeating: 0, count: dim)
        for r in 0..<(x.count / dim) {
            let scale = 1 / ((0..<dim).reduce(0) { $0 + x[r * dim + $1] * x[r * dim + $1] } / Double(dim) + eps).squareRoot()
            let mean = (0..<dim).reduce(0) { $0 + dy[r * dim + $1] * w[$1] * x[r * dim + $1] * scale } / Double(dim)
            for i in 0..<dim {
                let xhat = x[r * dim + i] * scale
                dx[r * dim + i] = scale * (dy[r * dim + i] * w[i] - xhat * mean)
                dw[i] += dy[r * dim + i] * xhat
            }
        }
        return (dx, dw)
    }

    /// `y = down( silu(gate x) * up x )`, `silu(z) = z sigmoid(z)`; no biases.
    public static func swiGLU(_ x: [Double], rows: Int, dim: Int, hidden: Int, gate: [Double], up: [Double], down: [Double]) -> [Double] {
        let g = linear(x, rows: rows, inputs: dim, outputs: hidden, weight: gate, bias: nil)
        let u = linear(x, rows: rows, inputs: dim, outputs: hidden, weight: up, bias: nil)
        let h = zip(g, u).map { $0 / (1 + exp(-$0)) * $1 }
        return linear(h, rows: rows, inputs: hidden, outputs: dim, weight: down, bias: nil)
    }
}
