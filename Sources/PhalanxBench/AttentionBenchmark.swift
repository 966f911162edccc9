import Foundation
import PhalanxLayers
import PhalanxRuntime

/// Median times of the attention kernel and the FLOPs they stand for, so that a caller can
/// divide by the sgemm rate measured in the same run (`MachineCeilings.sgemmRates()`).
public struct AttentionTiming: Sendable {
    /// The shapes timed.
    public let layout: AttentionLayout
    /// Keys each query sees; nil for full causal.
    public let window: Int?
    /// Median seconds of one forward.
    public let forward: Double
    /// Median seconds of one forward followed by its backward.
    public let forwardBackward: Double
    /// FLOPs of the forward: its two matrix products over the visible query-key pairs,
    /// `4 * headDim * pairs` (full causal: `pairs = batch * heads * L (L + 1) / 2`). Masked-out
    /// entries that the tiles compute anyway are not counted.
    public let forwardFlops: Double
    /// FLOPs of forward plus backward: backward recomputes the scores and does four more
    /// products (`QK^T`, `dO V^T`, `P^T dO`, `dS K`, `dS^T Q`), 2.5 times the forward's.
    public var forwardBackwardFlops: Double { 3.5 * forwardFlops }

    /// Forward FLOP/s: `forwardFlops / forward`.
    public var forwardRate: Double { forwardFlops / forward }
    /// Forward-plus-backward FLOP/s: `forwardBackwardFlops / forwardBackward`.
    public var forwardBackwardRate: Double { forwardBackwardFlops / forwardBackward }
}

/// Timings of the CPU attention kernel.
public enum AttentionBenchmark {
    /// Times `AttentionKernel` forward and forward+backward on random inputs: a warm-up call,
    /// then the median of `repeats`.
    ///
    /// - Parameter window: keys each query sees (sliding window); nil for full causal.
    public static func kernel(batch: Int = 1, heads: Int, kvHeads: Int, headDim: Int, length: Int, window: Int?,
                              repeats: Int = 5, pool: WorkerPool = .shared) -> AttentionTiming {
        let layout = AttentionLayout(batch: batch, length: length, heads: heads, kvHeads: kvHeads, headDim: headDim)
        let kernel = AttentionKernel(window: window)
        var rng = SeededGenerator(seed: 1)
        func random(_ count: Int) -> BenchBuffer { BenchBuffer(count: count) { _ in Float.random(in: -1...1, using: &rng) } }
        let q = random(layout.queryCount), k = random(layout.keyCount), v = random(layout.keyCount)
        let dOut = random(layout.queryCount)
        let out = BenchBuffer(count: layout.queryCount) { _ in 0 }, lse = BenchBuffer(count: layout.rowCount) { _ in 0 }
        let dq = BenchBuffer(count: layout.queryCount) { _ in 0 }
        let dk = BenchBuffer(count: layout.keyCount) { _ in 0 }, dv = BenchBuffer(count: layout.keyCount) { _ in 0 }

        func forward() {
            kernel.forward(query: q.readOnly, key: k.readOnly, value: v.readOnly, output: out.pointer,
                           logsumexp: lse.pointer, layout: layout, pool: pool)
        }
        let forwardSeconds = Timing.median(repeats: repeats, forward)
        let bothSeconds = Timing.median(repeats: repeats) {
            forward()
            kernel.backward(query: q.readOnly, key: k.readOnly, value: v.readOnly, output: out.readOnly,
                            logsumexp: lse.readOnly, outputGradient: dOut.readOnly, queryGradient: dq.pointer,
                            keyGradient: dk.pointer, valueGradient: dv.pointer, layout: layout, pool: pool)
        }
        return AttentionTiming(layout: layout, window: window, forward: forwardSeconds, forwardBackward: bothSeconds,
                               forwardFlops: kernel.forwardFlops(layout))
    }
}
