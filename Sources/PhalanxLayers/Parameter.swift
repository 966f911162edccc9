import PhalanxRuntime
import PhalanxCUDA

/// A trainable tensor with its gradient and its checkpoint name.
///
/// Names are dotted paths that equal checkpoint keys (`layers.3.mixer.param.proj_a.weight`), so
/// saving, loading and reference checkpoints need no mapping table. Backward passes add into
/// `gradient`; an optimiser step reads it and the training loop zeroes it.
public final class Parameter: @unchecked Sendable {
    /// The dotted checkpoint key, for example `layers.3.mixer.param.proj_a.weight`.
    public let name: String
    /// The current values.
    public let value: Tensor
    /// The accumulated gradient, same shape as `value`; backward passes add into it.
    public let gradient: Tensor
    /// Whether weight decay applies (matrices yes; norms, biases and embeddings no, by default).
    public let decays: Bool

    /// A parameter holding `value`, with a zero gradient of the same shape.
    public convenience init(_ name: String, _ value: Tensor, decays: Bool) {
        self.init(name, value, gradient: Tensor(zeros: value.shape), decays: decays)
    }

    /// A parameter over given storage, for example views into a fused matrix.
    public init(_ name: String, _ value: Tensor, gradient: Tensor, decays: Bool) {
        require(value.shape == gradient.shape, "Parameter \(name): value \(value.shape) and gradient \(gradient.shape) differ")
        self.name = name
        self.value = value
        self.gradient = gradient
        self.decays = decays
    }

    /// Values uniform in `[-bound, bound]` (PyTorch's `nn.Linear` default is `bound = 1 / sqrt(fanIn)`).
    public static func uniform(_ name: String, shape: [Int], bound: Float, decays: Bool,
                               using rng: inout SeededGenerator) -> Parameter {
        let values = (0..<shape.reduce(1, *)).map { _ in Float.random(in: -bound...bound, using: &rng) }
        return Parameter(name, Tensor(values, shape: shape), decays: decays)
    }

    /// A parameter with every element equal to `value` (norm scales start at 1), not decayed by default.
    public static func constant(_ name: String, shape: [Int], value: Float, decays: Bool = false) -> Parameter {
        let t = Tensor(zeros: shape)
        t.fill(value)
        return Parameter(name, t, decays: decays)
    }
}

/// Anything that owns parameters: layers, blocks, models.
public protocol ParameterContainer: AnyObject {
    /// Every parameter, in a stable order (the order of the checkpoint).
    var parameters: [Parameter] { get }
}

extension ParameterContainer {
    /// Sets every parameter's gradient to zero.
    public func zeroGradients() { for p in parameters { p.gradient.fill(0) } }

    /// Moves every parameter's value and gradient to `device` (float32 masters). With `compute`
    /// bfloat16 on a GPU, every matrix (a two-dimensional tensor owning its storage) also gets a
    /// bfloat16 `computeCopy` that the matrix products read; the optimizer refreshes it after
    /// each update. Views move with the tensor they view. Moving back to the CPU drops the copies.
    public func move(to device: Device, compute: NumberFormat = .float32) {
        let values = Set(parameters.map { ObjectIdentifier($0.value.root) })
        let narrow = compute != .float32 && device.cuda != nil ? compute : nil
        var seen = Set<ObjectIdentifier>()
        for root in parameters.flatMap({ [$0.value.root, $0.gradient.root] }) where seen.insert(ObjectIdentifier(root)).inserted {
            let isMatrix = root.shape.count == 2 && values.contains(ObjectIdentifier(root))
            root.move(to: device, compute: isMatrix ? narrow : nil)
        }
    }

    /// Where the parameters live (the first one's place; all move together).
    public var device: Device { parameters.first?.value.device ?? .cpu }
    /// Trainable scalars: the sum of the parameters' element counts.
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.value.count } }
}

/// Joins a prefix and a name with a dot (`"layers.0"` + `"mlp"`), skipping an empty prefix.
public func qualified(_ prefix: String, _ name: String) -> String {
    prefix.isEmpty ? name : "\(prefix).\(name)"
}
