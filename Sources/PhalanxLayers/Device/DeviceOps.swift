import PhalanxCUDA
import PhalanxRuntime

/// The element-wise and row-wise work of the layers on a CUDA device, each the GPU form of the
/// CPU code beside the layer that calls it (formulas in those layers' doc comments). Work is
/// queued on the device's stream; failures are recorded on the device (`CUDADevice.perform`).
public enum DeviceOps {
    /// `into += other` (queued).
    public static func add(_ other: Tensor, into target: Tensor, on gpu: CUDADevice) { pending() }
    static func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float, on gpu: CUDADevice) -> Tensor { pending() }
    static func rmsNormBackward(_ dy: Tensor, input x: Tensor, weight: Tensor, weightGradient: Tensor, eps: Float, on gpu: CUDADevice) -> Tensor { pending() }
    static func swiGLU(gate: Tensor, up: Tensor, on gpu: CUDADevice) -> Tensor { pending() }
    static func swiGLUBackward(_ dh: Tensor, gate: Tensor, up: Tensor, on gpu: CUDADevice) -> Tensor { pending() }
    static func embed(_ tokens: [Int32], shape: [Int], table: Tensor, on gpu: CUDADevice) -> Tensor { pending() }
    static func embedBackward(_ dy: Tensor, tokens: [Int32], tableGradient: Tensor, on gpu: CUDADevice) { pending() }
    static func rotate(_ x: Tensor, heads: Int, headDim: Int, cosines: Tensor, sines: Tensor, startPosition: Int, inverse: Bool, on gpu: CUDADevice) { pending() }
    static func attention(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor, layout: AttentionLayout, window: Int?, on gpu: CUDADevice) { pending() }
    static func attentionBackward(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor, outputGradient: Tensor, queryGradient: Tensor, keyGradient: Tensor, valueGradient: Tensor, layout: AttentionLayout, window: Int?, on gpu: CUDADevice) { pending() }
    public static func dropout(_ t: Tensor, stream: UInt64, threshold: UInt64, keepScale: Float, on gpu: CUDADevice) { pending() }
    public static func crossEntropy(_ logits: Tensor, targets: [Int32], gradientScale: Float, on gpu: CUDADevice) -> Float { pending() }
    public static func adamW(_ p: Parameter, firstMoment: Tensor, secondMoment: Tensor, learningRate: Float, beta1: Float, beta2: Float, epsilon: Float, weightDecay: Float, correction1: Float, correction2: Float, on gpu: CUDADevice) { pending() }
    public static func clipGradients(_ gradients: [Tensor], maxNorm: Float, on gpu: CUDADevice) -> Float { pending() }
    public static func allFinite(_ tensors: [Tensor], on gpu: CUDADevice) -> Bool { pending() }
    static func pending() -> Never { fatalError("pending") }
}
