import Foundation
import PhalanxLayers
import PhalanxRuntime

/// Times a layer's forward and forward+backward and relates them to its matrix-product floor:
/// the FLOPs of its GEMMs divided by the sgemm rate measured in the same run.
public struct LayerTiming: Sendable {
    /// The layer timed (`attention`, `swa-<window>`, `phalanx`).
    public let name: String
    /// Positions per sequence.
    public let length: Int
    /// Median seconds of one forward.
    public let forward: Double
    /// Median seconds of one forward followed by its backward.
    public let forwardBackward: Double
    /// FLOPs of the forward's matrix products; backward's are twice these.
    public let forwardGemmFlops: Double

    /// Ratio of the measured forward+backward time to the matrix-product floor.
    public func floorRatio(sgemmRate: Double) -> Double { forwardBackward / (3 * forwardGemmFlops / sgemmRate) }
}

/// Timings of whole mixer layers on the CPU, against their matrix-product floor.
public enum LayerBenchmark {
    /// Times `forward` and `forward` + `backward` of any mixer on random input `[batch, length, dim]`.
    static func time<Mixer: SequenceMixer>(_ mixer: Mixer, name: String, dim: Int, batch: Int, length: Int,
                                           repeats: Int, gemmFlops: Double) -> LayerTiming {
        var rng = SeededGenerator(seed: 1)
        let x = Tensor((0..<(batch * length * dim)).map { _ in Float.random(in: -1...1, using: &rng) }, shape: [batch, length, dim])
        let dy = Tensor((0..<(batch * length * dim)).map { _ in Float.random(in: -1...1, using: &rng) }, shape: [batch, length, dim])
        let forward = Timing.median(repeats: repeats) { _ = mixer.forward(x) }
        let both = Timing.median(repeats: repeats) {
            let (_, cache) = mixer.forward(x)
            _ = mixer.backward(dy, cache: cache)
        }
        return LayerTiming(name: name, length: length, forward: forward, forwardBackward: both, forwardGemmFlops: gemmFlops)
    }

    /// An attention layer (projections, RoPE, tiled kernel) at `dim` with `heads` of `dim / heads`;
    /// `window` nil for full causal. Its GEMM floor counts the four projections only.
    public static func attention(dim: Int, heads: Int, window: Int?, batch: Int = 1, length: Int, repeats: Int) -> LayerTiming {
        var rng = SeededGenerator(seed: 1)
        let layer = Attention("bench", dim: dim, heads: heads, kvHeads: heads, headDim: dim / heads, window: window, rng: &rng)
        return time(layer, name: window == nil ? "attention" : "swa-\(window!)", dim: dim, batch: batch, length: length,
                    repeats: repeats, gemmFlops: 2 * Double(batch * length) * Double(dim) * Double(4 * dim))
    }

    /// The Phalanx layer at `dim` (heads of 16, `kvHeads` key/value heads), one sequence of `length`.
    public static func phalanx(dim: Int, kvHeads: Int, batch: Int = 1, length: Int, repeats: Int) -> LayerTiming {
        var rng = SeededGenerator(seed: 1)
        let layer = PhalanxLayer("bench", .init(dim: dim, kvHeads: kvHeads), rng: &rng)
        let D = PhalanxLayer.headDim, H = dim / D
        let projections = H + 2 * kvHeads * D + H * D + dim
        return time(layer, name: "phalanx", dim: dim, batch: batch, length: length, repeats: repeats,
                    gemmFlops: 2 * Double(batch * length) * Double(dim) * Double(projections))
    }
}
