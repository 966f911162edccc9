import Foundation

/// NVRTC, CUDA's run-time compiler (`libnvrtc.so`), loaded at run time: compiles CUDA C++ source
/// to a CUBIN for one GPU architecture. It needs no GPU, so kernels can be compiled (and checked)
/// on a machine without one.
public final class NVRTC: @unchecked Sendable {
    typealias Program = OpaquePointer
    typealias Result = Int32

    /// The library that was loaded.
    public let path: String
    /// `nvrtcVersion`: (major, minor).
    public let version: (major: Int, minor: Int)

    private let nvrtcGetErrorString: @convention(c) (Result) -> UnsafePointer<CChar>?
    private let nvrtcVersion: @convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Result
    private let nvrtcCreateProgram: @convention(c) (
        UnsafeMutablePointer<Program?>, UnsafePointer<CChar>, UnsafePointer<CChar>?, Int32,
        UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Result
    private let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<Program?>) -> Result
    private let nvrtcCompileProgram: @convention(c) (Program?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Result
    private let nvrtcGetProgramLogSize: @convention(c) (Program?, UnsafeMutablePointer<Int>) -> Result
    private let nvrtcGetProgramLog: @convention(c) (Program?, UnsafeMutablePointer<CChar>) -> Result
    private let nvrtcGetCUBINSize: @convention(c) (Program?, UnsafeMutablePointer<Int>) -> Result
    private let nvrtcGetCUBIN: @convention(c) (Program?, UnsafeMutablePointer<CChar>) -> Result

    /// NVRTC as found by `defaultCandidates`, loaded once, or why it cannot be.
    public static let shared: Swift.Result<NVRTC, CUDAUnavailable> = {
        do { return .success(try NVRTC(candidates: defaultCandidates)) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// Where NVRTC is looked for, in order: the path in `PHALANX_NVRTC` if set; `libnvrtc.so`,
    /// `libnvrtc.so.13` and `libnvrtc.so.12` on the loader's search path (`LD_LIBRARY_PATH`, ldconfig);
    /// then the same names in the toolkit's library folders (`$CUDA_HOME`, `/usr/local/cuda`).
    public static var defaultCandidates: [String] {
        let names = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
        let environment = ProcessInfo.processInfo.environment
        var candidates = environment["PHALANX_NVRTC"].map { [$0] } ?? []
        candidates += names
        for root in CUDAToolkit.roots {
            for folder in ["targets/x86_64-linux/lib", "lib64"] {
                candidates += names.map { "\(root)/\(folder)/\($0)" }
            }
        }
        return candidates
    }

    /// Opens the first of `candidates` that loads and resolves NVRTC's entry points.
    ///
    /// - Throws: `CUDAUnavailable` when none loads or an entry point is missing.
    public init(candidates: [String]) throws {
        let library = try DynamicLibrary.open(
            firstOf: candidates,
            what: "NVRTC (the CUDA toolkit's run-time compiler; set PHALANX_NVRTC to its path)")
        path = library.path
        nvrtcGetErrorString = try library.function("nvrtcGetErrorString")
        nvrtcVersion = try library.function("nvrtcVersion")
        nvrtcCreateProgram = try library.function("nvrtcCreateProgram")
        nvrtcDestroyProgram = try library.function("nvrtcDestroyProgram")
        nvrtcCompileProgram = try library.function("nvrtcCompileProgram")
        nvrtcGetProgramLogSize = try library.function("nvrtcGetProgramLogSize")
        nvrtcGetProgramLog = try library.function("nvrtcGetProgramLog")
        nvrtcGetCUBINSize = try library.function("nvrtcGetCUBINSize")
        nvrtcGetCUBIN = try library.function("nvrtcGetCUBIN")
        var major: Int32 = 0, minor: Int32 = 0
        _ = nvrtcVersion(&major, &minor)
        version = (Int(major), Int(minor))
    }

    /// The result of a compilation: the CUBIN and the compiler's log (warnings, `-Xptxas -v` output).
    public struct Compiled: Sendable {
        /// The compiled module for one architecture, ready for `cuModuleLoadData`.
        public let cubin: [UInt8]
        /// The compiler's messages, possibly empty.
        public let log: String
    }

    /// Compiles `source` to a CUBIN.
    ///
    /// - Parameters:
    ///   - name: the file name that messages refer to.
    ///   - options: NVRTC options; a CUBIN needs a real architecture, `--gpu-architecture=sm_90`.
    /// - Throws: `NVRTCError` with the compiler's log when compilation fails.
    public func compile(source: String, name: String, options: [String]) throws -> Compiled {
        var program: Program?
        try check(nvrtcCreateProgram(&program, source, name, 0, nil, nil), "nvrtcCreateProgram(\(name))")
        defer { _ = nvrtcDestroyProgram(&program) }

        let cOptions = options.map { strdup($0) }
        defer { cOptions.forEach { free($0) } }
        let compiled = cOptions.map { UnsafePointer($0) }.withUnsafeBufferPointer {
            nvrtcCompileProgram(program, Int32(options.count), $0.baseAddress)
        }
        var logSize = 0
        try check(nvrtcGetProgramLogSize(program, &logSize), "nvrtcGetProgramLogSize")
        var logBytes = [CChar](repeating: 0, count: max(logSize, 1))
        try check(nvrtcGetProgramLog(program, &logBytes), "nvrtcGetProgramLog")
        let log = String(decoding: logBytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        try check(compiled, "nvrtcCompileProgram(\(name), \(options.joined(separator: " ")))", log: log)

        var size = 0
        try check(nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize")
        var cubin = [UInt8](repeating: 0, count: size)
        try cubin.withUnsafeMutableBytes { bytes in
            try check(nvrtcGetCUBIN(program, bytes.baseAddress!.assumingMemoryBound(to: CChar.self)), "nvrtcGetCUBIN")
        }
        return Compiled(cubin: cubin, log: log)
    }

    private func check(_ code: Result, _ call: @autoclosure () -> String, log: String = "") throws {
        if code != 0 {
            let message = nvrtcGetErrorString(code).map { String(cString: $0) } ?? "NVRTC error"
            throw NVRTCError(call: call(), code: code, message: message, log: log)
        }
    }
}

/// Where the CUDA toolkit lives on this machine: headers for NVRTC's `-I`, and its libraries.
public enum CUDAToolkit {
    /// Candidate toolkit roots: `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`.
    public static var roots: [String] {
        let environment = ProcessInfo.processInfo.environment
        return [environment["CUDA_HOME"], environment["CUDA_PATH"], "/usr/local/cuda"].compactMap { $0 }
    }

    /// The first folder holding `cuda_runtime.h` under a root (`include` or
    /// `targets/x86_64-linux/include`), or nil: the kernels of this package need no header, so
    /// compilation goes on without `-I` when there is none.
    public static var includeDirectory: String? {
        for root in roots {
            for folder in ["include", "targets/x86_64-linux/include"] {
                let path = "\(root)/\(folder)"
                if FileManager.default.fileExists(atPath: "\(path)/cuda_runtime.h") { return path }
            }
        }
        return nil
    }
}
