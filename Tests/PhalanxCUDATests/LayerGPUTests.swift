import PhalanxCUDA
import PhalanxCUDAChecks
import PhalanxLayers
import PhalanxRuntime
import SWR
import Testing

/// The GPU Phalanx layer against the CPU `PhalanxLayer`, the GPU exact recurrence against the CPU
/// `ExactRecurrence`, and cuBLAS products against host arithmetic: skipped, with the reason, where
/// no CUDA device is.
@Suite("CUDA layer, exact recurrence and cuBLAS equal the CPU",
       .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")))
struct LayerGPUTests {
    @Test("layer output, dx and every parameter gradient: ragged lengths, extreme gates, kv groups, f32 and bf16",
          arguments: CUDAPhalanxLayerCheck.standardCases)
    func layerMatchesCPU(_ testCase: CUDAPhalanxLayerCheck.Case) throws {
        let outcome = try CUDAPhalanxLayerCheck.run(testCase, device: try CUDADevice.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }

    @Test("exact recurrence forward and gradients through the hierarchical decomposition",
          arguments: CUDAExactRecurrenceCheck.standardCases)
    func exactMatchesCPU(_ testCase: CUDAExactRecurrenceCheck.Case) throws {
        let outcome = try CUDAExactRecurrenceCheck.run(testCase, context: try CUDAContext.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }

    @Test("row-major products with transposes, strides and offsets, f32 exactly and bf16 into f32")
    func gemm() throws {
        let context = try CUDAContext.shared.get()
        let blas = try CUBLAS(context: context)
        // A [3, 2] stored with stride 4 from offset 1; B^T stored as [4, 2]; C = A B [3, 4] + C.
        let a: [Float] = [9, 1, 2, 9, 9, 3, 4, 9, 9, 5, 6, 9, 9]
        let bt: [Float] = [1, 0, 0, 1, 1, 1, 2, -1]
        let expected: [Float] = [1, 2, 3, 0, 3, 4, 7, 2, 5, 6, 11, 4].map { $0 + 1 }
        for storage in NumberFormat.allCases {
            let aBuffer = try storage.upload(a, context: context), bBuffer = try storage.upload(bt, context: context)
            let c = try DeviceBuffer(context: context, floats: [Float](repeating: 1, count: 12))
            try blas.gemm(.init(aBuffer, storage, rows: 3, columns: 2, stride: 4, offset: 1),
                          .init(bBuffer, storage, rows: 4, columns: 2), transposeB: true,
                          into: .init(c, .float32, rows: 3, columns: 4), beta: 1)
            #expect(try c.floats() == expected, "\(storage)")
        }
    }

    @Test("a freed buffer's memory serves the next buffer of its size")
    func memoryReuse() throws {
        let context = try CUDAContext.shared.get()
        let bytes = 3 * 1024 * 1024 + 17  // a size no other test allocates
        var address: UInt64 = 0
        do { address = try DeviceBuffer(context: context, byteCount: bytes).address }
        #expect(context.cachedMemoryBytes >= bytes)
        let again = try DeviceBuffer(context: context, byteCount: bytes)
        #expect(again.address == address)
    }
}
