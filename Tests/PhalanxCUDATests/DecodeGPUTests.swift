import PhalanxCUDA
import PhalanxCUDAChecks
import Testing

/// Decoding on the GPU: the decode kernels compile without a GPU; on a GPU, decoding equals the
/// device's parallel forward, CPU decoding, and each ragged prompt decoded alone (skipped, with
/// the reason, where NVRTC or a CUDA device is missing).
@Suite("Decoding on a CUDA device")
struct DecodeGPUTests {
    @Test("phalanx_decode.cu and attention_decode.cu compile with NVRTC for Hopper and Ampere (no GPU needed)",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func compiles() throws {
        let nvrtc = try NVRTC.shared.get()
        let phalanx = try ["jagged_window", "phalanx_layer", "phalanx_decode"].map { try KernelSources.source(named: $0) }
            .joined(separator: "\n")
        let attention = try KernelSources.source(named: "attention_decode")
        for architecture in ["sm_90", "sm_80"] {
            let options = ["--gpu-architecture=\(architecture)", "-std=c++17"]
            for blockLength in CUDAPhalanxKernels.blockLengths {
                let compiled = try nvrtc.compile(source: phalanx, name: "phalanx_decode.cu",
                                                 options: options + KernelSources.definitions(blockLength: blockLength))
                #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(architecture) l=\(blockLength)")
            }
            for headDim in CUDADecodeAttention.headDims {
                let compiled = try nvrtc.compile(source: attention, name: "attention_decode.cu", options: options + ["-DATTN_HEAD_DIM=\(headDim)"])
                #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(architecture) D=\(headDim)")
            }
        }
    }

    @Test("decoding after prompts of 0, 1, 15, 16, 17, 40, 48, 100 equals the parallel forward and the CPU; ragged prompts batched equal each alone; the Phalanx state's size is constant",
          .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")),
          arguments: CUDADecodeCheck.standardCases)
    func decodeMatches(_ testCase: CUDADecodeCheck.Case) throws {
        let outcome = try CUDADecodeCheck.run(testCase, device: try CUDADevice.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }
}
