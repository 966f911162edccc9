import CPhalanxIntrinsics
import Foundation
import PhalanxRuntime

extension AttentionLayout {
    func check(_ name: String, count: Int, expected: Int, _ function: String) {
        require(count == expected, "\(function): \(name) holds \(count) floats, expected \(expected) for \(self)")
    }
}

/// Causal softmax attention, full or in a sliding window, tiled with an online softmax so memory
/// stays linear in the length (no `L x L` matrix ever exists).
///
/// For query `i`, head `h` (kv head `g = h / (heads / kvHeads)`), over the visible keys
/// `V(i) = { j : j <= i, j > i - window }` (all `j <= i` without a window):
///
///     s_ij = scale * q_i . k_j                     scale = 1 / sqrt(headDim) by default
///     lse_i = log sum_{j in V(i)} exp(s_ij)
///     o_i  = sum_{j in V(i)} exp(s_ij - lse_i) v_j
///
/// Backward (FlashAttention-2: the probabilities are recomputed from the saved `lse`):
///
///     D_i   = dO_i . O_i,   P_ij = exp(s_ij - lse_i),   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
///     dq_i  = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i
///
/// (dk and dv sum over every query head of the group.)
///
/// Tiling: queries and keys in tiles of 64. Forward runs one task per (sequence, head, pair of
/// query tiles), visiting key tiles from the first one inside the window to the diagonal, with the
/// running max `m`, running sum `l` and output accumulator rescaled per key tile (the online
/// softmax); tiles wholly outside the window are never touched, so the cost is
/// `O(L * min(L, window))`. Backward runs one task per (sequence, kv head, key-tile chunk): it
/// owns the dk and dv rows of its key tiles (all query heads of the group are summed inside the
/// task), two key tiles per pass over the query tiles. With one chunk per (sequence, kv head),
/// the usual case, the task also owns the dq rows
/// of its group's heads and adds into them in place; with several, each chunk adds dq into a
/// partial buffer of its own and a last pass sums them. No two tasks write the same memory.
/// Forward, dk and dv do not depend on the thread count; dq is summed over a number of chunks
/// that depends on it, so its last bits may.
///
/// The tile products are register-blocked `SIMD16` loops (4 rows x 64 columns, 16 fused
/// multiply-add accumulators, with AVX-512; 6 x 16 with AVX2: see `multiplyTile`), and the
/// softmax uses a vector `exp2`. On the 2-core development
/// machine (AVX-512) one thread ran OpenBLAS's 64 x 64 x 64 products at 73-114 GFLOP/s (124 at
/// 256 x 256 x 64; its kernels there are AVX2), and this whole forward, softmax included, at
/// about 200 GFLOP/s per thread.
///
/// Memory: operands are read in place, tile by tile; each task copies into its own scratch of a
/// few tiles only what must be padded (a sequence's last tile, a head width that is not a
/// multiple of 16) or transposed. Extra memory is `O(batch * heads * length)` (per-row
/// statistics in backward), plus at most 8 dq-sized partial buffers when backward splits key
/// tiles. Complexity: forward `4 * visiblePairs * headDim` FLOPs, backward 2.5 times that.
///
/// References: Dao et al., "FlashAttention" (2022) and "FlashAttention-2" (2023); Milakov and
/// Gimelshein, "Online normalizer calculation for softmax" (2018).
public struct AttentionKernel: Hashable, Sendable {
    /// Keys a query sees, itself included (`i - window < j <= i`); nil for full causal.
    public let window: Int?
    /// Logit scale; nil for `1 / sqrt(headDim)`.
    public let scale: Float?

    /// A kernel with an optional sliding `window` (at least 1) and logit `scale` (positive; nil for `1 / sqrt(headDim)`).
    public init(window: Int? = nil, scale: Float? = nil) {
        if let window { require(window >= 1, "AttentionKernel: window must be at least 1 (the query itself), got \(window)") }
        if let scale { require(scale.isFinite && scale > 0, "AttentionKernel: scale must be positive and finite, got \(scale)") }
        self.window = window
        self.scale = scale
    }

    /// The logit scale used for `layout`.
    public func scale(for layout: AttentionLayout) -> Float { scale ?? 1 / Float(layout.headDim).squareRoot() }

    /// Forward FLOPs (the two matrix products over visible pairs); backward does 2.5 times these.
    public func forwardFlops(_ layout: AttentionLayout) -> Double {
        4 * Double(layout.visiblePairs(window: window)) * Double(layout.headDim)
    }

    /// Computes the attention output and the log-sum-exp that `backward` needs.
    ///
    /// - Parameters:
    ///   - query: `[batch, length, heads, headDim]`.
    ///   - key, value: `[batch, length, kvHeads, headDim]`.
    ///   - output: `[batch, length, heads, headDim]`, overwritten; may not alias the inputs.
    ///   - logsumexp: `[batch, heads, length]`, overwritten.
    public func forward(query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>,
                        value: UnsafeBufferPointer<Float>, output: UnsafeMutableBufferPointer<Float>,
                        logsumexp: UnsafeMutableBufferPointer<Float>, layout: AttentionLayout,
                        pool: WorkerPool = .shared) {
        let name = "AttentionKernel.forward"
        layout.check("query", count: query.count, expected: layout.queryCount, name)
        layout.check("key", count: key.count, expected: layout.keyCount, name)
        layout.check("value", count: value.count, expected: layout.keyCount, name)
        layout.check("output", count: output.count, expected: layout.queryCount, name)
        layout.check("logsumexp", count: logsumexp.count, expected: layout.rowCount, name)
        guard layout.batch > 0, layout.length > 0 else { return }
        let t = Tiling(layout, window: window, scale: scale(for: layout))
        let q = query.baseAddress!, k = key.baseAddress!, v = value.baseAddress!
        let out = output.baseAddress!, lse = logsumexp.baseAddress!
        let sequencesAndHeads = layout.batch * layout.heads
        // Tasks of `queryTilesPerTask` query tiles, one (sequence, head) after another, so that
        // the threads share its keys and values in the caches; within it the longest tasks (last
        // query tiles, under causal masking) first, and the shortest last, for balance.
        let perTask = Tiling.queryTilesPerTask(tiles: t.tiles, sequencesAndHeads: sequencesAndHeads, threads: pool.threadCount)
        let tasks = (t.tiles + perTask - 1) / perTask
        pool.run(sequencesAndHeads * tasks) { index in
            let last = t.tiles - 1 - (index % tasks) * perTask, bh = index / tasks
            t.forwardTiles(query: q, key: k, value: v, output: out, logsumexp: lse,
                           batch: bh / layout.heads, head: bh % layout.heads, tiles: max(last - perTask + 1, 0), last)
        }
    }

    /// The gradients of `sum(outputGradient * output)` with respect to the queries, keys and
    /// values, written over (not added to) `queryGradient`, `keyGradient` and `valueGradient`.
    ///
    /// - Parameters:
    ///   - query, key, value, output, logsumexp: as given to and returned by `forward`.
    ///   - outputGradient: `dO`, `[batch, length, heads, headDim]`.
    ///   - queryGradient: `[batch, length, heads, headDim]`, overwritten.
    ///   - keyGradient, valueGradient: `[batch, length, kvHeads, headDim]`, overwritten.
    public func backward(query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>,
                         value: UnsafeBufferPointer<Float>, output: UnsafeBufferPointer<Float>,
                         logsumexp: UnsafeBufferPointer<Float>, outputGradient: UnsafeBufferPointer<Float>,
                         queryGradient: UnsafeMutableBufferPointer<Float>,
                         keyGradient: UnsafeMutableBufferPointer<Float>,
                         valueGradient: UnsafeMutableBufferPointer<Float>,
                         layout: AttentionLayout, pool: WorkerPool = .shared) {
        let name = "AttentionKernel.backward"
        for (label, count) in [("query", query.count), ("output", output.count), ("outputGradient", outputGradient.count),
                               ("queryGradient", queryGradient.count)] {
            layout.check(label, count: count, expected: layout.queryCount, name)
        }
        for (label, count) in [("key", key.count), ("value", value.count), ("keyGradient", keyGradient.count),
                               ("valueGradient", valueGradient.count)] {
            layout.check(label, count: count, expected: layout.keyCount, name)
        }
        layout.check("logsumexp", count: logsumexp.count, expected: layout.rowCount, name)
        guard layout.batch > 0, layout.length > 0 else { return }
        let t = Tiling(layout, window: window, scale: scale(for: layout))
        let B = layout.batch, H = layout.heads, KVH = layout.kvHeads, Dp = t.paddedDim, Lp = t.paddedLength

        // Per query row: D_i and lse_i in base 2, [batch, heads, Lp].
        let rowStatistics = allocateTile(2 * B * H * Lp)
        defer { release(rowStatistics) }
        let delta = rowStatistics, lse2 = rowStatistics + B * H * Lp
        t.rowStatistics(output: output.baseAddress!, outputGradient: outputGradient.baseAddress!,
                        logsumexp: logsumexp.baseAddress!, delta: delta, logsumexp2: lse2, pool: pool)

        // The key tiles of one (sequence, kv head) are dealt round-robin to `chunks` tasks, enough
        // that the tasks (all of about equal work) number a multiple of the threads. With one
        // chunk a task owns the dq rows of its heads and adds into them in place; with several
        // (or a head width that is not a multiple of 16) each chunk adds into its own zeroed
        // partial buffer `[chunk, batch, heads, Lp, Dp]`, summed at the end.
        let threads = pool.threadCount
        let chunks = max(1, min(t.tiles, 8, threads / greatestCommonDivisor(B * KVH, threads)))
        let inPlace = chunks == 1 && t.paddedDim == layout.headDim
        let partial = inPlace ? nil : allocateTile(chunks * B * H * Lp * Dp)
        defer { partial.map(release) }
        let q = query.baseAddress!, k = key.baseAddress!, v = value.baseAddress!, dO = outputGradient.baseAddress!
        let dq = queryGradient.baseAddress!, dk = keyGradient.baseAddress!, dv = valueGradient.baseAddress!
        pool.run(chunks * B * KVH) { index in
            let chunk = index % chunks, bkv = index / chunks, b = bkv / KVH, g = bkv % KVH
            let target: QueryGradient
            if let partial {
                let start = partial + ((chunk * B + b) * H + g * layout.groupSize) * Lp * Dp
                start.update(repeating: 0, count: layout.groupSize * Lp * Dp)
                target = QueryGradient(start: start, headStride: Lp * Dp, rowStride: Dp, padded: true)
            } else {
                let D = layout.headDim, start = dq + (b * layout.length * H + g * layout.groupSize) * D
                for i in 0..<layout.length { (start + i * H * D).update(repeating: 0, count: layout.groupSize * D) }
                target = QueryGradient(start: start, headStride: D, rowStride: H * D, padded: false)
            }
            t.backwardKeys(query: q, key: k, value: v, outputGradient: dO, delta: delta, logsumexp2: lse2,
                           queryGradient: target, keyGradient: dk, valueGradient: dv,
                           batch: b, kvHead: g, firstTile: chunk, tileStep: chunks)
        }
        if let partial { t.sumPartials(partial, chunks: chunks, into: dq, pool: pool) }
    }
}

// MARK: - Implementation

/// Rows and columns of every tile.
private let tileSize = 64

/// Floats on a 64-byte boundary, so that the tile products' vector loads never straddle two
/// cache lines (every tile and row offset is a multiple of 16 floats). Free with `release`.
private func allocateTile(_ count: Int) -> UnsafeMutablePointer<Float> {
    UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64).bindMemory(to: Float.self, capacity: max(count, 1))
}

private func release(_ pointer: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(pointer).deallocate() }

private func greatestCommonDivisor(_ a: Int, _ b: Int) -> Int { b == 0 ? a : greatestCommonDivisor(b, a % b) }

/// Where one backward task adds `dS K` for the query heads of its group: row `i` of the group's
/// head `hh` starts at `start + hh * headStride + i * rowStride`.
private struct QueryGradient {
    let start: UnsafeMutablePointer<Float>
    let headStride: Int, rowStride: Int
    /// Whether rows exist up to the padded length (a partial buffer), not only up to the length.
    let padded: Bool
}

/// A 64-row tile of one head, as the tile products read it: `rows` apart by `stride` floats.
private struct TileRows {
    let rows: UnsafePointer<Float>
    let stride: Int
}

/// The geometry of one call and the per-tile work of forward and backward.
///
/// Operands are read where they lie (`[batch, length, heads, headDim]`, rows `heads * headDim`
/// apart) when a tile is whole and the head width a multiple of 16; otherwise, and for the
/// transposed forms, each task copies the tile it needs into its own zero-padded, 64-byte
/// aligned scratch. The copies cost `O(64 * headDim)` per tile against `O(64^2 * headDim)` of
/// products, and no call allocates more than `O(batch * heads * length)` floats of statistics
/// (plus the dq partials when backward splits key tiles).
private struct Tiling {
    let layout: AttentionLayout
    let window: Int?
    let scale: Float
    /// `scale * log2(e)`: logits go straight to base-2 exponents.
    let scale2: Float
    let tiles: Int, paddedLength: Int, paddedDim: Int

    init(_ layout: AttentionLayout, window: Int?, scale: Float) {
        self.layout = layout
        self.window = window
        self.scale = scale
        scale2 = scale * Float(M_LOG2E)
        tiles = (layout.length + tileSize - 1) / tileSize
        paddedLength = tiles * tileSize
        paddedDim = (layout.headDim + 15) / 16 * 16
    }

    /// Keys that query `i` sees inside the key tile starting at `keyStart`, as a lane range
    /// `lo..<hi` of the tile (empty when `hi <= lo`).
    @inline(__always)
    func visibleKeys(query i: Int, keyStart: Int) -> (lo: Int, hi: Int) {
        let lo = window.map { min(max(i - $0 + 1 - keyStart, 0), tileSize) } ?? 0
        return (lo, min(max(i + 1 - keyStart, 0), tileSize))
    }

    /// Queries that see key `j` inside the query tile starting at `queryStart`, as a lane range
    /// `lo..<hi` of the tile (empty when `hi <= lo`).
    @inline(__always)
    func visibleQueries(key j: Int, queryStart: Int) -> (lo: Int, hi: Int) {
        let hi = window.map { min(max(j + $0 - queryStart, 0), tileSize) } ?? tileSize
        return (min(max(j - queryStart, 0), tileSize), hi)
    }

    /// Whether some pair of query tile `queryTile` and key tile `keyTile` is hidden (the diagonal
    /// tile, or a tile that the window's lower edge crosses).
    @inline(__always)
    func needsMask(queryTile: Int, keyTile: Int) -> Bool {
        if keyTile >= queryTile { return true }
        guard let window else { return false }
        return keyTile * tileSize <= queryTile * tileSize + tileSize - 1 - window
    }

    /// First key tile that query tile `queryTile` sees.
    @inline(__always)
    func firstKeyTile(queryTile: Int) -> Int {
        guard let window else { return 0 }
        return max(queryTile * tileSize - window + 1, 0) / tileSize
    }

    /// Last query tile that sees key tile `keyTile`.
    @inline(__always)
    func lastQueryTile(keyTile: Int) -> Int {
        guard let window else { return tiles - 1 }
        return min((keyTile * tileSize + tileSize - 1 + window - 1) / tileSize, tiles - 1)
    }

    /// Rows `tile * 64 ..< tile * 64 + 64` of head `head` of `source` (`[batch, length, heads,
    /// headDim]`): in place when they all exist and the head width is a multiple of 16, else
    /// copied into `scratch` (`[64, Dp]`, zero-padded).
    @inline(__always)
    func rows(of source: UnsafePointer<Float>, heads: Int, batch b: Int, head h: Int, tile: Int,
              scratch: UnsafeMutablePointer<Float>) -> TileRows {
        let L = layout.length, D = layout.headDim, Dp = paddedDim
        let first = source + ((b * L + tile * tileSize) * heads + h) * D
        let count = min(tileSize, L - tile * tileSize)
        if count == tileSize && D == Dp { return TileRows(rows: first, stride: heads * D) }
        for r in 0..<tileSize {
            let target = scratch + r * Dp
            if r < count {
                target.update(from: first + r * heads * D, count: D)
                (target + D).update(repeating: 0, count: Dp - D)
            } else {
                target.update(repeating: 0, count: Dp)
            }
        }
        return TileRows(rows: scratch, stride: Dp)
    }

    /// The same tile transposed into `out` (`[Dp, 64]`: channels x positions, zero-padded).
    func transposed(_ source: UnsafePointer<Float>, heads: Int, batch b: Int, head h: Int, tile: Int,
                    into out: UnsafeMutablePointer<Float>) {
        let L = layout.length, D = layout.headDim, Dp = paddedDim
        let first = source + ((b * L + tile * tileSize) * heads + h) * D, stride = heads * D
        let count = min(tileSize, L - tile * tileSize)
        if count < tileSize || D < Dp { out.update(repeating: 0, count: tileSize * Dp) }
        // Contiguous stores, strided loads (the tile's 64 rows stay in L1).
        for d in 0..<D {
            let target = out + d * tileSize
            for r in 0..<count { target[r] = first[r * stride + d] }
        }
    }

    /// One 64 x 64 tile of scores, `S = A B^T` with `A` a tile's rows and `B^T` a tile stored
    /// transposed (`[Dp, 64]`); when `masked`, the entries of row `r` outside `visible(r)` (a lane
    /// range) are set to `-inf`. The forward takes `S^T` (keys x queries, `visibleQueries`), the
    /// backward `S` (queries x keys, `visibleKeys`). Masking is a pass of its own: a branch inside
    /// the softmax loops that follow keeps the compiler from vectorising them cleanly.
    @inline(__always)
    func scores(_ a: TileRows, _ bTransposed: UnsafePointer<Float>, into s: UnsafeMutablePointer<Float>, masked: Bool,
                visible: (Int) -> (lo: Int, hi: Int)) {
        multiplyTile(a.rows, aRow: a.stride, aDepth: 1, bTransposed, bRow: tileSize, depth: paddedDim, columns: tileSize,
                     into: s, cRow: tileSize, accumulate: false)
        guard masked else { return }
        for r in 0..<tileSize {
            let (lo, hi) = visible(r)
            hide(s + r * tileSize, lo: lo, hi: hi)
        }
    }

    // MARK: Forward

    /// Query tiles that one forward task serves together: each key and value tile it reads from
    /// memory is used by all of them while it is in the L1/L2 cache. Once a head's keys and
    /// values outgrow the caches (4 MiB of each at 16K) the forward waits on that traffic, which
    /// this divides by the group size. Up to 16 tiles, as long as every thread still gets at
    /// least 4 tasks to balance the causal triangle with (`bench layers --length 32768`, AMD EPYC,
    /// 2 threads: groups of 2, 8 and 16 tiles gave a forward of 3.29, 2.80 and 2.80 s on the
    /// AVX-512 build and 3.6-4.0, 3.06 and 3.04 s on the AVX2 build; at 4096, 47.7-48.8 ms with
    /// 16 against 55.6-56.8 ms with 2 on the AVX2 build).
    static func queryTilesPerTask(tiles: Int, sequencesAndHeads: Int, threads: Int) -> Int {
        var perTask = 16
        while perTask > 1 && sequencesAndHeads * ((tiles + perTask - 1) / perTask) < 4 * threads { perTask /= 2 }
        return perTask
    }

    /// One (sequence, head) and the query tiles `firstTile...lastTile` (at most
    /// `queryTilesPerTask`): the online softmax of each over its key tiles.
    ///
    /// Scores are computed transposed, `S^T = K Q^T` (keys x queries), so that every per-query
    /// quantity (running max, sum, rescale factor) is a lane of a vector and every reduction
    /// over keys is a vertical one: no horizontal reductions, no transposed keys.
    func forwardTiles(query: UnsafePointer<Float>, key: UnsafePointer<Float>, value: UnsafePointer<Float>,
                      output: UnsafeMutablePointer<Float>, logsumexp: UnsafeMutablePointer<Float>,
                      batch b: Int, head h: Int, tiles firstTile: Int, _ lastTile: Int) {
        let L = layout.length, H = layout.heads, KVH = layout.kvHeads, D = layout.headDim, Dp = paddedDim, n = tileSize
        let g = h / layout.groupSize
        let group = lastTile - firstTile + 1

        // Scratch: key and value copies [64, Dp] (used only for a partial tile or a padded head
        // width); scores [64 keys, 64 queries]; per query tile its queries transposed [Dp, 64],
        // output accumulator [64, Dp], and per query the rescale factor, running max and sum.
        let perTile = 2 * n * Dp + 3 * n
        let scratch = allocateTile(2 * n * Dp + n * n + group * perTile)
        defer { release(scratch) }
        let keyCopy = scratch, valueCopy = keyCopy + n * Dp, s = valueCopy + n * Dp
        func state(_ t: Int) -> (qt: UnsafeMutablePointer<Float>, o: UnsafeMutablePointer<Float>,
                                 alpha: UnsafeMutablePointer<Float>, m: UnsafeMutablePointer<Float>, l: UnsafeMutablePointer<Float>) {
            let qt = s + n * n + (t - firstTile) * perTile, o = qt + n * Dp, alpha = o + n * Dp
            return (qt, o, alpha, alpha + n, alpha + 2 * n)
        }
        for t in firstTile...lastTile {
            let (qt, o, _, m, l) = state(t)
            transposed(query, heads: H, batch: b, head: h, tile: t, into: qt)
            o.update(repeating: 0, count: n * Dp)
            m.update(repeating: -.infinity, count: n)
            l.update(repeating: 0, count: n)
        }

        let cv = SIMD16<Float>(repeating: scale2)
        for u in firstKeyTile(queryTile: firstTile)...lastTile {
            let j0 = u * n
            let keys = rows(of: key, heads: KVH, batch: b, head: g, tile: u, scratch: keyCopy)
            let values = rows(of: value, heads: KVH, batch: b, head: g, tile: u, scratch: valueCopy)
            for t in max(firstTile, u)...lastTile where u >= firstKeyTile(queryTile: t) {
                let i0 = t * n, (qt, o, alpha, m, l) = state(t)
                scores(keys, qt, into: s, masked: needsMask(queryTile: t, keyTile: u)) { k in
                    visibleQueries(key: j0 + k, queryStart: i0)
                }
                // Each query's maximum over the keys.
                var x0 = SIMD16<Float>(repeating: -.infinity), x1 = x0, x2 = x0, x3 = x0
                for k in 0..<n {
                    let row = s + k * n
                    x0 = maximum(x0, load16(row)); x1 = maximum(x1, load16(row + 16))
                    x2 = maximum(x2, load16(row + 32)); x3 = maximum(x3, load16(row + 48))
                }
                // Per query (16 at a time): the new running max (base 2), the factor that rescales
                // what was summed so far, and this tile's shift (0 where nothing has been seen yet,
                // so never inf - inf).
                func rescale(_ lanes: Int, _ tileMax: SIMD16<Float>) -> SIMD16<Float> {
                    let old = load16(m + lanes), new = maximum(old, tileMax * cv)
                    let shift = new.replacing(with: 0, where: new .== -.infinity)
                    store16(new, m + lanes)
                    store16(exp2(old - shift), alpha + lanes)
                    return -shift
                }
                let n0 = rescale(0, x0), n1 = rescale(16, x1), n2 = rescale(32, x2), n3 = rescale(48, x3)
                var t0 = SIMD16<Float>(), t1 = t0, t2 = t0, t3 = t0
                for k in 0..<n {
                    let row = s + k * n
                    let p0 = exp2(n0.addingProduct(load16(row), cv)), p1 = exp2(n1.addingProduct(load16(row + 16), cv))
                    let p2 = exp2(n2.addingProduct(load16(row + 32), cv)), p3 = exp2(n3.addingProduct(load16(row + 48), cv))
                    store16(p0, row); store16(p1, row + 16); store16(p2, row + 32); store16(p3, row + 48)
                    t0 += p0; t1 += p1; t2 += p2; t3 += p3
                }
                func accumulate(_ lanes: Int, _ sum: SIMD16<Float>) {
                    store16(load16(l + lanes) * load16(alpha + lanes) + sum, l + lanes)
                }
                accumulate(0, t0); accumulate(16, t1); accumulate(32, t2); accumulate(48, t3)
                for r in 0..<n where alpha[r] != 1 {
                    let a = SIMD16<Float>(repeating: alpha[r]), row = o + r * Dp
                    for d in stride(from: 0, to: Dp, by: 16) { store16(load16(row + d) * a, row + d) }
                }
                // O += P V, with P stored transposed (keys x queries).
                multiplyTile(s, aRow: 1, aDepth: n, values.rows, bRow: values.stride, depth: n, columns: Dp,
                             into: o, cRow: Dp, accumulate: true)
            }
        }

        let ln2 = Float(M_LN2)
        for t in firstTile...lastTile {
            let i0 = t * n, (_, o, _, m, l) = state(t)
            for r in 0..<min(n, L - i0) {
                let inverse = 1 / l[r]
                let target = output + ((b * L + i0 + r) * H + h) * D, source = o + r * Dp
                for d in 0..<D { target[d] = source[d] * inverse }
                logsumexp[(b * H + h) * L + i0 + r] = (m[r] + log2(l[r])) * ln2
            }
        }
    }

    // MARK: Backward

    /// Per query row, `D_i = dO_i . O_i` and `lse_i * log2(e)`, `[batch, heads, Lp]`; padding rows
    /// get 0 and `+inf`, so that their probabilities are 0.
    func rowStatistics(output: UnsafePointer<Float>, outputGradient: UnsafePointer<Float>,
                       logsumexp: UnsafePointer<Float>, delta: UnsafeMutablePointer<Float>,
                       logsumexp2: UnsafeMutablePointer<Float>, pool: WorkerPool) {
        let L = layout.length, H = layout.heads, D = layout.headDim, Lp = paddedLength
        let log2e = Float(M_LOG2E)
        pool.run(layout.batch * H * tiles) { index in
            let tile = index % tiles, bh = index / tiles, b = bh / H, h = bh % H
            for r in tile * tileSize..<(tile + 1) * tileSize {
                guard r < L else {
                    delta[bh * Lp + r] = 0
                    logsumexp2[bh * Lp + r] = .infinity
                    continue
                }
                let offset = ((b * L + r) * H + h) * D
                var sum: Float = 0
                for d in 0..<D { sum += outputGradient[offset + d] * output[offset + d] }
                delta[bh * Lp + r] = sum
                logsumexp2[bh * Lp + r] = logsumexp[bh * L + r] * log2e
            }
        }
    }

    /// Key tiles that one backward pass serves together: each query and output-gradient tile
    /// it reads from memory is used by all of them while it is in the caches (the backward's
    /// counterpart of `queryTilesPerTask`; passes do not change how work is dealt to threads).
    /// Measured with `bench layers --length 32768`, AMD EPYC, 2 threads, backward alone (the
    /// forward+backward less the forward): 8.4 s with passes of 2 key tiles, 7.6 s with 8, 7.0 s
    /// with 16 and 32 (AVX-512 build; AVX2 build 8.2-9.2 s with 2, 7.1 s with 16).
    static let keyTilesPerPass = 16

    /// One (sequence, kv head, chunk): key tiles `firstTile, firstTile + tileStep, ...`, in
    /// passes of `keyTilesPerPass`, each against every query tile of every head of the group that
    /// sees it. Writes the dk and dv rows of those tiles and adds `scale * sum_j dS_ij k_j` into
    /// `queryGradient`.
    func backwardKeys(query: UnsafePointer<Float>, key: UnsafePointer<Float>, value: UnsafePointer<Float>,
                      outputGradient: UnsafePointer<Float>, delta: UnsafePointer<Float>, logsumexp2: UnsafePointer<Float>,
                      queryGradient dq: QueryGradient, keyGradient: UnsafeMutablePointer<Float>,
                      valueGradient: UnsafeMutablePointer<Float>, batch b: Int, kvHead g: Int, firstTile: Int, tileStep: Int) {
        let L = layout.length, H = layout.heads, KVH = layout.kvHeads, D = layout.headDim
        let Dp = paddedDim, Lp = paddedLength, n = tileSize, group = layout.groupSize
        let keyTiles = Array(stride(from: firstTile, to: tiles, by: tileStep))
        let perPass = min(Self.keyTilesPerPass, max(keyTiles.count, 1))
        // Scratch: per key tile of a pass its keys and values transposed [Dp, 64], a key copy
        // [64, Dp] and dk and dv accumulators [64, Dp]; shared: query and output-gradient copies
        // [64, Dp] (partial tiles or padded widths only), probabilities (then dS) and dP [64, 64],
        // a dq tile [64, Dp] for a partial query tile added in place.
        let perKeyTile = 5 * n * Dp
        let scratch = allocateTile(perPass * perKeyTile + 3 * n * Dp + 2 * n * n)
        defer { release(scratch) }
        let queryCopy = scratch + perPass * perKeyTile, gradientCopy = queryCopy + n * Dp, p = gradientCopy + n * Dp
        let dp = p + n * n, dqTile = dp + n * n
        let cv = SIMD16<Float>(repeating: scale2), scaleVector = SIMD16<Float>(repeating: scale)

        for pass in stride(from: 0, to: keyTiles.count, by: perPass) {
            let passTiles = keyTiles[pass..<min(pass + perPass, keyTiles.count)]
            // Per key tile of the pass: kt, vt, its rows, dk and dv accumulators.
            var keyRows: [TileRows] = []
            for (slot, u) in passTiles.enumerated() {
                let kt = scratch + slot * perKeyTile, vt = kt + n * Dp, keyCopy = vt + n * Dp
                transposed(key, heads: KVH, batch: b, head: g, tile: u, into: kt)
                transposed(value, heads: KVH, batch: b, head: g, tile: u, into: vt)
                keyRows.append(rows(of: key, heads: KVH, batch: b, head: g, tile: u, scratch: keyCopy))
                (keyCopy + n * Dp).update(repeating: 0, count: 2 * n * Dp)
            }
            let lastTile = passTiles.map { lastQueryTile(keyTile: $0) }.max()!
            for hh in 0..<group {
                let h = g * group + hh, bh = b * H + h
                for t in passTiles.first!...lastTile {
                    let i0 = t * n
                    let queries = rows(of: query, heads: H, batch: b, head: h, tile: t, scratch: queryCopy)
                    let gradients = rows(of: outputGradient, heads: H, batch: b, head: h, tile: t, scratch: gradientCopy)
                    let lse2 = logsumexp2 + bh * Lp + i0, rowDelta = delta + bh * Lp + i0
                    for (slot, u) in passTiles.enumerated() where u <= t && t <= lastQueryTile(keyTile: u) {
                        let j0 = u * n, kt = scratch + slot * perKeyTile, vt = kt + n * Dp, keys = keyRows[slot]
                        let dkAcc = vt + 2 * n * Dp, dvAcc = dkAcc + n * Dp
                        // P = exp2(c s - lse2), hidden pairs 0.
                        scores(queries, kt, into: p, masked: needsMask(queryTile: t, keyTile: u)) { r in
                            visibleKeys(query: i0 + r, keyStart: j0)
                        }
                        for r in 0..<n {
                            let row = p + r * n, negShift = SIMD16<Float>(repeating: -lse2[r])
                            for k in stride(from: 0, to: n, by: 16) {
                                store16(exp2(negShift.addingProduct(load16(row + k), cv)), row + k)
                            }
                        }
                        // dv += P^T dO
                        multiplyTile(p, aRow: 1, aDepth: n, gradients.rows, bRow: gradients.stride, depth: n, columns: Dp,
                                     into: dvAcc, cRow: Dp, accumulate: true)
                        // dP = dO V^T, then scale * dS = scale * P (dP - D) in place of P.
                        multiplyTile(gradients.rows, aRow: gradients.stride, aDepth: 1, vt, bRow: n, depth: Dp, columns: n,
                                     into: dp, cRow: n, accumulate: false)
                        for r in 0..<n {
                            let row = p + r * n, dRow = dp + r * n, d = SIMD16<Float>(repeating: rowDelta[r])
                            for k in stride(from: 0, to: n, by: 16) {
                                store16(load16(row + k) * (load16(dRow + k) - d) * scaleVector, row + k)
                            }
                        }
                        // dq += scale dS K (a partial query tile through `dqTile`, so that no row past
                        // the sequence is written), dk += scale dS^T Q
                        let dqRows = dq.start + hh * dq.headStride + i0 * dq.rowStride
                        if i0 + n <= L || dq.padded {
                            multiplyTile(p, aRow: n, aDepth: 1, keys.rows, bRow: keys.stride, depth: n, columns: Dp,
                                         into: dqRows, cRow: dq.rowStride, accumulate: true)
                        } else {
                            multiplyTile(p, aRow: n, aDepth: 1, keys.rows, bRow: keys.stride, depth: n, columns: Dp,
                                         into: dqTile, cRow: Dp, accumulate: false)
                            for r in 0..<(L - i0) {
                                let row = dqRows + r * dq.rowStride
                                for d in 0..<D { row[d] += dqTile[r * Dp + d] }
                            }
                        }
                        multiplyTile(p, aRow: 1, aDepth: n, queries.rows, bRow: queries.stride, depth: n, columns: Dp,
                                     into: dkAcc, cRow: Dp, accumulate: true)
                    }
                }
            }
            for (slot, u) in passTiles.enumerated() {
                let j0 = u * n, dkAcc = scratch + slot * perKeyTile + 3 * n * Dp, dvAcc = dkAcc + n * Dp
                for j in 0..<min(n, L - j0) {
                    let offset = ((b * L + j0 + j) * KVH + g) * D
                    (keyGradient + offset).update(from: dkAcc + j * Dp, count: D)
                    (valueGradient + offset).update(from: dvAcc + j * Dp, count: D)
                }
            }
        }
    }

    /// `dq = sum_chunks partial`, with the padding dropped.
    func sumPartials(_ partial: UnsafeMutablePointer<Float>, chunks: Int, into dq: UnsafeMutablePointer<Float>, pool: WorkerPool) {
        let L = layout.length, H = layout.heads, D = layout.headDim, Dp = paddedDim, Lp = paddedLength
        let chunkStride = layout.batch * H * Lp * Dp
        pool.run(layout.batch * H * tiles) { index in
            let tile = index % tiles, bh = index / tiles, b = bh / H, h = bh % H
            for i in tile * tileSize..<min((tile + 1) * tileSize, L) {
                let target = dq + ((b * L + i) * H + h) * D, source = partial + (bh * Lp + i) * Dp
                for d in 0..<D {
                    var sum: Float = 0
                    for chunk in 0..<chunks { sum += source[chunk * chunkStride + d] }
                    target[d] = sum
                }
            }
        }
    }
}

// MARK: - Tile products and vector math

/// `C[64, columns] (+)= A[64, depth] B[depth, columns]`, `columns` a multiple of 16. Element
/// `(r, d)` of `A` is `a[r * aRow + d * aDepth]` (so `aRow: 1, aDepth: 64` reads a stored
/// `[depth, 64]` matrix transposed); rows of `B` and `C` are `bRow` and `cRow` apart.
///
/// Register blocks by instruction set: with 32 wide registers (AVX-512), 4 x 64 blocks (16
/// accumulators); with 16 registers of 8 floats (AVX2), 6 x 16 blocks (12 accumulators, two
/// operand vectors and a broadcast: 15 registers), whose 12 independent multiply-add chains cover
/// the latency of two FMA pipes (4-5 cycles each needs at least 8-10 in flight), then a 4 x 16
/// block for the last 4 of the 64 rows.
@inline(__always)
private func multiplyTile(_ a: UnsafePointer<Float>, aRow: Int, aDepth: Int, _ b: UnsafePointer<Float>, bRow: Int,
                          depth: Int, columns: Int, into c: UnsafeMutablePointer<Float>, cRow: Int, accumulate: Bool) {
    if hasWideRegisters {
        for r in stride(from: 0, to: tileSize, by: 4) {
            var column = 0
            while column + 64 <= columns {
                block4x64(a + r * aRow, aRow: aRow, aDepth: aDepth, b + column, bRow: bRow, depth: depth,
                          into: c + r * cRow + column, cRow: cRow, accumulate: accumulate)
                column += 64
            }
            while column < columns {
                block4x16(a + r * aRow, aRow: aRow, aDepth: aDepth, b + column, bRow: bRow, depth: depth,
                          into: c + r * cRow + column, cRow: cRow, accumulate: accumulate)
                column += 16
            }
        }
    } else {
        for column in stride(from: 0, to: columns, by: 16) {
            var r = 0
            while r + 6 <= tileSize {
                block6x16(a + r * aRow, aRow: aRow, aDepth: aDepth, b + column, bRow: bRow, depth: depth,
                          into: c + r * cRow + column, cRow: cRow, accumulate: accumulate)
                r += 6
            }
            block4x16(a + r * aRow, aRow: aRow, aDepth: aDepth, b + column, bRow: bRow, depth: depth,
                      into: c + r * cRow + column, cRow: cRow, accumulate: accumulate)
        }
    }
}

/// The register block: 4 rows x 64 columns, 16 vector accumulators.
@inline(__always)
private func block4x64(_ a: UnsafePointer<Float>, aRow: Int, aDepth: Int, _ b: UnsafePointer<Float>, bRow: Int,
                       depth: Int, into c: UnsafeMutablePointer<Float>, cRow: Int, accumulate: Bool) {
    let c0 = c, c1 = c + cRow, c2 = c + 2 * cRow, c3 = c + 3 * cRow
    var s00 = SIMD16<Float>(), s01 = SIMD16<Float>(), s02 = SIMD16<Float>(), s03 = SIMD16<Float>()
    var s10 = SIMD16<Float>(), s11 = SIMD16<Float>(), s12 = SIMD16<Float>(), s13 = SIMD16<Float>()
    var s20 = SIMD16<Float>(), s21 = SIMD16<Float>(), s22 = SIMD16<Float>(), s23 = SIMD16<Float>()
    var s30 = SIMD16<Float>(), s31 = SIMD16<Float>(), s32 = SIMD16<Float>(), s33 = SIMD16<Float>()
    if accumulate {
        s00 = load16(c0); s01 = load16(c0 + 16); s02 = load16(c0 + 32); s03 = load16(c0 + 48)
        s10 = load16(c1); s11 = load16(c1 + 16); s12 = load16(c1 + 32); s13 = load16(c1 + 48)
        s20 = load16(c2); s21 = load16(c2 + 16); s22 = load16(c2 + 32); s23 = load16(c2 + 48)
        s30 = load16(c3); s31 = load16(c3 + 16); s32 = load16(c3 + 32); s33 = load16(c3 + 48)
    }
    var a0 = a, a1 = a + aRow, a2 = a + 2 * aRow, a3 = a + 3 * aRow, bp = b
    for _ in 0..<depth {
        let b0 = load16(bp), b1 = load16(bp + 16), b2 = load16(bp + 32), b3 = load16(bp + 48)
        let x0 = SIMD16<Float>(repeating: a0.pointee), x1 = SIMD16<Float>(repeating: a1.pointee)
        let x2 = SIMD16<Float>(repeating: a2.pointee), x3 = SIMD16<Float>(repeating: a3.pointee)
        s00 = s00.addingProduct(x0, b0); s01 = s01.addingProduct(x0, b1); s02 = s02.addingProduct(x0, b2); s03 = s03.addingProduct(x0, b3)
        s10 = s10.addingProduct(x1, b0); s11 = s11.addingProduct(x1, b1); s12 = s12.addingProduct(x1, b2); s13 = s13.addingProduct(x1, b3)
        s20 = s20.addingProduct(x2, b0); s21 = s21.addingProduct(x2, b1); s22 = s22.addingProduct(x2, b2); s23 = s23.addingProduct(x2, b3)
        s30 = s30.addingProduct(x3, b0); s31 = s31.addingProduct(x3, b1); s32 = s32.addingProduct(x3, b2); s33 = s33.addingProduct(x3, b3)
        a0 += aDepth; a1 += aDepth; a2 += aDepth; a3 += aDepth; bp += bRow
    }
    store16(s00, c0); store16(s01, c0 + 16); store16(s02, c0 + 32); store16(s03, c0 + 48)
    store16(s10, c1); store16(s11, c1 + 16); store16(s12, c1 + 32); store16(s13, c1 + 48)
    store16(s20, c2); store16(s21, c2 + 16); store16(s22, c2 + 32); store16(s23, c2 + 48)
    store16(s30, c3); store16(s31, c3 + 16); store16(s32, c3 + 32); store16(s33, c3 + 48)
}

/// 6 rows x 16 columns (`Block6x16`): the block of the 16-register path.
@inline(__always)
private func block6x16(_ a: UnsafePointer<Float>, aRow: Int, aDepth: Int, _ b: UnsafePointer<Float>, bRow: Int,
                       depth: Int, into c: UnsafeMutablePointer<Float>, cRow: Int, accumulate: Bool) {
    var block = accumulate ? Block6x16(loading: c, cRow: cRow) : Block6x16()
    block.add(a, aRow: aRow, aDepth: aDepth, b, bRow: bRow, depth: depth)
    block.forEachRow { r, sum in store16(sum, c + r * cRow) }
}

/// 4 rows x 16 columns: the wide path's remainder when `columns` is not a multiple of 64, and
/// the narrow path's last 4 rows.
@inline(__always)
private func block4x16(_ a: UnsafePointer<Float>, aRow: Int, aDepth: Int, _ b: UnsafePointer<Float>, bRow: Int,
                       depth: Int, into c: UnsafeMutablePointer<Float>, cRow: Int, accumulate: Bool) {
    var s0 = accumulate ? load16(c) : SIMD16<Float>(), s1 = accumulate ? load16(c + cRow) : SIMD16<Float>()
    var s2 = accumulate ? load16(c + 2 * cRow) : SIMD16<Float>(), s3 = accumulate ? load16(c + 3 * cRow) : SIMD16<Float>()
    for d in 0..<depth {
        let bv = load16(b + d * bRow), ap = a + d * aDepth
        s0 = s0.addingProduct(SIMD16(repeating: ap[0]), bv)
        s1 = s1.addingProduct(SIMD16(repeating: ap[aRow]), bv)
        s2 = s2.addingProduct(SIMD16(repeating: ap[2 * aRow]), bv)
        s3 = s3.addingProduct(SIMD16(repeating: ap[3 * aRow]), bv)
    }
    store16(s0, c); store16(s1, c + cRow); store16(s2, c + 2 * cRow); store16(s3, c + 3 * cRow)
}

/// Sets the entries of a 64-wide score row outside `lo..<hi` to `-inf`.
@inline(__always)
private func hide(_ row: UnsafeMutablePointer<Float>, lo: Int, hi: Int) {
    let lane = SIMD16<Int32>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    let low = SIMD16<Int32>(repeating: Int32(lo)), high = SIMD16<Int32>(repeating: Int32(hi))
    for k in stride(from: 0, to: tileSize, by: 16) {
        let index = lane &+ Int32(k)
        store16(load16(row + k).replacing(with: -.infinity, where: (index .< low) .| (index .>= high)), row + k)
    }
}

/// Lane-wise maximum: one `vmaxps` (and a NaN check) through `phalanx_max16`. (The standard
/// library's `pointwiseMax` is an out-of-line generic call, measured at 40% of the forward's time;
/// `replacing(with:where:)` compiles to masked 4-lane loads when an operand is a load.)
@inline(__always)
private func maximum(_ a: SIMD16<Float>, _ b: SIMD16<Float>) -> SIMD16<Float> { phalanx_max16(a, b) }
