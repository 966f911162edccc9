import PhalanxCUDA
import PhalanxRuntime

/// Decoding the Phalanx layer on a CUDA device: the same three steps as the device forward, with
/// the recurrence continued from the state (`CUDAPhalanxDecodeKernels`):
///
///     z     = x W_in^T                              cuBLAS
///     mixed = phalanx_step(z + bias, state)         one thread per (sequence, head, channel),
///                                                   the chunk's rows in order
///           | phalanx_forward(z + bias)             a prefill from empty sequences: the parallel
///             + phalanx_state_after_forward           forward kernel, then the state it ends in
///     y     = mixed W_out^T                         cuBLAS
extension PhalanxLayer {
    /// Continues every sequence of the device `state` by the positions of `x` `[batch, n, dim]`
    /// (queued; failures are recorded on the device).
    func infer(_ x: Tensor, state: inout PhalanxState, on gpu: CUDADevice) -> Tensor {
        let dim = configuration.dim, H = configuration.heads, D = PhalanxLayer.headDim
        require(x.shape.count == 3 && x.shape[2] == dim, "PhalanxLayer.infer: input must be [batch, length, \(dim)], got \(x.shape)")
        require(configuration.blocksSeen == 2, "PhalanxLayer.infer: the GPU kernels compute the jagged window k = 2, the layer has k = \(configuration.blocksSeen)")
        guard case .device(let local, let gateProduct, let carrier) = state.storage, local.device.isSame(as: x.device) else {
            fatalError("PhalanxLayer.infer: x is on \(x.device), the state is not (make it with makeState after moving the layer)")
        }
        x.requireSameDevice("PhalanxLayer.infer", inputWeight.value)
        let (batch, n) = (x.shape[0], x.shape[1]), rows = batch * n
        let y = Tensor(uninitialized: [batch, n, dim], like: x)
        guard rows > 0 else { return y }
        let z = Tensor(uninitialized: [rows, columns.stride], like: x)
        gpu.perform { try multiply(.z, rows: rows, x, into: z) }
        let mixed: Tensor
        let l = configuration.blockLength
        if n > 1 && state.positions.allSatisfy({ $0 == 0 }) {
            let (forwardMixed, carriers) = forwardKernel(z, batch: batch, length: n, on: gpu)
            mixed = forwardMixed
            gpu.perform {
                try CUDAPhalanxDecodeKernels.on(gpu, storage: z.format, blockLength: l).stateAfterForward(
                    z: z.deviceBuffer, bias: inputBias.value.deviceBuffer, carriers: carriers.deviceBuffer, local: local.deviceBuffer,
                    gate: gateProduct.deviceBuffer, carrier: carrier.deviceBuffer, batch: batch, n: n, shape: kernelShape)
            }
        } else {
            mixed = Tensor(uninitialized: [rows, H * D], like: x)
            let offsets = state.positions.map { Int32($0 % l) }
            gpu.perform {
                let offsetBuffer = try DeviceBuffer(context: gpu.context, byteCount: batch * 4)
                try offsetBuffer.enqueueUpload(offsets)
                try CUDAPhalanxDecodeKernels.on(gpu, storage: z.format, blockLength: l).step(
                    z: z.deviceBuffer, bias: inputBias.value.deviceBuffer, mixed: mixed.deviceBuffer, local: local.deviceBuffer,
                    gate: gateProduct.deviceBuffer, carrier: carrier.deviceBuffer, offsets: offsetBuffer, batch: batch, n: n,
                    shape: kernelShape)
            }
        }
        state.positions = state.positions.map { $0 + n }
        gpu.perform { try multiply(.y, rows: rows, mixed, into: y) }
        return y
    }
}
