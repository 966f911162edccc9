import PhalanxCUDA
import PhalanxRuntime
import SWR

/// The Phalanx layer on a CUDA device: the same parameters and results as the CPU pass, as three
/// steps per direction (`CUDAPhalanxKernels` holds the fused element-wise kernels):
///
///     z     = x W_in^T                      [rows, stride]  cuBLAS (columns b | c | v | a, padded)
///     mixed = phalanx_forward(z + bias)     [rows, H*D]     one kernel, carriers kept for backward
///     y     = mixed W_out^T                 [rows, dim]     cuBLAS
///
///     dmixed = dy W_out;  dW_out += dy^T mixed                cuBLAS
///     dz     = phalanx_backward(z, dmixed)                   one kernel (+ group sums when KVH < H)
///     dbias += 1^T dz                                          cuBLAS (a fixed order: no atomics)
///     dW_in += dz^T x;    dx = dz W_in                        cuBLAS
///
/// Activations are in the input's format; the products read the weights' compute copies
/// (bfloat16 in mixed precision) and add float32 gradients.
extension PhalanxLayer {
    /// The kernels' view of this layer's shape.
    var kernelShape: CUDAPhalanxKernels.Shape {
        .init(heads: configuration.heads, kvHeads: configuration.kvHeads, gateScale: configuration.gateScale,
              b: columns.b, c: columns.c, v: columns.v, a: columns.a, width: columns.width, stride: columns.stride)
    }

    /// The forward pass on `gpu` (queued; failures are recorded on the device).
    func forward(_ x: Tensor, on gpu: CUDADevice) -> (Tensor, Cache) {
        let dim = configuration.dim
        require(x.shape.count == 3 && x.shape[2] == dim, "PhalanxLayer: input must be [batch, length, \(dim)], got \(x.shape)")
        x.requireSameDevice("PhalanxLayer.forward", inputWeight.value, projOut.weight.value)
        let (batch, length) = (x.shape[0], x.shape[1]), rows = batch * length
        let z = Tensor(uninitialized: [rows, columns.stride], like: x)
        let y = Tensor(uninitialized: [batch, length, dim], like: x)
        gpu.perform { try multiply(.z, rows: rows, x, into: z) }
        let (mixed, carriers) = forwardKernel(z, batch: batch, length: length, on: gpu)
        gpu.perform { try multiply(.y, rows: rows, mixed, into: y) }
        return (y, Cache(input: x, shape: (batch, length), projections: z, mixed: mixed,
                         intermediates: .device(carriers: carriers), columns: columns))
    }

    /// The forward kernel alone (queued): `mixed` `[rows, H*D]` and the carriers from `z`
    /// `[rows, stride]` (the projections before bias); the benchmarks time it by itself.
    public func forwardKernel(_ z: Tensor, batch: Int, length: Int, on gpu: CUDADevice) -> (mixed: Tensor, carriers: Tensor) {
        let H = configuration.heads, D = PhalanxLayer.headDim, rows = batch * length
        let blocks = (length + configuration.blockLength - 1) / configuration.blockLength
        let mixed = Tensor(uninitialized: [rows, H * D], like: z)
        let carriers = Tensor(uninitialized: [batch, blocks, H, D], on: z.device, format: .float32)
        gpu.perform {
            let kernels = try CUDAPhalanxKernels.on(gpu, storage: z.format, blockLength: configuration.blockLength)
            try kernels.forward(z: z.deviceBuffer, bias: inputBias.value.deviceBuffer, mixed: mixed.deviceBuffer,
                                carriers: carriers.deviceBuffer, batch: batch, length: length, shape: kernelShape)
        }
        return (mixed, carriers)
    }

    /// The backward kernel alone (queued): `dz` `[rows, stride]` for `dmixed` `[rows, H*D]` and
    /// the forward's `cache`, adding the bias gradient; the benchmarks time it by itself.
    public func backwardKernel(_ dMixed: Tensor, cache: Cache, on gpu: CUDADevice) -> Tensor {
        guard case .device(let carriers) = cache.intermediates else { fatalError("PhalanxLayer.backwardKernel: a CPU pass's cache") }
        let (batch, length) = cache.shape
        let dz = Tensor(uninitialized: [batch * length, columns.stride], like: dMixed)
        gpu.perform {
            let kernels = try CUDAPhalanxKernels.on(gpu, storage: dMixed.format, blockLength: configuration.blockLength)
            try kernels.backward(z: cache.projections.deviceBuffer, bias: inputBias.value.deviceBuffer,
                                 dMixed: dMixed.deviceBuffer, carriers: carriers.deviceBuffer, dz: dz.deviceBuffer,
                                 biasGradient: inputBias.gradient.deviceBuffer, batch: batch, length: length, shape: kernelShape,
                                 blas: gpu.blas)
        }
        return dz
    }

    /// The backward pass on the device of `dy` (queued).
    func backwardOnDevice(_ dy: Tensor, cache: Cache) -> Tensor {
        let (batch, length) = cache.shape, rows = batch * length, dim = configuration.dim
        let width = configuration.heads * PhalanxLayer.headDim
        guard let gpu = dy.device.cuda else { fatalError("PhalanxLayer.backward: the cache is from a GPU pass, dy is on \(dy.device)") }
        let dx = Tensor(uninitialized: [batch, length, dim], like: dy)
        let dMixed = Tensor(uninitialized: [rows, width], like: dy)
        gpu.perform {
            try multiply(.dMixed, rows: rows, dy, into: dMixed)
            try multiply(.dOutputWeight, rows: rows, dy, cache.mixed)
        }
        let dz = backwardKernel(dMixed, cache: cache, on: gpu)
        gpu.perform {
            try multiply(.dInputWeight, rows: rows, dz, cache.input)
            try multiply(.dx, rows: rows, dz, into: dx)
        }
        return dx
    }

    /// Runs `product` over `rows` rows of device tensors (queued), as the pointer form does on the
    /// CPU: `a` is its row operand (`x`, `mixed`, `dy` or `dz`), `b` the second activation of the
    /// weight gradients (`mixed` for `dW_out`, `x` for `dW_in`), `out` its result (unused by the
    /// weight gradients, which add into this layer's float32 gradients). `z` and `dz` are
    /// `[rows, stride]`.
    public func multiply(_ product: Product, rows: Int, _ a: Tensor, _ b: Tensor? = nil, into out: Tensor? = nil) throws {
        guard let gpu = a.device.cuda else {
            require(product == .dOutputWeight || product == .dInputWeight ? b != nil : out != nil,
                    "PhalanxLayer.multiply(\(product.rawValue)): missing operand")
            return multiply(product, rows: rows, a.pointer, b?.pointer, into: out?.pointer)
        }
        let dim = configuration.dim, width = configuration.heads * PhalanxLayer.headDim
        let inputWeight = DeviceMatrix.of(self.inputWeight.value.compute, rows: columns.width, columns: dim)
        let outputWeight = DeviceMatrix.of(projOut.weight.value.compute, rows: dim, columns: dim)
        func rowsOf(_ t: Tensor, _ columns: Int) -> CUBLAS.Matrix { DeviceMatrix.of(t, rows: rows, columns: columns) }
        func z(_ t: Tensor) -> CUBLAS.Matrix { DeviceMatrix.of(t, rows: rows, columns: columns.width, stride: columns.stride) }
        func operand(_ t: Tensor?, _ role: String) -> Tensor {
            require(t != nil, "PhalanxLayer.multiply(\(product.rawValue)): needs \(role)")
            return t!
        }
        switch product {
        case .z: try DeviceMatrix.multiply(on: gpu, rowsOf(a, dim), inputWeight, transposeB: true, into: z(operand(out, "z")))
        case .y: try DeviceMatrix.multiply(on: gpu, rowsOf(a, width), outputWeight, transposeB: true, into: rowsOf(operand(out, "y"), dim))
        case .dMixed: try DeviceMatrix.multiply(on: gpu, rowsOf(a, dim), outputWeight, into: rowsOf(operand(out, "dmixed"), width))
        case .dOutputWeight:
            try DeviceMatrix.multiply(on: gpu, rowsOf(a, dim), transposeA: true, rowsOf(operand(b, "mixed"), width),
                                      into: DeviceMatrix.of(projOut.weight.gradient, rows: dim, columns: dim), beta: 1)
        case .dInputWeight:
            try DeviceMatrix.multiply(on: gpu, z(a), transposeA: true, rowsOf(operand(b, "x"), dim),
                                      into: DeviceMatrix.of(self.inputWeight.gradient, rows: columns.width, columns: dim), beta: 1)
        case .dx: try DeviceMatrix.multiply(on: gpu, z(a), inputWeight, into: rowsOf(operand(out, "dx"), dim))
        }
    }
}
