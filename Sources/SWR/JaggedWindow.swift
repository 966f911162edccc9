import PhalanxRuntime

/// The sliding window recurrence with a jagged window (SWR.md section 3).
///
/// For block length `l`, position `i` in block `t = i / l`:
///
///     w_i = a_i * w_{i-1} + u_i        (w restarts from 0 at each block start)
///     g_i = a_i * g_{i-1}              (g restarts from 1 at each block start)
///     y_i = w_i + g_i * v_{t-1}        blocksSeen = 2 (k = 2, the default, what Phalanx uses)
///     y_i = w_i                        blocksSeen = 1 (k = 1, local only)
///
/// where `v_{t-1}` is the terminal local state of block `t-1` (the carrier; for block 0, the
/// initial state's carrier, 0 by default). Position `i` sees exactly the positions from the start
/// of block `t-1` up to `i`. Every block boundary carries, whatever the length, the batch size or
/// the number of threads: unlike the reference GPU kernel, no edge drops the carrier.
///
/// Blocks are counted from each sequence's start (or continue from its state's offset), and a
/// length that is not a multiple of `l` simply ends mid-block: later padding could never change
/// earlier outputs.
///
/// Complexity: one streaming pass, 2 multiply-adds per channel and position; work is split over
/// sequences and head groups, and over time chunks (with a one-block halo) when those are few.
public struct JaggedWindow: Hashable, Sendable {
    /// The paper's block length, `l = 16`: the default everywhere a block length is taken.
    public static let standardBlockLength = 16
    /// The paper's window, `k = 2` (a position sees its own block and the previous one).
    public static let standardBlocksSeen = 2
    /// Channels per head of the Phalanx layer and of the GPU kernels, 16: one head fills one
    /// 16-lane vector on the CPU, and the GPU kernels assign lanes per head by it.
    public static let standardHeadDim = 16

    /// Positions per block, `l` (16 on the reference GPU kernel).
    public let blockLength: Int
    /// How many blocks a position sees: 1 (its own) or 2 (its own and the previous one).
    public let blocksSeen: Int

    /// A window of `blocksSeen` blocks of `blockLength` positions.
    public init(blockLength: Int = standardBlockLength, blocksSeen: Int = standardBlocksSeen) {
        require(blockLength >= 1, "JaggedWindow: blockLength must be at least 1, got \(blockLength)")
        require(blocksSeen == 1 || blocksSeen == 2,
                     "JaggedWindow: blocksSeen (the reference's k) must be 1 or 2, got \(blocksSeen); use ExactRecurrence for the untruncated scan")
        self.blockLength = blockLength
        self.blocksSeen = blocksSeen
    }

    var seesNeighbour: Bool { blocksSeen == 2 }

    /// Runs the window over every sequence of `layout`, continuing from `state` and leaving in it
    /// the state after each sequence's last position.
    ///
    /// - Parameters:
    ///   - gates: `a`, `[rows, heads]`, normally in `[0, 1]` (any finite value is computed as given).
    ///   - inputs: `u`, `[rows, heads, headDim]`.
    ///   - output: `y`, `[rows, heads, headDim]`; may not alias `inputs`.
    ///   - state: per-sequence state (`JaggedState(for: layout, blockLength:)` for fresh sequences).
    public func forward(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                        output: UnsafeMutableBufferPointer<Float>, layout: SequenceLayout,
                        state: inout JaggedState, pool: WorkerPool = .shared) {
        let name = "JaggedWindow.forward"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("inputs", count: inputs.count, expected: layout.elementCount, name)
        layout.check("output", count: output.count, expected: layout.elementCount, name)
        state.check(against: layout, blockLength: blockLength, name)

        let partition = Partition(layout, threads: pool.threadCount)
        let items = WorkItem.all(layout, partition) { s in
            partition.chunkStarts(length: layout.lengths[s],
                                  firstBoundary: (blockLength - state.offset[s]) % blockLength,
                                  alignment: blockLength)
        }
        let H = layout.heads, D = layout.headDim, l = blockLength, neighbour = seesNeighbour
        let a = gates.baseAddress!, u = inputs.baseAddress!, y = output.baseAddress!
        let starts = layout.starts
        let output = OutputStreaming(y, count: layout.elementCount, headDim: D)
        // Items of one sequence run concurrently: all read the offsets as they were on entry.
        let initialOffsets = state.offset
        withStatePointers(&state) { st in
            pool.run(items.count) { index in
                let item = items[index]
                let scratch = ScratchState(heads: item.heads, headDim: D)
                defer { scratch.deallocate(); output.finish() }
                var offset: Int
                if item.isFirstChunk {
                    offset = initialOffsets[item.sequence]
                    scratch.load(from: st, sequence: item.sequence, heads: H, headDim: D)
                } else {
                    // Halo: the chunk starts at a block boundary and needs only the previous
                    // block's carrier; recompute that block (read-only) from a fresh start, or from
                    // the sequence's own state when that block is the sequence's first.
                    let haloStart = max(item.rows.lowerBound - l, 0)
                    if haloStart == 0 {
                        offset = initialOffsets[item.sequence]
                        scratch.load(from: st, sequence: item.sequence, heads: H, headDim: D)
                    } else {
                        offset = 0
                        scratch.reset(carrier: true)
                    }
                    let row = starts[item.sequence] + haloStart
                    jaggedForwardRows(
                        a: a + row * H, u: u + row * H * D, y: nil,
                        rows: item.rows.lowerBound - haloStart, heads: H, headRange: item.heads,
                        headDim: D, state: scratch, offset: &offset, blockLength: l, neighbour: true)
                }
                let row = starts[item.sequence] + item.rows.lowerBound
                jaggedForwardRows(
                    a: a + row * H, u: u + row * H * D, y: y + row * H * D,
                    rows: item.rows.count, heads: H, headRange: item.heads, headDim: D,
                    state: scratch, offset: &offset, blockLength: l, neighbour: neighbour, output: output)
                if item.isLastChunk {
                    // Items of one sequence that write its state own disjoint head ranges.
                    scratch.store(to: st, sequence: item.sequence, heads: H, headDim: D)
                }
            }
        }
        for s in 0..<layout.sequenceCount {
            state.offset[s] = (initialOffsets[s] + layout.lengths[s]) % blockLength
        }
    }

    /// One decode step: every sequence advances by one position (`layout` has length 1 each).
    /// Identical to `forward` over that one position.
    public func step(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                     output: UnsafeMutableBufferPointer<Float>, state: inout JaggedState) {
        let layout = SequenceLayout.batched(batch: state.sequences, length: 1,
                                            heads: state.heads, headDim: state.headDim)
        forward(gates: gates, inputs: inputs, output: output, layout: layout, state: &state)
    }
}

/// The scan itself over `rows` rows of one sequence, for heads `headRange`, in place on `state`.
///
/// `a`, `u`, `y` point at the first row (row strides `heads` and `heads * headDim`); `y == nil`
/// only advances the state (a halo). At each block end the local state becomes the carrier.
/// `output` says how `y` is written (ordinary stores unless given).
@inline(__always)
func jaggedForwardRows(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>?,
    rows: Int, heads H: Int, headRange: Range<Int>, headDim D: Int,
    state: ScratchState, offset: inout Int, blockLength l: Int, neighbour: Bool,
    output: OutputStreaming = .ordinary
) {
    // Head widths and head counts of 16 (the default model's) known to the compiler unroll the
    // loops over channels and heads (on the Intel Xeon host the exact forward's equivalent took
    // 28-30 ms on one core instead of 33-36).
    func scan<Heads: ChannelWidth>(_ width: Int, _: Heads.Type) {
        jaggedForwardRows(a: a, u: u, y: y, rows: rows, heads: H, headRange: headRange, D: width, Heads.self,
                          state: state, offset: &offset, blockLength: l, neighbour: neighbour, output: output)
    }
    switch (D == 16, headRange.count == 16) {
    case (true, true): scan(16, Sixteen.self)
    case (true, false): scan(16, AnyWidth.self)
    default: scan(D, AnyWidth.self)
    }
}

/// The scan of `jaggedForwardRows` with `Heads.count(headRange.count)` heads. Offsets wrap (`&+`,
/// `&*`): they lie inside arrays whose sizes `forward` checked.
@inline(__always)
private func jaggedForwardRows<Heads: ChannelWidth>(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>?,
    rows: Int, heads H: Int, headRange: Range<Int>, D: Int, _: Heads.Type,
    state: ScratchState, offset: inout Int, blockLength l: Int, neighbour: Bool, output: OutputStreaming
) {
    let h0 = headRange.lowerBound, n = Heads.count(headRange.count)
    let w = state.local, g = state.gateProduct, v = state.carrier
    var r = 0
    while r < rows {
        let segment = min(rows - r, l - offset)
        for i in r..<(r + segment) {
            let row = i &* H &+ h0
            let aRow = a + row, uRow = u + row &* D
            for k in 0..<n {
                let ah = aRow[k]
                let gh = g[k] * ah
                g[k] = gh
                let o = k &* D
                let wh = w + o, vh = v + o, uh = uRow + o
                if let y {
                    let yh = y + (row &+ k) &* D
                    forEachChannelChunk(D, vector: { c in
                        let wc = load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(wh + c))
                        store16(wc, wh + c)
                        output.store(neighbour ? wc.addingProduct(SIMD16(repeating: gh), load16(vh + c)) : wc, yh + c)
                    }, scalar: { c in
                        let wc = (uh + c).pointee + ah * (wh + c).pointee
                        (wh + c).pointee = wc
                        (yh + c).pointee = neighbour ? wc + gh * (vh + c).pointee : wc
                    })
                } else {
                    forEachChannelChunk(D, vector: { c in
                        store16(load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(wh + c)), wh + c)
                    }, scalar: { c in
                        (wh + c).pointee = (uh + c).pointee + ah * (wh + c).pointee
                    })
                }
            }
        }
        r += segment
        offset += segment
        if offset == l {
            offset = 0
            state.endBlock()
        }
    }
}
