import PhalanxRuntime

/// A fully connected layer on the platform BLAS:
///
///     y = x W^T + b        x [rows, in], W [out, in], b [out], y [rows, out]
///
/// Backward (adds into the parameter gradients):
///
///     dx = dy W,   dW += dy^T x,   db += sum_rows dy
///
/// Leading dimensions of `x` are flattened into rows. Parameters are `<name>.weight` and
/// `<name>.bias`, as in PyTorch state dicts.
public final class Linear: ParameterContainer {
    /// Input features, `in`.
    public let inputs: Int
    /// Output features, `out`.
    public let outputs: Int
    /// `W` `[out, in]`, `<name>.weight`, decayed.
    public let weight: Parameter
    /// `b` `[out]`, `<name>.bias`, not decayed; nil for a layer without bias.
    public let bias: Parameter?

    /// PyTorch's default initialisation: weight and bias uniform in `±1/sqrt(inputs)`.
    public init(_ name: String, inputs: Int, outputs: Int, bias: Bool, rng: inout SeededGenerator) {
        require(inputs >= 1 && outputs >= 1, "Linear \(name): sizes must be positive, got \(inputs) -> \(outputs)")
        self.inputs = inputs
        self.outputs = outputs
        let bound = 1 / Float(inputs).squareRoot()
        weight = .uniform(qualified(name, "weight"), shape: [outputs, inputs], bound: bound, decays: true, using: &rng)
        self.bias = bias ? .uniform(qualified(name, "bias"), shape: [outputs], bound: bound, decays: false, using: &rng) : nil
    }

    /// The weight, then the bias if there is one.
    public var parameters: [Parameter] { [weight] + (bias.map { [$0] } ?? []) }

    /// `y = x W^T + b`; `x` has `inputs` columns, `y` keeps `x`'s leading shape.
    public func forward(_ x: Tensor) -> Tensor {
        require(x.columns == inputs, "Linear \(weight.name): input has \(x.columns) features, expected \(inputs) (shape \(x.shape))")
        let y = Tensor(uninitialized: Array(x.shape.dropLast()) + [outputs], like: x)
        forward(x, into: y)
        return y
    }

    /// `y = x W^T + b` into `y` (`[rows, outputs]` elements, overwritten), where `x` lives.
    public func forward(_ x: Tensor, into y: Tensor) {
        require(x.columns == inputs && y.count == x.rows * outputs,
                "Linear \(weight.name): input \(x.shape) and output \(y.shape) do not fit \(inputs) -> \(outputs)")
        switch x.device {
        case .cpu: forward(x.pointer, rows: x.rows, into: y.pointer)
        case .cuda(let gpu): forward(x, into: y, on: gpu)
        }
    }

    /// Raw form: `x` `[rows, inputs]` to `y` `[rows, outputs]` (overwritten).
    public func forward(_ x: UnsafePointer<Float>, rows: Int, into y: UnsafeMutablePointer<Float>) {
        if let bias {
            for r in 0..<rows { (y + r * outputs).update(from: bias.value.pointer, count: outputs) }
        }
        Gemm.multiply(m: rows, n: outputs, k: inputs, x, weight.value.pointer, transposeB: true,
                      into: y, beta: bias == nil ? 0 : 1)
    }

    /// Adds the parameter gradients for input `x` and output cotangent `dy`; returns `dx`.
    public func backward(_ dy: Tensor, input x: Tensor) -> Tensor {
        require(dy.columns == outputs && dy.rows == x.rows,
                     "Linear \(weight.name): cotangent \(dy.shape) does not match input \(x.shape) -> \(outputs) features")
        let dx = Tensor(uninitialized: x.shape, like: dy)
        backward(dy, input: x, inputGradient: dx)
        return dx
    }

    /// Tensor form of the raw backward, on the CPU or a GPU: adds the parameter gradients and
    /// writes `dx` into `inputGradient` (added to it when `accumulate`; nil when the input needs
    /// no gradient).
    public func backward(_ dy: Tensor, input x: Tensor, inputGradient dx: Tensor?, accumulate: Bool = false) {
        require(dy.columns == outputs && dy.rows == x.rows && x.columns == inputs && (dx.map { $0.count == x.count } ?? true),
                "Linear \(weight.name): cotangent \(dy.shape), input \(x.shape), input gradient \(dx?.shape ?? []) do not chain")
        switch dy.device {
        case .cpu: backward(dy.pointer, input: x.pointer, rows: x.rows, inputGradient: dx?.pointer, accumulate: accumulate)
        case .cuda(let gpu): backward(dy, input: x, inputGradient: dx, accumulate: accumulate, on: gpu)
        }
    }

    /// Raw form. `inputGradient` (`[rows, inputs]`) is overwritten unless `accumulate` is set;
    /// pass `nil` when the input needs no gradient.
    public func backward(_ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, rows: Int,
                         inputGradient dx: UnsafeMutablePointer<Float>?, accumulate: Bool = false) {
        Gemm.multiply(m: outputs, n: inputs, k: rows, dy, transposeA: true, x,
                      into: weight.gradient.pointer, beta: 1)
        if let bias {
            let db = bias.gradient.pointer
            for r in 0..<rows {
                let row = dy + r * outputs
                for o in 0..<outputs { db[o] += row[o] }
            }
        }
        if let dx {
            Gemm.multiply(m: rows, n: inputs, k: outputs, dy, weight.value.pointer, into: dx, beta: accumulate ? 1 : 0)
        }
    }
}
