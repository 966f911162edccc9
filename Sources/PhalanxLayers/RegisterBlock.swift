import PhalanxRuntime

/// Six rows by 16 columns of a matrix product in registers: the register block of the
/// 16-register (AVX2) path of both `PackedGemm` and the attention kernel's tile products.
///
/// Six 16-lane accumulators are twelve 8-lane registers; with the `B` operand (two) and one
/// broadcast, 15 of the 16. Their twelve independent multiply-add chains cover the latency of
/// two FMA pipes (4-5 cycles each needs 8-10 in flight).
struct Block6x16 {
    var s0, s1, s2, s3, s4, s5: SIMD16<Float>

    /// All zero.
    @inline(__always)
    init() { (s0, s1, s2, s3, s4, s5) = (.zero, .zero, .zero, .zero, .zero, .zero) }

    /// Rows `c`, `c + cRow`, ..., `c + 5 cRow` (16 floats each).
    @inline(__always)
    init(loading c: UnsafePointer<Float>, cRow: Int) {
        (s0, s1, s2) = (load16(c), load16(c + cRow), load16(c + 2 * cRow))
        (s3, s4, s5) = (load16(c + 3 * cRow), load16(c + 4 * cRow), load16(c + 5 * cRow))
    }

    /// `S[r] += sum_d A[r, d] B[d, 0..<16]` with `A[r, d] = a[r * aRow + d * aDepth]` and
    /// `B[d, j] = b[d * bRow + j]`.
    @inline(__always)
    mutating func add(_ a: UnsafePointer<Float>, aRow: Int, aDepth: Int, _ b: UnsafePointer<Float>, bRow: Int, depth: Int) {
        var ap = a, bp = b
        for _ in 0..<depth {
            let bv = load16(bp)
            s0 = s0.addingProduct(SIMD16(repeating: ap[0]), bv)
            s1 = s1.addingProduct(SIMD16(repeating: ap[aRow]), bv)
            s2 = s2.addingProduct(SIMD16(repeating: ap[2 * aRow]), bv)
            s3 = s3.addingProduct(SIMD16(repeating: ap[3 * aRow]), bv)
            s4 = s4.addingProduct(SIMD16(repeating: ap[4 * aRow]), bv)
            s5 = s5.addingProduct(SIMD16(repeating: ap[5 * aRow]), bv)
            ap += aDepth; bp += bRow
        }
    }

    /// `body(r, S[r])` for the six rows in order.
    @inline(__always)
    func forEachRow(_ body: (Int, SIMD16<Float>) -> Void) {
        body(0, s0); body(1, s1); body(2, s2); body(3, s3); body(4, s4); body(5, s5)
    }
}
