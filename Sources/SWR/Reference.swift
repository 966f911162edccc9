/// Slow, obviously correct double-precision references for every operator, kept beside the fast
/// kernels and used by the tests. Same layouts as the kernels (`SequenceLayout`), in `Double`.
public enum Reference {
    /// The jagged-window state in double precision; fields as in `JaggedState`.
    public struct JaggedState64: Equatable, Sendable {
        /// `w`, `[sequences, heads, headDim]`.
        public var local: [Double]
        /// `g`, `[sequences, heads]`.
        public var gateProduct: [Double]
        /// `v` of the previous block, `[sequences, heads, headDim]`.
        public var carrier: [Double]
        /// Position inside the current block, per sequence.
        public var offset: [Int]

        /// The single-precision `state`, widened to `Double`.
        public init(_ state: JaggedState) {
            local = state.local.map(Double.init)
            gateProduct = state.gateProduct.map(Double.init)
            carrier = state.carrier.map(Double.init)
            offset = state.offset
        }
    }

    /// `x_i = a_i x_{i-1} + u_i` by plain iteration. Returns the outputs and the final state.
    public static func exactRecurrence(gates: [Double], inputs: [Double], layout: SequenceLayout,
                                       initial: [Double]? = nil) -> (output: [Double], final: [Double]) {
        let H = layout.heads, D = layout.headDim
        var state = initial ?? [Double](repeating: 0, count: layout.sequenceCount * H * D)
        var out = [Double](repeating: 0, count: layout.elementCount)
        for s in 0..<layout.sequenceCount {
            for i in 0..<layout.lengths[s] {
                let row = layout.starts[s] + i
                for h in 0..<H {
                    for c in 0..<D {
                        let k = (s * H + h) * D + c
                        state[k] = gates[row * H + h] * state[k] + inputs[(row * H + h) * D + c]
                        out[(row * H + h) * D + c] = state[k]
                    }
                }
            }
        }
        return (out, state)
    }

    /// The jagged window from its definition as a sum over the window, with explicit products:
    ///
    ///     y_i = sum_{j = start(i)}^{i} (a_{j+1} * ... * a_i) * u_j   [+ g-weighted carrier in block 0]
    ///
    /// where `start(i)` is the first position of the previous block (k = 2) or of the own block
    /// (k = 1). The initial state's local state `w0` enters as an input at position -1 of the
    /// current block, and its carrier `p` (weighted by `g0 * a_0 * ... * a_i`) only in block 0,
    /// for k = 2. The final state is read off the same sums.
    public static func jaggedWindow(gates: [Double], inputs: [Double], layout: SequenceLayout,
                                    window: JaggedWindow, initial: JaggedState64? = nil)
        -> (output: [Double], final: JaggedState64) {
        let H = layout.heads, D = layout.headDim, l = window.blockLength
        var final = initial ?? JaggedState64(JaggedState(for: layout, blockLength: l))
        let start = final
        var out = [Double](repeating: 0, count: layout.elementCount)
        for s in 0..<layout.sequenceCount {
            let n = layout.lengths[s], o = start.offset[s], row0 = layout.starts[s]
            for h in 0..<H {
                let gate = { (i: Int) in gates[(row0 + i) * H + h] }
                /// a_{j+1} * ... * a_i (1 when j == i).
                func product(from j: Int, to i: Int) -> Double {
                    var p = 1.0
                    if j + 1 <= i { for k in (j + 1)...i { p *= gate(k) } }
                    return p
                }
                let sh = s * H + h
                /// Input j, with the initial local state as input -1.
                func input(_ j: Int, _ c: Int) -> Double {
                    j == -1 ? start.local[sh * D + c] : inputs[((row0 + j) * H + h) * D + c]
                }
                /// First call position of block t (block 0 may have begun before the call).
                func blockStart(_ t: Int) -> Int { t == 0 ? -1 : t * l - o }
                /// Local state at position i of block t (sum over the own block).
                func local(_ i: Int, _ t: Int, _ c: Int) -> Double {
                    var sum = 0.0
                    for j in blockStart(t)...i { sum += product(from: j, to: i) * input(j, c) }
                    return sum
                }
                /// g at position i of block t.
                func gateProduct(_ i: Int, _ t: Int) -> Double {
                    t == 0 ? start.gateProduct[sh] * product(from: -1, to: i) : product(from: t * l - o - 1, to: i)
                }
                /// The carrier block t sees: the initial one for block 0, else block t-1's end.
                func carrier(_ t: Int, _ c: Int) -> Double {
                    t == 0 ? start.carrier[sh * D + c] : local(t * l - o - 1, t - 1, c)
                }
                for i in 0..<n {
                    let t = (o + i) / l
                    for c in 0..<D {
                        var y = 0.0
                        let first = window.blocksSeen == 2 && t >= 1 ? blockStart(t - 1) : blockStart(t)
                        for j in first...i { y += product(from: j, to: i) * input(j, c) }
                        if window.blocksSeen == 2 && t == 0 {
                            y += gateProduct(i, 0) * start.carrier[sh * D + c]
                        }
                        out[((row0 + i) * H + h) * D + c] = y
                    }
                }
                // Final state after position n-1.
                guard n > 0 else { continue }
                let endOffset = (o + n) % l
                let tLast = (o + n - 1) / l
                for c in 0..<D {
                    if endOffset == 0 {
                        final.carrier[sh * D + c] = local(n - 1, tLast, c)
                        final.local[sh * D + c] = 0
                    } else {
                        final.carrier[sh * D + c] = carrier(tLast, c)
                        final.local[sh * D + c] = local(n - 1, tLast, c)
                    }
                }
                final.gateProduct[sh] = endOffset == 0 ? 1 : gateProduct(n - 1, tLast)
            }
            if n > 0 { final.offset[s] = (o + n) % l }
        }
        return (out, final)
    }

    /// The untruncated recurrence seen as a window longer than the sequence: every output is the
    /// full sum `sum_{j <= i} (a_{j+1} ... a_i) u_j` (used to test `exactRecurrence` and to show
    /// what the jagged window drops).
    public static func fullWindow(gates: [Double], inputs: [Double], layout: SequenceLayout) -> [Double] {
        let H = layout.heads, D = layout.headDim
        var out = [Double](repeating: 0, count: layout.elementCount)
        for s in 0..<layout.sequenceCount {
            let row0 = layout.starts[s]
            for h in 0..<H {
                for i in 0..<layout.lengths[s] {
                    var p = 1.0
                    for j in stride(from: i, through: 0, by: -1) {
                        for c in 0..<D { out[((row0 + i) * H + h) * D + c] += p * inputs[((row0 + j) * H + h) * D + c] }
                        p *= gates[(row0 + j) * H + h]
                    }
                }
            }
        }
        return out
    }
}
