import ArgumentParser
import PhalanxCUDA
import PhalanxLayers

/// `--device` and `--precision`: where a command runs its model.
struct DeviceOptions: ParsableArguments {
    @Option(help: "cpu, or cuda (GPU 0, or each rank's own GPU in data-parallel training; the driver, NVRTC and cuBLAS are loaded at run time). Checkpoints are the same on both.")
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

    /// Where the model goes; on the GPU (`ordinal`, 0 unless a data-parallel rank says otherwise),
    /// after checking that it can be used.
    func placement(ordinal: Int = 0) throws -> Placement {
        guard onGPU else { return .cpu }
        if ordinal != 0 {
            do {
                return Placement(.cuda(try CUDADevice(context: try CUDAContext(ordinal: ordinal))), compute: compute)
            } catch {
                throw ValidationError("--device cuda (GPU \(ordinal)): \(error)")
            }
        }
        switch CUDADevice.shared {
        case .success(let gpu): return Placement(.cuda(gpu), compute: compute)
        case .failure(let error): throw ValidationError("--device cuda: \(error)")
        }
    }
}
