import Foundation
import PhalanxRuntime

/// The keys and values an attention layer keeps between calls while decoding.
///
/// Full attention keeps every position (the cache grows with the context); sliding-window
/// attention keeps a ring of `window + chunk` positions, constant in size, where `chunk` is the
/// largest piece a prefill is cut into (so no key a query of the piece needs is overwritten).
/// Keys are stored after the rotary embedding, at their absolute positions.
///
/// Layout: `[slot, batch, kvHeads, headDim]`; position `p` lives in slot `p` (full) or
/// `p % capacity` (ring).
public struct KeyValueCache: Sendable {
    public let batch: Int, kvHeads: Int, headDim: Int
    /// Positions kept; nil when every position is kept.
    public let capacity: Int?
    /// Positions processed so far: the absolute position of the next token.
    public private(set) var length = 0
    var keys: [Float] = [], values: [Float] = []

    /// Largest piece a sliding-window cache takes at once.
    static let chunk = 64

    init(batch: Int, kvHeads: Int, headDim: Int, window: Int?) {
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        capacity = window.map { $0 + Self.chunk }
        if let capacity {
            keys = [Float](repeating: 0, count: capacity * rowWidth)
            values = keys
        }
    }

    /// Floats per slot: `batch * kvHeads * headDim`.
    var rowWidth: Int { batch * kvHeads * headDim }

    /// Bytes held for keys and values.
    public var byteCount: Int { (keys.count + values.count) * MemoryLayout<Float>.stride }

    func slot(_ position: Int) -> Int { capacity.map { position % $0 } ?? position }

    /// Appends `n` positions of keys and values (`[batch, n, kvHeads, headDim]` each).
    mutating func append(keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, count n: Int) {
        let width = kvHeads * headDim
        if capacity == nil {
            keys.reserveCapacity((length + n) * rowWidth)
            keys.append(contentsOf: repeatElement(0, count: n * rowWidth))
            values.append(contentsOf: repeatElement(0, count: n * rowWidth))
        }
        let slots = (0..<n).map { slot(length + $0) }
        let batch = batch
        keys.withUnsafeMutableBufferPointer { keyStore in
            values.withUnsafeMutableBufferPointer { valueStore in
                for i in 0..<n {
                    let s = slots[i]
                    for b in 0..<batch {
                        let to = (s * batch + b) * width, from = (b * n + i) * width
                        (keyStore.baseAddress! + to).update(from: k + from, count: width)
                        (valueStore.baseAddress! + to).update(from: v + from, count: width)
                    }
                }
            }
        }
        length += n
    }
}

extension Attention {
    /// An empty cache for `batch` sequences.
    public func makeState(batch: Int) -> KeyValueCache {
        KeyValueCache(batch: batch, kvHeads: kvHeads, headDim: headDim, window: window)
    }

    /// Continues every sequence from `state` by the positions of `x` (`[batch, n, dim]`, any `n`):
    /// a prefill chunk or a decode step. Equal to the parallel forward over the whole sequence.
    ///
    ///     y_i = o_proj( sum_{j visible from i} softmax_j(q_i . k_j / sqrt(d)) v_j )
    ///
    /// over the cached positions and the chunk's own (causal, and within the window if any).
    public func infer(_ x: Tensor, state: inout KeyValueCache) -> Tensor {
        require(x.shape.count == 3 && x.shape[2] == dim && x.shape[0] == state.batch,
                "Attention.infer: input must be [\(state.batch), length, \(dim)], got \(x.shape)")
        let n = x.shape[1]
        if state.length == 0 && n > 1 {
            // A prefill from empty sequences is the parallel forward (the tiled kernel); its
            // keys and values fill the cache (a ring keeps the last ones).
            let (y, cache) = forward(x)
            state.append(keys: cache.key.pointer, values: cache.value.pointer, count: n)
            return y
        }
        if state.capacity != nil && n > KeyValueCache.chunk {
            // A ring holds window + chunk positions: feed longer prefills piece by piece.
            var outputs: [Tensor] = []
            var start = 0
            while start < n {
                let piece = min(KeyValueCache.chunk, n - start)
                outputs.append(infer(slice(x, start..<(start + piece)), state: &state))
                start += piece
            }
            return concatenate(outputs, batch: state.batch)
        }
        let batch = state.batch, start = state.length
        let q = qProj.forward(x), k = kProj.forward(x), v = vProj.forward(x)
        if let rotary {
            rotary.rotate(q, startPosition: start, inverse: false, pool: pool)
            rotary.rotate(k, startPosition: start, inverse: false, pool: pool)
        }
        state.append(keys: k.pointer, values: v.pointer, count: n)
        let attended = Tensor(uninitialized: [batch, n, heads * headDim])
        let group = heads / kvHeads, D = headDim, H = heads, KVH = kvHeads
        let scale = kernel.scale(for: AttentionLayout(batch: batch, length: 1, heads: heads, kvHeads: kvHeads, headDim: headDim))
        let window = self.window
        let cache = state
        let qp = q.pointer, op = attended.pointer
        cache.keys.withUnsafeBufferPointer { keys in
            cache.values.withUnsafeBufferPointer { values in
                let kp = keys.baseAddress!, vp = values.baseAddress!
                pool.run(batch * H * n) { index in
                    let i = index % n, h = (index / n) % H, b = index / (n * H)
                    let position = start + i
                    let first = window.map { max(0, position - $0 + 1) } ?? 0
                    let query = qp + ((b * n + i) * H + h) * D
                    let out = op + ((b * n + i) * H + h) * D
                    let g = h / group
                    func key(_ p: Int) -> UnsafePointer<Float> { kp + ((cache.slot(p) * batch + b) * KVH + g) * D }
                    func value(_ p: Int) -> UnsafePointer<Float> { vp + ((cache.slot(p) * batch + b) * KVH + g) * D }
                    var scores = [Float](repeating: 0, count: position - first + 1)
                    var maximum = -Float.infinity
                    for p in first...position {
                        let dot = dotProduct(query, key(p), count: D)
                        scores[p - first] = dot * scale
                        maximum = max(maximum, dot * scale)
                    }
                    var total: Float = 0
                    for j in scores.indices {
                        scores[j] = exp(scores[j] - maximum)
                        total += scores[j]
                    }
                    out.update(repeating: 0, count: D)
                    for p in first...position { addScaled(value(p), scores[p - first] / total, into: out, count: D) }
                }
            }
        }
        return oProj.forward(attended)
    }

    private func slice(_ x: Tensor, _ range: Range<Int>) -> Tensor {
        let (batch, length, width) = (x.shape[0], x.shape[1], x.shape[2])
        let out = Tensor(uninitialized: [batch, range.count, width])
        for b in 0..<batch {
            (out.pointer + b * range.count * width).update(from: x.pointer + (b * length + range.lowerBound) * width,
                                                           count: range.count * width)
        }
        return out
    }

    private func concatenate(_ parts: [Tensor], batch: Int) -> Tensor {
        let width = parts[0].shape[2], total = parts.reduce(0) { $0 + $1.shape[1] }
        let out = Tensor(uninitialized: [batch, total, width])
        var offset = 0
        for part in parts {
            let n = part.shape[1]
            for b in 0..<batch {
                (out.pointer + (b * total + offset) * width).update(from: part.pointer + b * n * width, count: n * width)
            }
            offset += n
        }
        return out
    }
}
