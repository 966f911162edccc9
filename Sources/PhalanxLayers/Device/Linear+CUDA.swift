import PhalanxCUDA
import PhalanxRuntime

/// `Linear` on a CUDA device: the same products on cuBLAS, reading the weight's compute copy and
/// adding into its float32 gradient. Layers without bias only (every matrix of the models here);
/// a bias stops with a message naming the layer.
extension Linear {
    /// `y = x W^T` (queued).
    func forward(_ x: Tensor, into y: Tensor, on gpu: CUDADevice) {
        requireDeviceForm(x)
        gpu.perform {
            try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(x, rows: x.rows, columns: inputs),
                                      DeviceMatrix.of(weight.value.compute), transposeB: true,
                                      into: DeviceMatrix.of(y, rows: x.rows, columns: outputs))
        }
    }

    /// `dW += dy^T x`, then `dx = dy W` (or `dx += dy W`), queued.
    func backward(_ dy: Tensor, input x: Tensor, inputGradient dx: Tensor?, accumulate: Bool, on gpu: CUDADevice) {
        requireDeviceForm(x, dy)
        gpu.perform {
            let rows = x.rows
            try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(dy, rows: rows, columns: outputs), transposeA: true,
                                      DeviceMatrix.of(x, rows: rows, columns: inputs), into: DeviceMatrix.of(weight.gradient), beta: 1)
            if let dx {
                try DeviceMatrix.multiply(on: gpu, DeviceMatrix.of(dy, rows: rows, columns: outputs), DeviceMatrix.of(weight.value.compute),
                                          into: DeviceMatrix.of(dx, rows: rows, columns: inputs), beta: accumulate ? 1 : 0)
            }
        }
    }

    private func requireDeviceForm(_ tensors: Tensor...) {
        require(bias == nil, "Linear \(weight.name): a bias has no GPU implementation (the models here use none)")
        for t in tensors { t.requireSameDevice("Linear \(weight.name)", weight.value) }
    }
}
