import PhalanxCUDA
import PhalanxCUDAChecks
import Testing

/// The whole model on the GPU against the CPU: skipped, with the reason, where no CUDA device is.
@Suite("The language model trains on a CUDA device as on the CPU",
       .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")))
struct ModelGPUTests {
    @Test("loss, every parameter gradient and every weight after AdamW: all mixers, dropout, untied head, f32 and bf16",
          arguments: CUDAModelCheck.standardCases)
    func modelMatchesCPU(_ testCase: CUDAModelCheck.Case) throws {
        let outcome = try CUDAModelCheck.run(testCase, device: try CUDADevice.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }
}
