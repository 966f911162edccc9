import Foundation
import PhalanxCUDA
import PhalanxRuntime
import Testing

/// What works without a GPU: loading errors, the kernel cache key, the shipped sources, bfloat16.
@Suite("CUDA backend: loading, sources and keys (no GPU needed)")
struct RuntimeLoadingTests {
    @Test("a missing driver library is CUDAUnavailable naming the library and dlopen's reason")
    func missingDriver() {
        #expect {
            _ = try CUDADriver(libraryNames: ["libcuda-missing-for-test.so.1"])
        } throws: { error in
            guard let error = error as? CUDAUnavailable else { return false }
            let text = "\(error)"
            return text.hasPrefix("CUDA unavailable: The CUDA driver") && text.contains("libcuda-missing-for-test.so.1")
                && text.contains("cannot open shared object file")
        }
    }

    @Test("a missing NVRTC is CUDAUnavailable naming every candidate")
    func missingNVRTC() {
        #expect {
            _ = try NVRTC(candidates: ["/nonexistent/libnvrtc.so", "libnvrtc-missing.so.99"])
        } throws: { error in
            guard let error = error as? CUDAUnavailable else { return false }
            return error.reason.contains("NVRTC") && error.reason.contains("/nonexistent/libnvrtc.so")
                && error.reason.contains("libnvrtc-missing.so.99") && error.reason.contains("PHALANX_NVRTC")
        }
    }

    @Test("without a device the shared context holds the reason; with one, its architecture")
    func sharedContext() throws {
        switch CUDAContext.shared {
        case .success(let context):
            #expect(context.architecture.hasPrefix("sm_") && context.multiprocessorCount > 0)
            #expect(CUDAContext.isAvailable && CUDAContext.unavailableReason == nil)
        case .failure(let error):
            #expect(!CUDAContext.isAvailable)
            #expect(CUDAContext.unavailableReason == error.reason && !error.reason.isEmpty)
            #expect(throws: CUDAUnavailable.self) { try CUDAContext.shared.get() }
            #expect(throws: CUDAUnavailable.self) { try CUDAContext(ordinal: 0) }
        }
    }

    @Test("the kernel key is FNV-1a of source and options, per architecture")
    func kernelKey() {
        let empty = KernelKey(source: "", options: [], architecture: "sm_90")
        #expect(empty.sourceHash == 0xcbf2_9ce4_8422_2325)  // FNV-1a 64 offset basis: nothing hashed
        #expect("\(empty)" == "sm_90-cbf29ce484222325")
        #expect(KernelKey(source: "a", options: [], architecture: "sm_90").sourceHash == 0xaf63_dc4c_8601_ec8c)
        let key = KernelKey(source: "kernel", options: ["-std=c++17"], architecture: "sm_90")
        #expect(key == KernelKey(source: "kernel", options: ["-std=c++17"], architecture: "sm_90"))
        #expect(key != KernelKey(source: "kernel", options: ["-std=c++17"], architecture: "sm_80"))
        #expect(key != KernelKey(source: "kernel ", options: ["-std=c++17"], architecture: "sm_90"))
        #expect(key != KernelKey(source: "kernel", options: ["-std=c++20"], architecture: "sm_90"))
        // Option boundaries count: ["ab"] and ["a", "b"] differ.
        #expect(KernelKey(source: "", options: ["ab"], architecture: "sm_90")
                != KernelKey(source: "", options: ["a", "b"], architecture: "sm_90"))
    }

    @Test("the CUDA sources ship in the bundle with the entry points the Swift side launches")
    func sourcesInBundle() throws {
        #expect(KernelSources.names.contains("jagged_window"))
        let source = try KernelSources.source(named: "jagged_window")
        for type in ["f32", "bf16"] {
            #expect(source.contains("(swr_jagged_forward_\(type)_v4,"))
            for tuning in CUDAJaggedWindow.Tuning.variants {
                #expect(source.contains("(swr_jagged_backward_\(type)_v\(tuning.backwardChannels),"))
            }
        }
        #expect(throws: CUDAUnavailable.self) { try KernelSources.source(named: "no_such_kernel") }
        #expect(KernelSources.compileOptions(architecture: "sm_90").prefix(2) == ["--gpu-architecture=sm_90", "-std=c++17"])
    }

    @Test("the kernels compile with NVRTC for Hopper and Ampere at every block length they take (no GPU needed)",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func kernelsCompile() throws {
        let nvrtc = try NVRTC.shared.get()
        let source = try KernelSources.source(named: "jagged_window")
        for architecture in ["sm_90", "sm_80"] {
            for blockLength in [1, 5, 8, 16] {
                let compiled = try nvrtc.compile(source: source, name: "jagged_window.cu",
                                                 options: KernelSources.compileOptions(architecture: architecture)
                                                     + KernelSources.definitions(blockLength: blockLength))
                #expect(compiled.cubin.count > 1000, "\(architecture) l=\(blockLength): \(compiled.cubin.count) bytes")
                #expect(Array(compiled.cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46])  // an ELF image
            }
        }
    }

    @Test("the block length reaches the kernels only as a compile definition, and one they cannot take does not compile",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func blockLengthDefinition() throws {
        let nvrtc = try NVRTC.shared.get()
        let source = try KernelSources.source(named: "jagged_window")
        let options = KernelSources.compileOptions(architecture: "sm_90")
        #expect(KernelSources.definitions(blockLength: 8) == ["-DSWR_BLOCK_LENGTH=8", "-DSWR_HEAD_DIM=16"])
        for (label, extra) in [("no definitions", [String]()), ("block length 17", KernelSources.definitions(blockLength: 17))] {
            #expect(throws: NVRTCError.self, "\(label)") {
                _ = try nvrtc.compile(source: source, name: "jagged_window.cu", options: options + extra)
            }
        }
        #expect(KernelKey(source: source, options: options + KernelSources.definitions(blockLength: 8), architecture: "sm_90")
                != KernelKey(source: source, options: options + KernelSources.definitions(blockLength: 16), architecture: "sm_90"))
    }

    @Test("a source that does not compile is NVRTCError with the compiler's log",
          .enabled(if: NVRTCAvailable.yes, Comment(rawValue: "NVRTC not found: \(NVRTCAvailable.reason)")))
    func compileError() throws {
        let nvrtc = try NVRTC.shared.get()
        #expect {
            _ = try nvrtc.compile(source: "extern \"C\" __global__ void k() { undeclared = 1; }", name: "broken.cu",
                                  options: ["--gpu-architecture=sm_90"])
        } throws: { error in
            guard let error = error as? NVRTCError else { return false }
            return error.call.hasPrefix("nvrtcCompileProgram(broken.cu") && error.log.contains("undeclared")
        }
    }

    @Test("bfloat16 rounds to nearest even and keeps NaN and infinities")
    func bfloat16() {
        #expect(BFloat16.bits(1) == 0x3f80)
        #expect(BFloat16.float(0x3f80) == 1)
        #expect(BFloat16.float(BFloat16.bits(1 + 1.0 / 256)) == 1)                 // tie: to even (down)
        #expect(BFloat16.float(BFloat16.bits(1 + 3.0 / 256)) == 1 + 4.0 / 256)     // tie: to even (up)
        #expect(BFloat16.float(BFloat16.bits(1 + 1.0 / 256 + 1.0 / 65536)) == 1 + 1.0 / 128)  // above the tie
        #expect(BFloat16.float(BFloat16.bits(-2.5)) == -2.5)
        #expect(BFloat16.bits(.nan) == 0x7fc0)
        #expect(BFloat16.float(BFloat16.bits(.infinity)) == .infinity)
        #expect(BFloat16.float(BFloat16.bits(.greatestFiniteMagnitude)) == .infinity)  // rounds up past the largest
        let values: [Float] = [0, -0.0, 0.1, 3.14159, 1e-20, 65504]
        for value in values {
            let rounded = BFloat16.float(BFloat16.bits(value))
            #expect(abs(rounded - value) <= abs(value) / 256, "\(value) -> \(rounded)")
            #expect(BFloat16.bits(rounded) == BFloat16.bits(value))  // idempotent
        }
    }

    @Test("cuDNN's attention graphs finalize node by node (full, windowed, grouped), where cuDNN loads",
          .enabled(if: CUDNNAttention.unavailableReason == nil, "cuDNN 9 is not installed here"))
    func cudnnAttentionNodes() throws {
        for (heads, kvHeads, window) in [(4, 4, nil), (4, 2, 7), (8, 2, 100)] as [(Int, Int, Int?)] {
            let shape = AttentionLayout(batch: 2, length: 256, heads: heads, kvHeads: kvHeads, headDim: 128)
            try CUDNNAttention.validateNodes(shape: shape, window: window)
            try CUDNNAttention.validateNodes(shape: shape, window: window, deterministic: true)
        }
    }
}

/// Whether NVRTC can be loaded here (it needs no GPU).
enum NVRTCAvailable {
    static var yes: Bool { if case .success = NVRTC.shared { true } else { false } }
    static var reason: String { if case .failure(let error) = NVRTC.shared { error.reason } else { "" } }
}
