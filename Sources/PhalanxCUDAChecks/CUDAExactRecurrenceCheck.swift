import Foundation
import PhalanxCUDA
import PhalanxRuntime
import SWR

/// The comparisons of `CUDAExactRecurrence` with the CPU `ExactRecurrence`: the tests run them, and
/// so does `phalanx bench cuda --check`. Gates and inputs as `CUDAJaggedWindowCheck` draws them;
/// output, input gradient and gate gradient compared by `CUDAJaggedWindowCheck.relativeError`.
public enum CUDAExactRecurrenceCheck {
    /// One comparison: a uniform batch of heads of 16 channels, its storage and its gate regime.
    public struct Case: Sendable, CustomStringConvertible {
        /// How the device buffers store numbers.
        public var storage: NumberFormat
        /// Sequences, positions per sequence, and heads.
        public var batch: Int, length: Int, heads: Int
        /// How the gates are drawn.
        public var gates: CUDAJaggedWindowCheck.Gates

        /// A case of `batch` sequences of `length` positions with `heads` heads.
        public init(storage: NumberFormat, batch: Int = 2, length: Int, heads: Int = 3,
                    gates: CUDAJaggedWindowCheck.Gates = .random) {
            (self.storage, self.batch, self.length, self.heads, self.gates) = (storage, batch, length, heads, gates)
        }

        /// `exact`, storage, shape and gate regime, for the report.
        public var description: String { "exact \(storage) B=\(batch) L=\(length) H=\(heads) gates \(gates)" }
    }

    /// float32: 1e-5 relative to the tensor's scale (the decomposition reassociates the products of
    /// gates, within a few float32 roundings). bfloat16: 2^-7, as the jagged window.
    public static func tolerance(_ storage: NumberFormat) -> Double {
        CUDAJaggedWindowCheck.tolerance(storage)
    }

    /// Ragged lengths (1, 15, 16, 17, 100, 1000, 5000: up to 313 blocks in the carrier scan) in
    /// every gate regime and both storages, and 128 heads at 4096 positions.
    public static var standardCases: [Case] {
        NumberFormat.allCases.flatMap { storage in
            [1, 15, 16, 17, 100, 1000, 5000].flatMap { length in
                CUDAJaggedWindowCheck.Gates.allCases.map { Case(storage: storage, length: length, gates: $0) }
            } + [Case(storage: storage, batch: 1, length: 4096, heads: 128)]
        }
    }

    /// Runs one case on `context` and on the CPU.
    public static func run(_ testCase: Case, context: CUDAContext) throws -> CUDAJaggedWindowCheck.Outcome {
        let storage = testCase.storage
        let gpu = try CUDAExactRecurrence(context: context, storage: storage)
        let layout = SequenceLayout.batched(batch: testCase.batch, length: testCase.length, heads: testCase.heads, headDim: 16)
        let regime = CUDAJaggedWindowCheck.Gates.allCases.firstIndex(of: testCase.gates)!
        var rng = SeededGenerator(seed: UInt64(testCase.length * 917 + testCase.heads * 13 + regime))
        let (gates, inputs, outputGradient) = CUDAJaggedWindowCheck.operands(layout, gates: testCase.gates, storage: storage,
                                                                            rng: &rng)

        let a = try storage.upload(gates, context: context), u = try storage.upload(inputs, context: context)
        let dy = try storage.upload(outputGradient, context: context)
        let bytes = layout.elementCount * storage.byteCount
        let y = try DeviceBuffer(context: context, byteCount: bytes), du = try DeviceBuffer(context: context, byteCount: bytes)
        let da = try DeviceBuffer(context: context, byteCount: layout.gateCount * storage.byteCount)
        try gpu.forward(gates: a, inputs: u, output: y, layout: layout)
        try gpu.backward(gates: a, outputs: y, outputGradient: dy, inputGradient: du, gateGradient: da, layout: layout)
        let output = try storage.download(y, count: layout.elementCount)

        let cpu = ExactRecurrence()
        var expected = [Float](repeating: 0, count: layout.elementCount)
        var state = ExactState(sequences: testCase.batch, heads: testCase.heads, headDim: 16)
        gates.withUnsafeBufferPointer { a in
            inputs.withUnsafeBufferPointer { u in
                expected.withUnsafeMutableBufferPointer { cpu.forward(gates: a, inputs: u, output: $0, layout: layout, state: &state) }
            }
        }
        // The backward reads the forward output as stored (rounded once in bfloat16), on both sides.
        let storedOutput = storage.rounded(expected)
        var expectedInputGradient = [Float](repeating: 0, count: layout.elementCount)
        var expectedGateGradient = [Float](repeating: 0, count: layout.gateCount)
        gates.withUnsafeBufferPointer { a in
            storedOutput.withUnsafeBufferPointer { x in
                outputGradient.withUnsafeBufferPointer { dx in
                    expectedInputGradient.withUnsafeMutableBufferPointer { du in
                        expectedGateGradient.withUnsafeMutableBufferPointer { da in
                            _ = cpu.backward(gates: a, outputs: x, outputGradient: dx, layout: layout,
                                             initialState: ExactState(sequences: testCase.batch, heads: testCase.heads, headDim: 16),
                                             inputGradient: du, gateGradient: da)
                        }
                    }
                }
            }
        }
        return CUDAJaggedWindowCheck.Outcome(
            label: testCase.description,
            outputError: CUDAJaggedWindowCheck.relativeError(output, expected),
            inputGradientError: CUDAJaggedWindowCheck.relativeError(try storage.download(du, count: layout.elementCount),
                                                                    expectedInputGradient),
            gateGradientError: CUDAJaggedWindowCheck.relativeError(try storage.download(da, count: layout.gateCount),
                                                                   expectedGateGradient),
            tolerance: tolerance(storage))
    }
}
