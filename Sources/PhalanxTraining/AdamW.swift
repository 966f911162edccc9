import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime

/// AdamW (Loshchilov and Hutter): Adam with decoupled weight decay.
///
///     m = b1 m + (1 - b1) g
///     v = b2 v + (1 - b2) g^2
///     p -= lr * ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )     (wd only where `decays`)
///
/// Weight decay applies to parameters marked `decays` (matrices); norms, biases and embeddings
/// are exempt unless `decayAll` is set.
public final class AdamW {
    /// The optimizer's constants; stored in every checkpoint.
    public struct Hyperparameters: Codable, Hashable, Sendable {
        /// Decay of the first moment, `b1`.
        public var beta1: Float = 0.9
        /// Decay of the second moment, `b2` (0.95, as is usual for language models).
        public var beta2: Float = 0.95
        /// Added to `sqrt(v)` in the denominator, `eps`.
        public var epsilon: Float = 1e-8
        /// Decoupled weight decay `wd`, multiplied by the learning rate.
        public var weightDecay: Float = 0.1
        /// Decay every parameter, not only those marked `decays`.
        public var decayAll = false
        /// The defaults above.
        public init() {}
    }

    /// The constants this optimizer updates with.
    public let hyperparameters: Hyperparameters
    /// What it updates, in checkpoint order.
    public let parameters: [Parameter]
    /// First and second moments, one per parameter, in `parameters` order.
    public let firstMoments: [Tensor], secondMoments: [Tensor]
    /// Steps taken (`t` of the bias corrections).
    public var step = 0
    let pool: WorkerPool

    /// An optimizer over `parameters` with zero moments at step 0.
    public init(_ parameters: [Parameter], hyperparameters: Hyperparameters = .init(), pool: WorkerPool = .shared) {
        self.parameters = parameters
        self.hyperparameters = hyperparameters
        firstMoments = parameters.map { Tensor(zeros: $0.value.shape) }
        secondMoments = parameters.map { Tensor(zeros: $0.value.shape) }
        self.pool = pool
    }

    /// Moves the moments to `device` (where the parameters are).
    public func move(to device: Device) {
        for moment in firstMoments + secondMoments { moment.move(to: device) }
        deviceClipState = nil
    }

    /// On a GPU, the gradients are not scaled in place: `clipGradients` leaves the norm, the scale
    /// and a non-finite flag here, and the update kernel scales as it reads (and changes nothing
    /// when the flag is set). Reset to "scale 1" after every update.
    private var deviceClipState: DeviceBuffer?
    private var clipStateIsFresh = false


    /// Scales the gradients so that their global L2 norm is at most `maxNorm` (0: no clipping) and
    /// returns the norm before clipping: `clipGradients(parameters, maxNorm:)` on the CPU; on a GPU
    /// the scale is applied by the next `update` (see `deviceClipState`).
    public func clipGradients(maxNorm: Float) -> Float {
        guard case .cuda(let gpu) = parameters.first?.gradient.device else {
            return PhalanxTraining.clipGradients(parameters, maxNorm: maxNorm)
        }
        if deviceClipState == nil {
            deviceClipState = gpu.value { try DeviceBuffer(context: gpu.context, byteCount: CUDALayerKernels.clipStateBytes) }
        }
        guard let state = deviceClipState else { return .nan }
        clipStateIsFresh = true
        return DeviceOps.clipState(parameters.map(\.gradient), maxNorm: maxNorm, into: state, on: gpu)
    }

    /// Applies one update with learning rate `lr` from the current gradients.
    public func update(learningRate lr: Float) {
        step += 1
        let h = hyperparameters
        let correction1 = 1 - pow(h.beta1, Float(step)), correction2 = 1 - pow(h.beta2, Float(step))
        // On a GPU: the clip state `clipGradients` left, else one computed with no clipping.
        if case .cuda = parameters.first?.value.device, !clipStateIsFresh { _ = clipGradients(maxNorm: 0) }
        for (i, p) in parameters.enumerated() {
            let decay = (p.decays || h.decayAll) ? h.weightDecay : 0
            if case .cuda(let gpu) = p.value.device, let state = deviceClipState {
                DeviceOps.adamW(p, firstMoment: firstMoments[i], secondMoment: secondMoments[i], clipState: state,
                                learningRate: lr, step: step, beta1: h.beta1, beta2: h.beta2, epsilon: h.epsilon, decay: decay, on: gpu)
                continue
            }
            let w = p.value.pointer, g = p.gradient.pointer
            let m = firstMoments[i].pointer, v = secondMoments[i].pointer
            let n = p.value.count
            let parts = min(pool.threadCount, max(n / 16384, 1))
            pool.run(parts) { part in
                for j in (part * n / parts)..<((part + 1) * n / parts) {
                    let gj = g[j]
                    let mj = h.beta1 * m[j] + (1 - h.beta1) * gj
                    let vj = h.beta2 * v[j] + (1 - h.beta2) * gj * gj
                    m[j] = mj
                    v[j] = vj
                    w[j] -= lr * ((mj / correction1) / ((vj / correction2).squareRoot() + h.epsilon) + decay * w[j])
                }
            }
        }
        clipStateIsFresh = false
    }
}

/// Scales all gradients so that their global L2 norm is at most `maxNorm`; returns the norm
/// before clipping (reported in the progress line).
@discardableResult
public func clipGradients(_ parameters: [Parameter], maxNorm: Float) -> Float {
    require(parameters.allSatisfy { $0.gradient.device.isSame(as: .cpu) },
            "clipGradients: gradients on a GPU are clipped by their optimizer (AdamW.clipGradients)")
    var sum = 0.0
    for p in parameters {
        let g = p.gradient.pointer
        var s: Float = 0
        for j in 0..<p.gradient.count { s += g[j] * g[j] }
        sum += Double(s)
    }
    let norm = Float(sum.squareRoot())
    if maxNorm > 0, norm > maxNorm, norm.isFinite {
        let scale = maxNorm / norm
        for p in parameters {
            let g = p.gradient.pointer
            for j in 0..<p.gradient.count { g[j] *= scale }
        }
    }
    return norm
}

/// Linear warm-up to `peak`, then cosine decay to `peak * finalFraction` at `totalSteps`:
///
///     lr(s) = peak * (s + 1) / warmup                                    s < warmup
///     lr(s) = peak * (f + (1 - f) * (1 + cos(pi * progress)) / 2)         otherwise
///     progress = min((s - warmup) / max(totalSteps - warmup, 1), 1)
public struct LearningRateSchedule: Codable, Hashable, Sendable {
    /// The learning rate at the end of the warm-up.
    public var peak: Float
    /// Steps of linear warm-up.
    public var warmupSteps: Int
    /// The step at which the cosine reaches its end (the run's length).
    public var totalSteps: Int
    /// The final learning rate as a fraction of `peak`, `f`.
    public var finalFraction: Float

    /// A schedule ending at `peak * finalFraction`.
    public init(peak: Float, warmupSteps: Int, totalSteps: Int, finalFraction: Float = 0.1) {
        self.peak = peak
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
        self.finalFraction = finalFraction
    }

    /// The learning rate of step `step` (0-based), by the formula above.
    public func callAsFunction(_ step: Int) -> Float {
        if step < warmupSteps { return peak * Float(step + 1) / Float(warmupSteps) }
        let span = max(totalSteps - warmupSteps, 1)
        let progress = min(Float(step - warmupSteps) / Float(span), 1)
        return peak * (finalFraction + (1 - finalFraction) * (1 + cos(Float.pi * progress)) / 2)
    }
}

/// Whether every parameter's value is finite (after an update: a step that produced NaN or
/// infinity is never saved). On a GPU, one pass over the values on the device.
public func parametersAreFinite(_ parameters: [Parameter]) -> Bool {
    if case .cuda(let gpu) = parameters.first?.value.device {
        return DeviceOps.allFinite(parameters.map(\.value), on: gpu)
    }
    return parameters.allSatisfy { $0.value.readOnly.allSatisfy(\.isFinite) }
}
