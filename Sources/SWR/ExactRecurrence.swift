import PhalanxRuntime

/// The exact scalar-gated linear recurrence (SWR.md section 1):
///
///     x_i = a_i * x_{i-1} + u_i,     x_{-1} = x0 (the state; 0 for a fresh sequence)
///
/// One gate per head and position scales all `headDim` channels of that head.
///
/// The streaming kernel holds one 16-lane vector of state per head and walks the rows once; the
/// heads of a row are independent chains, interleaved so that the multiply-add latency overlaps.
/// When there are fewer sequence-head pairs than threads, the time axis is cut into chunks with the
/// hierarchical decomposition of SWR.md section 2, fused: each chunk first reduces its rows to a
/// carrier (terminal local state `v_t`, from 0) and a compound gate `c_t` without writing, a short
/// carrier scan `S_t = c_t S_{t-1} + v_t` runs over the chunks, and each chunk then streams again
/// from `S_{t-1}`. That rerun equals `w_i + g_t[i] S_{t-1}` exactly and writes every output once.
/// `hierarchical(...)` is the same decomposition unfused, at any number of levels.
public struct ExactRecurrence: Hashable, Sendable {
    /// The recurrence; it has no parameters.
    public init() {}

    /// Runs the recurrence over every sequence of `layout`, from `state` (`x0`), leaving in it each
    /// sequence's final state.
    ///
    /// - Parameters:
    ///   - gates: `a`, `[rows, heads]`.
    ///   - inputs: `u`, `[rows, heads, headDim]`.
    ///   - output: `x`, `[rows, heads, headDim]`; may not alias `inputs`.
    public func forward(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                        output: UnsafeMutableBufferPointer<Float>, layout: SequenceLayout,
                        state: inout ExactState, pool: WorkerPool = .shared) {
        let name = "ExactRecurrence.forward"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("inputs", count: inputs.count, expected: layout.elementCount, name)
        layout.check("output", count: output.count, expected: layout.elementCount, name)
        state.check(against: layout, name)

        let partition = Partition(layout, threads: pool.threadCount)
        let items = WorkItem.all(layout, partition) { s in
            partition.chunkStarts(length: layout.lengths[s], firstBoundary: 0, alignment: 16)
        }
        let H = layout.heads, D = layout.headDim
        let a = gates.baseAddress!, u = inputs.baseAddress!, y = output.baseAddress!
        let starts = layout.starts
        // Chunk summaries: carrier v_t and compound gate c_t per item's heads, for items that are
        // not the last chunk of their sequence (the next chunk scans them).
        let carriers = UnsafeMutablePointer<Float>.allocate(capacity: items.count * H * D)
        let compounds = UnsafeMutablePointer<Float>.allocate(capacity: items.count * H)
        defer {
            carriers.deallocate()
            compounds.deallocate()
        }
        let needsCarrierScan = items.contains { !$0.isFirstChunk }
        if needsCarrierScan {
            pool.run(items.count) { index in
                let item = items[index]
                guard !item.isLastChunk else { return }
                let v = carriers + index * H * D, c = compounds + index * H
                v.update(repeating: 0, count: item.heads.count * D)
                c.update(repeating: 1, count: item.heads.count)
                let row = starts[item.sequence] + item.rows.lowerBound
                exactForwardRows(a: a + row * H, u: u + row * H * D, y: nil, rows: item.rows.count,
                                 heads: H, headRange: item.heads, headDim: D, x: v, product: c)
            }
        }
        let output = OutputStreaming(y, count: layout.elementCount, headDim: D)
        state.x.withUnsafeMutableBufferPointer { x0 in
            let x0 = x0.baseAddress!
            pool.run(items.count) { index in
                let item = items[index]
                let n = item.heads.count
                let x = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
                defer { x.deallocate(); output.finish() }
                x.update(from: x0 + (item.sequence * H + item.heads.lowerBound) * D, count: n * D)
                if !item.isFirstChunk {
                    // Carrier scan over the earlier chunks of this sequence: S = c * S + v.
                    var previous = index - 1
                    while !items[previous].isFirstChunk { previous -= 1 }
                    for j in previous..<index {
                        for k in 0..<n {
                            let c = compounds[j * H + k]
                            for ch in 0..<D {
                                x[k * D + ch] = c * x[k * D + ch] + carriers[(j * H + k) * D + ch]
                            }
                        }
                    }
                }
                let row = starts[item.sequence] + item.rows.lowerBound
                exactForwardRows(a: a + row * H, u: u + row * H * D, y: y + row * H * D,
                                 rows: item.rows.count, heads: H, headRange: item.heads, headDim: D,
                                 x: x, product: nil, output: output)
                if item.isLastChunk {
                    (x0 + (item.sequence * H + item.heads.lowerBound) * D).update(from: x, count: n * D)
                }
            }
        }
    }

    /// One decode step: every sequence advances by one position. Identical to `forward` over it.
    public func step(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                     output: UnsafeMutableBufferPointer<Float>, state: inout ExactState) {
        let layout = SequenceLayout.batched(batch: state.sequences, length: 1,
                                            heads: state.heads, headDim: state.headDim)
        forward(gates: gates, inputs: inputs, output: output, layout: layout, state: &state)
    }
}

/// The streaming scan over `rows` rows of one sequence for heads `headRange`.
///
/// `x` holds the state of those heads (`headRange.count * headDim`), updated in place; `y == nil`
/// only advances it. With `product` non-nil the running product of the gates is accumulated into
/// it (one float per head): the compound gate of a chunk. `output` says how `y` is written
/// (ordinary stores unless given).
@inline(__always)
func exactForwardRows(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>?,
    rows: Int, heads H: Int, headRange: Range<Int>, headDim D: Int,
    x: UnsafeMutablePointer<Float>, product: UnsafeMutablePointer<Float>?,
    output: OutputStreaming = .ordinary
) {
    // Head widths and head counts of 16 (the default model's) known to the compiler unroll the
    // loops over channels and heads: on one core of the Intel Xeon host 28-30 ms instead of 33-36
    // at 4 x 65536 rows of 16 heads x 16 (2 cores: 94-96% of the copy bandwidth, from 87-88%).
    func scan<Heads: ChannelWidth>(_ width: Int, _: Heads.Type) {
        exactForwardRows(a: a, u: u, y: y, rows: rows, heads: H, headRange: headRange, D: width, Heads.self,
                         x: x, product: product, output: output)
    }
    switch (D == 16, headRange.count == 16) {
    case (true, true): scan(16, Sixteen.self)
    case (true, false): scan(16, AnyWidth.self)
    default: scan(D, AnyWidth.self)
    }
}

/// The scan of `exactForwardRows` with `Heads.count(headRange.count)` heads. Offsets wrap (`&+`,
/// `&*`): they lie inside arrays whose sizes `forward` checked.
@inline(__always)
private func exactForwardRows<Heads: ChannelWidth>(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>?,
    rows: Int, heads H: Int, headRange: Range<Int>, D: Int, _: Heads.Type,
    x: UnsafeMutablePointer<Float>, product: UnsafeMutablePointer<Float>?, output: OutputStreaming
) {
    let h0 = headRange.lowerBound, n = Heads.count(headRange.count)
    for i in 0..<rows {
        let row = i &* H &+ h0
        let aRow = a + row, uRow = u + row &* D
        for k in 0..<n {
            let ah = aRow[k]
            let xh = x + k &* D, uh = uRow + k &* D
            if let product { product[k] *= ah }
            if let y {
                let yh = y + (row &+ k) &* D
                forEachChannelChunk(D, vector: { c in
                    let v = load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(xh + c))
                    store16(v, xh + c)
                    output.store(v, yh + c)
                }, scalar: { c in
                    let v = (uh + c).pointee + ah * (xh + c).pointee
                    (xh + c).pointee = v
                    (yh + c).pointee = v
                })
            } else {
                forEachChannelChunk(D, vector: { c in
                    store16(load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(xh + c)), xh + c)
                }, scalar: { c in
                    (xh + c).pointee = (uh + c).pointee + ah * (xh + c).pointee
                })
            }
        }
    }
}
