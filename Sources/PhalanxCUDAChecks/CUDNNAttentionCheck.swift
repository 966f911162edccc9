import Foundation
import PhalanxCUDA
import PhalanxRuntime

/// The comparisons of `CUDNNAttention` (cuDNN's fused attention, bfloat16) with the CPU
/// `AttentionKernel`, by `CUDAAttentionCheck`'s operands, reference and bfloat16 tolerance: the
/// tests run them, and so does `phalanx bench cuda --check`. A case cuDNN does not take (or every
/// case, without cuDNN) is skipped with the reason, never failed.
public enum CUDNNAttentionCheck {
    /// What one case gave.
    public enum Result: Sendable, CustomStringConvertible {
        case compared(CUDAAttentionCheck.Outcome)
        case skipped(String, reason: String)

        /// Whether the case passed or was skipped.
        public var passed: Bool {
            if case .compared(let outcome) = self { return outcome.passed }
            return true
        }

        /// The outcome's line, or `SKIP`, the case and the reason.
        public var description: String {
            switch self {
            case .compared(let outcome): "\(outcome)"
            case .skipped(let label, let reason): "SKIP \(label): \(reason)"
            }
        }
    }

    /// Lengths 1, 17, 100, 1000 (ragged against cuDNN's tiles) and 256, 1024 (multiples of 128,
    /// which cuDNN's backward before 9.16 needs), each with every window (none, 7, 64, 100), the
    /// head dim alternating 64 and 128 and the group (query heads per kv head) rotating 1, 2, 4.
    public static var standardCases: [CUDAAttentionCheck.Case] {
        let groups = [(4, 4), (4, 2), (4, 1)]
        var cases: [CUDAAttentionCheck.Case] = [], index = 0
        for length in [1, 17, 100, 1000, 256, 1024] {
            for window in [nil, 7, 64, 100] as [Int?] {
                let (heads, kvHeads) = groups[index % 3]
                cases.append(CUDAAttentionCheck.Case(storage: .bfloat16, batch: length < 1000 ? 2 : 1, length: length,
                                                     heads: heads, kvHeads: kvHeads, headDim: index % 2 == 0 ? 128 : 64,
                                                     window: window))
                index += 1
            }
        }
        return cases
    }

    /// Cases of the deterministic backward: full and windowed, grouped, both head dims.
    public static var deterministicCases: [CUDAAttentionCheck.Case] {
        [CUDAAttentionCheck.Case(storage: .bfloat16, batch: 2, length: 256, heads: 4, kvHeads: 2, headDim: 128, window: nil),
         CUDAAttentionCheck.Case(storage: .bfloat16, batch: 1, length: 1000, heads: 4, kvHeads: 1, headDim: 64, window: 100)]
    }

    /// Runs one case through cuDNN (its deterministic backward with `deterministic`) and the CPU.
    public static func run(_ testCase: CUDAAttentionCheck.Case, context: CUDAContext, deterministic: Bool = false) throws -> Result {
        let label = "cuDNN\(deterministic ? " deterministic" : "") \(testCase)"
        if let reason = CUDNNAttention.unavailableReason { return .skipped(label, reason: reason) }
        let gpu = try CUDNNAttention(context: context, headDim: testCase.headDim, window: testCase.window, deterministic: deterministic)
        if let reason = gpu.unsupportedReason(testCase.shape) { return .skipped(label, reason: reason) }
        let operands = CUDAAttentionCheck.operands(testCase)
        let (output, lse) = try gpu.forward(query: operands.query, key: operands.key, value: operands.value, shape: testCase.shape)
        let (dq, dk, dv) = try gpu.backward(query: operands.query, key: operands.key, value: operands.value, output: output,
                                            logsumexp: lse, outputGradient: operands.outputGradient, shape: testCase.shape)
        return .compared(CUDAAttentionCheck.compare(testCase, operands, device: [output, lse, dq, dk, dv], label: label))
    }

    /// Whether two runs of `testCase`'s forward and backward give bit-identical outputs, or nil
    /// (with the reason) where cuDNN does not take the case.
    public static func isDeterministic(_ testCase: CUDAAttentionCheck.Case, context: CUDAContext,
                                       deterministic: Bool) throws -> (same: Bool?, reason: String) {
        if let reason = CUDNNAttention.unavailableReason { return (nil, reason) }
        let gpu = try CUDNNAttention(context: context, headDim: testCase.headDim, window: testCase.window, deterministic: deterministic)
        if let reason = gpu.unsupportedReason(testCase.shape) { return (nil, reason) }
        let (q, k, v, dO) = CUDAAttentionCheck.operands(testCase)
        func once() throws -> [[UInt32]] {
            let (output, lse) = try gpu.forward(query: q, key: k, value: v, shape: testCase.shape)
            let (dq, dk, dv) = try gpu.backward(query: q, key: k, value: v, output: output, logsumexp: lse,
                                                outputGradient: dO, shape: testCase.shape)
            return [output, lse, dq, dk, dv].map { $0.map(\.bitPattern) }
        }
        let same = try once() == once()
        return (same, same ? "bit-identical" : "outputs differ between runs")
    }

    /// Every case (fast and deterministic backward), then determinism: one line each, passed or
    /// not. The fast backward's determinism is reported, never failed (it is not promised).
    public static func runAll(context: CUDAContext) throws -> [(line: String, passed: Bool)] {
        var lines: [(String, Bool)] = []
        if let version = CUDNNAttention.loadedVersion { lines.append(("INFO cuDNN \(version)", true)) }
        for testCase in standardCases {
            let result = try run(testCase, context: context)
            lines.append(("\(result)", result.passed))
        }
        for testCase in deterministicCases {
            let result = try run(testCase, context: context, deterministic: true)
            lines.append(("\(result)", result.passed))
        }
        let probe = CUDAAttentionCheck.determinismCases.first { $0.storage == .bfloat16 }!
        let wholeProbe = CUDAAttentionCheck.Case(storage: .bfloat16, batch: probe.batch, length: 1024, heads: probe.heads,
                                                 kvHeads: probe.kvHeads, headDim: probe.headDim, window: probe.window)
        for deterministic in [true, false] {
            let (same, reason) = try isDeterministic(wholeProbe, context: context, deterministic: deterministic)
            let mode = deterministic ? "deterministic backward" : "default backward"
            switch same {
            case nil: lines.append(("SKIP cuDNN \(mode) twice, \(wholeProbe): \(reason)", true))
            case let same?:
                let verdict = deterministic ? (same ? "PASS" : "FAIL") : "INFO"
                lines.append(("\(verdict) cuDNN \(mode) twice, \(wholeProbe): \(reason)", !deterministic || same))
            }
        }
        return lines
    }
}
