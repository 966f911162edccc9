import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime
import SWR

/// The comparisons of `PhalanxLayer` on a GPU with the same layer on the CPU, which defines it: the
/// tests run them, and so does `phalanx bench cuda --check`.
///
/// Each case builds a CPU layer from a seed (its parameters rounded to bfloat16 when the storage
/// is bfloat16) and a second one from the same seed that it moves to the GPU (bfloat16 compute
/// copies of its matrices when the storage is bfloat16), pushes the same input and output gradient through both and
/// compares the output, the input gradient and every parameter gradient by name, each by
/// `CUDAJaggedWindowCheck.relativeError` (error relative to each value and to the tensor's scale).
public enum CUDAPhalanxLayerCheck {
    /// Gate regimes, set through proj_a's bias: as initialised (gates spread around 0.5), near 1
    /// (bias +12: `1 - a / gateScale ~ 6e-6`, the longest memory) and near 0 (bias -30).
    public enum Gates: String, Sendable, CaseIterable {
        case random, nearOne, nearZero
    }

    /// One comparison: a layer's shape and storage, its gate regime, block length and kernel tuning.
    public struct Case: Sendable, CustomStringConvertible {
        /// How the GPU layer stores activations and weights.
        public var storage: NumberFormat
        /// Sequences, and positions per sequence.
        public var batch: Int, length: Int
        /// Layer width (a multiple of 16) and key/value heads.
        public var dim: Int, kvHeads: Int
        /// The layer's gate scale, in `(0, 1]`.
        public var gateScale: Float
        /// The gate regime, set through proj_a's bias.
        public var gates: Gates
        /// Positions per block, compiled into the kernels.
        public var blockLength: Int
        /// The kernel variants and chunk length.
        public var tuning: CUDAPhalanxKernels.Tuning

        /// A case of `batch` sequences of `length` positions through a layer of width `dim`.
        public init(storage: NumberFormat, batch: Int, length: Int, dim: Int = 64, kvHeads: Int = 4,
                    gateScale: Float = 1, gates: Gates = .random, blockLength: Int = JaggedWindow.standardBlockLength,
                    tuning: CUDAPhalanxKernels.Tuning = .init()) {
            (self.storage, self.batch, self.length, self.dim, self.kvHeads) = (storage, batch, length, dim, kvHeads)
            (self.gateScale, self.gates, self.blockLength, self.tuning) = (gateScale, gates, blockLength, tuning)
        }

        /// Storage, shape, gate scale and regime, `l` and tuning, for the report.
        public var description: String {
            "layer \(storage) B=\(batch) L=\(length) dim=\(dim) KVH=\(kvHeads) scale \(gateScale) gates \(gates) l=\(blockLength), \(tuning)"
        }
    }

    /// The measured errors of one case against its tolerance.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The case that was run.
        public let testCase: Case
        /// `y`, `dx`, then every parameter gradient by name, with its error.
        public let errors: [(name: String, error: Double)]
        /// The largest error that passes.
        public let tolerance: Double

        /// The tensor with the largest error, and that error.
        public var worst: (name: String, error: Double) { errors.max { $0.error < $1.error }! }
        /// Whether every error is within `tolerance`.
        public var passed: Bool { errors.allSatisfy { $0.error <= tolerance } }

        /// `PASS` or `FAIL`, the case and each tensor's error (parameters by the last two parts of their
        /// names), then the tolerance.
        public var description: String {
            let shown = errors.map { String(format: "%@ %.1e", ($0.name.split(separator: ".").suffix(2).joined(separator: ".")), $0.error) }
            return "\(passed ? "PASS" : "FAIL") \(testCase): " + shown.joined(separator: "  ")
                + String(format: "  (tolerance %.0e)", tolerance)
        }
    }

    /// float32: 1e-5 (the same operations as the CPU, in other summation orders over up to `dim`
    /// and `rows` terms; measured errors are below 1e-6). bfloat16: 2^-6: every activation and
    /// gradient tensor between the two matrix products is rounded once to bfloat16 (2^-9
    /// relative), and a handful of such roundings compound along the backward chain (measured
    /// errors are below 6e-3).
    public static func tolerance(_ storage: NumberFormat) -> Double {
        storage == .float32 ? 1e-5 : 1.0 / 64
    }

    /// Ragged lengths (1, 17, 33, 100, 300), every gate regime, gate scale 0.8, kv groups of 1, 2
    /// and 4 heads, chunks of 1 and 3 blocks (the halo paths), block length 8, 8 heads of a warp
    /// and a partial warp, and every kernel variant, in both storages.
    public static var standardCases: [Case] {
        NumberFormat.allCases.flatMap { storage in
            [
                Case(storage: storage, batch: 2, length: 100),
                Case(storage: storage, batch: 1, length: 33, kvHeads: 2, gateScale: 0.8),
                Case(storage: storage, batch: 2, length: 100, kvHeads: 1, gates: .nearOne),
                Case(storage: storage, batch: 1, length: 33, gates: .nearZero),
                Case(storage: storage, batch: 3, length: 1),
                Case(storage: storage, batch: 1, length: 17, dim: 128, kvHeads: 8, gates: .nearOne),
                Case(storage: storage, batch: 2, length: 300, dim: 48, kvHeads: 3, tuning: .init(chunkBlocks: 1)),
                Case(storage: storage, batch: 1, length: 300, dim: 128, kvHeads: 2, gateScale: 0.8, gates: .nearOne,
                     tuning: .init(chunkBlocks: 3)),
                Case(storage: storage, batch: 2, length: 100, kvHeads: 2, blockLength: 8),
                Case(storage: storage, batch: 1, length: 300, gates: .nearOne, blockLength: 8, tuning: .init(chunkBlocks: 3)),
            ] + variants.flatMap { tuning in
                [Case(storage: storage, batch: 2, length: 100, kvHeads: 2, gateScale: 0.8, tuning: tuning),
                 Case(storage: storage, batch: 1, length: 300, dim: 128, kvHeads: 8, gates: .nearOne, tuning: tuning)]
            }
        }
    }

    /// Every kernel variant (each forward one, paired with the backward ones in turn) besides the
    /// default, with a chunk of 2 blocks.
    static var variants: [CUDAPhalanxKernels.Tuning] {
        let all = CUDAPhalanxKernels.Tuning.forwardVariants.enumerated().map { index, forward in
            let backward = CUDAPhalanxKernels.Tuning.backwardVariants
            return CUDAPhalanxKernels.Tuning(forwardChannels: forward.0, forwardRows: forward.1,
                                           backwardRows: backward[index % backward.count], chunkBlocks: 2)
        }
        return all.filter { $0 != CUDAPhalanxKernels.Tuning(chunkBlocks: 2) }
    }

    /// Runs one case on `device` and on the CPU.
    public static func run(_ testCase: Case, device: CUDADevice) throws -> Outcome {
        let storage = testCase.storage
        func layer() -> (PhalanxLayer, SeededGenerator) {
            var rng = SeededGenerator(seed: UInt64(testCase.length * 131 + testCase.dim * 7 + testCase.kvHeads))
            let layer = PhalanxLayer("check", .init(dim: testCase.dim, kvHeads: testCase.kvHeads, gateScale: testCase.gateScale,
                                                    blockLength: testCase.blockLength),
                                     rng: &rng)
            for parameter in layer.parameters { parameter.value.write(storage.rounded(parameter.value.array)) }
            switch testCase.gates {
            case .random: break
            case .nearOne: layer.projABias.value.fill(12)
            case .nearZero: layer.projABias.value.fill(-30)
            }
            return (layer, rng)
        }
        var (cpu, rng) = layer()
        let gpu = layer().0
        gpu.move(to: .cuda(device), compute: storage)
        let kernels = try CUDAPhalanxKernels.on(device, storage: storage, blockLength: testCase.blockLength)
        kernels.tuning = testCase.tuning
        defer { kernels.tuning = .init() }

        let shape = [testCase.batch, testCase.length, testCase.dim], count = shape.reduce(1, *)
        let x = storage.rounded((0..<count).map { _ in Float.random(in: -1...1, using: &rng) })
        let dy = storage.rounded((0..<count).map { _ in Float.random(in: -1...1, using: &rng) })
        let (y, cache) = gpu.forward(Tensor(x, shape: shape, on: .cuda(device), format: storage))
        let dx = gpu.backward(Tensor(dy, shape: shape, on: .cuda(device), format: storage), cache: cache)
        try device.checkFailure()

        let (expected, cpuCache) = cpu.forward(Tensor(x, shape: shape))
        let expectedInputGradient = cpu.backward(Tensor(dy, shape: shape), cache: cpuCache)
        var errors = [("y", CUDAJaggedWindowCheck.relativeError(y.array, expected.array)),
                      ("dx", CUDAJaggedWindowCheck.relativeError(dx.array, expectedInputGradient.array))]
        for (reference, parameter) in zip(cpu.parameters, gpu.parameters) {
            errors.append((parameter.name, CUDAJaggedWindowCheck.relativeError(parameter.gradient.array, reference.gradient.array)))
        }
        try device.checkFailure()
        return Outcome(testCase: testCase, errors: errors, tolerance: tolerance(storage))
    }
}
