import PhalanxRuntime

/// Causal attention over device buffers with `CUDAAttention`'s semantics and layouts, whichever
/// kernels compute it (`CUDAAttention`, `CUDNNAttention`); the host-array forms below run them on
/// uploaded copies (for checks and benchmarks).
public protocol DeviceAttentionKernels {
    /// The GPU every call runs on, on its stream.
    var context: CUDAContext { get }
    /// How queries, keys, values, outputs and gradients are stored (the log-sum-exp is float32).
    var storage: NumberFormat { get }

    /// `output` and `logsumexp` of attention over `query`, `key`, `value`, queued.
    func forward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                 logsumexp: DeviceBuffer, shape: AttentionLayout) throws

    /// The gradients of the queries, keys and values for `outputGradient`, queued; overwritten.
    func backward(query: DeviceBuffer, key: DeviceBuffer, value: DeviceBuffer, output: DeviceBuffer,
                  logsumexp: DeviceBuffer, outputGradient: DeviceBuffer, queryGradient: DeviceBuffer,
                  keyGradient: DeviceBuffer, valueGradient: DeviceBuffer, shape: AttentionLayout) throws
}

extension DeviceAttentionKernels {
    /// `forward` on host arrays (float32, rounded to bfloat16 on upload when `storage` is):
    /// returns the output (as stored, widened to float32) and the log-sum-exp.
    public func forward(query: [Float], key: [Float], value: [Float], shape: AttentionLayout) throws -> (output: [Float], logsumexp: [Float]) {
        let q = try storage.upload(query, context: context), k = try storage.upload(key, context: context)
        let v = try storage.upload(value, context: context)
        let o = try DeviceBuffer(context: context, byteCount: max(shape.queryCount, 1) * storage.byteCount)
        let lse = try DeviceBuffer(context: context, byteCount: max(shape.rowCount, 1) * 4)
        try forward(query: q, key: k, value: v, output: o, logsumexp: lse, shape: shape)
        return (try storage.download(o, count: shape.queryCount), try lse.floats(count: shape.rowCount))
    }

    /// `backward` on host arrays (see the host `forward`); `output` and `logsumexp` as the host
    /// `forward` returned them.
    public func backward(query: [Float], key: [Float], value: [Float], output: [Float], logsumexp: [Float],
                         outputGradient: [Float], shape: AttentionLayout) throws
        -> (queryGradient: [Float], keyGradient: [Float], valueGradient: [Float]) {
        let q = try storage.upload(query, context: context), k = try storage.upload(key, context: context)
        let v = try storage.upload(value, context: context), o = try storage.upload(output, context: context)
        let lse = try DeviceBuffer(context: context, floats: logsumexp), dO = try storage.upload(outputGradient, context: context)
        let dq = try DeviceBuffer(context: context, byteCount: max(shape.queryCount, 1) * storage.byteCount)
        let dk = try DeviceBuffer(context: context, byteCount: max(shape.keyCount, 1) * storage.byteCount)
        let dv = try DeviceBuffer(context: context, byteCount: max(shape.keyCount, 1) * storage.byteCount)
        try backward(query: q, key: k, value: v, output: o, logsumexp: lse, outputGradient: dO, queryGradient: dq,
                     keyGradient: dk, valueGradient: dv, shape: shape)
        return (try storage.download(dq, count: shape.queryCount), try storage.download(dk, count: shape.keyCount),
                try storage.download(dv, count: shape.keyCount))
    }
}
