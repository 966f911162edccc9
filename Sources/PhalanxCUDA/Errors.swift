/// CUDA cannot be used here: the driver or NVRTC library is missing, lacks an entry point, or
/// finds no device. Thrown when loading, never later; `reason` says which and how to fix it.
public struct CUDAUnavailable: Error, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) { self.reason = reason }

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

    public var description: String { "\(call) failed: \(name) (\(code)): \(message)" }
}

/// An NVRTC call failed; for a compilation, `log` holds the compiler's messages.
public struct NVRTCError: Error, CustomStringConvertible {
    public let call: String
    public let code: Int32
    public let message: String
    public let log: String

    public var description: String {
        "\(call) failed: \(message) (\(code))" + (log.isEmpty ? "" : "\n\(log)")
    }
}
