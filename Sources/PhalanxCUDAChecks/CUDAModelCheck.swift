import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTraining

/// The whole language model on a GPU against the same model on the CPU: one training step of a
/// tiny configuration holding every mixer kind (Phalanx, sliding-window and full attention with
/// grouped key/value heads and a window that cuts Phalanx blocks), on a ragged length, with and
/// without residual dropout, tied and untied head. Compared: the loss and every parameter
/// gradient by name; then the GPU's clipped AdamW update against the CPU's update of the same
/// weights and gradients (the GPU's own, copied to a CPU model), and the bfloat16 compute copies
/// against the updated masters.
///
/// Why the update is checked on the GPU's own gradients: Adam's first step moves every weight by
/// about `lr * sign(g)`, so a gradient element near zero whose last bits differ flips a whole
/// step; comparing updated weights of two runs would measure that, not the update.
///
/// Both models are built from the same seed; the GPU one moves to the device in `compute`
/// (bfloat16 mixed precision or float32). Gradient errors are relative to each element and to the
/// larger of the tensor's scale and 1e-3 of the largest gradient of the model (a gradient that is
/// zero in exact arithmetic, such as the query projection's at length 1, holds rounding noise
/// on both sides).
public enum CUDAModelCheck {
    /// One comparison.
    public struct Case: Sendable, CustomStringConvertible {
        /// The GPU model's compute format.
        public var compute: NumberFormat
        /// Layer pattern (tiled over `depth`), sequences and positions per sequence.
        public var pattern: String, batch: Int, length: Int
        /// Residual dropout rate (0: none) and whether the head is tied to the embedding.
        public var dropout: Float, tied: Bool

        /// A case; the defaults hold every mixer kind.
        public init(compute: NumberFormat, pattern: String = "PSA", batch: Int = 2, length: Int = 37, dropout: Float = 0,
                    tied: Bool = true) {
            (self.compute, self.pattern, self.batch, self.length, self.dropout, self.tied) = (compute, pattern, batch, length, dropout, tied)
        }

        /// Format, pattern, shape, dropout and head, for the report.
        public var description: String {
            "model \(compute) \(pattern) B=\(batch) L=\(length) dropout \(dropout) \(tied ? "tied" : "untied") head"
        }

        /// The model: dim 64 (4 Phalanx heads of 16, 2 kv heads), 4 attention heads of 16 with 2
        /// kv heads, window 7, SwiGLU 96, byte vocabulary.
        var configuration: ModelConfiguration {
            ModelConfiguration(dim: 64, depth: pattern.count, pattern: pattern, attentionHeads: 4, attentionKVHeads: 2,
                               window: 7, mlpHidden: 96, phalanxKVHeads: 2, tiedEmbedding: tied)
        }
    }

    /// The measured errors of one case.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The case that was run.
        public let testCase: Case
        /// The loss, every gradient, every updated weight, by name, with its error.
        public let errors: [(name: String, error: Double)]
        /// The largest error that passes.
        public let tolerance: Double

        /// Whether every error is within `tolerance`.
        public var passed: Bool { errors.allSatisfy { $0.error <= tolerance } }
        /// The tensor with the largest error.
        public var worst: (name: String, error: Double) { errors.max { $0.error < $1.error }! }

        /// `PASS` or `FAIL`, the case, the loss error, the worst tensor, and every tensor beyond the tolerance.
        public var description: String {
            let failures = errors.filter { $0.error > tolerance }.map { String(format: "%@ %.1e", $0.name, $0.error) }
            return String(format: "%@ %@: %d tensors, loss %.1e, worst %@ %.1e (tolerance %.0e)", passed ? "PASS" : "FAIL",
                          "\(testCase)", errors.count, errors[0].error, worst.name, worst.error, tolerance)
                + (failures.isEmpty ? "" : "; beyond: " + failures.joined(separator: ", "))
        }
    }

    /// float32: 1e-4 (the same operations in other summation orders, compounded through three
    /// blocks). bfloat16: 5e-2 (activations rounded to bfloat16 at every layer boundary, about
    /// 2^-9 each, compounded over the depth and both directions). The update's own error is far
    /// below either (float32 arithmetic on the same numbers; the clip norm summed in another order).
    public static func tolerance(_ compute: NumberFormat) -> Double { compute == .float32 ? 1e-4 : 5e-2 }

    /// Every mixer kind in both formats, dropout, the untied head, length 1, and length 256: a
    /// multiple of 128, the only lengths whose attention backward cuDNN before 9.16 takes, so that
    /// bf16 attention inside the model runs on cuDNN wherever it loads.
    public static var standardCases: [Case] {
        NumberFormat.allCases.flatMap { compute in
            [Case(compute: compute), Case(compute: compute, dropout: 0.1), Case(compute: compute, tied: false),
             Case(compute: compute, pattern: "AP", batch: 3, length: 1), Case(compute: compute, pattern: "SSSA", length: 100),
             Case(compute: compute, pattern: "PSA", batch: 1, length: 256)]
        }
    }

    /// Runs one case on `device` and on the CPU.
    public static func run(_ testCase: Case, device: CUDADevice) throws -> Outcome {
        let configuration = testCase.configuration
        let cpu = try LanguageModel(configuration, seed: 7), gpu = try LanguageModel(configuration, seed: 7)
        if testCase.compute == .bfloat16 {
            // The CPU model starts from the weights the GPU's products read.
            for p in cpu.parameters where p.value.shape.count == 2 { p.value.write(NumberFormat.bfloat16.rounded(p.value.array)) }
            for p in gpu.parameters where p.value.shape.count == 2 { p.value.write(NumberFormat.bfloat16.rounded(p.value.array)) }
        }
        gpu.move(to: .cuda(device), compute: testCase.compute)
        var rng = SeededGenerator(seed: 3)
        let count = testCase.batch * testCase.length
        let tokens = (0..<count).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        let targets = (0..<count).map { _ in Int32.random(in: 0..<Int32(configuration.vocabulary), using: &rng) }
        let dropout = testCase.dropout > 0 ? Dropout(rate: testCase.dropout, seed: 5, step: 2, microBatch: 1) : nil

        var losses: [Float] = []
        for model in [cpu, gpu] {
            let cache = model.forward(tokens: tokens, batch: testCase.batch, length: testCase.length, dropout: dropout)
            losses.append(model.loss(cache, targets: targets))
            model.backward(cache)
        }
        try device.checkFailure()
        var errors = [("loss", Double(abs(losses[0] - losses[1]) / max(abs(losses[0]), 1e-6)))]
        let expected = cpu.parameters.map(\.gradient.array)
        let floor = 1e-3 * Double(expected.flatMap { $0 }.lazy.map { abs($0) }.max() ?? 0)
        for (reference, parameter) in zip(expected, gpu.parameters) {
            errors.append(("d " + parameter.name,
                           CUDAAttentionCheck.relativeError(parameter.gradient.array, reference, scale: floor)))
        }

        // The update: the GPU's weights and gradients copied to a CPU model, both updated.
        let mirror = try LanguageModel(configuration, seed: 7)
        for (copy, parameter) in zip(mirror.parameters, gpu.parameters) {
            copy.value.write(parameter.value.array)
            copy.gradient.write(parameter.gradient.array)
        }
        let optimizers = [AdamW(mirror.parameters), AdamW(gpu.parameters)]
        optimizers[1].move(to: .cuda(device))
        for optimizer in optimizers {
            _ = optimizer.clipGradients(maxNorm: 0.5)
            optimizer.update(learningRate: 1e-2)
        }
        try device.checkFailure()
        for (reference, parameter) in zip(mirror.parameters, gpu.parameters) {
            errors.append((parameter.name, CUDAJaggedWindowCheck.relativeError(parameter.value.array, reference.value.array)))
            if parameter.value.compute !== parameter.value {
                errors.append((parameter.name + " (bf16 copy)", CUDAJaggedWindowCheck.relativeError(
                    parameter.value.compute.array, NumberFormat.bfloat16.rounded(reference.value.array))))
            }
        }
        return Outcome(testCase: testCase, errors: errors, tolerance: tolerance(testCase.compute))
    }
}
