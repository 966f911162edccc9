import ArgumentParser
import PhalanxCUDA
import PhalanxLayers

/// `--device` and `--precision`: where a command runs its model.
struct DeviceOptions: ParsableArguments {
    @Option(help: "cpu, or cuda (GPU 0; the driver, NVRTC and cuBLAS are loaded at run time). Checkpoints are the same on both.")
    var device = "cpu"
    @Option(help: "With --device cuda: bf16 (mixed precision: bfloat16 activations and matrix products, float32 master weights, moments and sums; default) or f32 (exact mode, for checks).")
    var precision = "bf16"

    /// Whether the command runs on the GPU.
    var onGPU: Bool { device == "cuda" }
    /// The compute format of `--precision`.
    var compute: NumberFormat { NumberFormat(name: precision) ?? .bfloat16 }

    func validate() throws {
        guard ["cpu", "cuda"].contains(device) else { throw ValidationError("--device must be cpu or cuda; got \(device).") }
        guard NumberFormat(name: precision) != nil else { throw ValidationError("--precision must be bf16 or f32; got \(precision).") }
    }

    /// Where the model goes; on the GPU, after checking that one can be used.
    func placement() throws -> Placement {
        guard onGPU else { return .cpu }
        switch CUDADevice.shared {
        case .success(let gpu): return Placement(.cuda(gpu), compute: compute)
        case .failure(let error): throw ValidationError("--device cuda: \(error)")
        }
    }
}
