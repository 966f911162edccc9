import Foundation
import PhalanxCUDA
import PhalanxRuntime

/// The keys and values an attention layer keeps between calls while decoding.
///
/// Full attention keeps every position (the cache grows with the context); sliding-window
/// attention keeps a ring of `window + chunk` positions, constant in size, where `chunk` is the
/// largest piece a prefill is cut into (so no key a query of the piece needs is overwritten).
/// Keys are stored after the rotary embedding, at their absolute positions.
///
/// Layout: `[slot, batch, kvHeads, headDim]`; position `p` of a sequence lives in slot `p` (full)
/// or `p % capacity` (ring). Each sequence has its own length (prompts of different lengths
/// decoded together): a full cache holds as many slots as the longest, and a shorter sequence's
/// slots beyond its length are never read.
///
/// On a GPU (when the layer's weights are there) the keys and values live in `devicePages`
/// instead, in pages that are added as the sequences grow and never move (see
/// `DeviceKeyValuePages`); the lengths stay on the host.
public struct KeyValueCache: @unchecked Sendable {
    /// Sequences decoded together, key/value heads, and channels per head.
    public let batch: Int, kvHeads: Int, headDim: Int
    /// Positions kept; nil when every position is kept.
    public let capacity: Int?
    /// Positions processed so far by each sequence: the absolute position of its next token.
    public private(set) var lengths: [Int]
    var keys: [Float] = [], values: [Float] = []
    /// The keys and values on a GPU; nil in host memory. A copy of the cache shares them.
    let devicePages: DeviceKeyValuePages?

    /// Largest piece a sliding-window cache takes at once.
    static let chunk = 64

    init(batch: Int, kvHeads: Int, headDim: Int, window: Int?, device: (CUDADevice, NumberFormat)? = nil) {
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        capacity = window.map { $0 + Self.chunk }
        lengths = Array(repeating: 0, count: batch)
        let ring = capacity
        devicePages = device.map { DeviceKeyValuePages(on: $0.0, format: $0.1, batch: batch, kvHeads: kvHeads, headDim: headDim,
                                                       ring: ring) }
        if let capacity, devicePages == nil {
            keys = [Float](repeating: 0, count: capacity * rowWidth)
            values = keys
        }
    }

    /// Floats per slot: `batch * kvHeads * headDim`.
    var rowWidth: Int { batch * kvHeads * headDim }

    /// Bytes held for keys and values.
    public var byteCount: Int { devicePages?.byteCount ?? (keys.count + values.count) * MemoryLayout<Float>.stride }

    /// Counts `n` more positions for every sequence (their keys and values written by the caller).
    mutating func advance(by n: Int) { lengths = lengths.map { $0 + n } }

    func slot(_ position: Int) -> Int { capacity.map { position % $0 } ?? position }

    /// Slots held: the ring's capacity, or the longest sequence's positions.
    var slotCount: Int { rowWidth == 0 ? 0 : keys.count / rowWidth }

    /// Appends `n` positions of keys and values (`[batch, n, kvHeads, headDim]` each), each
    /// sequence's after its own last position.
    mutating func append(keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, count n: Int) {
        let width = kvHeads * headDim
        let missing = (lengths.max() ?? 0) + n - slotCount
        if capacity == nil && missing > 0 {
            // Appending grows the storage geometrically; `reserveCapacity` here would reallocate
            // (and copy the whole cache) on every decode step.
            keys.append(contentsOf: repeatElement(0, count: missing * rowWidth))
            values.append(contentsOf: repeatElement(0, count: missing * rowWidth))
        }
        let batch = batch, lengths = lengths, capacity = capacity
        keys.withUnsafeMutableBufferPointer { keyStore in
            values.withUnsafeMutableBufferPointer { valueStore in
                for b in 0..<batch {
                    for i in 0..<n {
                        let position = lengths[b] + i, slot = capacity.map { position % $0 } ?? position
                        let to = (slot * batch + b) * width, from = (b * n + i) * width
                        (keyStore.baseAddress! + to).update(from: k + from, count: width)
                        (valueStore.baseAddress! + to).update(from: v + from, count: width)
                    }
                }
            }
        }
        self.lengths = lengths.map { $0 + n }
    }
}

extension KeyValueCache: MixerState {
    /// The parts' sequences in order, each with its keys, values and length.
    public static func stacking(_ parts: [KeyValueCache]) -> KeyValueCache {
        require(!parts.isEmpty, "KeyValueCache.stacking: no caches")
        let first = parts[0]
        require(parts.allSatisfy { ($0.kvHeads, $0.headDim, $0.capacity) == (first.kvHeads, first.headDim, first.capacity) },
                "KeyValueCache.stacking: the caches differ in heads, head width or window")
        return KeyValueCache(stacking: parts)
    }

    /// `parts` laid out as one cache (checked alike by `stacking`).
    private init(stacking parts: [KeyValueCache]) {
        (kvHeads, headDim, capacity) = (parts[0].kvHeads, parts[0].headDim, parts[0].capacity)
        batch = parts.reduce(0) { $0 + $1.batch }
        lengths = parts.flatMap(\.lengths)
        if parts[0].devicePages != nil {
            devicePages = DeviceKeyValuePages(stacking: parts.map { part in
                guard let pages = part.devicePages else { fatalError("KeyValueCache.stacking: caches on the CPU and on a GPU") }
                return (pages, part.lengths.max() ?? 0)
            })
            return
        }
        devicePages = nil
        let slots = capacity ?? (lengths.max() ?? 0), width = kvHeads * headDim
        keys = [Float](repeating: 0, count: slots * batch * width)
        values = keys
        var sequence = 0
        for part in parts {
            for s in 0..<min(slots, part.slotCount) {
                for b in 0..<part.batch {
                    let to = (s * batch + sequence + b) * width, from = (s * part.batch + b) * width
                    keys.replaceSubrange(to..<(to + width), with: part.keys[from..<(from + width)])
                    values.replaceSubrange(to..<(to + width), with: part.values[from..<(from + width)])
                }
            }
            sequence += part.batch
        }
    }
}

extension Attention {
    /// An empty cache for `batch` sequences.
    public func makeState(batch: Int) -> KeyValueCache {
        let weight = qProj.weight.value
        return KeyValueCache(batch: batch, kvHeads: kvHeads, headDim: headDim, window: window,
                             device: weight.device.cuda.map { ($0, weight.compute.format) })
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
        if case .cuda(let gpu) = x.device { return infer(x, state: &state, on: gpu) }
        let n = x.shape[1]
        if state.lengths.allSatisfy({ $0 == 0 }) && n > 1 {
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
        let batch = state.batch, starts = state.lengths
        let q = qProj.forward(x), k = kProj.forward(x), v = vProj.forward(x)
        if let rotary {
            rotary.rotate(q, startPositions: starts, inverse: false, pool: pool)
            rotary.rotate(k, startPositions: starts, inverse: false, pool: pool)
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
                    let position = starts[b] + i
                    let first = window.map { max(0, position - $0 + 1) } ?? 0
                    let query = qp + ((b * n + i) * H + h) * D
                    let out = op + ((b * n + i) * H + h) * D
                    let g = h / group
                    func key(_ p: Int) -> UnsafePointer<Float> { kp + ((cache.slot(p) * batch + b) * KVH + g) * D }
                    func value(_ p: Int) -> UnsafePointer<Float> { vp + ((cache.slot(p) * batch + b) * KVH + g) * D }
                    attendOneQuery(query, positions: first...position, key: key, value: value, headDim: D, scale: scale, into: out)
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

/// One query against the cached positions `positions` (decoding: a single row of attention):
///
///     s_p = scale * q . k_p,   out = sum_p softmax(s)_p v_p
///
/// in three streaming passes: scores (four keys at a time, so that four dot products overlap),
/// their exponentials 16 at a time, then the weighted sum of values two positions at a time.
/// `key(p)`, `value(p)` give position `p`'s `headDim` floats.
@inline(__always)
private func attendOneQuery(_ query: UnsafePointer<Float>, positions: ClosedRange<Int>,
                            key: (Int) -> UnsafePointer<Float>, value: (Int) -> UnsafePointer<Float>,
                            headDim D: Int, scale: Float, into out: UnsafeMutablePointer<Float>) {
    let first = positions.lowerBound, count = positions.count
    let scores = Tensor(uninitialized: [count])
    let sp = scores.pointer
    let vectorEnd = D & ~15
    @inline(__always) func dot(_ k: UnsafePointer<Float>) -> Float {
        var total: Float = 0
        for c in vectorEnd..<D { total += query[c] * k[c] }
        return total
    }
    var maximum = -Float.infinity
    var p = first
    while p + 4 <= positions.upperBound + 1 {
        let k0 = key(p), k1 = key(p + 1), k2 = key(p + 2), k3 = key(p + 3)
        var a0 = SIMD16<Float>.zero, a1 = a0, a2 = a0, a3 = a0
        var c = 0
        while c < vectorEnd {
            let q = load16(query + c)
            a0 = a0.addingProduct(q, load16(k0 + c)); a1 = a1.addingProduct(q, load16(k1 + c))
            a2 = a2.addingProduct(q, load16(k2 + c)); a3 = a3.addingProduct(q, load16(k3 + c))
            c += 16
        }
        let s0 = (horizontalSum(a0) + dot(k0)) * scale, s1 = (horizontalSum(a1) + dot(k1)) * scale
        let s2 = (horizontalSum(a2) + dot(k2)) * scale, s3 = (horizontalSum(a3) + dot(k3)) * scale
        sp[p - first] = s0; sp[p - first + 1] = s1; sp[p - first + 2] = s2; sp[p - first + 3] = s3
        maximum = max(maximum, max(max(s0, s1), max(s2, s3)))
        p += 4
    }
    while p <= positions.upperBound {
        let s = dotProduct(query, key(p), count: D) * scale
        sp[p - first] = s
        maximum = max(maximum, s)
        p += 1
    }

    var sums = SIMD16<Float>.zero, tail: Float = 0
    forEachChannelChunk(count, vector: { j in
        let e = exp(load16(sp + j) - maximum)
        store16(e, sp + j)
        sums += e
    }, scalar: { j in
        sp[j] = exp(sp[j] - maximum)
        tail += sp[j]
    })
    let inverse = 1 / (horizontalSum(sums) + tail)

    out.update(repeating: 0, count: D)
    p = first
    while p + 2 <= positions.upperBound + 1 {
        let v0 = value(p), v1 = value(p + 1)
        let w0 = sp[p - first] * inverse, w1 = sp[p - first + 1] * inverse
        var c = 0
        while c < vectorEnd {
            store16(load16(out + c).addingProduct(w0, load16(v0 + c)).addingProduct(w1, load16(v1 + c)), out + c)
            c += 16
        }
        for c in vectorEnd..<D { out[c] += w0 * v0[c] + w1 * v1[c] }
        p += 2
    }
    if p <= positions.upperBound { addScaled(value(p), sp[p - first] * inverse, into: out, count: D) }
}
