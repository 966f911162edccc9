import PhalanxRuntime

/// Single-precision matrix products on packed panels and a 16-lane register tile: the product
/// this package runs where the platform BLAS would use narrower vectors than the processor has
/// (see `Gemm.Kernel`). One thread; `Gemm.multiply` splits work over the pool.
///
///     C = alpha * op(A) op(B) + beta * C,   op(A) [m, k], op(B) [k, n], C [m, n], all row-major
///
/// Blocking (Goto's scheme): `op(B)` is packed `kc` rows by `nc` columns at a time into
/// micro-panels `[kc, 32]` (one stays in L1 while every row panel of A passes over it), `op(A)`
/// `mc` rows by `kc` at a time into micro-panels `[kc, 8]` (the block stays in L2; a row-major
/// `op(A)` whose rows come in whole panels of 8 is read in place instead), and each
/// `8 x 32` tile of C is sixteen accumulators in registers for a whole `kc` stretch. Packing
/// absorbs both transposes and zero-pads the edges, so the inner loop never branches; edge tiles
/// go through a scratch tile. With `beta == 0`, `C` is never read (it may hold anything).
enum PackedGemm {
    static let mr = 8, nr = 32, kc = 192, mc = 144, nc = 1024

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
                                microKernel(kb, ap, rowStride: rowStride, kStride: kStride, bp, ct, ldc, alpha: alpha, beta: blockBeta)
                            } else {
                                microKernel(kb, ap, rowStride: rowStride, kStride: kStride, bp, tile, nr, alpha: alpha, beta: 0)
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
    /// `out[(p * kb + kk) * 8 + i] = op(A)[row + 8p + i, k + kk]`, rows past `mb` zero.
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
    /// `out[(q * kb + kk) * 32 + j] = op(B)[k + kk, column + 32q + j]`, columns past `nb` zero.
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
                    store16(load16(source), target)
                    store16(load16(source + 16), target + 16)
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

    /// The `8 x 32` tile `C[0..<8, 0..<32] (row stride ldc) = beta * C + alpha * sum_k A[k] (x) Bp[k]`
    /// with `Bp` a packed panel `[kc, 32]` and `A[k][i] = ap[i * rowStride + k * kStride]`: a
    /// packed panel `[kc, 8]` (`rowStride` 1, `kStride` 8) or eight rows of a row-major `A`
    /// read in place (`rowStride` lda, `kStride` 1). Sixteen 16-lane accumulators stay in
    /// registers; each k is two loads, eight broadcasts, sixteen FMAs.
    @inline(__always)
    static func microKernel(_ kc: Int, _ ap: UnsafePointer<Float>, rowStride: Int, kStride: Int, _ bp: UnsafePointer<Float>,
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
        let va = SIMD16<Float>(repeating: alpha)
        if beta == 0 {
            store16(va * c00, c + 0 * ldc); store16(va * c01, c + 0 * ldc + 16)
            store16(va * c10, c + 1 * ldc); store16(va * c11, c + 1 * ldc + 16)
            store16(va * c20, c + 2 * ldc); store16(va * c21, c + 2 * ldc + 16)
            store16(va * c30, c + 3 * ldc); store16(va * c31, c + 3 * ldc + 16)
            store16(va * c40, c + 4 * ldc); store16(va * c41, c + 4 * ldc + 16)
            store16(va * c50, c + 5 * ldc); store16(va * c51, c + 5 * ldc + 16)
            store16(va * c60, c + 6 * ldc); store16(va * c61, c + 6 * ldc + 16)
            store16(va * c70, c + 7 * ldc); store16(va * c71, c + 7 * ldc + 16)
        } else {
            let vb = SIMD16<Float>(repeating: beta)
            store16((vb * load16(c + 0 * ldc)).addingProduct(va, c00), c + 0 * ldc)
            store16((vb * load16(c + 0 * ldc + 16)).addingProduct(va, c01), c + 0 * ldc + 16)
            store16((vb * load16(c + 1 * ldc)).addingProduct(va, c10), c + 1 * ldc)
            store16((vb * load16(c + 1 * ldc + 16)).addingProduct(va, c11), c + 1 * ldc + 16)
            store16((vb * load16(c + 2 * ldc)).addingProduct(va, c20), c + 2 * ldc)
            store16((vb * load16(c + 2 * ldc + 16)).addingProduct(va, c21), c + 2 * ldc + 16)
            store16((vb * load16(c + 3 * ldc)).addingProduct(va, c30), c + 3 * ldc)
            store16((vb * load16(c + 3 * ldc + 16)).addingProduct(va, c31), c + 3 * ldc + 16)
            store16((vb * load16(c + 4 * ldc)).addingProduct(va, c40), c + 4 * ldc)
            store16((vb * load16(c + 4 * ldc + 16)).addingProduct(va, c41), c + 4 * ldc + 16)
            store16((vb * load16(c + 5 * ldc)).addingProduct(va, c50), c + 5 * ldc)
            store16((vb * load16(c + 5 * ldc + 16)).addingProduct(va, c51), c + 5 * ldc + 16)
            store16((vb * load16(c + 6 * ldc)).addingProduct(va, c60), c + 6 * ldc)
            store16((vb * load16(c + 6 * ldc + 16)).addingProduct(va, c61), c + 6 * ldc + 16)
            store16((vb * load16(c + 7 * ldc)).addingProduct(va, c70), c + 7 * ldc)
            store16((vb * load16(c + 7 * ldc + 16)).addingProduct(va, c71), c + 7 * ldc + 16)
        }
    }
}
