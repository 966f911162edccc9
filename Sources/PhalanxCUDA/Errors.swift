/// CUDA cannot be used here: the driver or NVRTC library is missing, lacks an entry point, or
/// finds no device. Thrown when loading, never later; `reason` says which and how to fix it.
public struct CUDAUnavailable: Error, CustomStringConvertible {
    /// What is missing and how to fix it.
    public let reason: String

    /// The error with its explanation.
    public init(_ reason: String) { self.reason = reason }

    /// `CUDA unavailable: ` and the reason.
    public var description: String { "CUDA unavailable: \(reason)" }
}

/// A CUDA driver call returned an error: names the call and CUDA's own name and text for the code.
public struct CUDAError: Error, CustomStringConvertible {
    /// The driver entry point, with what it was doing (`cuMemAlloc_v2(268435456 bytes)`).
    public let call: String
    /// The `CUresult` code.
    public let code: Int32
    /// CUDA's name for the code (`CUDA_ERROR_OUT_OF_MEMORY`).
    public let name: String
    /// CUDA's description of the code (`out of memory`).
    public let message: String

    /// The call, CUDA's name and code for the error, and its text.
    public var description: String { "\(call) failed: \(name) (\(code)): \(message)" }
}

/// An NVRTC call failed; for a compilation, `log` holds the compiler's messages.
public struct NVRTCError: Error, CustomStringConvertible {
    /// The NVRTC entry point, with the file (and options) where it has one
    /// (`nvrtcCompileProgram(jagged_window.cu, ...)`).
    public let call: String
    /// The `nvrtcResult` code.
    public let code: Int32
    /// NVRTC's description of the code (`nvrtcGetErrorString`).
    public let message: String
    /// The compiler's log; empty unless a compilation failed.
    public let log: String

    /// The call, the message and code, then the log on lines of its own.
    public var description: String {
        "\(call) failed: \(message) (\(code))" + (log.isEmpty ? "" : "\n\(log)")
    }
}
