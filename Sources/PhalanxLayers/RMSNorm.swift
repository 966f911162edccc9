import PhalanxCUDA
import PhalanxRuntime

/// Root-mean-square normalisation with a learned scale:
///
///     y = x / sqrt(mean(x^2) + eps) * w          x, y [rows, dim], w [dim]
///
/// Backward, with `r = 1/sqrt(mean(x^2) + eps)`, `xhat = x r`, `g = dy * w`:
///
///     dx = r * (g - xhat * mean(g * xhat)),   dw += sum_rows dy * xhat
///
/// Parameter `<name>.weight` (initialised to 1, not decayed).
public final class RMSNorm: ParameterContainer {
    /// Features per row.
    public let dim: Int
    /// Added to the mean square before the square root (1e-5 by default).
    public let eps: Float
    /// The scale `w` `[dim]`, `<name>.weight`.
    public let weight: Parameter
    let pool: WorkerPool

    /// A norm over `dim` features with scale 1 and `eps` inside the square root.
    public init(_ name: String, dim: Int, eps: Float = 1e-5, pool: WorkerPool = .shared) {
        self.dim = dim
        self.eps = eps
        weight = .constant(qualified(name, "weight"), shape: [dim], value: 1)
        self.pool = pool
    }

    /// The scale only.
    public var parameters: [Parameter] { [weight] }

    /// Normalises each row of `x` (last dimension `dim`).
    public func forward(_ x: Tensor) -> Tensor {
        require(x.columns == dim, "RMSNorm \(weight.name): input has \(x.columns) features, expected \(dim)")
        if case .cuda(let gpu) = x.device { return DeviceOps.rmsNorm(x, weight: weight.value, eps: eps, on: gpu) }
        let y = Tensor(zeros: x.shape)
        let xp = x.pointer, yp = y.pointer, w = weight.value.pointer, dim = dim, eps = eps
        forEachRowRange(x.rows) { range in
            for r in range {
                let row = xp + r * dim, out = yp + r * dim
                var sum: Float = 0
                for i in 0..<dim { sum += row[i] * row[i] }
                let scale = 1 / (sum / Float(dim) + eps).squareRoot()
                for i in 0..<dim { out[i] = row[i] * scale * w[i] }
            }
        }
        return y
    }

    /// Adds `dw` for input `x` and cotangent `dy`; returns `dx`.
    public func backward(_ dy: Tensor, input x: Tensor) -> Tensor {
        require(dy.shape == x.shape, "RMSNorm \(weight.name): cotangent \(dy.shape) does not match input \(x.shape)")
        if case .cuda(let gpu) = x.device {
            return DeviceOps.rmsNormBackward(dy, input: x, weight: weight.value, weightGradient: weight.gradient, eps: eps, on: gpu)
        }
        let dx = Tensor(zeros: x.shape)
        let rows = x.rows, dim = dim, eps = eps
        let xp = x.pointer, dyp = dy.pointer, dxp = dx.pointer, w = weight.value.pointer
        // Per-thread partial sums of dw, added at the end: threads never write the same memory.
        let parts = partsFor(rows)
        let partial = Tensor(zeros: [parts, dim])
        let pp = partial.pointer
        pool.run(parts) { p in
            let dwp = pp + p * dim
            for r in (p * rows / parts)..<((p + 1) * rows / parts) {
                let row = xp + r * dim, g = dyp + r * dim, out = dxp + r * dim
                var sum: Float = 0
                for i in 0..<dim { sum += row[i] * row[i] }
                let scale = 1 / (sum / Float(dim) + eps).squareRoot()
                var meanGX: Float = 0
                for i in 0..<dim { meanGX += g[i] * w[i] * row[i] * scale }
                meanGX /= Float(dim)
                for i in 0..<dim {
                    let xhat = row[i] * scale
                    out[i] = scale * (g[i] * w[i] - xhat * meanGX)
                    dwp[i] += g[i] * xhat
                }
            }
        }
        let dw = weight.gradient.pointer
        for p in 0..<parts { for i in 0..<dim { dw[i] += pp[p * dim + i] } }
        return dx
    }

    private func partsFor(_ rows: Int) -> Int { min(pool.threadCount, max(rows / 32, 1)) }

    private func forEachRowRange(_ rows: Int, _ body: (Range<Int>) -> Void) {
        let parts = partsFor(rows)
        pool.run(parts) { p in body((p * rows / parts)..<((p + 1) * rows / parts)) }
    }
}
