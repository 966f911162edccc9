import PhalanxCUDA
import PhalanxCUDAChecks
import Testing

/// The training layers' kernels (`Kernels/layers.cu`): they compile with NVRTC wherever NVRTC is
/// (no GPU needed), and on a GPU every `CUDALayerKernelsCheck` case passes.
@Suite("CUDA layer kernels: RMSNorm, RoPE, SwiGLU, embedding, dropout, cross-entropy, clip, AdamW")
struct LayerKernelsTests {
    @Test("layers.cu compiles with NVRTC for Hopper and Ampere (no GPU needed)",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func compiles() throws {
        let nvrtc = try NVRTC.shared.get()
        #expect(KernelSources.names.contains("layers"))
        let source = try KernelSources.source(named: "layers")
        for architecture in ["sm_90", "sm_80"] {
            let compiled = try nvrtc.compile(source: source, name: "layers.cu",
                                             options: KernelSources.compileOptions(architecture: architecture))
            #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(architecture): not an ELF image")
        }
    }

    @Test("every kernel against the CPU layer, both storages, ragged sizes; reductions bit-identical twice",
          .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")))
    func matchesCPU() throws {
        for outcome in try CUDALayerKernelsCheck.runAll(context: try CUDAContext.shared.get()) {
            #expect(outcome.passed, "\(outcome)")
        }
    }
}
