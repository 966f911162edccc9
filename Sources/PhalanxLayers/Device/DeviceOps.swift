import PhalanxCUDA
import PhalanxRuntime

/// The element-wise and row-wise work of the layers on a CUDA device, each the GPU form of the
/// CPU code beside the layer that calls it (formulas in those layers' doc comments and in
/// `CUDALayerKernels`). Work is queued on the device's stream; failures are recorded on the
/// device (`CUDADevice.perform`), and a function that must return a host value (a loss, a norm)
/// returns NaN after one.
public enum DeviceOps {
    /// The layer kernels for activations in `storage` on `gpu` (compiled once per device).
    static func kernels(_ storage: NumberFormat, on gpu: CUDADevice) throws -> CUDALayerKernels {
        try gpu.kernels("layers/\(storage)") { try CUDALayerKernels(context: gpu.context, storage: storage) }
    }

    /// `target += other` (queued); `other` may be stored in another format.
    public static func add(_ other: Tensor, into target: Tensor, on gpu: CUDADevice) {
        gpu.perform {
            try kernels(target.format, on: gpu).add(other.deviceBuffer, xStorage: other.format, into: target.deviceBuffer,
                                                    count: target.count)
        }
    }

    /// RMSNorm of the rows of `x` with float32 `weight`.
    static func rmsNorm(_ x: Tensor, weight: Tensor, eps: Float, on gpu: CUDADevice) -> Tensor {
        let y = Tensor(uninitialized: x.shape, like: x)
        gpu.perform {
            try kernels(x.format, on: gpu).rmsNormForward(x: x.deviceBuffer, weight: weight.deviceBuffer, output: y.deviceBuffer,
                                                          rows: x.rows, dim: x.columns, eps: eps)
        }
        return y
    }

    /// RMSNorm's `dx`, adding the weight's gradient.
    static func rmsNormBackward(_ dy: Tensor, input x: Tensor, weight: Tensor, weightGradient: Tensor, eps: Float,
                                on gpu: CUDADevice) -> Tensor {
        let dx = Tensor(uninitialized: x.shape, like: dy)
        gpu.perform {
            try kernels(x.format, on: gpu).rmsNormBackward(x: x.deviceBuffer, weight: weight.deviceBuffer, outputGradient: dy.deviceBuffer,
                                                           inputGradient: dx.deviceBuffer, weightGradient: weightGradient.deviceBuffer,
                                                           rows: x.rows, dim: x.columns, eps: eps)
        }
        return dx
    }

    /// `silu(gate) * up`.
    static func swiGLU(gate: Tensor, up: Tensor, on gpu: CUDADevice) -> Tensor {
        let hidden = Tensor(uninitialized: gate.shape, like: gate)
        gpu.perform {
            try kernels(gate.format, on: gpu).swiGLUForward(gate: gate.deviceBuffer, up: up.deviceBuffer, hidden: hidden.deviceBuffer,
                                                            rows: gate.rows, columns: gate.columns)
        }
        return hidden
    }

    /// The gradient of `up`, returned, and of `gate`, written over `dh`.
    static func swiGLUBackward(_ dh: Tensor, gate: Tensor, up: Tensor, on gpu: CUDADevice) -> Tensor {
        let dUp = Tensor(uninitialized: gate.shape, like: dh)
        gpu.perform {
            try kernels(gate.format, on: gpu).swiGLUBackward(gate: gate.deviceBuffer, up: up.deviceBuffer, hiddenGradient: dh.deviceBuffer,
                                                             gateGradient: dh.deviceBuffer, upGradient: dUp.deviceBuffer,
                                                             rows: gate.rows, columns: gate.columns)
        }
        return dUp
    }

    /// The rows of the float32 `table` for `tokens` (checked by the caller), as `shape` in the
    /// format of the table's compute copy.
    static func embed(_ tokens: [Int32], shape: [Int], table: Tensor, on gpu: CUDADevice) -> Tensor {
        let y = Tensor(uninitialized: shape, on: .cuda(gpu), format: table.compute.format)
        gpu.perform {
            // Queued behind the work in flight (the previous step's), not waited for.
            let ids = try DeviceBuffer(context: gpu.context, byteCount: tokens.count * 4)
            try ids.enqueueUpload(tokens)
            try kernels(y.format, on: gpu).embeddingForward(tokens: ids, table: table.deviceBuffer, output: y.deviceBuffer,
                                                            rows: tokens.count, dim: table.columns, vocabulary: table.rows)
        }
        return y
    }

    /// Adds each position's `dy` row into its token's row of the float32 `tableGradient`, in
    /// position order (deterministic).
    static func embedBackward(_ dy: Tensor, tokens: [Int32], tableGradient: Tensor, on gpu: CUDADevice) {
        gpu.perform {
            let kernels = try kernels(dy.format, on: gpu)
            let plan = try kernels.embeddingGradientPlan(tokens: tokens, vocabulary: tableGradient.rows)
            try kernels.embeddingBackward(plan: plan, outputGradient: dy.deviceBuffer, weightGradient: tableGradient.deviceBuffer,
                                          dim: tableGradient.columns)
        }
    }

    /// The host's rotary table (`[positions, headDim/2]` cosines and sines) on `gpu`.
    static func rotaryTable(headDim: Int, cosines: [Float], sines: [Float], on gpu: CUDADevice) -> CUDALayerKernels.RotaryTable? {
        gpu.value { try kernels(.float32, on: gpu).rotaryTable(headDim: headDim, cosines: cosines, sines: sines) }
    }

    /// Rotates `x` `[batch, length, heads, headDim]` in place by `table`'s angles.
    static func rotate(_ x: Tensor, heads: Int, table: CUDALayerKernels.RotaryTable, startPosition: Int, inverse: Bool,
                       on gpu: CUDADevice) {
        gpu.perform {
            try kernels(x.format, on: gpu).rotate(x.deviceBuffer, table: table, batch: x.shape[0], length: x.shape[1], heads: heads,
                                                  startPosition: startPosition, inverse: inverse)
        }
    }

    /// The attention kernels for `storage`, head width and window on `gpu` (compiled once per device).
    private static func attention(_ storage: NumberFormat, headDim: Int, window: Int?, on gpu: CUDADevice) throws -> CUDAAttention {
        try gpu.kernels("attention/\(storage)/d\(headDim)/w\(window ?? 0)") {
            try CUDAAttention(context: gpu.context, storage: storage, headDim: headDim, window: window)
        }
    }

    /// cuDNN's attention for `headDim` and `window` on `gpu` (one per device, head dim, window and
    /// backward mode), or nil where cuDNN cannot be used (said once).
    private static func cudnnAttention(headDim: Int, window: Int?, deterministic: Bool, on gpu: CUDADevice) -> CUDNNAttention? {
        // The closure's type is spelled out: inferred through `try?` it would be optional, and
        // `kernels` would then read a missing entry as a stored nil and never make one.
        let key = "cudnn-attention/d\(headDim)/w\(window ?? 0)/\(deterministic ? "deterministic" : "fast")"
        let slot = try? gpu.kernels(key) { () -> CUDNNAttentionSlot in
            do {
                return CUDNNAttentionSlot(attention: try CUDNNAttention(context: gpu.context, headDim: headDim, window: window,
                                                                        deterministic: deterministic))
            } catch {
                AttentionKernelNotice.once("cuDNN is not usable (\(error)); attention runs on Phalanx's own kernel")
                return CUDNNAttentionSlot(attention: nil)
            }
        }
        return slot?.attention
    }

    /// cuDNN's attention when `AttentionKernelChoice.current` asks for it, the storage is
    /// bfloat16 and cuDNN takes `layout` (forward and backward); else nil (the reason said once).
    private static func cudnnAttention(_ storage: NumberFormat, layout: AttentionLayout, window: Int?,
                                       on gpu: CUDADevice) -> CUDNNAttention? {
        let choice = AttentionKernelChoice.current
        guard choice.usesCUDNN else {
            AttentionKernelNotice.once("\(storage) attention runs on Phalanx's own kernel (\(AttentionKernelChoice.variable)=\(choice.rawValue))")
            return nil
        }
        guard storage == .bfloat16 else {
            AttentionKernelNotice.once("\(storage) attention runs on Phalanx's own kernel (cuDNN is used for bf16 only)")
            return nil
        }
        guard let attention = cudnnAttention(headDim: layout.headDim, window: window, deterministic: choice.deterministic, on: gpu)
        else { return nil }
        if let reason = attention.unsupportedReason(layout) {
            AttentionKernelNotice.once("cuDNN does not take \(layout) window \(window.map(String.init) ?? "none") (\(reason)); "
                                       + "that shape runs on Phalanx's own kernel")
            return nil
        }
        AttentionKernelNotice.once("bf16 attention runs on cuDNN \(CUDNNAttention.loadedVersion ?? "")"
                                   + "\(choice.deterministic ? ", deterministic backward" : "") (\(AttentionKernelChoice.variable)=\(choice.rawValue))")
        return attention
    }

    /// Causal attention (with `window`) of `query`, `key`, `value` into `output` and `logsumexp`,
    /// by cuDNN or our kernel (`AttentionKernelChoice`).
    static func attention(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor, layout: AttentionLayout,
                          window: Int?, on gpu: CUDADevice) {
        gpu.perform {
            if let cudnn = cudnnAttention(query.format, layout: layout, window: window, on: gpu) {
                try cudnn.forward(query: query.deviceBuffer, key: key.deviceBuffer, value: value.deviceBuffer,
                                  output: output.deviceBuffer, logsumexp: logsumexp.deviceBuffer, shape: layout)
                return
            }
            try attention(query.format, headDim: layout.headDim, window: window, on: gpu)
                .forward(query: query.deviceBuffer, key: key.deviceBuffer, value: value.deviceBuffer, output: output.deviceBuffer,
                         logsumexp: logsumexp.deviceBuffer, shape: layout)
        }
    }

    /// The gradients of `query`, `key` and `value` (overwritten), by the kernel the forward used.
    static func attentionBackward(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logsumexp: Tensor,
                                  outputGradient: Tensor, queryGradient: Tensor, keyGradient: Tensor, valueGradient: Tensor,
                                  layout: AttentionLayout, window: Int?, on gpu: CUDADevice) {
        gpu.perform {
            if let cudnn = cudnnAttention(query.format, layout: layout, window: window, on: gpu) {
                try cudnn.backward(query: query.deviceBuffer, key: key.deviceBuffer, value: value.deviceBuffer,
                                   output: output.deviceBuffer, logsumexp: logsumexp.deviceBuffer,
                                   outputGradient: outputGradient.deviceBuffer, queryGradient: queryGradient.deviceBuffer,
                                   keyGradient: keyGradient.deviceBuffer, valueGradient: valueGradient.deviceBuffer, shape: layout)
                return
            }
            try attention(query.format, headDim: layout.headDim, window: window, on: gpu)
                .backward(query: query.deviceBuffer, key: key.deviceBuffer, value: value.deviceBuffer, output: output.deviceBuffer,
                          logsumexp: logsumexp.deviceBuffer, outputGradient: outputGradient.deviceBuffer,
                          queryGradient: queryGradient.deviceBuffer, keyGradient: keyGradient.deviceBuffer,
                          valueGradient: valueGradient.deviceBuffer, shape: layout)
        }
    }

    /// Residual dropout of `t` in place, with the CPU `Dropout`'s masks (the same hash of seed,
    /// step, micro-batch, block, branch and element, `t`'s first element being `firstElement`).
    public static func dropout(_ t: Tensor, rate: Float, seed: UInt64, step: Int, microBatch: Int, block: Int, branch: Int,
                               firstElement: Int, on gpu: CUDADevice) {
        gpu.perform {
            try kernels(t.format, on: gpu).dropout(t.deviceBuffer, count: t.count, rate: rate, seed: seed, step: step,
                                                   microBatch: microBatch, block: block, branch: branch, elementIndex: firstElement)
        }
    }

    /// The mean cross-entropy of `targets` under `logits` `[rows, V]`, whose gradient (scaled by
    /// `gradientScale / rows`) replaces them; waits for the device to read the loss.
    public static func crossEntropy(_ logits: Tensor, targets: [Int32], gradientScale: Float, on gpu: CUDADevice) -> Float {
        gpu.value {
            let kernels = try kernels(logits.format, on: gpu)
            let ids = try DeviceBuffer(context: gpu.context, byteCount: targets.count * 4)
            try ids.enqueueUpload(targets)
            let losses = try DeviceBuffer(context: gpu.context, byteCount: max(targets.count, 1) * 4)
            let mean = try DeviceBuffer(context: gpu.context, byteCount: 4)
            try kernels.crossEntropy(logits: logits.deviceBuffer, targets: ids, rowLosses: losses, rows: logits.rows,
                                     vocabulary: logits.columns, gradientScale: gradientScale)
            try kernels.meanLoss(rowLosses: losses, count: targets.count, into: mean)
            return try mean.floats()[0]
        } ?? .nan
    }

    /// `tensors` (float32 device tensors) as segments for the norm kernels.
    private static func segments(_ tensors: [Tensor]) -> [CUDALayerKernels.Segment] {
        tensors.map { CUDALayerKernels.Segment($0.deviceBuffer, count: $0.count) }
    }

    /// Writes the clip state of `gradients` (norm, scale, non-finite flag; see
    /// `CUDALayerKernels.clipState`) into `state` and returns the norm; waits for the device.
    public static func clipState(_ gradients: [Tensor], maxNorm: Float, into state: DeviceBuffer, on gpu: CUDADevice) -> Float {
        gpu.value {
            try kernels(.float32, on: gpu).clipState(gradients: segments(gradients), maxNorm: maxNorm, into: state)
            return try CUDALayerKernels.readClipState(state).norm
        } ?? .nan
    }

    /// Whether every number of `tensors` (float32 device tensors) is finite; waits for the device.
    public static func allFinite(_ tensors: [Tensor], on gpu: CUDADevice) -> Bool {
        gpu.value {
            let state = try DeviceBuffer(context: gpu.context, byteCount: CUDALayerKernels.clipStateBytes)
            try kernels(.float32, on: gpu).clipState(gradients: segments(tensors), maxNorm: 0, into: state)
            return try !CUDALayerKernels.readClipState(state).nonFinite
        } ?? false
    }

    /// One AdamW update of `p` (see `CUDALayerKernels.adamW`), its gradient scaled by the clip
    /// `state`, its bfloat16 compute copy refreshed when it has one.
    public static func adamW(_ p: Parameter, firstMoment: Tensor, secondMoment: Tensor, clipState state: DeviceBuffer,
                             learningRate: Float, step: Int, beta1: Float, beta2: Float, epsilon: Float, decay: Float,
                             on gpu: CUDADevice) {
        gpu.perform {
            let copy = p.value.compute
            try kernels(.float32, on: gpu).adamW(
                weights: p.value.deviceBuffer, gradients: p.gradient.deviceBuffer, firstMoments: firstMoment.deviceBuffer,
                secondMoments: secondMoment.deviceBuffer, count: p.value.count,
                bfloat16Copy: copy === p.value ? nil : copy.deviceBuffer, clipState: state, learningRate: learningRate,
                step: step, beta1: beta1, beta2: beta2, epsilon: epsilon, decay: decay)
        }
    }
}
