import PhalanxRuntime

extension ExactRecurrence {
    /// The exact recurrence computed through the hierarchical decomposition (SWR.md section 2),
    /// unfused and at any number of levels: a second implementation of `forward`.
    ///
    /// With block length `l = blockLengths[0]`, for each block `t`:
    ///
    ///     w_i   = a_i w_{i-1} + u_i   (from 0 at the block start)     local solve
    ///     g_t[i] = a_start * ... * a_i                                propagation vector
    ///     v_t = w_last,  c_t = g_t[last]                              carrier, compound gate
    ///     S_t = c_t S_{t-1} + v_t,   S_{-1} = x0                      carrier scan
    ///     x_i = w_i + g_t[i] * S_{t-1}                                propagation
    ///
    /// The carrier scan is itself an exact recurrence of length `ceil(n / l)`, solved with the
    /// remaining `blockLengths` (blocks of blocks), and sequentially once they run out.
    ///
    /// - Parameter blockLengths: block length at each level, innermost first (for example
    ///   `[16, 16]`: blocks of 16 positions, then blocks of 16 carriers).
    public func hierarchical(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                             output: UnsafeMutableBufferPointer<Float>, layout: SequenceLayout,
                             state: inout ExactState, blockLengths: [Int],
                             pool: WorkerPool = .shared) {
        let name = "ExactRecurrence.hierarchical"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("inputs", count: inputs.count, expected: layout.elementCount, name)
        layout.check("output", count: output.count, expected: layout.elementCount, name)
        state.check(against: layout, name)
        require(blockLengths.allSatisfy { $0 >= 1 }, "\(name): block lengths must be at least 1, got \(blockLengths)")

        let H = layout.heads, D = layout.headDim
        let a = gates.baseAddress!, u = inputs.baseAddress!, y = output.baseAddress!
        let starts = layout.starts, lengths = layout.lengths
        state.x.withUnsafeMutableBufferPointer { x0 in
            let x0 = x0.baseAddress!
            pool.run(layout.sequenceCount * H) { index in
                let s = index / H, h = index % H, n = lengths[s], row = starts[s]
                // Gather one head's sequence into contiguous arrays, solve, scatter.
                let gate = (0..<n).map { a[(row + $0) * H + h] }
                var input = [Float](repeating: 0, count: n * D)
                for i in 0..<n { for c in 0..<D { input[i * D + c] = u[((row + i) * H + h) * D + c] } }
                let start = Array(UnsafeBufferPointer(start: x0 + index * D, count: D))
                let x = hierarchicalSolve(gates: gate, inputs: input, initial: start, headDim: D,
                                          blockLengths: blockLengths[...])
                for i in 0..<n { for c in 0..<D { y[((row + i) * H + h) * D + c] = x[i * D + c] } }
                if n > 0 { for c in 0..<D { x0[index * D + c] = x[(n - 1) * D + c] } }
            }
        }
    }
}

/// The decomposition on one head's contiguous data: `gates` `[n]`, `inputs` `[n, D]`.
private func hierarchicalSolve(gates: [Float], inputs: [Float], initial: [Float], headDim D: Int,
                               blockLengths: ArraySlice<Int>) -> [Float] {
    let n = gates.count
    guard let l = blockLengths.first, n > l else {
        var x = initial
        var out = [Float](repeating: 0, count: n * D)
        for i in 0..<n {
            for c in 0..<D {
                x[c] = gates[i] * x[c] + inputs[i * D + c]
                out[i * D + c] = x[c]
            }
        }
        return out
    }
    let blocks = (n + l - 1) / l
    var w = [Float](repeating: 0, count: n * D)
    var g = [Float](repeating: 0, count: n)
    var carriers = [Float](repeating: 0, count: blocks * D)
    var compounds = [Float](repeating: 0, count: blocks)
    for t in 0..<blocks {
        let range = (t * l)..<min(n, (t + 1) * l)
        var product: Float = 1
        for i in range {
            product *= gates[i]
            g[i] = product
            for c in 0..<D {
                w[i * D + c] = (i == range.lowerBound ? 0 : gates[i] * w[(i - 1) * D + c]) + inputs[i * D + c]
            }
        }
        compounds[t] = product
        for c in 0..<D { carriers[t * D + c] = w[(range.upperBound - 1) * D + c] }
    }
    let scanned = hierarchicalSolve(gates: compounds, inputs: carriers, initial: initial, headDim: D,
                                    blockLengths: blockLengths.dropFirst())
    for i in 0..<n {
        let t = i / l
        for c in 0..<D {
            let previous = t == 0 ? initial[c] : scanned[(t - 1) * D + c]
            w[i * D + c] += g[i] * previous
        }
    }
    return w
}
