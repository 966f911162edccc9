import PhalanxCUDA
import PhalanxRuntime

/// A token embedding table: row `t` of `weight` `[vocabulary, dim]` for each token `t`.
///
///     y[b, i, :] = W[tokens[b, i], :]          backward: dW[t, :] += sum over positions of t of dy
///
/// Parameter `<name>.weight`, initialised from a normal distribution with standard deviation
/// `initScale` (0.02 by default, as GPT-2), not decayed.
public final class Embedding: ParameterContainer {
    /// Rows of the table: token ids are `0..<vocabulary`.
    public let vocabulary: Int
    /// Width of each embedding row.
    public let dim: Int
    /// The table `[vocabulary, dim]`, `<name>.weight`.
    public let weight: Parameter

    /// A table of `vocabulary` rows of width `dim` drawn from `N(0, initScale^2)`, named `<name>.weight`.
    public init(_ name: String, vocabulary: Int, dim: Int, initScale: Float = 0.02, rng: inout SeededGenerator) {
        require(vocabulary >= 1 && dim >= 1, "Embedding \(name): sizes must be positive, got \(vocabulary) x \(dim)")
        self.vocabulary = vocabulary
        self.dim = dim
        let values = (0..<(vocabulary * dim)).map { _ in rng.normal() * initScale }
        weight = Parameter(qualified(name, "weight"), Tensor(values, shape: [vocabulary, dim]), decays: false)
    }

    /// The table only.
    public var parameters: [Parameter] { [weight] }

    /// `tokens` `[batch, length]` (row-major) to `[batch, length, dim]`.
    public func forward(_ tokens: [Int32], batch: Int, length: Int) -> Tensor {
        require(tokens.count == batch * length, "Embedding: \(tokens.count) tokens for [\(batch), \(length)]")
        if case .cuda(let gpu) = weight.value.device {
            if let bad = tokens.firstIndex(where: { $0 < 0 || Int($0) >= vocabulary }) {
                fatalError("Embedding \(weight.name): token \(tokens[bad]) at position \(bad) is outside 0..<\(vocabulary)")
            }
            return DeviceOps.embed(tokens, shape: [batch, length, dim], table: weight.value, on: gpu)
        }
        let y = Tensor(zeros: [batch, length, dim])
        for (i, t) in tokens.enumerated() {
            require(t >= 0 && Int(t) < vocabulary, "Embedding \(weight.name): token \(t) at position \(i) is outside 0..<\(vocabulary)")
            (y.pointer + i * dim).update(from: weight.value.pointer + Int(t) * dim, count: dim)
        }
        return y
    }

    /// Adds the cotangent of each position into its token's row.
    public func backward(_ dy: Tensor, tokens: [Int32]) {
        require(dy.rows == tokens.count && dy.columns == dim, "Embedding.backward: cotangent \(dy.shape) for \(tokens.count) tokens")
        if case .cuda(let gpu) = dy.device {
            return DeviceOps.embedBackward(dy, tokens: tokens, tableGradient: weight.gradient, on: gpu)
        }
        let dw = weight.gradient.pointer
        for (i, t) in tokens.enumerated() {
            let row = dw + Int(t) * dim, g = dy.pointer + i * dim
            for c in 0..<dim { row[c] += g[c] }
        }
    }
}
