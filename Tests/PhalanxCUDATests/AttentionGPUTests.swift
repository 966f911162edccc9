import Foundation
import PhalanxCUDA
import PhalanxCUDAChecks
import Testing

/// The attention kernels: they compile with NVRTC at every head dim without a GPU (and without any
/// include path), and on a GPU they equal the CPU `AttentionKernel` and repeat bit for bit;
/// skipped, with the reason, where NVRTC or a CUDA device is missing.
@Suite("CUDA attention")
struct AttentionGPUTests {
    @Test("attention.cu ships with its entry points and includes nothing")
    func source() throws {
        let source = try KernelSources.source(named: "attention")
        #expect(KernelSources.names.contains("attention"))
        #expect(!source.split(separator: "\n").contains { $0.trimmingCharacters(in: .whitespaces).hasPrefix("#include") })
        for kernel in ["attn_forward", "attn_dot", "attn_dkdv", "attn_dq"] {
            for type in ["f32", "bf16"] { #expect(source.contains("\(kernel)_\(type)("), "\(kernel)_\(type)") }
        }
    }

    @Test("attention.cu compiles with NVRTC for Hopper and Ampere at every head dim, without an include path (no GPU needed)",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func compiles() throws {
        let nvrtc = try NVRTC.shared.get()
        let source = try KernelSources.source(named: "attention")
        for architecture in ["sm_90", "sm_80"] {
            for headDim in CUDAAttention.headDims {
                let compiled = try nvrtc.compile(source: source, name: "attention.cu",
                                                 options: ["--gpu-architecture=\(architecture)", "-std=c++17",
                                                           "-DATTN_HEAD_DIM=\(headDim)"])
                #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(architecture) D=\(headDim)")
            }
        }
        #expect(throws: NVRTCError.self, "no head dim") {
            _ = try nvrtc.compile(source: source, name: "attention.cu", options: ["--gpu-architecture=sm_90", "-std=c++17"])
        }
        #expect(throws: NVRTCError.self, "head dim 24") {
            _ = try nvrtc.compile(source: source, name: "attention.cu",
                                  options: ["--gpu-architecture=sm_90", "-std=c++17", "-DATTN_HEAD_DIM=24"])
        }
    }

    @Test("output, lse, dq, dk, dv equal the CPU: ragged lengths, windows that cut tiles, kv groups, head dims, f32 and bf16",
          .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")),
          arguments: CUDAAttentionCheck.standardCases)
    func matchesCPU(_ testCase: CUDAAttentionCheck.Case) throws {
        let outcome = try CUDAAttentionCheck.run(testCase, context: try CUDAContext.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }

    @Test("two runs give bit-identical outputs and gradients",
          .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")),
          arguments: CUDAAttentionCheck.determinismCases)
    func deterministic(_ testCase: CUDAAttentionCheck.Case) throws {
        #expect(try CUDAAttentionCheck.isDeterministic(testCase, context: try CUDAContext.shared.get()))
    }
}
