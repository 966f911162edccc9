import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime

/// Decoding on a GPU: a model on the device, prefilled with a prompt in one call and then decoded
/// one token at a time, against (1) the device's own parallel forward over the same tokens, at
/// prompt lengths 0, 1, 15, 16, 17, 40, 48, 100 (around the Phalanx block of 16, a window of 7
/// that cuts blocks); (2) the same decoding on the CPU; (3) prompts of different lengths
/// prefilled alone in chunks of 7 (mid-block chunks continuing a state), stacked and decoded
/// together, against each decoded alone. Models of one mixer each (P, S, A) and of all three;
/// a long case (prompt 1030, window 300) crosses a cache page (1024 positions) and the attention's splits (256).
///
/// Also asserted: the Phalanx state's device size is the same after 0 and after every prompt
/// (`(2 * 16 + 1) * heads * 4` bytes per sequence and layer).
///
/// Errors are relative to the largest logit (`CUDAJaggedWindowCheck.relativeError`); tolerances
/// as the model check's (`CUDAModelCheck.tolerance`): the same float32 operations in other
/// summation orders (matrix products of 2 rows against 240), and in bfloat16 the activations'
/// rounding at every layer boundary.
public enum CUDADecodeCheck {
    /// One comparison.
    public struct Case: Sendable, CustomStringConvertible {
        /// The GPU model's compute format.
        public var compute: NumberFormat
        /// Layer pattern (one block per letter), positions per sequence, sliding window, prompt lengths.
        public var pattern: String, length: Int, window: Int, prompts: [Int]
        /// Model width and attention heads (their head dim is `dim / attentionHeads`, with half as
        /// many key/value heads).
        public var dim: Int, attentionHeads: Int

        /// A case; the defaults are the standard prompt lengths and attention heads of 16 channels.
        public init(compute: NumberFormat, pattern: String, length: Int = 110, window: Int = 7,
                    prompts: [Int] = CUDADecodeCheck.promptLengths, dim: Int = 64, attentionHeads: Int = 4) {
            (self.compute, self.pattern, self.length, self.window, self.prompts) = (compute, pattern, length, window, prompts)
            (self.dim, self.attentionHeads) = (dim, attentionHeads)
        }

        /// Format, pattern, length, window, attention head dim.
        public var description: String {
            "decode \(compute) \(pattern) L=\(length) window \(window) D=\(dim / attentionHeads)"
        }

        /// `dim` (Phalanx heads of 16, half as many kv heads), the attention heads with half as many
        /// kv heads, SwiGLU 1.5 dim, byte vocabulary.
        var configuration: ModelConfiguration {
            ModelConfiguration(dim: dim, depth: pattern.count, pattern: pattern, attentionHeads: attentionHeads,
                               attentionKVHeads: attentionHeads / 2, window: window, mlpHidden: dim * 3 / 2,
                               phalanxKVHeads: dim / PhalanxLayer.headDim / 2)
        }
    }

    /// The prompt lengths of the issue: around the block of 16 and past several blocks.
    public static let promptLengths = [0, 1, 15, 16, 17, 40, 48, 100]

    /// Each mixer alone and all three, in both formats, and the long cases: one crossing a page,
    /// and the attention kernels' wider rows (head dims 64 and 128, read by 8 or 16 lanes a row in
    /// bfloat16) with prompts that end inside a tile of 32 and inside a split of 256.
    public static var standardCases: [Case] {
        NumberFormat.allCases.flatMap { compute in
            ["P", "S", "A", "PSA"].map { Case(compute: compute, pattern: $0) }
                + [Case(compute: compute, pattern: "SA", length: 1100, window: 300, prompts: [1030]),
                   Case(compute: compute, pattern: "SA", length: 560, window: 300, prompts: [0, 17, 515], dim: 256, attentionHeads: 2),
                   Case(compute: compute, pattern: "A", length: 300, window: 7, prompts: [1, 270], dim: 256, attentionHeads: 4)]
        }
    }

    /// The measured errors of one case.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The case that was run.
        public let testCase: Case
        /// Each comparison, named, with its error.
        public let errors: [(name: String, error: Double)]
        /// The largest error that passes.
        public let tolerance: Double
        /// Problems that are not errors of numbers (a state whose size changed).
        public let violations: [String]

        /// Whether every error is within `tolerance` and nothing else went wrong.
        public var passed: Bool { violations.isEmpty && errors.allSatisfy { $0.error <= tolerance } }

        /// `PASS` or `FAIL`, the case, the worst comparison, and every one beyond the tolerance.
        public var description: String {
            let worst = errors.max { $0.error < $1.error }!
            let beyond = errors.filter { $0.error > tolerance }.map { String(format: "%@ %.1e", $0.name, $0.error) } + violations
            return String(format: "%@ %@: %d comparisons, worst %@ %.1e (tolerance %.0e)", passed ? "PASS" : "FAIL", "\(testCase)",
                          errors.count, worst.name, worst.error, tolerance)
                + (beyond.isEmpty ? "" : "; failing: " + beyond.joined(separator: ", "))
        }
    }

    /// Runs one case on `device` and on the CPU.
    public static func run(_ testCase: Case, device: CUDADevice) throws -> Outcome {
        let configuration = testCase.configuration
        let cpu = try LanguageModel(configuration, seed: 7), gpu = try LanguageModel(configuration, seed: 7)
        if testCase.compute == .bfloat16 {
            // The CPU model starts from the weights the GPU's products read.
            for model in [cpu, gpu] {
                for p in model.parameters where p.value.shape.count == 2 { p.value.write(NumberFormat.bfloat16.rounded(p.value.array)) }
            }
        }
        gpu.move(to: .cuda(device), compute: testCase.compute)
        let (batch, total, V) = (2, testCase.length, configuration.vocabulary)
        var rng = SeededGenerator(seed: 5)
        let tokens = (0..<(batch * total)).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) }
        let full = gpu.forward(tokens: tokens, batch: batch, length: total).logits.array
        try device.checkFailure()

        var errors: [(String, Double)] = [], violations: [String] = []
        let emptyStateBytes = gpu.makeDecodeState(batch: batch).byteCount(of: .phalanx)
        for prompt in testCase.prompts {
            let decoded = decode(gpu, tokens: tokens, batch: batch, total: total, prompt: prompt) { state in
                if state.byteCount(of: .phalanx) != emptyStateBytes {
                    violations.append("Phalanx state \(state.byteCount(of: .phalanx)) bytes after \(prompt) positions, \(emptyStateBytes) empty")
                }
            }
            try device.checkFailure()
            errors.append(("prompt \(prompt) vs parallel", CUDAJaggedWindowCheck.relativeError(decoded, full)))
        }
        let prompt = testCase.prompts[testCase.prompts.count / 2]
        let onDevice = decode(gpu, tokens: tokens, batch: batch, total: total, prompt: prompt) { _ in }
        let onCPU = decode(cpu, tokens: tokens, batch: batch, total: total, prompt: prompt) { _ in }
        try device.checkFailure()
        errors.append(("prompt \(prompt) vs CPU decoding", CUDAJaggedWindowCheck.relativeError(onDevice, onCPU)))
        let phalanxBlocks = configuration.pattern.filter { $0 == "P" }.count
        let expectedBytes = (2 * PhalanxLayer.headDim + 1) * (configuration.dim / PhalanxLayer.headDim) * 4 * batch * phalanxBlocks
        if emptyStateBytes != expectedBytes {
            violations.append("Phalanx state \(emptyStateBytes) bytes, expected \(expectedBytes)")
        }
        errors.append(contentsOf: try ragged(gpu, vocabulary: V, device: device))
        return Outcome(testCase: testCase, errors: errors, tolerance: CUDAModelCheck.tolerance(testCase.compute), violations: violations)
    }

    /// The logits `[batch * total, V]` (sequence-major, as the parallel forward's) of `prompt`
    /// positions in one call, then one-token steps up to `total`; `inspect` sees the state after
    /// the prompt.
    static func decode(_ model: LanguageModel, tokens: [Int32], batch: Int, total: Int, prompt: Int,
                       inspect: (LanguageModel.DecodeState) -> Void) -> [Float] {
        let V = model.configuration.vocabulary
        var state = model.makeDecodeState(batch: batch)
        var pieces: [(range: Range<Int>, logits: [Float])] = []
        func rows(_ range: Range<Int>) -> [Int32] { (0..<batch).flatMap { b in tokens[(b * total + range.lowerBound)..<(b * total + range.upperBound)] } }
        if prompt > 0 { pieces.append((0..<prompt, model.infer(tokens: rows(0..<prompt), length: prompt, state: &state).array)) }
        inspect(state)
        for i in prompt..<total { pieces.append((i..<(i + 1), model.infer(tokens: rows(i..<(i + 1)), length: 1, state: &state).array)) }
        var out = [Float](repeating: 0, count: batch * total * V)
        for (range, logits) in pieces {
            for b in 0..<batch {
                for r in 0..<range.count {
                    let to = (b * total + range.lowerBound + r) * V, from = (b * range.count + r) * V
                    out.replaceSubrange(to..<(to + V), with: logits[from..<(from + V)])
                }
            }
        }
        return out
    }

    /// Prompts of 5, 17 and 40 tokens prefilled alone in chunks of 7, stacked, then 8 given tokens
    /// decoded together, against each prompt decoded alone: one error per prompt.
    static func ragged(_ model: LanguageModel, vocabulary V: Int, device: CUDADevice) throws -> [(String, Double)] {
        var rng = SeededGenerator(seed: 9)
        let prompts = [5, 17, 40].map { n in (0..<n).map { _ in Int32.random(in: 0..<Int32(V), using: &rng) } }
        let steps = (0..<8).map { _ in prompts.map { _ in Int32.random(in: 0..<Int32(V), using: &rng) } }
        var alone: [[Float]] = []
        for (i, prompt) in prompts.enumerated() {
            var (state, logits) = model.prefill(prompt, chunk: 7)
            for step in steps { logits += model.infer(tokens: [step[i]], length: 1, state: &state).array }
            alone.append(logits)
        }
        let prefilled = prompts.map { model.prefill($0, chunk: 7) }
        var state = LanguageModel.DecodeState.stacking(prefilled.map(\.state))
        var together = prefilled.map(\.logits)
        for step in steps {
            let logits = model.infer(tokens: step, length: 1, state: &state).array
            for i in prompts.indices { together[i] += logits[(i * V)..<((i + 1) * V)] }
        }
        try device.checkFailure()
        return prompts.indices.map { i in
            ("ragged prompt \(prompts[i].count) batched vs alone", CUDAJaggedWindowCheck.relativeError(together[i], alone[i]))
        }
    }
}
