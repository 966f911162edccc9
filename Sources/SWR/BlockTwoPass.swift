import Foundation
import PhalanxRuntime

/// The jagged window computed as the Block Two-Pass algorithm of the GPU kernel (SWR.md section 4):
/// a second implementation of `JaggedWindow.forward`, with materialised transfer matrices.
///
/// Pass 1, every block independently: build the block's `l x l` lower-triangular transfer matrix
///
///     L_t[i][j] = a_{j+1} * ... * a_i     (i > j),   1 on the diagonal,   0 above
///
/// either in log space (`exp` of segment sums of `log a`, summed right to left so no two large
/// prefixes are subtracted) or in linear space (column-wise cumulative products), then the local
/// solve as a dense product `w_t = L_t u_t`, keeping the carrier `v_t` (the last row of `w_t`).
/// Pass 2, every block independently: the rank-one update `y_t = w_t + g_t v_{t-1}^T` with
/// `g_t[i] = L_t[i][0] * a_start`.
///
/// Sequences start from an empty state. Cost is `O(l)` per element, so it serves as a check and
/// as the model of the GPU kernel, not as the CPU fast path.
public struct BlockTwoPass: Hashable, Sendable {
    /// How the transfer matrix is materialised.
    public enum TransferSpace: String, Sendable, CaseIterable { case log, linear }

    /// The window computed: block length `l` and blocks seen `k`.
    public let window: JaggedWindow
    /// Whether transfer matrices are built in log or linear space.
    public let space: TransferSpace

    /// The Block Two-Pass evaluation of `window`, building transfer matrices in `space`.
    public init(window: JaggedWindow = JaggedWindow(), space: TransferSpace = .log) {
        self.window = window
        self.space = space
    }

    /// Same contract as `JaggedWindow.forward` from the empty state.
    public func forward(gates: UnsafeBufferPointer<Float>, inputs: UnsafeBufferPointer<Float>,
                        output: UnsafeMutableBufferPointer<Float>, layout: SequenceLayout,
                        pool: WorkerPool = .shared) {
        let name = "BlockTwoPass.forward"
        layout.check("gates", count: gates.count, expected: layout.gateCount, name)
        layout.check("inputs", count: inputs.count, expected: layout.elementCount, name)
        layout.check("output", count: output.count, expected: layout.elementCount, name)
        let H = layout.heads, D = layout.headDim, l = window.blockLength
        let a = gates.baseAddress!, u = inputs.baseAddress!, y = output.baseAddress!
        let starts = layout.starts, lengths = layout.lengths
        let space = self.space, neighbour = window.seesNeighbour
        pool.run(layout.sequenceCount * H) { index in
            let s = index / H, h = index % H, n = lengths[s]
            let blocks = (n + l - 1) / l
            let gate = { (i: Int) in a[(starts[s] + i) * H + h] }
            let inputAt = { (i: Int) in u + ((starts[s] + i) * H + h) * D }
            let outputAt = { (i: Int) in y + ((starts[s] + i) * H + h) * D }
            var L = [Float](repeating: 0, count: l * l)
            var g = [Float](repeating: 0, count: n)
            var carriers = [Float](repeating: 0, count: blocks * D)
            // Pass 1: transfer matrix, local solve w_t = L_t u_t, carrier v_t.
            for t in 0..<blocks {
                let first = t * l, m = min(l, n - first)
                buildTransfer(&L, m: m, l: l, space: space) { gate(first + $0) }
                for i in 0..<m {
                    g[first + i] = L[i * l] * gate(first)
                    let out = outputAt(first + i)
                    for c in 0..<D {
                        var sum: Float = 0
                        for j in 0...i { sum += L[i * l + j] * inputAt(first + j)[c] }
                        out[c] = sum
                    }
                }
                for c in 0..<D { carriers[t * D + c] = outputAt(first + m - 1)[c] }
            }
            // Pass 2: rank-one update with the previous block's carrier.
            guard neighbour else { return }
            for t in 1..<max(blocks, 1) {
                for i in (t * l)..<min(n, (t + 1) * l) {
                    let out = outputAt(i)
                    for c in 0..<D { out[c] += g[i] * carriers[(t - 1) * D + c] }
                }
            }
        }
    }
}

/// Fills the leading `m x m` of `L` (row stride `l`) with the block's transfer matrix.
private func buildTransfer(_ L: inout [Float], m: Int, l: Int, space: BlockTwoPass.TransferSpace,
                           gate: (Int) -> Float) {
    for i in 0..<m {
        for j in 0..<m { L[i * l + j] = 0 }
    }
    switch space {
    case .log:
        for i in 0..<m {
            L[i * l + i] = 1
            var segment: Float = 0
            for j in stride(from: i - 1, through: 0, by: -1) {
                segment += log(gate(j + 1))
                L[i * l + j] = exp(segment)
            }
        }
    case .linear:
        for j in 0..<m {
            L[j * l + j] = 1
            for i in (j + 1)..<max(m, j + 1) { L[i * l + j] = L[(i - 1) * l + j] * gate(i) }
        }
    }
}
