import PhalanxLayers
import PhalanxRuntime
import Testing

/// `Gemm.multiply` with each kernel against a double-precision triple loop.
@Suite("Matrix products")
struct GemmTests {
    /// `C = alpha op(A) op(B) + beta C` in double precision, row-major with leading dimensions.
    func reference(m: Int, n: Int, k: Int, a: [Float], transposeA: Bool, lda: Int, b: [Float], transposeB: Bool, ldb: Int,
                   c: [Float], ldc: Int, alpha: Double, beta: Double) -> [Double] {
        var out = c.map(Double.init)
        for i in 0..<m {
            for j in 0..<n {
                var sum = 0.0
                for p in 0..<k {
                    let x = transposeA ? a[p * lda + i] : a[i * lda + p]
                    let y = transposeB ? b[j * ldb + p] : b[p * ldb + j]
                    sum += Double(x) * Double(y)
                }
                out[i * ldc + j] = alpha * sum + (beta == 0 ? 0 : beta * Double(c[i * ldc + j]))
            }
        }
        return out
    }

    @Test("every kernel, transpose and edge shape matches the reference", arguments: Gemm.Kernel.allCases)
    func matchesReference(kernel: Gemm.Kernel) {
        var rng = SeededGenerator(seed: 11)
        // Whole and ragged register tiles of both instruction sets (8 x 32 and 6 x 16), and blocks
        // that cross the kc, mc and nc boundaries.
        let shapes = [(1, 1, 1), (7, 33, 5), (8, 32, 192), (9, 31, 193), (6, 16, 192), (12, 48, 385), (13, 17, 7),
                      (40, 70, 400), (200, 37, 64), (3, 1100, 17), (150, 150, 150), (288, 64, 20)]
        for (m, n, k) in shapes {
            for (transposeA, transposeB) in [(false, false), (false, true), (true, false), (true, true)] {
                for (alpha, beta) in [(Float(1), Float(0)), (0.5, 1), (-2, 0.25)] {
                    // Leading dimensions wider than the matrices, to catch stride mistakes.
                    let lda = (transposeA ? m : k) + 3, ldb = (transposeB ? k : n) + 5, ldc = n + 2
                    let a = (0..<((transposeA ? k : m) * lda)).map { _ in Float.random(in: -1...1, using: &rng) }
                    let b = (0..<((transposeB ? n : k) * ldb)).map { _ in Float.random(in: -1...1, using: &rng) }
                    // With beta 0 the output's old contents must not matter, NaN included.
                    var c = (0..<(m * ldc)).map { _ in beta == 0 ? Float.nan : Float.random(in: -1...1, using: &rng) }
                    let expected = reference(m: m, n: n, k: k, a: a, transposeA: transposeA, lda: lda, b: b, transposeB: transposeB,
                                             ldb: ldb, c: c, ldc: ldc, alpha: Double(alpha), beta: Double(beta))
                    c.withUnsafeMutableBufferPointer { cp in
                        Gemm.multiply(m: m, n: n, k: k, a, transposeA: transposeA, b, transposeB: transposeB, into: cp.baseAddress!,
                                      alpha: alpha, beta: beta, lda: lda, ldb: ldb, ldc: ldc, kernel: kernel)
                    }
                    var worst = 0.0
                    for i in 0..<m { for j in 0..<n { worst = max(worst, abs(Double(c[i * ldc + j]) - expected[i * ldc + j])) } }
                    #expect(worst < 1e-5 * Double(k).squareRoot() * 4, "m \(m) n \(n) k \(k) tA \(transposeA) tB \(transposeB) alpha \(alpha) beta \(beta): \(worst)")
                    // Padding columns of C beyond n are untouched.
                    for i in 0..<m { for j in n..<ldc where !(beta == 0) { #expect(c[i * ldc + j] == Float(expected[i * ldc + j])) } }
                }
            }
        }
    }
}
