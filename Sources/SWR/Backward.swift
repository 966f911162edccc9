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

/// Backward over one whole sequence for a range of heads (see `JaggedWindow.backward`).
private func jaggedBackwardSequence(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, dy: UnsafePointer<Float>,
    du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>, rows: Int,
    heads H: Int, headRange: Range<Int>, headDim D: Int, blockLength l: Int, neighbour: Bool,
    sequence s: Int, initial: StatePointers, gradient: StatePointers
) {
    // Constant head width and reach let the compiler drop the channel loop and the branches.
    switch (D == 16, neighbour) {
    case (true, true):
        jaggedBackwardSequence(a: a, u: u, dy: dy, du: du, da: da, rows: rows, heads: H, headRange: headRange,
                               D: 16, blockLength: l, neighbour: true, sequence: s, initial: initial, gradient: gradient)
    case (true, false):
        jaggedBackwardSequence(a: a, u: u, dy: dy, du: du, da: da, rows: rows, heads: H, headRange: headRange,
                               D: 16, blockLength: l, neighbour: false, sequence: s, initial: initial, gradient: gradient)
    default:
        jaggedBackwardSequence(a: a, u: u, dy: dy, du: du, da: da, rows: rows, heads: H, headRange: headRange,
                               D: D, blockLength: l, neighbour: neighbour, sequence: s, initial: initial, gradient: gradient)
    }
}

@inline(__always)
private func jaggedBackwardSequence(
    a: UnsafePointer<Float>, u: UnsafePointer<Float>, dy: UnsafePointer<Float>,
    du: UnsafeMutablePointer<Float>, da: UnsafeMutablePointer<Float>, rows: Int,
    heads H: Int, headRange: Range<Int>, D: Int, blockLength l: Int, neighbour: Bool,
    sequence s: Int, initial: StatePointers, gradient: StatePointers
) {
    let n = headRange.count, h0 = headRange.lowerBound
    let first = s * H + h0
    // W[j] is the local state before row j of the block (W[0] its start), G likewise.
    let W = UnsafeMutablePointer<Float>.allocate(capacity: (l + 1) * n * D)
    let G = UnsafeMutablePointer<Float>.allocate(capacity: (l + 1) * n)
    let carrier = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
    let dp = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
    let lw = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
    // lg kept per channel (lg = sum over channels), so that da needs one horizontal sum, not two.
    let lgv = UnsafeMutablePointer<Float>.allocate(capacity: n * D)
    defer { for p in [W, G, carrier, dp, lw, lgv] { p.deallocate() } }

    W.update(from: initial.local + first * D, count: n * D)
    G.update(from: initial.gateProduct + first, count: n)
    carrier.update(from: initial.carrier + first * D, count: n * D)
    (gradient.local + first * D).update(repeating: 0, count: n * D)
    (gradient.gateProduct + first).update(repeating: 0, count: n)
    (gradient.carrier + first * D).update(repeating: 0, count: n * D)

    /// dp = sum_{i in rows} g_i dy_i, with g running from `start[k]` (or 1) over the rows' gates.
    func carrierAdjoint(_ range: Range<Int>, start: UnsafePointer<Float>?, into out: UnsafeMutablePointer<Float>) {
        out.update(repeating: 0, count: n * D)
        for k in 0..<n {
            var g: Float = start?[k] ?? 1
            let outk = out + k * D
            for i in range {
                g *= a[i * H + h0 + k]
                let dyh = dy + (i * H + h0 + k) * D
                forEachChannelChunk(D, vector: { c in
                    store16(load16(outk + c).addingProduct(SIMD16(repeating: g), load16(dyh + c)), outk + c)
                }, scalar: { c in outk[c] += g * dyh[c] })
            }
        }
    }

    var r0 = 0
    var segmentEnd = min(rows, l - initial.offset[s])
    if neighbour { carrierAdjoint(0..<segmentEnd, start: G, into: gradient.carrier + first * D) }
    while r0 < rows {
        let m = segmentEnd - r0
        // 1. Local states of this block, kept for the reverse sweep.
        for j in 0..<m {
            let aRow = a + (r0 + j) * H, uRow = u + (r0 + j) * H * D
            for k in 0..<n {
                let ah = aRow[h0 + k]
                G[(j + 1) * n + k] = ah * G[j * n + k]
                let wPrev = W + (j * n + k) * D, wNext = W + ((j + 1) * n + k) * D, uh = uRow + (h0 + k) * D
                forEachChannelChunk(D, vector: { c in
                    store16(load16(uh + c).addingProduct(SIMD16(repeating: ah), load16(wPrev + c)), wNext + c)
                }, scalar: { c in wNext[c] = uh[c] + ah * wPrev[c] })
            }
        }
        // 2. Read ahead: the next block's carrier adjoint enters lw at this block's last row.
        let nextEnd = min(rows, segmentEnd + l)
        if neighbour && segmentEnd < rows {
            carrierAdjoint(segmentEnd..<nextEnd, start: nil, into: lw)
        } else {
            lw.update(repeating: 0, count: n * D)
        }
        lgv.update(repeating: 0, count: n * D)
        // 3. Reverse sweep; at the last row the carry factor is 1 (lw holds dp, lg is 0).
        for j in stride(from: m - 1, through: 0, by: -1) {
            let i = r0 + j
            let isLast = j == m - 1
            let aNextRow = a + (i + 1) * H
            for k in 0..<n {
                let h = h0 + k
                let aNext: Float = isLast ? 1 : aNextRow[h]
                let dyh = dy + (i * H + h) * D, duh = du + (i * H + h) * D
                let lwh = lw + k * D, lgh = lgv + k * D, ph = carrier + k * D, wPrev = W + (j * n + k) * D
                let gPrev = G[j * n + k]
                var dot: Float = 0
                forEachChannelChunk(D, vector: { c in
                    let dyc = load16(dyh + c)
                    let lwc = dyc.addingProduct(SIMD16(repeating: aNext), load16(lwh + c))
                    store16(lwc, lwh + c)
                    store16(lwc, duh + c)
                    var terms = lwc * load16(wPrev + c)
                    if neighbour {
                        let lgc = (dyc * load16(ph + c)).addingProduct(SIMD16(repeating: aNext), load16(lgh + c))
                        store16(lgc, lgh + c)
                        terms = terms.addingProduct(lgc, SIMD16(repeating: gPrev))
                    }
                    dot += terms.sum()
                }, scalar: { c in
                    let lwc = dyh[c] + aNext * lwh[c]
                    lwh[c] = lwc
                    duh[c] = lwc
                    dot += lwc * wPrev[c]
                    if neighbour {
                        let lgc = dyh[c] * ph[c] + aNext * lgh[c]
                        lgh[c] = lgc
                        dot += lgc * gPrev
                    }
                })
                da[i * H + h] = dot
            }
        }
        if r0 == 0 {
            for k in 0..<n {
                let a0 = a[h0 + k]
                var lg: Float = 0
                for c in 0..<D {
                    gradient.local[(first + k) * D + c] = a0 * lw[k * D + c]
                    lg += lgv[k * D + c]
                }
                gradient.gateProduct[first + k] = a0 * lg
            }
        }
        // The block's terminal local state is the next block's carrier; the next block starts fresh.
        carrier.update(from: W + m * n * D, count: n * D)
        W.update(repeating: 0, count: n * D)
        G.update(repeating: 1, count: n)
        r0 = segmentEnd
        segmentEnd = nextEnd
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
    // lam lives in dx0 (this item's slice): it ends as lam_0, then scaled by a_0.
    let lam = dx0
    lam.update(repeating: 0, count: n * D)
    for i in stride(from: rows - 1, through: 0, by: -1) {
        for k in 0..<n {
            let h = h0 + k
            let aNext: Float = i + 1 < rows ? a[(i + 1) * H + h] : 0
            let lamh = lam + k * D, dxh = dx + (i * H + h) * D, duh = du + (i * H + h) * D
            let xPrev = i > 0 ? x + ((i - 1) * H + h) * D : x0 + k * D
            var dot: Float = 0
            forEachChannelChunk(D, vector: { c in
                let v = load16(dxh + c).addingProduct(SIMD16(repeating: aNext), load16(lamh + c))
                store16(v, lamh + c)
                store16(v, duh + c)
                dot += (v * load16(xPrev + c)).sum()
            }, scalar: { c in
                let v = dxh[c] + aNext * lamh[c]
                lamh[c] = v
                duh[c] = v
                dot += v * xPrev[c]
            })
            da[i * H + h] = dot
        }
    }
    if rows > 0 {
        for k in 0..<n {
            let a0 = a[h0 + k]
            for c in 0..<D { lam[k * D + c] *= a0 }
        }
    }
}
