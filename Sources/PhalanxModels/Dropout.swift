import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime

/// Residual dropout for training: the output of every block's mixer and MLP branch is multiplied,
/// element by element, by `m / (1 - rate)` with `m` 0 (probability `rate`) or 1, before it joins
/// the residual stream.
///
/// The masks are a pure function of `(seed, step, microBatch, block, branch, element)` (a hash,
/// not a random stream): backward regenerates them instead of storing them, and a resumed run
/// draws exactly the masks the uninterrupted one would have. `element` counts from the start of
/// the global batch: a data-parallel rank whose share starts at sequence `firstSequence` draws
/// the masks one process would draw for those sequences.
public struct Dropout: Sendable, Hashable {
    /// Probability that an element is dropped, in [0, 1).
    public let rate: Float
    /// The run's seed (masks differ between runs of different seeds).
    public let seed: UInt64
    /// Optimizer step and micro-batch within it: every forward pass gets fresh masks.
    public let step: Int, microBatch: Int
    /// The index, in the global batch, of the first sequence of the tensors masked (0 for a single process).
    public let firstSequence: Int

    /// The masks of one forward pass.
    public init(rate: Float, seed: UInt64, step: Int, microBatch: Int = 0, firstSequence: Int = 0) {
        require(rate >= 0 && rate < 1, "Dropout: rate must be in [0, 1), got \(rate)")
        require(firstSequence >= 0, "Dropout: firstSequence must be at least 0, got \(firstSequence)")
        self.rate = rate
        self.seed = seed
        self.step = step
        self.microBatch = microBatch
        self.firstSequence = firstSequence
    }

    /// Multiplies `t` `[batch, ...]` in place by the mask of `branch` (0 mixer, 1 MLP) of block
    /// `block`; its element `i` is element `firstSequence * (count / batch) + i` of the global batch.
    public func apply(to t: Tensor, block: Int, branch: Int, pool: WorkerPool = .shared) {
        let firstElement = firstSequence * (t.count / max(t.shape.first ?? 1, 1))
        if case .cuda(let gpu) = t.device {
            return DeviceOps.dropout(t, rate: rate, seed: seed, step: step, microBatch: microBatch, block: block, branch: branch,
                                     firstElement: firstElement, on: gpu)
        }
        let keepScale = 1 / (1 - rate)
        // Keep when the hash's top 24 bits, as a fraction of 2^24, are at least `rate`.
        let threshold = UInt64((Double(rate) * Double(1 << 24)).rounded())
        let stream = mix(seed ^ mix(UInt64(step) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(microBatch) << 48
                                     ^ UInt64(block) << 8 ^ UInt64(branch)))
        let count = t.count, p = t.pointer, stride = UInt64(0xD1B5_4A32_D192_ED03)
        let first = stream &+ UInt64(firstElement) &* stride
        let parts = min(pool.threadCount, max(count / 65536, 1))
        pool.run(parts) { part in
            for i in (part * count / parts)..<((part + 1) * count / parts) {
                let keep = mix(first &+ UInt64(i) &* stride) >> 40 >= threshold
                p[i] = keep ? p[i] * keepScale : 0
            }
        }
    }

    /// SplitMix64's finaliser: a bijection of 64-bit words whose outputs look independent.
    private func mix(_ z: UInt64) -> UInt64 {
        var z = z
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
