import Foundation
import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime

/// The comparisons of `CUDAAttention` with the CPU `AttentionKernel` that defines it: the tests run
/// them, and so does `phalanx bench cuda --check`.
///
/// Each case draws queries, keys, values and an output gradient uniform in [-2, 2] from a seed
/// (wide enough that the softmax is far from uniform), rounds them to bfloat16 when the storage
/// is bfloat16, and runs the CPU kernel on the same (rounded) numbers. The CPU backward reads the
/// GPU's output and log-sum-exp rounded as the device stores them, so both sides differentiate the
/// same forward. Errors are `|gpu - cpu| / (|cpu| + scale)` at worst, `scale` the largest `|cpu|`
/// of the tensor; for dq and dk the scale is at least dv's: their terms `P (dP - D)` cancel
/// exactly when a query sees one key (window 1, or position 0), leaving a true gradient of zero
/// and float32 rounding of the size of dv's terms.
public enum CUDAAttentionCheck {
    /// One comparison.
    public struct Case: Sendable, CustomStringConvertible {
        /// How the device buffers store numbers.
        public var storage: NumberFormat
        /// Sequences, positions per sequence, query heads, key/value heads, channels per head.
        public var batch: Int, length: Int, heads: Int, kvHeads: Int, headDim: Int
        /// Keys a query sees (nil: full causal).
        public var window: Int?

        /// A case of `batch` sequences of `length` positions.
        public init(storage: NumberFormat, batch: Int = 2, length: Int, heads: Int = 4, kvHeads: Int = 2,
                    headDim: Int, window: Int?) {
            (self.storage, self.batch, self.length, self.heads, self.kvHeads) = (storage, batch, length, heads, kvHeads)
            (self.headDim, self.window) = (headDim, window)
        }

        /// The call's shape.
        public var shape: AttentionLayout {
            AttentionLayout(batch: batch, length: length, heads: heads, kvHeads: kvHeads, headDim: headDim)
        }

        /// `attention`, storage, shape and window, for the report.
        public var description: String {
            "attention \(storage) B=\(batch) L=\(length) H=\(heads)/\(kvHeads) D=\(headDim) window \(window.map(String.init) ?? "none")"
        }
    }

    /// The measured errors of one case against its tolerance.
    public struct Outcome: Sendable, CustomStringConvertible {
        /// The case, described.
        public let label: String
        /// Errors of the output, log-sum-exp, dq, dk and dv (see the type's comment).
        public let errors: [Double]
        /// The largest error that passes.
        public let tolerance: Double

        /// Whether every error is within `tolerance`.
        public var passed: Bool { errors.allSatisfy { $0 <= tolerance } }

        /// `PASS` or `FAIL`, the case, the five errors and the tolerance, on one line.
        public var description: String {
            let names = ["o", "lse", "dq", "dk", "dv"]
            let parts = zip(names, errors).map { String(format: "%@ %.1e", $0, $1) }.joined(separator: "  ")
            return "\(passed ? "PASS" : "FAIL") \(label): \(parts)  (tolerance \(String(format: "%.0e", tolerance)))"
        }
    }

    /// float32: 1e-5 (the same operations as the CPU in another order; expf and the CPU's vector
    /// exp2 differ by a few units in the last place). Measured at worst 7.9e-7 (dk).
    /// bfloat16: 2^-6, as the Phalanx layer's check. The operands are the same rounded numbers on
    /// both sides, but the kernels also round P and dS to bfloat16 for the tensor cores (2^-9
    /// relative per term, random in sign, accumulated in float32) and every result once more on
    /// store (2^-9 relative). Measured on an H200 over the standard cases: at worst 1.9e-3 (o),
    /// 2.3e-3 (dq), 2.0e-3 (dk), 2.1e-3 (dv), 1.2e-7 (lse); 2^-6 leaves a margin of about 7
    /// without letting a wrong mask or a missing tile through (those err by tens of percent).
    public static func tolerance(_ storage: NumberFormat) -> Double {
        storage == .float32 ? 1e-5 : 1.0 / 64
    }

    /// Every length (1, 15, 16, 17, 63, 100, 257, 1000: ragged against the tiles of 64 and 4) with
    /// every window (1, 7, 64, 100: cutting tiles; none), in both storages, the head dim and group
    /// size (heads per kv head 1, 2, 4) rotating through 16, 32, 64, 128 and 1, 2, 4; plus every
    /// head dim with every group size at L = 100 (full) and L = 257 (window 64).
    public static var standardCases: [Case] {
        let groups = [(4, 4), (4, 2), (4, 1)]
        var cases: [Case] = []
        for storage in NumberFormat.allCases {
            var index = 0
            for length in [1, 15, 16, 17, 63, 100, 257, 1000] {
                for window in [1, 7, 64, 100, nil] as [Int?] {
                    let (heads, kvHeads) = groups[index % 3]
                    let headDim = CUDAAttention.headDims[(index / 3 + index) % 4]
                    cases.append(Case(storage: storage, batch: length < 1000 ? 2 : 1, length: length, heads: heads,
                                      kvHeads: kvHeads, headDim: headDim, window: window))
                    index += 1
                }
            }
            for headDim in CUDAAttention.headDims {
                for (heads, kvHeads) in groups {
                    cases.append(Case(storage: storage, length: 100, heads: heads, kvHeads: kvHeads, headDim: headDim, window: nil))
                    cases.append(Case(storage: storage, length: 257, heads: heads, kvHeads: kvHeads, headDim: headDim, window: 64))
                }
            }
        }
        return cases
    }

    /// The operands of `testCase`, rounded to its storage: queries, keys, values, output gradient.
    static func operands(_ testCase: Case) -> (query: [Float], key: [Float], value: [Float], outputGradient: [Float]) {
        let shape = testCase.shape
        var rng = SeededGenerator(seed: UInt64(testCase.length * 7919 + testCase.headDim * 131 + testCase.heads * 17
                                               + testCase.kvHeads * 5 + (testCase.window ?? 0) * 3 + testCase.batch))
        func draw(_ count: Int) -> [Float] {
            testCase.storage.rounded((0..<count).map { _ in Float.random(in: -2...2, using: &rng) })
        }
        return (draw(shape.queryCount), draw(shape.keyCount), draw(shape.keyCount), draw(shape.queryCount))
    }

    /// Runs one case on `context` and on the CPU.
    public static func run(_ testCase: Case, context: CUDAContext) throws -> Outcome {
        let shape = testCase.shape, storage = testCase.storage
        let gpu = try CUDAAttention(context: context, storage: storage, headDim: testCase.headDim, window: testCase.window)
        let operands = operands(testCase)
        let (output, lse) = try gpu.forward(query: operands.query, key: operands.key, value: operands.value, shape: shape)
        let (dq, dk, dv) = try gpu.backward(query: operands.query, key: operands.key, value: operands.value, output: output,
                                            logsumexp: lse, outputGradient: operands.outputGradient, shape: shape)
        return compare(testCase, operands, device: [output, lse, dq, dk, dv])
    }

    /// The device's `[output, lse, dq, dk, dv]` for `testCase`'s `operands` against the CPU
    /// kernel's, whose backward differentiates the device's stored output and log-sum-exp.
    static func compare(_ testCase: Case, _ operands: (query: [Float], key: [Float], value: [Float], outputGradient: [Float]),
                        device: [[Float]], label: String? = nil) -> Outcome {
        let shape = testCase.shape
        let (q, k, v, dO) = operands
        let (output, lse, dq, dk, dv) = (device[0], device[1], device[2], device[3], device[4])
        let cpu = AttentionKernel(window: testCase.window)
        let layout = AttentionLayout(batch: shape.batch, length: shape.length, heads: shape.heads, kvHeads: shape.kvHeads,
                                     headDim: shape.headDim)
        var expectedOutput = [Float](repeating: 0, count: shape.queryCount)
        var expectedLSE = [Float](repeating: 0, count: shape.rowCount)
        var expectedDQ = [Float](repeating: 0, count: shape.queryCount)
        var expectedDK = [Float](repeating: 0, count: shape.keyCount), expectedDV = expectedDK
        q.withUnsafeBufferPointer { q in
            k.withUnsafeBufferPointer { k in
                v.withUnsafeBufferPointer { v in
                    expectedOutput.withUnsafeMutableBufferPointer { o in
                        expectedLSE.withUnsafeMutableBufferPointer { lse in
                            cpu.forward(query: q, key: k, value: v, output: o, logsumexp: lse, layout: layout)
                        }
                    }
                    // The backward of the forward as the device stored it (output rounded to storage).
                    output.withUnsafeBufferPointer { o in
                        lse.withUnsafeBufferPointer { lse in
                            dO.withUnsafeBufferPointer { dO in
                                expectedDQ.withUnsafeMutableBufferPointer { dq in
                                    expectedDK.withUnsafeMutableBufferPointer { dk in
                                        expectedDV.withUnsafeMutableBufferPointer { dv in
                                            cpu.backward(query: q, key: k, value: v, output: o, logsumexp: lse, outputGradient: dO,
                                                         queryGradient: dq, keyGradient: dk, valueGradient: dv, layout: layout)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let dvScale = scale(of: expectedDV)
        return Outcome(label: label ?? testCase.description,
                       errors: [relativeError(output, expectedOutput), relativeError(lse, expectedLSE),
                                relativeError(dq, expectedDQ, scale: dvScale), relativeError(dk, expectedDK, scale: dvScale),
                                relativeError(dv, expectedDV)],
                       tolerance: tolerance(testCase.storage))
    }

    /// Runs `testCase`'s forward and backward twice on the device and says whether every output
    /// (o, lse, dq, dk, dv) is bit-identical between the runs.
    public static func isDeterministic(_ testCase: Case, context: CUDAContext) throws -> Bool {
        let gpu = try CUDAAttention(context: context, storage: testCase.storage, headDim: testCase.headDim, window: testCase.window)
        let (q, k, v, dO) = operands(testCase)
        func once() throws -> [[UInt32]] {
            let (output, lse) = try gpu.forward(query: q, key: k, value: v, shape: testCase.shape)
            let (dq, dk, dv) = try gpu.backward(query: q, key: k, value: v, output: output, logsumexp: lse,
                                                outputGradient: dO, shape: testCase.shape)
            return [output, lse, dq, dk, dv].map { $0.map(\.bitPattern) }
        }
        return try once() == once()
    }

    /// Cases for `isDeterministic`: many query tiles per key tile and many heads per kv head.
    public static var determinismCases: [Case] {
        NumberFormat.allCases.map { Case(storage: $0, batch: 2, length: 1000, heads: 8, kvHeads: 2, headDim: 64, window: 300) }
    }

    /// The largest `|value|`, at least 1e-30.
    static func scale(of values: [Float]) -> Double { max(Double(values.lazy.map { abs($0) }.max() ?? 0), 1e-30) }

    /// `max |actual - expected| / (|expected| + max(scale, max|expected|))`; infinite when `actual`
    /// has a non-finite value the reference does not, or the counts differ.
    public static func relativeError(_ actual: [Float], _ expected: [Float], scale floor: Double = 0) -> Double {
        guard actual.count == expected.count else { return .infinity }
        let scale = max(scale(of: expected), floor)
        var worst = 0.0
        for (a, e) in zip(actual, expected) {
            if !a.isFinite && a != e { return .infinity }
            worst = max(worst, abs(Double(a) - Double(e)) / (abs(Double(e)) + scale))
        }
        return worst
    }
}
