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
        let forwardFlops = PhalanxLayer.Product.allCases.filter { !$0.isBackward }.reduce(0.0) { total, product in
            let (m, n, k) = layer.shape(of: product, rows: batch * length)
            return total + 2 * Double(m) * Double(n) * Double(k)
        }
        return time(layer, name: "phalanx", dim: dim, batch: batch, length: length, repeats: repeats, gemmFlops: forwardFlops)
    }
}

/// One matrix product of a layer, timed alone at the layer's shape: `C[m, n] (+)= op(A) op(B)`
/// with inner dimension `k`.
public struct ProductTiming: Sendable {
    /// What the product computes (`z = x W_in^T`, ...).
    public let name: String
    /// Rows and columns of the result and the inner dimension.
    public let m: Int, n: Int, k: Int
    /// Median seconds per product.
    public let seconds: Double
    /// FLOP/s: `2 m n k / seconds`.
    public var rate: Double { 2 * Double(m) * Double(n) * Double(k) / seconds }
}

extension LayerBenchmark {
    /// The Phalanx layer's six matrix products (`PhalanxLayer.Product`, the list the layer itself
    /// runs), each alone through the layer at its shapes for one sequence of `length`. Their sum
    /// is the layer's matrix-product time at its own (skinny) shapes; the rest of the layer's
    /// forward+backward is its element-wise passes and the recurrence.
    public static func phalanxProducts(dim: Int, kvHeads: Int, length: Int, repeats: Int) -> [ProductTiming] {
        var rng = SeededGenerator(seed: 2)
        let layer = PhalanxLayer("bench", .init(dim: dim, kvHeads: kvHeads), rng: &rng)
        let widest = PhalanxLayer.Product.allCases.map { layer.shape(of: $0, rows: length) }.map { max($0.m * $0.k, $0.k * $0.n, $0.m * $0.n) }.max()!
        let a = BenchBuffer(count: widest) { _ in Float.random(in: -1...1, using: &rng) }
        let b = BenchBuffer(count: widest) { _ in Float.random(in: -1...1, using: &rng) }
        let out = BenchBuffer(count: widest) { _ in 0 }
        return PhalanxLayer.Product.allCases.map { product in
            let (m, n, k) = layer.shape(of: product, rows: length)
            let seconds = Timing.median(repeats: repeats) {
                layer.multiply(product, rows: length, a.readOnly.baseAddress!, b.readOnly.baseAddress!, into: out.pointer.baseAddress!)
            }
            return ProductTiming(name: product.rawValue, m: m, n: n, k: k, seconds: seconds)
        }
    }
}
