import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime
import SWR

/// The comparisons of `CUDAJaggedWindow` with the CPU `JaggedWindow` that define it: the tests run
/// them, and so does `phalanx bench cuda --check` on a GPU machine without a Swift toolchain.
///
/// Each case draws gates and inputs (and an output gradient) from a seed, rounds them to bfloat16
/// when the storage is bfloat16, and compares output, input gradient and gate gradient with the
/// CPU operator run on the same (rounded) numbers, by the largest
/// `|gpu - cpu| / (|cpu| + max|cpu|)` (the error relative to each value and to the tensor's scale).
public enum CUDAJaggedWindowCheck {
    /// Gate regimes: random in [0, 1], all 0 (no memory), all 1 (no decay), and just below 1
    /// (`1 - 10^-x`, x in 2...7).
    public enum Gates: String, Sendable, CaseIterable {
        case random, zero, one, nearOne
    }

    /// One case's operands, drawn from `rng` in this order and rounded to `storage` as the device
    /// holds them: gates `[layout.gateCount]` in `regime`, inputs and an output gradient
    /// `[layout.elementCount]` uniform in [-1, 1].
    static func operands(_ layout: SequenceLayout, gates regime: Gates, storage: NumberFormat,
                         rng: inout SeededGenerator) -> (gates: [Float], inputs: [Float], outputGradient: [Float]) {
        let gates = storage.rounded((0..<layout.gateCount).map { _ -> Float in
            switch regime {
            case .random: Float.random(in: 0...1, using: &rng)
            case .zero: 0
            case .one: 1
            case .nearOne: Float(1 - pow(10, Double.random(in: -7 ... -2, using: &rng)))
            }
        })
        let inputs = storage.rounded((0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) })
        let outputGradient = storage.rounded((0..<layout.elementCount).map { _ in Float.random(in: -1...1, using: &rng) })
        return (gates, inputs, outputGradient)
    }

    /// One comparison: a uniform batch of heads of 16 channels, its storage, gate regime, window and
    /// kernel tuning.
    public struct Case: Sendable, CustomStringConvertible {
        /// How the device buffers store numbers.
        public var storage: NumberFormat
        /// Sequences in the batch.
        public var batch: Int
        /// Positions per sequence.
        public var length: Int
        /// Heads per position (16 channels each).
        public var heads: Int
        /// How the gates are drawn.
        public var gates: Gates
        /// The window's `k`: 1 or 2.
        public var blocksSeen: Int
        /// Positions per block, compiled into the kernels.
        public var blockLength: Int
        /// The kernel variant and work split.
        public var tuning: CUDAJaggedWindow.Tuning

        /// `tuning` defaults to `Tuning()` with `chunkBlocks`.
        public init(storage: NumberFormat, batch: Int = 2, length: Int, heads: Int = 3,
                    gates: Gates = .random, blocksSeen: Int = 2, blockLength: Int = JaggedWindow.standardBlockLength,
                    chunkBlocks: Int? = nil, tuning: CUDAJaggedWindow.Tuning? = nil) {
            (self.storage, self.batch, self.length, self.heads, self.gates) = (storage, batch, length, heads, gates)
            (self.blocksSeen, self.blockLength) = (blocksSeen, blockLength)
            self.tuning = tuning ?? CUDAJaggedWindow.Tuning()
            if let chunkBlocks { self.tuning.chunkBlocks = chunkBlocks }
        }

        /// Storage, shape, gate regime, `l`, `k` and tuning, for the report.
        public var description: String {
            "\(storage) B=\(batch) L=\(length) H=\(heads) gates \(gates) l=\(blockLength) k=\(blocksSeen), \(tuning)"
        }
    }

    /// The measured errors of one case (of this check or `CUDAExactRecurrenceCheck`) against its
    /// tolerance.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The case, described.
        public let label: String
        /// `relativeError` of the output `y`.
        public let outputError: Double
        /// `relativeError` of the input gradient `du`.
        public let inputGradientError: Double
        /// `relativeError` of the gate gradient `da`.
        public let gateGradientError: Double
        /// The largest error that passes.
        public let tolerance: Double

        /// Whether all three errors are within `tolerance`.
        public var passed: Bool {
            [outputError, inputGradientError, gateGradientError].allSatisfy { $0 <= tolerance }
        }

        /// `PASS` or `FAIL`, the case, the three errors and the tolerance, on one line.
        public var description: String {
            String(format: "%@ %@: y %.1e  du %.1e  da %.1e  (tolerance %.0e)", passed ? "PASS" : "FAIL",
                   label, outputError, inputGradientError, gateGradientError, tolerance)
        }
    }

    /// float32: 1e-5 (the kernels do the CPU's operations; only reduction order differs).
    /// bfloat16: 2^-7, two units in the last place at the tensor's scale (each result is rounded
    /// once from float32; the reference is not).
    public static func tolerance(_ storage: NumberFormat) -> Double {
        storage == .float32 ? 1e-5 : 1.0 / 128
    }

    /// Ragged lengths (1, 15, 16, 17, 100, 1000) in every gate regime and both storages; chunks of
    /// 1 and 3 blocks (every halo path); k = 1; block lengths 5 and 8; one case of 128 heads and
    /// 4096 positions (many warps and chunks); and every kernel variant (`Tuning.variants`) and
    /// block size 256 on a few of these.
    public static var standardCases: [Case] {
        var cases: [Case] = []
        for storage in NumberFormat.allCases {
            for length in [1, 15, 16, 17, 100, 1000] {
                for gates in Gates.allCases { cases.append(Case(storage: storage, length: length, gates: gates)) }
            }
            for chunk in [1, 3] {
                cases.append(Case(storage: storage, length: 1000, gates: .nearOne, chunkBlocks: chunk))
                cases.append(Case(storage: storage, length: 1000, gates: .one, chunkBlocks: chunk))
            }
            cases.append(Case(storage: storage, length: 17, blocksSeen: 1))
            // Other block lengths (compiled in): 5 and 8 positions, with chunks that cut them.
            for blockLength in [5, 8] {
                cases.append(Case(storage: storage, length: 100, blockLength: blockLength))
                cases.append(Case(storage: storage, length: 100, blocksSeen: 1, blockLength: blockLength))
                cases.append(Case(storage: storage, length: 1000, gates: .nearOne, blockLength: blockLength, chunkBlocks: 3))
            }
            cases.append(Case(storage: storage, batch: 1, length: 4096, heads: 128))
            let alternatives = CUDAJaggedWindow.Tuning.variants + [CUDAJaggedWindow.Tuning(threadsPerBlock: 256)]
            for tuning in alternatives where tuning != CUDAJaggedWindow.Tuning() {
                cases.append(Case(storage: storage, length: 17, gates: .nearOne, tuning: tuning))
                cases.append(Case(storage: storage, length: 100, blocksSeen: 1, chunkBlocks: 2, tuning: tuning))
                cases.append(Case(storage: storage, length: 1000, chunkBlocks: 3, tuning: tuning))
                cases.append(Case(storage: storage, batch: 1, length: 4096, heads: 128, tuning: tuning))
            }
        }
        return cases
    }

    /// Runs one case on `context` and on the CPU.
    public static func run(_ testCase: Case, context: CUDAContext) throws -> Outcome {
        let window = JaggedWindow(blockLength: testCase.blockLength, blocksSeen: testCase.blocksSeen)
        var gpu = try CUDAJaggedWindow(context: context, window: window, storage: testCase.storage)
        gpu.tuning = testCase.tuning
        let layout = SequenceLayout.batched(batch: testCase.batch, length: testCase.length, heads: testCase.heads, headDim: PhalanxLayer.headDim)

        let regime = Gates.allCases.firstIndex(of: testCase.gates)!
        var rng = SeededGenerator(seed: UInt64(testCase.length * 1009 + testCase.heads * 31 + regime * 7 + testCase.batch))
        let (gates, inputs, outputGradient) = operands(layout, gates: testCase.gates, storage: testCase.storage, rng: &rng)

        let output = try gpu.forward(gates: gates, inputs: inputs, layout: layout)
        let (inputGradient, gateGradient) = try gpu.backward(gates: gates, inputs: inputs, outputGradient: outputGradient,
                                                             layout: layout)

        var expectedOutput = [Float](repeating: 0, count: layout.elementCount)
        var expectedInputGradient = expectedOutput
        var expectedGateGradient = [Float](repeating: 0, count: layout.gateCount)
        var state = JaggedState(for: layout, blockLength: window.blockLength)
        gates.withUnsafeBufferPointer { a in
            inputs.withUnsafeBufferPointer { u in
                outputGradient.withUnsafeBufferPointer { dy in
                    expectedOutput.withUnsafeMutableBufferPointer { y in
                        window.forward(gates: a, inputs: u, output: y, layout: layout, state: &state)
                    }
                    expectedInputGradient.withUnsafeMutableBufferPointer { du in
                        expectedGateGradient.withUnsafeMutableBufferPointer { da in
                            _ = window.backward(gates: a, inputs: u, outputGradient: dy, layout: layout,
                                            initialState: JaggedState(for: layout, blockLength: window.blockLength), inputGradient: du, gateGradient: da)
                        }
                    }
                }
            }
        }
        return Outcome(label: testCase.description,
                       outputError: relativeError(output, expectedOutput),
                       inputGradientError: relativeError(inputGradient, expectedInputGradient),
                       gateGradientError: relativeError(gateGradient, expectedGateGradient),
                       tolerance: tolerance(testCase.storage))
    }

    /// `max |actual - expected| / (|expected| + max|expected|)`; infinite when `actual` has a
    /// non-finite value the reference does not, or the counts differ.
    public static func relativeError(_ actual: [Float], _ expected: [Float]) -> Double {
        guard actual.count == expected.count else { return .infinity }
        let scale = max(Double(expected.lazy.map { abs($0) }.max() ?? 0), 1e-30)
        var worst = 0.0
        for (a, e) in zip(actual, expected) {
            if !a.isFinite && a != e { return .infinity }
            worst = max(worst, abs(Double(a) - Double(e)) / (abs(Double(e)) + scale))
        }
        return worst
    }
}
