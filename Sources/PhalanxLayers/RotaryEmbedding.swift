import Foundation
import PhalanxCUDA
import PhalanxRuntime
import Synchronization

/// Rotary position embedding (RoPE) in the rotate-half convention of Llama and Hugging Face:
/// channel `i` of a head is paired with channel `i + headDim/2`, and the pair at position `p` is
/// turned by the angle `p * base^(-2i / headDim)`:
///
///     y[i]             = x[i] cos(theta) - x[i + headDim/2] sin(theta)
///     y[i + headDim/2] = x[i + headDim/2] cos(theta) + x[i] sin(theta)
///
/// Backward is the inverse rotation (angle `-theta`): a rotation's transpose is its inverse.
///
/// Layout: `[batch, length, heads, headDim]` (any shape whose first two dimensions are batch and
/// length and whose rows split into heads of `headDim`). Positions count from `startPosition`,
/// so a decode step at position `p` rotates exactly as a full pass does there.
///
/// Angles are computed in double precision and kept as a float cos/sin table that grows to the
/// longest position asked for; every call after the first is one pass of multiply-adds.
public final class RotaryEmbedding: Sendable {
    /// Channels per head; even.
    public let headDim: Int
    /// The frequency base (10000 in Llama).
    public let base: Float
    /// `cos` and `sin` `[positions, headDim/2]`, for positions `0..<positions`.
    private struct Table: Sendable {
        var positions = 0
        var cos: [Float] = []
        var sin: [Float] = []
    }
    private let table = Mutex(Table())
    /// The same tables on each GPU that asked for them.
    private let deviceTables = Mutex([ObjectIdentifier: CUDALayerKernels.RotaryTable]())

    /// A rotation for heads of `headDim` channels (even, at least 2) and frequency `base` (above 1).
    public init(headDim: Int, base: Float = 10000) {
        require(headDim >= 2 && headDim % 2 == 0, "RotaryEmbedding: headDim must be even (channel pairs), got \(headDim)")
        require(base > 1, "RotaryEmbedding: base must exceed 1, got \(base)")
        self.headDim = headDim
        self.base = base
    }

    /// `x` rotated to its positions (a new tensor).
    public func forward(_ x: Tensor, startPosition: Int = 0, pool: WorkerPool = .shared) -> Tensor {
        let y = x.copy()
        rotate(y, startPosition: startPosition, inverse: false, pool: pool)
        return y
    }

    /// The input gradient for output gradient `dy`: `dy` rotated back (a new tensor).
    public func backward(_ dy: Tensor, startPosition: Int = 0, pool: WorkerPool = .shared) -> Tensor {
        let dx = dy.copy()
        rotate(dx, startPosition: startPosition, inverse: true, pool: pool)
        return dx
    }

    /// Rotates `x` in place (`inverse`: by the opposite angles, which is backward), every
    /// sequence from `startPosition`.
    public func rotate(_ x: Tensor, startPosition: Int = 0, inverse: Bool, pool: WorkerPool = .shared) {
        require(x.shape.count >= 2, "RotaryEmbedding: input must be [batch, length, ...], got \(x.shape)")
        rotate(x, startPositions: Array(repeating: startPosition, count: x.shape[0]), inverse: inverse, pool: pool)
    }

    /// Rotates `x` in place, sequence `b` from `startPositions[b]` (sequences decoded together
    /// at different positions).
    public func rotate(_ x: Tensor, startPositions: [Int], inverse: Bool, pool: WorkerPool = .shared) {
        require(x.shape.count >= 2, "RotaryEmbedding: input must be [batch, length, ...], got \(x.shape)")
        let (batch, length) = (x.shape[0], x.shape[1])
        require(startPositions.count == batch, "RotaryEmbedding: \(startPositions.count) start positions for \(batch) sequences")
        let perPosition = batch * length == 0 ? 0 : x.count / (batch * length)
        require(perPosition % headDim == 0,
                "RotaryEmbedding: \(perPosition) channels per position do not split into heads of \(headDim) (shape \(x.shape))")
        require(startPositions.allSatisfy { $0 >= 0 }, "RotaryEmbedding: start positions must be non-negative, got \(startPositions)")
        if case .cuda(let gpu) = x.device {
            let start = startPositions.first ?? 0
            require(startPositions.allSatisfy { $0 == start }, "RotaryEmbedding: on a GPU every sequence starts at one position")
            guard let table = deviceTable(upTo: start + length, on: gpu) else { return }
            return DeviceOps.rotate(x, heads: perPosition / headDim, table: table, startPosition: start, inverse: inverse, on: gpu)
        }
        rotate(x.pointer, batch: batch, length: length, heads: perPosition / headDim,
               startPositions: startPositions, inverse: inverse, pool: pool)
    }

    /// Raw form: rotates `x` `[batch, length, heads, headDim]` in place, sequence `b` from
    /// `startPositions[b]`.
    public func rotate(_ x: UnsafeMutablePointer<Float>, batch: Int, length: Int, heads: Int,
                       startPositions: [Int], inverse: Bool, pool: WorkerPool = .shared) {
        guard batch > 0, length > 0, heads > 0 else { return }
        let (cosines, sines) = angles(upTo: (startPositions.max() ?? 0) + length)
        let half = headDim / 2, D = headDim, sign: Float = inverse ? -1 : 1
        let rows = batch * length
        let parts = min(pool.threadCount, max(rows / 64, 1))
        cosines.withUnsafeBufferPointer { cosines in
            sines.withUnsafeBufferPointer { sines in
                pool.run(parts) { part in
                    for row in (part * rows / parts)..<((part + 1) * rows / parts) {
                        let position = startPositions[row / length] + row % length
                        let cp = cosines.baseAddress! + position * half, sp = sines.baseAddress! + position * half
                        for h in 0..<heads {
                            let first = x + (row * heads + h) * D, second = first + half
                            for i in 0..<half {
                                let c = cp[i], s = sign * sp[i], a = first[i], b = second[i]
                                first[i] = a * c - b * s
                                second[i] = b * c + a * s
                            }
                        }
                    }
                }
            }
        }
    }

    /// The host's cos and sin tables on `gpu`, covering at least `positions` positions (uploaded
    /// again only when the host's table grows); nil after a device failure.
    func deviceTable(upTo positions: Int, on gpu: CUDADevice) -> CUDALayerKernels.RotaryTable? {
        deviceTables.withLock { tables in
            let key = ObjectIdentifier(gpu)
            if let cached = tables[key], cached.positions >= positions { return cached }
            let (cosines, sines) = angles(upTo: positions)
            guard let table = DeviceOps.rotaryTable(headDim: headDim, cosines: cosines, sines: sines, on: gpu) else { return nil }
            tables[key] = table
            return table
        }
    }

    /// The cos and sin tables `[n, headDim/2]`, covering `n >= positions` positions (the table
    /// grows to at least twice its last size, and 256).
    public func angles(upTo positions: Int) -> ([Float], [Float]) {
        table.withLock { table in
            if table.positions < positions {
                let count = max(positions, 2 * table.positions, 256), half = headDim / 2
                var cosines = [Float](repeating: 0, count: count * half), sines = cosines
                for i in 0..<half {
                    let frequency = pow(Double(base), -2 * Double(i) / Double(headDim))
                    for p in 0..<count {
                        let angle = Double(p) * frequency
                        cosines[p * half + i] = Float(cos(angle))
                        sines[p * half + i] = Float(sin(angle))
                    }
                }
                table = Table(positions: count, cos: cosines, sin: sines)
            }
            return (table.cos, table.sin)
        }
    }
}
