import PhalanxRuntime

/// Single-precision matrix products on packed panels and a register tile sized for the compile
/// target: the product this package runs where it measures faster than the platform BLAS (see
/// `Gemm.kernel`). One thread; `Gemm.multiply` splits work over the pool.
///
///     C = alpha * op(A) op(B) + beta * C,   op(A) [m, k], op(B) [k, n], C [m, n], all row-major
///
/// Blocking (Goto's scheme): `op(B)` is packed `kc` rows by `nc` columns at a time into
/// micro-panels `[kc, nr]` (one stays in L1 while every row panel of A passes over it), `op(A)`
/// `mc` rows by `kc` at a time into micro-panels `[kc, mr]` (the block stays in L2; a row-major
/// `op(A)` whose rows come in whole panels of `mr` is read in place instead), and each
/// `mr x nr` tile of C stays in registers for a whole `kc` stretch. Packing absorbs both
/// transposes and zero-pads the edges, so the inner loop never branches; edge tiles go through a
/// scratch tile. With `beta == 0`, `C` is never read (it may hold anything).
///
/// The tile by instruction set: with 32 wide registers (AVX-512), `8 x 32`, sixteen 16-lane
/// accumulators; with 16 registers of 8 floats (AVX2), `6 x 16`, twelve 8-lane accumulators,
/// two operand vectors and a broadcast (15 registers: the 8 x 32 tile would need 32 and spill).
enum PackedGemm {
    static let kc = 192, mc = 144, nc = 1024
    /// Rows and columns of the register tile (`mc` and `nc` are multiples of both choices).
    @inline(__always) static var mr: Int { hasWideRegisters ? 8 : 6 }
    @inline(__always) static var nr: Int { hasWideRegisters ? 32 : 16 }

    static func multiply(m: Int, n: Int, k: Int,
                         _ a: UnsafePointer<Float>, _ transposeA: Bool, _ lda: Int,
                         _ b: UnsafePointer<Float>, _ transposeB: Bool, _ ldb: Int,
                         _ c: UnsafeMutablePointer<Float>, _ ldc: Int, alpha: Float, beta: Float) {
        let aBytes = mc * kc * 4, bBytes = kc * nc * 4, tileBytes = mr * nr * 4
        let storage = TensorStorage.shared
        let aPanels = storage.take(byteCount: aBytes).bindMemory(to: Float.self, capacity: mc * kc)
        let bPanels = storage.take(byteCount: bBytes).bindMemory(to: Float.self, capacity: kc * nc)
        let tile = storage.take(byteCount: tileBytes).bindMemory(to: Float.self, capacity: mr * nr)
        defer {
            storage.give(UnsafeMutableRawPointer(aPanels), byteCount: aBytes)
            storage.give(UnsafeMutableRawPointer(bPanels), byteCount: bBytes)
            storage.give(UnsafeMutableRawPointer(tile), byteCount: tileBytes)
        }
        for jc in stride(from: 0, to: n, by: nc) {
            let nb = min(nc, n - jc)
            for pc in stride(from: 0, to: k, by: kc) {
                let kb = min(kc, k - pc)
                packB(b, transposeB, ldb, k: pc, kb, columns: jc, nb, into: bPanels)
                let blockBeta = pc == 0 ? beta : 1
                for ic in stride(from: 0, to: m, by: mc) {
                    let mb = min(mc, m - ic)
                    // Whole panels of a row-major A are read in place: each of the eight rows is
                    // a contiguous stream over k, and packing would cost a pass as long as A.
                    let inPlace = !transposeA && mb % mr == 0
                    if !inPlace { packA(a, transposeA, lda, rows: ic, mb, k: pc, kb, into: aPanels) }
                    let (rowStride, kStride) = inPlace ? (lda, 1) : (1, mr)
                    for jr in stride(from: 0, to: nb, by: nr) {
                        let bp = UnsafePointer(bPanels + jr * kb)
                        let columns = min(nr, nb - jr)
                        for ir in stride(from: 0, to: mb, by: mr) {
                            let ap = inPlace ? a + (ic + ir) * lda + pc : UnsafePointer(aPanels + ir * kb)
                            let rows = min(mr, mb - ir)
                            let ct = c + (ic + ir) * ldc + jc + jr
                            if rows == mr && columns == nr {
                                tileProduct(kb, ap, rowStride: rowStride, kStride: kStride, bp, ct, ldc, alpha: alpha, beta: blockBeta)
                            } else {
                                tileProduct(kb, ap, rowStride: rowStride, kStride: kStride, bp, tile, nr, alpha: alpha, beta: 0)
                                for i in 0..<rows {
                                    for j in 0..<columns {
                                        ct[i * ldc + j] = blockBeta == 0 ? tile[i * nr + j] : blockBeta * ct[i * ldc + j] + tile[i * nr + j]
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows `row..<row+mb`, columns `k..<k+kb` of `op(A)` as micro-panels: panel `p` holds
    /// `out[(p * kb + kk) * mr + i] = op(A)[row + p mr + i, k + kk]`, rows past `mb` zero.
    private static func packA(_ a: UnsafePointer<Float>, _ transposed: Bool, _ lda: Int, rows row: Int, _ mb: Int,
                              k: Int, _ kb: Int, into out: UnsafeMutablePointer<Float>) {
        for p in 0..<(mb + mr - 1) / mr {
            let panel = out + p * kb * mr, first = row + p * mr, valid = min(mr, mb - p * mr)
            if transposed {
                // op(A)[i, kk] = a[kk * lda + i]: each kk reads `valid` consecutive floats.
                for kk in 0..<kb {
                    let source = a + (k + kk) * lda + first, target = panel + kk * mr
                    for i in 0..<valid { target[i] = source[i] }
                    for i in valid..<mr { target[i] = 0 }
                }
            } else {
                for i in 0..<mr {
                    if i < valid {
                        let source = a + (first + i) * lda + k
                        for kk in 0..<kb { panel[kk * mr + i] = source[kk] }
                    } else {
                        for kk in 0..<kb { panel[kk * mr + i] = 0 }
                    }
                }
            }
        }
    }

    /// Rows `k..<k+kb`, columns `column..<column+nb` of `op(B)` as micro-panels: panel `q` holds
    /// `out[(q * kb + kk) * nr + j] = op(B)[k + kk, column + q nr + j]`, columns past `nb` zero.
    private static func packB(_ b: UnsafePointer<Float>, _ transposed: Bool, _ ldb: Int, k: Int, _ kb: Int,
                              columns column: Int, _ nb: Int, into out: UnsafeMutablePointer<Float>) {
        for q in 0..<(nb + nr - 1) / nr {
            let panel = out + q * kb * nr, first = column + q * nr, valid = min(nr, nb - q * nr)
            if transposed {
                // op(B)[kk, j] = b[j * ldb + kk]: each column j is a contiguous run over kk.
                for j in 0..<nr {
                    if j < valid {
                        let source = b + (first + j) * ldb + k
                        for kk in 0..<kb { panel[kk * nr + j] = source[kk] }
                    } else {
                        for kk in 0..<kb { panel[kk * nr + j] = 0 }
                    }
                }
            } else if valid == nr {
                for kk in 0..<kb {
                    let source = b + (k + kk) * ldb + first, target = panel + kk * nr
                    for j in stride(from: 0, to: nr, by: 16) { store16(load16(source + j), target + j) }
                }
            } else {
                for kk in 0..<kb {
                    let source = b + (k + kk) * ldb + first, target = panel + kk * nr
                    for j in 0..<valid { target[j] = source[j] }
                    for j in valid..<nr { target[j] = 0 }
                }
            }
        }
    }

    /// `C[0..<mr, 0..<nr] (row stride ldc) = beta * C + alpha * sum_k A[k] (x) Bp[k]` with `Bp` a
    /// packed panel `[kc, nr]` and `A[k][i] = ap[i * rowStride + k * kStride]`: a packed panel
    /// `[kc, mr]` (`rowStride` 1, `kStride` mr) or `mr` rows of a row-major `A` read in place
    /// (`rowStride` lda, `kStride` 1).
    @inline(__always)
    static func tileProduct(_ kc: Int, _ ap: UnsafePointer<Float>, rowStride: Int, kStride: Int, _ bp: UnsafePointer<Float>,
                            _ c: UnsafeMutablePointer<Float>, _ ldc: Int, alpha: Float, beta: Float) {
        if hasWideRegisters {
            tile8x32(kc, ap, rowStride: rowStride, kStride: kStride, bp, c, ldc, alpha: alpha, beta: beta)
        } else {
            tile6x16(kc, ap, rowStride: rowStride, kStride: kStride, bp, c, ldc, alpha: alpha, beta: beta)
        }
    }

    /// `C[i, j] = alpha * sum + beta * C[i, j]` for one 16-wide row segment of the tile (`C` not
    /// read when `beta == 0`).
    @inline(__always)
    private static func store(_ sum: SIMD16<Float>, _ c: UnsafeMutablePointer<Float>, alpha: Float, beta: Float) {
        let va = SIMD16<Float>(repeating: alpha)
        store16(beta == 0 ? va * sum : (SIMD16(repeating: beta) * load16(c)).addingProduct(va, sum), c)
    }

    /// The 8 x 32 tile: sixteen 16-lane accumulators; each k is two loads, eight broadcasts,
    /// sixteen FMAs.
    @inline(__always)
    private static func tile8x32(_ kc: Int, _ ap: UnsafePointer<Float>, rowStride: Int, kStride: Int, _ bp: UnsafePointer<Float>,
                                 _ c: UnsafeMutablePointer<Float>, _ ldc: Int, alpha: Float, beta: Float) {
        var c00 = SIMD16<Float>.zero, c01 = SIMD16<Float>.zero
        var c10 = SIMD16<Float>.zero, c11 = SIMD16<Float>.zero
        var c20 = SIMD16<Float>.zero, c21 = SIMD16<Float>.zero
        var c30 = SIMD16<Float>.zero, c31 = SIMD16<Float>.zero
        var c40 = SIMD16<Float>.zero, c41 = SIMD16<Float>.zero
        var c50 = SIMD16<Float>.zero, c51 = SIMD16<Float>.zero
        var c60 = SIMD16<Float>.zero, c61 = SIMD16<Float>.zero
        var c70 = SIMD16<Float>.zero, c71 = SIMD16<Float>.zero
        var a = ap, b = bp
        for _ in 0..<kc {
            let b0 = load16(b), b1 = load16(b + 16)
            let a0 = SIMD16<Float>(repeating: a[0 * rowStride])
            c00 = c00.addingProduct(a0, b0); c01 = c01.addingProduct(a0, b1)
            let a1 = SIMD16<Float>(repeating: a[1 * rowStride])
            c10 = c10.addingProduct(a1, b0); c11 = c11.addingProduct(a1, b1)
            let a2 = SIMD16<Float>(repeating: a[2 * rowStride])
            c20 = c20.addingProduct(a2, b0); c21 = c21.addingProduct(a2, b1)
            let a3 = SIMD16<Float>(repeating: a[3 * rowStride])
            c30 = c30.addingProduct(a3, b0); c31 = c31.addingProduct(a3, b1)
            let a4 = SIMD16<Float>(repeating: a[4 * rowStride])
            c40 = c40.addingProduct(a4, b0); c41 = c41.addingProduct(a4, b1)
            let a5 = SIMD16<Float>(repeating: a[5 * rowStride])
            c50 = c50.addingProduct(a5, b0); c51 = c51.addingProduct(a5, b1)
            let a6 = SIMD16<Float>(repeating: a[6 * rowStride])
            c60 = c60.addingProduct(a6, b0); c61 = c61.addingProduct(a6, b1)
            let a7 = SIMD16<Float>(repeating: a[7 * rowStride])
            c70 = c70.addingProduct(a7, b0); c71 = c71.addingProduct(a7, b1)
            a += kStride; b += 32
        }
        store(c00, c, alpha: alpha, beta: beta); store(c01, c + 16, alpha: alpha, beta: beta)
        store(c10, c + ldc, alpha: alpha, beta: beta); store(c11, c + ldc + 16, alpha: alpha, beta: beta)
        store(c20, c + 2 * ldc, alpha: alpha, beta: beta); store(c21, c + 2 * ldc + 16, alpha: alpha, beta: beta)
        store(c30, c + 3 * ldc, alpha: alpha, beta: beta); store(c31, c + 3 * ldc + 16, alpha: alpha, beta: beta)
        store(c40, c + 4 * ldc, alpha: alpha, beta: beta); store(c41, c + 4 * ldc + 16, alpha: alpha, beta: beta)
        store(c50, c + 5 * ldc, alpha: alpha, beta: beta); store(c51, c + 5 * ldc + 16, alpha: alpha, beta: beta)
        store(c60, c + 6 * ldc, alpha: alpha, beta: beta); store(c61, c + 6 * ldc + 16, alpha: alpha, beta: beta)
        store(c70, c + 7 * ldc, alpha: alpha, beta: beta); store(c71, c + 7 * ldc + 16, alpha: alpha, beta: beta)
    }

    /// The 6 x 16 tile (`Block6x16`): each k is one load (two 8-lane), six broadcasts, six
    /// FMAs (twelve 8-lane).
    @inline(__always)
    private static func tile6x16(_ kc: Int, _ ap: UnsafePointer<Float>, rowStride: Int, kStride: Int, _ bp: UnsafePointer<Float>,
                                 _ c: UnsafeMutablePointer<Float>, _ ldc: Int, alpha: Float, beta: Float) {
        var block = Block6x16()
        block.add(ap, aRow: rowStride, aDepth: kStride, bp, bRow: 16, depth: kc)
        block.forEachRow { r, sum in store(sum, c + r * ldc, alpha: alpha, beta: beta) }
    }
}
