import CPhalanxIntrinsics
import PhalanxRuntime

extension JaggedWindow {
    /// Gradients of the jagged window (SWR.md section 5), given the output's cotangent `dy`.
    ///
    /// Per block `t` with carrier `p = v_{t-1}`, running backwards:
    ///
    ///     dp          = sum_{i in t} g_i * dy_i                  (sent to block t-1's last position)
    ///     lw_i        = dy_i + a_{i+1} * lw_{i+1}                (+ dp of block t+1 at the last position)
    ///     lg_i        = <dy_i, p> + a_{i+1} * lg_{i+1}
    ///     du_i        = lw_i
    ///     da_i        = <lw_i, w_{i-1}> + lg_i * g_{i-1}         (w, g before a block start: 0, 1)
    ///
    /// and for the initial state (block 0 continues from it): `dw = a_0 lw_0`, `dg = a_0 lg_0`,
    /// `dcarrier = sum_{i in block 0} g_i dy_i`.
    ///
    /// The local states are recomputed from `inputs` one block ahead of the reverse sweep, and the
    /// next block's `dp` is read ahead, so every array crosses memory once: one streaming pass.
    ///
    /// - Parameters:
    ///   - gates, inputs: as given to `forward`.
    ///   - outputGradient: `dy`, `[rows, heads, headDim]`.
    ///   - initialState: the state `forward` started from.
    ///   - inputGradient: receives `du`, `[rows, heads, headDim]` (overwritten).
    ///   - gateGradient: receives `da`, `[rows, heads]` (overwritten).
    /// - Returns: the gradient of the initial state (its `offset` copied from `initialState`).
    @discardableResult
    public func backward(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                         outputGradient: UnsafeBufferPointer<Float>, layout: SequenceLayout,
                         initialState: JaggedState,
                         inputGradient: UnsafeMutableBufferPointer<Float>,
                         gateGradient: UnsafeMutableBufferPointer<Float>,
                         pool: WorkerPool = .shared) -> JaggedState {
        let name = "JaggedWindow.backward"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("inputs", count: inputs.count, expected: layout.elementCount, name)
        layout.check("outputGradient", count: outputGradient.count, expected: layout.elementCount, name)
        layout.check("inputGradient", count: inputGradient.count, expected: layout.elementCount, name)
        layout.check("gateGradient", count: gateGradient.count, expected: layout.gateCount, name)
        initialState.check(against: layout, blockLength: blockLength, name)

        var initial = initialState
        var gradient = initialState
        let partition = Partition(layout, threads: pool.threadCount, minimumChunkRows: .max)
        let items = WorkItem.all(layout, partition) { _ in [0] }
        let H = layout.heads, D = layout.headDim, l = blockLength, neighbour = seesNeighbour
        let a = gates.baseAddress!, u = inputs.baseAddress!, dy = outputGradient.baseAddress!
        let du = inputGradient.baseAddress!, da = gateGradient.baseAddress!
        let starts = layout.starts, lengths = layout.lengths
        withStatePointers(&initial) { st0 in
            withStatePointers(&gradient) { dst in
                pool.run(items.count) { index in
                    let item = items[index]
                    let row = starts[item.sequence]
                    jaggedBackwardSequence(
                        a: a + row * H, u: u + row * H * D, dy: dy + row * H * D,
                        du: du + row * H * D, da: da + row * H, rows: lengths[item.sequence],
                        heads: H, headRange: item.heads, headDim: D, blockLength: l,
                        neighbour: neighbour, sequence: item.sequence, initial: st0, gradient: dst)
                }
            }
        }
        return gradient
    }
}

/// Backward over one whole sequence for a range of heads (see `JaggedBackwardSweep`).
private func jaggedBackwardSequence(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, dy: UnsafePointer<Float>,
    du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>, rows: Int,
    heads H: Int, headRange: Range<Int>, headDim D: Int, blockLength l: Int, neighbour: Bool,
    sequence s: Int, initial: StatePointers, gradient: StatePointers
) {
    func sweep<Width: ChannelWidth, Heads: ChannelWidth>(_: Width.Type, _: Heads.Type) {
        JaggedBackwardSweep<Width, Heads>(a: a, u: u, dy: dy, du: du, da: da, rows: rows, heads: H, headRange: headRange,
                                          headDim: D, blockLength: l, neighbour: neighbour)
            .run(sequence: s, initial: initial, gradient: gradient)
    }
    // Head widths and head counts of 16 (the default model's) known to the compiler unroll the
    // loops over channels and heads: measured on one core of the AMD EPYC at 4 x 65536 rows of
    // 16 heads x 16, a run-time head count cost 20-30% more time.
    switch (D == 16, headRange.count == 16) {
    case (true, true): sweep(Sixteen.self, Sixteen.self)
    case (true, false): sweep(Sixteen.self, AnyWidth.self)
    default: sweep(AnyWidth.self, AnyWidth.self)
    }
}

/// The backward pass of one sequence, streaming forward through memory with a one-block lag.
///
/// At block `t` one ascending pass over its rows recomputes the local states `W` and gate
/// products `G` (kept for the block) and the carrier adjoint `dp_t = sum g_i dy_i`; then block
/// `t-1` is swept in reverse with `dp_t` as its last row's carry-in, reading its `dy` back from
/// cache. Every input and output crosses memory once, in ascending order.
private struct JaggedBackwardSweep<Width: ChannelWidth, Heads: ChannelWidth> {
    let a: UnsafePointer<Float>, u: UnsafePointer<Float>, dy: UnsafePointer<Float>
    let du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>
    let rows: Int, H: Int, h0: Int, headCount: Int, headDim: Int, l: Int, neighbour: Bool
    /// Channels per head: a constant for `Sixteen`, so the channel loops unroll.
    var D: Int { Width.count(headDim) }
    /// Heads of this item: a constant for `Sixteen`, so the head loops unroll.
    var n: Int { Heads.count(headCount) }
    /// How `du` is written: non-temporal stores when its vectors are whole lines.
    let output: OutputStreaming

    init(a: UnsafePointer<Float>, u: UnsafePointer<Float>, dy: UnsafePointer<Float>,
         du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>, rows: Int,
         heads: Int, headRange: Range<Int>, headDim: Int, blockLength: Int, neighbour: Bool) {
        (self.a, self.u, self.dy, self.du, self.da) = (a, u, dy, du, da)
        (self.rows, H, h0, headCount, self.headDim, l) = (rows, heads, headRange.lowerBound, headRange.count, headDim, blockLength)
        self.neighbour = neighbour
        output = OutputStreaming(wholeLines: du, headDim: headDim)
    }

    /// Per block: `W[j]` the local state before row `j` (`W[0]` the block's start), `G` likewise.
    struct Block {
        let W: UnsafeMutablePointer<Float>, G: UnsafeMutablePointer<Float>
        var first = 0, count = 0
    }

    func run(sequence s: Int, initial: StatePointers, gradient: StatePointers) {
        let first = s * H + h0
        var current = Block(W: .allocate(capacity: (l + 1) * n * D), G: .allocate(capacity: (l + 1) * n))
        var previous = Block(W: .allocate(capacity: (l + 1) * n * D), G: .allocate(capacity: (l + 1) * n))
        let carrier = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
        let dp = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
        let lw = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
        let lg = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
        let scratch = SweepScratch(terms: .allocate(capacity: n * 16), ones: .allocate(capacity: n))
        scratch.ones.initialize(repeating: 1, count: n)
        defer {
            for p in [current.W, current.G, previous.W, previous.G, carrier, dp, lw, lg, scratch.terms, scratch.ones] {
                p.deallocate()
            }
        }

        current.W.update(from: initial.local + first * D, count: n * D)
        current.G.update(from: initial.gateProduct + first, count: n)
        carrier.update(from: initial.carrier + first * D, count: n * D)
        (gradient.local + first * D).update(repeating: 0, count: n * D)
        (gradient.gateProduct + first).update(repeating: 0, count: n)
        (gradient.carrier + first * D).update(repeating: 0, count: n * D)

        var start = 0
        var end = min(rows, l - initial.offset[s])
        while start < rows {
            current.first = start
            current.count = end - start
            ascend(current, dp: dp)
            if start == 0 {
                if neighbour { (gradient.carrier + first * D).update(from: dp, count: n * D) }
            } else {
                sweep(previous, carryIn: dp, carrier: carrier, lw: lw, lg: lg, scratch: scratch)
                if previous.first == 0 { writeInitialGradient(lw: lw, lg: lg, to: gradient, first: first) }
                carrier.update(from: previous.W + previous.count * n * D, count: n * D)
            }
            swap(&current, &previous)
            current.W.update(repeating: 0, count: n * D)
            current.G.update(repeating: 1, count: n)
            start = end
            end = min(rows, end + l)
        }
        if rows > 0 {
            dp.update(repeating: 0, count: n * D)
            sweep(previous, carryIn: dp, carrier: carrier, lw: lw, lg: lg, scratch: scratch)
            if previous.first == 0 { writeInitialGradient(lw: lw, lg: lg, to: gradient, first: first) }
        }
        output.finish()
    }

    /// Ascending pass over a block: `W`, `G`, and `dp = sum g_i dy_i` (when the window reaches
    /// the previous block).
    ///
    /// Index arithmetic here and in `sweep` wraps (`&+`, `&*`): every offset lies inside arrays
    /// whose sizes `backward` checked, so overflow checks would only add instructions to the
    /// innermost loops.
    @inline(__always)
    func ascend(_ block: Block, dp: UnsafeMutablePointer<Float>) {
        dp.update(repeating: 0, count: n * D)
        let ahead = 2 &* l &* H &* D
        for j in 0..<block.count {
            let i = block.first &+ j
            let row = i &* H &+ h0
            let aRow = a + row, uRow = u + row &* D, dyRow = dy + row &* D
            let gPrev = block.G + j &* n, gNext = gPrev + n
            let wPrev = block.W + j &* n &* D, wNext = wPrev + n &* D
            // The hardware prefetchers alone left this pass waiting on memory (the sweep between
            // two ascents issues no loads of its own): `u` is asked for two blocks ahead here and
            // `dy` by the sweep, so that requests go out through both halves of the work. Also
            // claim the lines the sweep of the block before will write, when they are not streamed.
            let prefetchInputs = i &+ 2 &* l < rows
            let claim: UnsafeMutablePointer<Float>? = i >= l && !output.streams ? du + (row &- l &* H) &* D : nil
            for k in 0..<n {
                let o = k &* D
                let ah = aRow[k]
                let g = ah * gPrev[k]
                gNext[k] = g
                let uh = uRow + o, dyh = dyRow + o, dpk = dp + o, wp = wPrev + o, wn = wNext + o
                forEachChannelChunk(D, vector: { c in
                    if prefetchInputs {
                        phalanx_prefetch(uh + (c &+ ahead))
                    }
                    if let claim { phalanx_prefetch_for_write(claim + (o &+ c)) }
                    store16(load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(wp + c)), wn + c)
                    if neighbour { store16(load16(dpk + c).addingProduct(SIMD16(repeating: g), load16(dyh + c)), dpk + c) }
                }, scalar: { c in
                    wn[c] = uh[c] + ah * wp[c]
                    if neighbour { dpk[c] += g * dyh[c] }
                })
            }
        }
    }

    /// Reverse sweep over a block whose last row receives `carryIn` (the next block's `dp`):
    ///
    ///     lw_i = dy_i + a_{i+1} lw_{i+1},   lg_i = dy_i * p + a_{i+1} lg_{i+1}   (per channel)
    ///     du_i = lw_i,   da_i = sum_c (lw_i * W_{i-1} + lg_i * G_{i-1})
    ///
    /// Each head's 16 lane partial sums of `da` go to `scratch.terms` (`[n, 16]`); a row's heads
    /// are then summed together by transposing trees (`sumLanes`).
    @inline(__always)
    func sweep(_ block: Block, carryIn: UnsafePointer<Float>, carrier p: UnsafePointer<Float>,
               lw: UnsafeMutablePointer<Float>, lg: UnsafeMutablePointer<Float>, scratch: SweepScratch) {
        lw.update(from: carryIn, count: n * D)
        lg.update(repeating: 0, count: n * D)
        for j in stride(from: block.count - 1, through: 0, by: -1) {
            let i = block.first &+ j
            let row = i &* H &+ h0
            // The block's last row has no next gate inside the block: its carry-in enters unscaled.
            let aNextRow = j == block.count - 1 ? UnsafePointer(scratch.ones) : a + (row &+ H)
            let dyRow = dy + row &* D, duRow = du + row &* D
            let wPrev = block.W + j &* n &* D, gPrev = block.G + j &* n
            // `dy` three blocks ahead of this one: two ahead of the ascent that comes next.
            let prefetchRow = i &+ 3 &* l < rows, dyAhead = 3 &* l &* H &* D
            for k in 0..<n {
                let o = k &* D
                let aNext = aNextRow[k], gk = gPrev[k]
                let dyh = dyRow + o, duh = duRow + o, lwk = lw + o, lgk = lg + o, pk = p + o, wp = wPrev + o
                var terms = SIMD16<Float>.zero
                var tail: Float = 0
                forEachChannelChunk(D, vector: { c in
                    if prefetchRow { phalanx_prefetch(dyh + (c &+ dyAhead)) }
                    let dyc = load16(dyh + c)
                    let lwc = dyc.addingProduct(SIMD16(repeating: aNext), load16(lwk + c))
                    store16(lwc, lwk + c)
                    output.store(lwc, duh + c)
                    terms = terms.addingProduct(lwc, load16(wp + c))
                    if neighbour {
                        let lgc = (dyc * load16(pk + c)).addingProduct(SIMD16(repeating: aNext), load16(lgk + c))
                        store16(lgc, lgk + c)
                        terms = terms.addingProduct(lgc, SIMD16(repeating: gk))
                    }
                }, scalar: { c in
                    let lwc = dyh[c] + aNext * lwk[c]
                    lwk[c] = lwc
                    duh[c] = lwc
                    tail += lwc * wp[c]
                    if neighbour {
                        let lgc = dyh[c] * pk[c] + aNext * lgk[c]
                        lgk[c] = lgc
                        tail += lgc * gk
                    }
                })
                if D % 16 != 0 { terms[0] += tail }
                store16(terms, scratch.terms + k &* 16)
            }
            sumLanes(of: scratch.terms, count: n, into: da + row)
        }
    }

    /// Row-independent buffers of `sweep`: `terms` `[n, 16]` (a row's lane partial sums of `da`)
    /// and `ones` `[n]` (the gates of the row after a block's last row, as seen from inside it).
    struct SweepScratch {
        let terms: UnsafeMutablePointer<Float>, ones: UnsafeMutablePointer<Float>
    }

    /// The first block continues from the initial state: `dw = a_0 lw_0`, `dg = a_0 lg_0`.
    func writeInitialGradient(lw: UnsafePointer<Float>, lg: UnsafePointer<Float>, to gradient: StatePointers, first: Int) {
        for k in 0..<n {
            let a0 = a[h0 + k]
            var lgSum: Float = 0
            for c in 0..<D {
                gradient.local[(first + k) * D + c] = a0 * lw[k * D + c]
                lgSum += lg[k * D + c]
            }
            gradient.gateProduct[first + k] = a0 * lgSum
        }
    }
}

extension ExactRecurrence {
    /// Gradients of the exact recurrence (SWR.md section 5), given the output's cotangent `dx`:
    ///
    ///     lam_i = dx_i + a_{i+1} * lam_{i+1}      (lam_n = 0)
    ///     du_i  = lam_i
    ///     da_i  = <lam_i, x_{i-1}>                (x_{-1} = x0)
    ///     dx0   = a_0 * lam_0
    ///
    /// One reverse streaming pass, split over sequences and head groups.
    ///
    /// - Parameters:
    ///   - gates: as given to `forward`.
    ///   - outputs: `x`, the forward's output, `[rows, heads, headDim]`.
    ///   - outputGradient: `dx`, `[rows, heads, headDim]`.
    ///   - initialState: the state `forward` started from.
    ///   - inputGradient: receives `du` (overwritten); gateGradient receives `da` (overwritten).
    /// - Returns: the gradient of the initial state.
    @discardableResult
    public func backward(gates: UnsafeBufferPointer<Float>, outputs: UnsafeBufferPointer<Float>,
                         outputGradient: UnsafeBufferPointer<Float>, layout: SequenceLayout,
                         initialState: ExactState,
                         inputGradient: UnsafeMutableBufferPointer<Float>,
                         gateGradient: UnsafeMutableBufferPointer<Float>,
                         pool: WorkerPool = .shared) -> ExactState {
        let name = "ExactRecurrence.backward"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("outputs", count: outputs.count, expected: layout.elementCount, name)
        layout.check("outputGradient", count: outputGradient.count, expected: layout.elementCount, name)
        layout.check("inputGradient", count: inputGradient.count, expected: layout.elementCount, name)
        layout.check("gateGradient", count: gateGradient.count, expected: layout.gateCount, name)
        initialState.check(against: layout, name)

        var gradient = ExactState(for: layout)
        let partition = Partition(layout, threads: pool.threadCount, minimumChunkRows: .max)
        let items = WorkItem.all(layout, partition) { _ in [0] }
        let H = layout.heads, D = layout.headDim
        let a = gates.baseAddress!, x = outputs.baseAddress!, dx = outputGradient.baseAddress!
        let du = inputGradient.baseAddress!, da = gateGradient.baseAddress!
        let starts = layout.starts, lengths = layout.lengths
        initialState.x.withUnsafeBufferPointer { x0 in
            gradient.x.withUnsafeMutableBufferPointer { dx0 in
                let x0 = x0.baseAddress!, dx0 = dx0.baseAddress!
                pool.run(items.count) { index in
                    let item = items[index]
                    let row = starts[item.sequence], rows = lengths[item.sequence]
                    let first = item.sequence * H + item.heads.lowerBound
                    exactBackwardSequence(
                        a: a + row * H, x: x + row * H * D, dx: dx + row * H * D,
                        du: du + row * H * D, da: da + row * H, rows: rows, heads: H,
                        headRange: item.heads, headDim: D, x0: x0 + first * D, dx0: dx0 + first * D)
                }
            }
        }
        return gradient
    }
}

private func exactBackwardSequence(
    a: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafePointer<Float>,
    du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>, rows: Int,
    heads H: Int, headRange: Range<Int>, headDim D: Int,
    x0: UnsafePointer<Float>, dx0: UnsafeMutablePointer<Float>
) {
    let n = headRange.count, h0 = headRange.lowerBound
    // Rows ahead (in the backward direction) to prefetch: 64 KiB of each stream, into level 2.
    // The hardware prefetchers follow a descending walk poorly; in scans like this one, 32 to 256
    // rows ahead did equally well and 512 or more worse.
    let prefetchRows = max(8, 65536 / (H * D * MemoryLayout<Float>.stride))
    // du is written once and not read again here: non-temporal stores skip the read for
    // ownership that an ordinary store costs (a third of the traffic of a write stream).
    let output = OutputStreaming(wholeLines: du, headDim: D)
    defer { output.finish() }
    // lam lives in dx0 (this item's slice): it ends as lam_0, then scaled by a_0.
    let lam = dx0
    lam.update(repeating: 0, count: n * D)
    // With 16-channel heads and AVX-512, the products `lam * x` of 16 heads are summed together
    // by one transposing tree (`sumLanes`) instead of one horizontal sum each. Not with AVX2: this
    // scan waits on memory there, and on one core of the AMD EPYC (AVX2 build, `bench operators
    // --only exact`) trees of 8 heads took 32-45 ms against 28-41 ms for sums one head at a time.
    let products = UnsafeMutablePointer<Float>.allocate(capacity: 16 * 16)
    defer { products.deallocate() }
    for i in stride(from: rows - 1, through: 0, by: -1) {
        /// Head `k`'s operands at row `i` (the next row's gate, lam, dx, du, and x one row back),
        /// with the rows ahead prefetched.
        @inline(__always) func operands(_ k: Int) -> (aNext: Float, lam: UnsafeMutablePointer<Float>, dx: UnsafePointer<Float>,
                                                     du: UnsafeMutablePointer<Float>, xPrev: UnsafePointer<Float>) {
            let h = h0 + k
            if i >= prefetchRows {
                let ahead = ((i - prefetchRows) * H + h) * D
                phalanx_prefetch(x + ahead)
                phalanx_prefetch(dx + ahead)
                if !output.streams { phalanx_prefetch_for_write(du + ahead) }
            }
            return (i + 1 < rows ? a[(i + 1) * H + h] : 0, lam + k * D, dx + (i * H + h) * D, du + (i * H + h) * D,
                    i > 0 ? x + ((i - 1) * H + h) * D : x0 + k * D)
        }
        /// lam_k = dx_i + a_{i+1} lam_k, written to du; returns lam_k * x_{i-1} (16 channels).
        @inline(__always) func head16(_ k: Int) -> SIMD16<Float> {
            let o = operands(k)
            let v = load16(o.dx).addingProduct(SIMD16(repeating: o.aNext), load16(o.lam))
            store16(v, o.lam)
            output.store(v, o.du)
            return v * load16(o.xPrev)
        }
        if D == 16 {
            var k = 0
            while hasWideRegisters && k + 16 <= n {
                for j in 0..<16 { store16(head16(k + j), products + 16 * j) }
                sumLanes(of: products, count: 16, into: da + i * H + h0 + k)
                k += 16
            }
            for k in k..<n { da[i * H + h0 + k] = horizontalSum(head16(k)) }
        } else {
            for k in 0..<n {
                let o = operands(k)
                var dot: Float = 0
                for c in 0..<D {
                    let v = o.dx[c] + o.aNext * o.lam[c]
                    o.lam[c] = v
                    o.du[c] = v
                    dot += v * o.xPrev[c]
                }
                da[i * H + h0 + k] = dot
            }
        }
    }
    if rows > 0 {
        for k in 0..<n {
            let a0 = a[h0 + k]
            for c in 0..<D { lam[k * D + c] *= a0 }
        }
    }
}
