import Foundation
import PhalanxCUDA
import PhalanxRuntime

/// Which kernel runs bfloat16 attention on the GPU, from `PHALANX_ATTENTION_KERNEL`:
///
/// - `auto` (the default) and `cudnn`: cuDNN's fused flash attention (`CUDNNAttention`) where
///   cuDNN 9 loads and takes the shape, else our kernel (`CUDAAttention`), saying why once.
///   cuDNN's backward adds dq's shares with float atomics: runs are not bit-identical.
/// - `cudnn-deterministic`: cuDNN with its deterministic backward (bit-identical runs; a
///   quadratic dP workspace, refused past 8 GiB, where our kernel takes over).
/// - `native`: always our kernel: bit-identical runs and resumes, the reference.
///
/// float32 storage always runs our kernel.
public enum AttentionKernelChoice: String, CaseIterable, Sendable {
    case auto, native, cudnn
    case cudnnDeterministic = "cudnn-deterministic"

    /// The environment variable that chooses.
    public static let variable = "PHALANX_ATTENTION_KERNEL"

    /// The choice in the environment (`auto` when unset); stops on an unknown value.
    public static let current: AttentionKernelChoice = {
        let value = ProcessInfo.processInfo.environment[variable] ?? ""
        guard !value.isEmpty else { return .auto }
        guard let choice = AttentionKernelChoice(rawValue: value) else {
            fatalError("\(variable)=\(value): expected one of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return choice
    }()

    /// Whether this choice tries cuDNN first.
    public var usesCUDNN: Bool { self != .native }

    /// Whether cuDNN's backward must be bit-reproducible.
    public var deterministic: Bool { self == .cudnnDeterministic }
}

/// Says `message` on standard error once per process: which kernel runs attention, and each
/// fallback, one line each.
enum AttentionKernelNotice {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var said: Set<String> = []

    static func once(_ message: String) {
        lock.lock()
        defer { lock.unlock() }
        guard said.insert(message).inserted else { return }
        FileHandle.standardError.write(Data("attention: \(message)\n".utf8))
    }
}

/// A device's cuDNN attention, or nil where cuDNN could not be set up (cached so that the
/// attempt and its notice happen once).
struct CUDNNAttentionSlot {
    let attention: CUDNNAttention?
}
