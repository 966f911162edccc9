import PhalanxCUDA
import PhalanxCUDAChecks
import PhalanxRuntime
import SWR
import Testing

/// The GPU operator against the CPU `JaggedWindow`: skipped, with the reason, where no CUDA device is.
@Suite("CUDA jagged window equals the CPU operator",
       .enabled(if: CUDAContext.isAvailable, Comment(rawValue: "no CUDA device: \(CUDAContext.unavailableReason ?? "")")))
struct JaggedWindowGPUTests {
    @Test("forward, input and gate gradients: ragged lengths, extreme gates, chunkings, f32 and bf16",
          arguments: CUDAJaggedWindowCheck.standardCases)
    func matchesCPU(_ testCase: CUDAJaggedWindowCheck.Case) throws {
        let outcome = try CUDAJaggedWindowCheck.run(testCase, context: try CUDAContext.shared.get())
        #expect(outcome.passed, "\(outcome)")
    }

    @Test("device buffers copy float32 and bfloat16 in and out, fill and copy on the device")
    func buffers() throws {
        let context = try CUDAContext.shared.get()
        let values: [Float] = (0..<1000).map { Float($0) * 0.5 - 7 }
        let a = try DeviceBuffer(context: context, floats: values)
        #expect(try a.floats() == values)
        let b = try DeviceBuffer(context: context, byteCount: a.byteCount)
        try b.copy(from: a)
        #expect(try b.floats(count: 10) == Array(values.prefix(10)))
        try b.fill(byte: 0)
        #expect(try b.floats().allSatisfy { $0 == 0 })
        let bits = BFloat16.bits(values)
        let c = try DeviceBuffer(context: context, bfloat16: bits)
        #expect(try c.bfloat16() == bits)
    }

    @Test("the kernel cache compiles a source once per context")
    func cache() throws {
        let context = try CUDAContext.shared.get()
        _ = try CUDAJaggedWindow(context: context, storage: .float32)
        let loaded = context.loadedModuleCount
        _ = try CUDAJaggedWindow(context: context, storage: .bfloat16)
        _ = try CUDAJaggedWindow(context: context, storage: .float32)
        #expect(context.loadedModuleCount == loaded)
    }

    @Test("events time work on the stream")
    func events() throws {
        let context = try CUDAContext.shared.get()
        let buffer = try DeviceBuffer(context: context, byteCount: 1 << 26)
        let start = try CUDAEvent(context: context), end = try CUDAEvent(context: context)
        try start.record()
        try buffer.fill(byte: 1)
        try end.record()
        let milliseconds = try start.milliseconds(to: end)
        #expect(milliseconds > 0 && milliseconds < 1000)
    }
}
