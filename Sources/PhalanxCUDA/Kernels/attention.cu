// Causal softmax attention (full, or in a sliding window; grouped key/value heads), forward and
// backward, with exactly the semantics of the CPU AttentionKernel (PhalanxLayers):
//
//   s_ij  = scale * q_i . k_j,  visible keys j <= i and (with a window w) j > i - w
//   lse_i = log sum_j exp(s_ij)            o_i = sum_j exp(s_ij - lse_i) v_j
//   D_i   = dO_i . O_i,  P_ij = exp(s_ij - lse_i),  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - D_i)
//   dq_i  = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dO_i
//   (dk, dv summed over the query heads of the group)
//
// Layouts (row-major): q, o, dq [batch, length, heads, HD]; k, v, dk, dv [batch, length, kvHeads,
// HD]; lse and D (the backward's row dots) [batch, heads, length] float32. Query head h reads kv
// head h / (heads / kvHeads). Storage float32 (`_f32`) or bfloat16 bits (`_bf16`); all arithmetic
// and accumulation float32. The head dim HD is compiled in (-DATTN_HEAD_DIM=16, 32, 48, ..., 128:
// a multiple of 16; a row's accumulators live in registers). The window is a launch argument
// (0: none). No #include: this compiles with NVRTC and no include path.
//
// bfloat16 kernels (FlashAttention-2 structure, tensor cores through mma.sync m16n8k16 bf16 with
// float32 accumulators, operands from shared memory through ldmatrix, tiles staged by cp.async;
// static shared memory, at most 34 KiB per block):
//   attn_forward_bf16  one block of 4 warps per (query tile of 64, head, sequence); a warp owns 16
//                      query rows with their Q fragments in registers; key/value tiles of 64 in
//                      shared memory (K of the next tile loads while P V runs, V while Q K^T runs);
//                      online softmax in the log2 domain; P stays in registers (the S accumulator
//                      layout is the A operand layout). Query tiles are scheduled longest first.
//   attn_dot_*         D_i = dO_i . O_i, one warp per row.
//   attn_dkdv_bf16     one block of 4 warps per (key tile of 64, kv head, sequence); a warp owns 16
//                      keys (K fragments in registers, V in shared memory) and their dk, dv
//                      accumulators; it loops over the group's query heads and over the query tiles
//                      (32 queries for HD > 64, else 64) that see the key tile, computing S^T = K Q^T
//                      and dP^T = V dO^T directly so that P^T and dS^T are A operands in registers.
//   attn_dq_bf16       one block of 4 warps per (query tile of 64, head, sequence); a warp owns 16
//                      query rows (Q and dO fragments in registers) and their dq accumulator, and
//                      loops over the visible key tiles: S, dP, dS recomputed, dq += dS K.
// DETERMINISM: every output element is written by exactly one thread that accumulates in a fixed
// order (no atomics, no split reductions), so the same inputs give bit-identical outputs on every
// run. The price is that backward computes S and dP twice (dkdv and dq kernels): 7 tile products
// instead of FlashAttention-2's 5 with float atomics for dq.
//
// float32 kernels (the exact mode for checks; SIMT, one warp per query row or key row): the same
// formulas with expf/logf, tiles of 32 keys (queries) in shared memory, lane = key (query) for the
// dot products and lane = channel for the accumulators. Deterministic in the same way.

#ifndef ATTN_HEAD_DIM
#error "compile with -DATTN_HEAD_DIM=<head dim> (a multiple of 16 up to 128)"
#endif

namespace attn {

constexpr int HD = ATTN_HEAD_DIM;
static_assert(HD % 16 == 0 && HD >= 16 && HD <= 128, "the attention kernels take head dims 16, 32, ..., 128");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#define kInf __int_as_float(0x7f800000)

typedef unsigned short bf16;

// 2^x by the special-function unit alone (ex2.approx.ftz: relative error about 2^-22, results
// below 2^-126 flushed to 0, 2^-inf = 0), for the bfloat16 kernels' probabilities. exp2f wraps
// the same instruction in a range fix-up that cost 10% of the forward at head dim 16 on an H200.
__device__ __forceinline__ float fastExp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float decode(bf16 b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ float decode(float x) { return x; }
// Round to nearest even; low -> bits 0..15, high -> bits 16..31.
__device__ __forceinline__ unsigned packPair(float low, float high) {
    unsigned bits;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(high), "f"(low));
    return bits;
}

// The window as a count of visible keys; "none" as a count no length reaches.
__device__ __forceinline__ int windowOrAll(int window) { return window > 0 ? window : 0x3fffffff; }

// ---- tensor-core building blocks (bfloat16) ---------------------------------------------------

constexpr int LDS = HD + 8;  // shared row stride in elements: 16 bytes of padding, no ldmatrix bank conflicts

__device__ __forceinline__ unsigned sharedAddress(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, zero-filled when !valid.
__device__ __forceinline__ void copy16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void commitCopies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void waitCopies() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm4(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm4t(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
// c (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col)
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragment addresses in a shared tile [rows][LDS] (lane's part of one ldmatrix.x4):
// A operand 16x16 at (row r, col c): a0..a3 = rows r..r+7 / r+8..r+15, cols c..c+7 / c+8..c+15.
__device__ __forceinline__ unsigned fragA(unsigned base, int r, int c, int lane) {
    return base + 2u * (unsigned)((r + (lane & 15)) * LDS + c + (lane >> 4) * 8);
}
// B operand (k x n col-major) from a tile stored [n][k] (rows = n): two n-tiles n..n+7, n+8..n+15
// at k..k+15: {r0, r1} for the first, {r2, r3} for the second.
__device__ __forceinline__ unsigned fragBRows(unsigned base, int n, int k, int lane) {
    return base + 2u * (unsigned)((n + (lane & 7) + ((lane >> 4) << 3)) * LDS + k + ((lane >> 3) & 1) * 8);
}
// B operand from a tile stored [k][n] (rows = k), with .trans: k..k+15, two n-tiles n.., n+8..
__device__ __forceinline__ unsigned fragBCols(unsigned base, int k, int n, int lane) {
    return base + 2u * (unsigned)((k + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n + (lane >> 4) * 8);
}

// ROWS rows of HD bf16 from rows p0.. of a strided global matrix into a shared tile; rows at or
// past `limit` are zero.
template <int ROWS>
__device__ __forceinline__ void loadTile(bf16* tile, const bf16* g, long long stride, int p0, int limit, int tid) {
    constexpr int chunks = HD / 8;
    const unsigned base = sharedAddress(tile);
#pragma unroll 4
    for (int c = tid; c < ROWS * chunks; c += 128) {
        const int r = c / chunks, k = c % chunks, p = p0 + r;
        const bool ok = p < limit;
        copy16(base + 2u * (unsigned)(r * LDS + k * 8), g + (long long)(ok ? p : 0) * stride + k * 8, ok);
    }
}

__device__ __forceinline__ float quadMax(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quadSum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- forward, bfloat16 ------------------------------------------------------------------------

constexpr int kTile = 64;  // query rows per block (4 warps x 16) and keys per tile

__device__ __forceinline__ void forwardBF16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                            int L, int H, int KVH, int window, float scale) {
    __shared__ __align__(128) bf16 Ks[kTile * LDS];
    __shared__ __align__(128) bf16 Vs[kTile * LDS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int tiles = (L + kTile - 1) / kTile;
    const int m0 = (tiles - 1 - (int)blockIdx.x) * kTile;  // longest (latest) query tiles first
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    const bf16* qb = q + (long long)b * L * qs + (long long)h * HD;
    const bf16* kb = k + (long long)b * L * ks + (long long)kvh * HD;
    const bf16* vb = v + (long long)b * L * ks + (long long)kvh * HD;
    const unsigned kAddr = sharedAddress(Ks), vAddr = sharedAddress(Vs);

    // Q fragments into registers, staged through Ks.
    loadTile<kTile>(Ks, qb, qs, m0, L, tid);
    commitCopies();
    waitCopies<0>();
    __syncthreads();
    unsigned qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) ldsm4(fragA(kAddr, warp * 16, kk * 16, lane), qf[kk]);
    __syncthreads();

    const int w = windowOrAll(window);
    const int kLo = max(0, m0 - w + 1), kHi = min(L, m0 + kTile);
    const int nt0 = kLo / kTile, nt1 = (kHi - 1) / kTile;
    loadTile<kTile>(Ks, kb, ks, nt0 * kTile, L, tid);
    commitCopies();

    float acc[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
    float mRow[2] = {-kInf, -kInf}, lRow[2] = {0.f, 0.f};
    const float sl2 = scale * kLog2e;
    const int row0 = m0 + warp * 16 + g;

    for (int nt = nt0; nt <= nt1; ++nt) {
        const int n0 = nt * kTile;
        loadTile<kTile>(Vs, vb, ks, n0, L, tid);
        commitCopies();
        waitCopies<1>();  // K of this tile
        __syncthreads();
        float s[kTile / 8][4];
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < kTile / 16; ++np) {
                unsigned bfr[4];
                ldsm4(fragBRows(kAddr, np * 16, kk * 16, lane), bfr);
                mma(s[2 * np], qf[kk], bfr[0], bfr[1]);
                mma(s[2 * np + 1], qf[kk], bfr[2], bfr[3]);
            }
        }
        __syncthreads();  // every warp is done with Ks
        if (nt < nt1) loadTile<kTile>(Ks, kb, ks, n0 + kTile, L, tid);
        commitCopies();

        // Mask (only tiles that cross the diagonal or the window's edge), then online softmax.
        const bool masked = (n0 + kTile - 1 > m0) || ((m0 + kTile - 1) - n0 >= w);
        if (masked) {
#pragma unroll
            for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = row0 + (e >> 1) * 8, j = n0 + n * 8 + t4 * 2 + (e & 1);
                    if (j > i || i - j >= w) s[n][e] = -kInf;
                }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -kInf;
#pragma unroll
            for (int n = 0; n < kTile / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = quadMax(mx) * sl2;
            const float mNew = fmaxf(mRow[r], mx);
            const float mUse = mNew == -kInf ? 0.f : mNew;
            const float alpha = fastExp2(mRow[r] - mUse);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < kTile / 8; ++n) {
                s[n][2 * r] = fastExp2(s[n][2 * r] * sl2 - mUse);
                s[n][2 * r + 1] = fastExp2(s[n][2 * r + 1] * sl2 - mUse);
                sum += s[n][2 * r] + s[n][2 * r + 1];
            }
            lRow[r] = lRow[r] * alpha + sum;
            mRow[r] = mNew;
#pragma unroll
            for (int d = 0; d < HD / 8; ++d) {
                acc[d][2 * r] *= alpha;
                acc[d][2 * r + 1] *= alpha;
            }
        }

        waitCopies<1>();  // V of this tile
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
            const unsigned a[4] = {packPair(s[2 * kk][0], s[2 * kk][1]), packPair(s[2 * kk][2], s[2 * kk][3]),
                                   packPair(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   packPair(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < HD / 16; ++dp) {
                unsigned bfr[4];
                ldsm4t(fragBCols(vAddr, kk * 16, dp * 16, lane), bfr);
                mma(acc[2 * dp], a, bfr[0], bfr[1]);
                mma(acc[2 * dp + 1], a, bfr[2], bfr[3]);
            }
        }
        __syncthreads();  // every warp is done with Vs
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + r * 8;
        const float l = quadSum(lRow[r]);
        if (i >= L) continue;
        const float inv = 1.f / l;
        unsigned* out = (unsigned*)(o + ((long long)b * L + i) * qs + (long long)h * HD);
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) out[d * 4 + t4] = packPair(acc[d][2 * r] * inv, acc[d][2 * r + 1] * inv);
        if (t4 == 0) lse[((long long)b * H + h) * L + i] = (mRow[r] + log2f(l)) * kLn2;
    }
}

// ---- backward: dk, dv per key tile, bfloat16 --------------------------------------------------

constexpr int kQueryTile = HD > 64 ? 32 : 64;  // queries per step of the dk/dv kernel

__device__ __forceinline__ void dkdvBF16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ dots,
                                         bf16* __restrict__ dk, bf16* __restrict__ dv,
                                         int L, int H, int KVH, int window, float scale) {
    constexpr int BQ = kQueryTile;
    static_assert(2 * BQ >= kTile, "K is staged in the Q and dO tiles");
    __shared__ __align__(128) bf16 Vs[kTile * LDS];
    __shared__ __align__(128) bf16 QdO[2 * BQ * LDS];  // Q tile, then dO tile
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int n0 = blockIdx.x * kTile;  // earliest key tiles (most queries) first
    const int kvh = blockIdx.y, b = blockIdx.z, group = H / KVH;
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    const bf16* kb = k + (long long)b * L * ks + (long long)kvh * HD;
    const bf16* vb = v + (long long)b * L * ks + (long long)kvh * HD;
    const unsigned vAddr = sharedAddress(Vs), qAddr = sharedAddress(QdO), dAddr = qAddr + 2u * BQ * LDS;

    loadTile<kTile>(QdO, kb, ks, n0, L, tid);
    loadTile<kTile>(Vs, vb, ks, n0, L, tid);
    commitCopies();
    waitCopies<0>();
    __syncthreads();
    unsigned kf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) ldsm4(fragA(qAddr, warp * 16, kk * 16, lane), kf[kk]);
    __syncthreads();

    float dkAcc[HD / 8][4], dvAcc[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) dkAcc[d][e] = dvAcc[d][e] = 0.f;

    const int w = windowOrAll(window);
    const int qHi = (int)min((long long)L, (long long)n0 + kTile - 1 + w);
    const int mt0 = n0 / BQ, mt1 = (qHi - 1) / BQ;
    const int key0 = n0 + warp * 16 + g;
    const float sl2 = scale * kLog2e;

    for (int hg = 0; hg < group; ++hg) {
        const int h = kvh * group + hg;
        const bf16* qb = q + (long long)b * L * qs + (long long)h * HD;
        const bf16* db = dout + (long long)b * L * qs + (long long)h * HD;
        const float* lseRow = lse + ((long long)b * H + h) * L;
        const float* dotRow = dots + ((long long)b * H + h) * L;
        for (int mt = mt0; mt <= mt1; ++mt) {
            const int m0 = mt * BQ;
            loadTile<BQ>(QdO, qb, qs, m0, L, tid);
            loadTile<BQ>(QdO + BQ * LDS, db, qs, m0, L, tid);
            commitCopies();
            // This thread's query columns: m0 + n*8 + t4*2 + {0,1}.
            float lseC[BQ / 8][2], dotC[BQ / 8][2];
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int i = m0 + n * 8 + t4 * 2 + e;
                    lseC[n][e] = i < L ? lseRow[i] * kLog2e : kInf;
                    dotC[n][e] = i < L ? dotRow[i] : 0.f;
                }
            waitCopies<0>();
            __syncthreads();

            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                unsigned va[4];
                ldsm4(fragA(vAddr, warp * 16, kk * 16, lane), va);
#pragma unroll
                for (int np = 0; np < BQ / 16; ++np) {
                    unsigned bq[4], bd[4];
                    ldsm4(fragBRows(qAddr, np * 16, kk * 16, lane), bq);
                    ldsm4(fragBRows(dAddr, np * 16, kk * 16, lane), bd);
                    mma(st[2 * np], kf[kk], bq[0], bq[1]);
                    mma(st[2 * np + 1], kf[kk], bq[2], bq[3]);
                    mma(dpt[2 * np], va, bd[0], bd[1]);
                    mma(dpt[2 * np + 1], va, bd[2], bd[3]);
                }
            }
            // P^T and dS^T (rows: keys, columns: queries).
            const bool masked = (n0 + kTile - 1 > m0) || ((m0 + BQ - 1) - n0 >= w) || (m0 + BQ > L);
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = key0 + (e >> 1) * 8, i = m0 + n * 8 + t4 * 2 + (e & 1);
                    float p = fastExp2(st[n][e] * sl2 - lseC[n][e & 1]);
                    if (masked && (j > i || i - j >= w)) p = 0.f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - dotC[n][e & 1]);
                }
            // dV += P^T dO, dK += dS^T Q.
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) {
                const unsigned pa[4] = {packPair(st[2 * kk][0], st[2 * kk][1]), packPair(st[2 * kk][2], st[2 * kk][3]),
                                        packPair(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                        packPair(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                const unsigned sa[4] = {packPair(dpt[2 * kk][0], dpt[2 * kk][1]), packPair(dpt[2 * kk][2], dpt[2 * kk][3]),
                                        packPair(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                        packPair(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < HD / 16; ++dp) {
                    unsigned bd[4], bq[4];
                    ldsm4t(fragBCols(dAddr, kk * 16, dp * 16, lane), bd);
                    ldsm4t(fragBCols(qAddr, kk * 16, dp * 16, lane), bq);
                    mma(dvAcc[2 * dp], pa, bd[0], bd[1]);
                    mma(dvAcc[2 * dp + 1], pa, bd[2], bd[3]);
                    mma(dkAcc[2 * dp], sa, bq[0], bq[1]);
                    mma(dkAcc[2 * dp + 1], sa, bq[2], bq[3]);
                }
            }
            __syncthreads();  // every warp is done with the Q and dO tiles
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = key0 + r * 8;
        if (j >= L) continue;
        const long long at = ((long long)b * L + j) * ks + (long long)kvh * HD;
        unsigned* dkOut = (unsigned*)(dk + at);
        unsigned* dvOut = (unsigned*)(dv + at);
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) {
            dkOut[d * 4 + t4] = packPair(dkAcc[d][2 * r] * scale, dkAcc[d][2 * r + 1] * scale);
            dvOut[d * 4 + t4] = packPair(dvAcc[d][2 * r], dvAcc[d][2 * r + 1]);
        }
    }
}

// ---- backward: dq per query tile, bfloat16 ----------------------------------------------------

__device__ __forceinline__ void dqBF16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ dots,
                                       bf16* __restrict__ dq, int L, int H, int KVH, int window, float scale) {
    __shared__ __align__(128) bf16 Ks[kTile * LDS];
    __shared__ __align__(128) bf16 Vs[kTile * LDS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int tiles = (L + kTile - 1) / kTile;
    const int m0 = (tiles - 1 - (int)blockIdx.x) * kTile;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    const bf16* qb = q + (long long)b * L * qs + (long long)h * HD;
    const bf16* db = dout + (long long)b * L * qs + (long long)h * HD;
    const bf16* kb = k + (long long)b * L * ks + (long long)kvh * HD;
    const bf16* vb = v + (long long)b * L * ks + (long long)kvh * HD;
    const unsigned kAddr = sharedAddress(Ks), vAddr = sharedAddress(Vs);

    loadTile<kTile>(Ks, qb, qs, m0, L, tid);
    loadTile<kTile>(Vs, db, qs, m0, L, tid);
    commitCopies();
    const int row0 = m0 + warp * 16 + g;
    float lseR[2], dotR[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + r * 8;
        lseR[r] = i < L ? lse[((long long)b * H + h) * L + i] * kLog2e : kInf;
        dotR[r] = i < L ? dots[((long long)b * H + h) * L + i] : 0.f;
    }
    waitCopies<0>();
    __syncthreads();
    unsigned qf[HD / 16][4], df[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        ldsm4(fragA(kAddr, warp * 16, kk * 16, lane), qf[kk]);
        ldsm4(fragA(vAddr, warp * 16, kk * 16, lane), df[kk]);
    }
    __syncthreads();

    const int w = windowOrAll(window);
    const int kLo = max(0, m0 - w + 1), kHi = min(L, m0 + kTile);
    const int nt0 = kLo / kTile, nt1 = (kHi - 1) / kTile;
    const float sl2 = scale * kLog2e;
    float acc[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;

    for (int nt = nt0; nt <= nt1; ++nt) {
        const int n0 = nt * kTile;
        loadTile<kTile>(Ks, kb, ks, n0, L, tid);
        loadTile<kTile>(Vs, vb, ks, n0, L, tid);
        commitCopies();
        waitCopies<0>();
        __syncthreads();
        float s[kTile / 8][4], dp[kTile / 8][4];
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < kTile / 16; ++np) {
                unsigned bk[4], bv[4];
                ldsm4(fragBRows(kAddr, np * 16, kk * 16, lane), bk);
                ldsm4(fragBRows(vAddr, np * 16, kk * 16, lane), bv);
                mma(s[2 * np], qf[kk], bk[0], bk[1]);
                mma(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                mma(dp[2 * np], df[kk], bv[0], bv[1]);
                mma(dp[2 * np + 1], df[kk], bv[2], bv[3]);
            }
        }
        const bool masked = (n0 + kTile - 1 > m0) || ((m0 + kTile - 1) - n0 >= w);
#pragma unroll
        for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row0 + (e >> 1) * 8, j = n0 + n * 8 + t4 * 2 + (e & 1);
                float p = fastExp2(s[n][e] * sl2 - lseR[e >> 1]);
                if (masked && (j > i || i - j >= w)) p = 0.f;
                s[n][e] = p * (dp[n][e] - dotR[e >> 1]);  // dS
            }
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
            const unsigned a[4] = {packPair(s[2 * kk][0], s[2 * kk][1]), packPair(s[2 * kk][2], s[2 * kk][3]),
                                   packPair(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   packPair(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int d2 = 0; d2 < HD / 16; ++d2) {
                unsigned bk[4];
                ldsm4t(fragBCols(kAddr, kk * 16, d2 * 16, lane), bk);
                mma(acc[2 * d2], a, bk[0], bk[1]);
                mma(acc[2 * d2 + 1], a, bk[2], bk[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + r * 8;
        if (i >= L) continue;
        unsigned* out = (unsigned*)(dq + ((long long)b * L + i) * qs + (long long)h * HD);
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) out[d * 4 + t4] = packPair(acc[d][2 * r] * scale, acc[d][2 * r + 1] * scale);
    }
}

// ---- float32 (SIMT) ---------------------------------------------------------------------------

constexpr int kRows = 4;      // rows (warps) per block
constexpr int kKeys = 32;     // keys (queries) per shared tile: one per lane
constexpr int KD = HD + 1;    // padded row: lane-per-row dot products without bank conflicts
constexpr int kLanes = (HD + 31) / 32;  // channels per lane

__device__ __forceinline__ float warpMax(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warpSum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Rows p0 .. p0+count-1 (zero at or past `limit`) of a strided matrix into a shared tile [count][ld].
__device__ __forceinline__ void loadRows(float* tile, int ld, const float* g, long long stride, int p0, int count,
                                         int limit) {
    for (int c = threadIdx.x; c < count * HD; c += blockDim.x) {
        const int r = c / HD, d = c % HD, p = p0 + r;
        tile[r * ld + d] = p < limit ? g[(long long)p * stride + d] : 0.f;
    }
}

__device__ __forceinline__ void forwardF32(const float* __restrict__ q, const float* __restrict__ k,
                                           const float* __restrict__ v, float* __restrict__ o, float* __restrict__ lse,
                                           int L, int H, int KVH, int window, float scale) {
    __shared__ float Ks[kKeys * KD], Vs[kKeys * HD], Qs[kRows * HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = blockIdx.x * kRows, h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    const float* kb = k + (long long)b * L * ks + (long long)kvh * HD;
    const float* vb = v + (long long)b * L * ks + (long long)kvh * HD;
    loadRows(Qs, HD, q + (long long)b * L * qs + (long long)h * HD, qs, i0, kRows, L);
    const int w = windowOrAll(window), i = i0 + warp;
    const int kLo = max(0, i0 - w + 1), kHi = min(L, i0 + kRows);
    float m = -kInf, l = 0.f, acc[kLanes];
#pragma unroll
    for (int t = 0; t < kLanes; ++t) acc[t] = 0.f;
    for (int j0 = kLo; j0 < kHi; j0 += kKeys) {
        __syncthreads();
        loadRows(Ks, KD, kb, ks, j0, kKeys, kHi);
        loadRows(Vs, HD, vb, ks, j0, kKeys, kHi);
        __syncthreads();
        const int j = j0 + lane;
        float s = -kInf;
        if (i < L && j < kHi && j <= i && i - j < w) {
            float dot = 0.f;
#pragma unroll 8
            for (int d = 0; d < HD; ++d) dot = fmaf(Qs[warp * HD + d], Ks[lane * KD + d], dot);
            s = scale * dot;
        }
        const float mNew = fmaxf(m, warpMax(s));
        const float mUse = mNew == -kInf ? 0.f : mNew;
        const float alpha = expf(m - mUse);
        const float p = s == -kInf ? 0.f : expf(s - mUse);
        l = l * alpha + warpSum(p);
        m = mNew;
#pragma unroll
        for (int t = 0; t < kLanes; ++t) acc[t] *= alpha;
        for (int jj = 0; jj < kKeys; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
            for (int t = 0; t < kLanes; ++t) {
                const int d = lane + 32 * t;
                if (d < HD) acc[t] = fmaf(pj, Vs[jj * HD + d], acc[t]);
            }
        }
    }
    if (i >= L) return;
    float* out = o + ((long long)b * L + i) * qs + (long long)h * HD;
    const float inv = 1.f / l;
#pragma unroll
    for (int t = 0; t < kLanes; ++t) {
        const int d = lane + 32 * t;
        if (d < HD) out[d] = acc[t] * inv;
    }
    if (lane == 0) lse[((long long)b * H + h) * L + i] = m + logf(l);
}

__device__ __forceinline__ void dkdvF32(const float* __restrict__ q, const float* __restrict__ k,
                                        const float* __restrict__ v, const float* __restrict__ dout,
                                        const float* __restrict__ lse, const float* __restrict__ dots,
                                        float* __restrict__ dk, float* __restrict__ dv,
                                        int L, int H, int KVH, int window, float scale) {
    __shared__ float Qs[kKeys * KD], Ds[kKeys * KD], Kr[kRows * HD], Vr[kRows * HD], lseS[kKeys], dotS[kKeys];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * kRows, kvh = blockIdx.y, b = blockIdx.z, group = H / KVH;
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    loadRows(Kr, HD, k + (long long)b * L * ks + (long long)kvh * HD, ks, j0, kRows, L);
    loadRows(Vr, HD, v + (long long)b * L * ks + (long long)kvh * HD, ks, j0, kRows, L);
    const int w = windowOrAll(window), j = j0 + warp;
    const int qHi = (int)min((long long)L, (long long)j0 + kRows - 1 + w);
    float dkA[kLanes], dvA[kLanes];
#pragma unroll
    for (int t = 0; t < kLanes; ++t) dkA[t] = dvA[t] = 0.f;
    for (int hg = 0; hg < group; ++hg) {
        const int h = kvh * group + hg;
        const float* qb = q + (long long)b * L * qs + (long long)h * HD;
        const float* db = dout + (long long)b * L * qs + (long long)h * HD;
        for (int q0 = j0; q0 < qHi; q0 += kKeys) {
            __syncthreads();
            loadRows(Qs, KD, qb, qs, q0, kKeys, qHi);
            loadRows(Ds, KD, db, qs, q0, kKeys, qHi);
            if (threadIdx.x < kKeys) {
                const int i = q0 + threadIdx.x;
                lseS[threadIdx.x] = i < qHi ? lse[((long long)b * H + h) * L + i] : 0.f;
                dotS[threadIdx.x] = i < qHi ? dots[((long long)b * H + h) * L + i] : 0.f;
            }
            __syncthreads();
            const int i = q0 + lane;
            float p = 0.f, ds = 0.f;
            if (j < L && i < qHi && i >= j && i - j < w) {
                float s = 0.f, dp = 0.f;
#pragma unroll 8
                for (int d = 0; d < HD; ++d) {
                    s = fmaf(Qs[lane * KD + d], Kr[warp * HD + d], s);
                    dp = fmaf(Ds[lane * KD + d], Vr[warp * HD + d], dp);
                }
                p = expf(scale * s - lseS[lane]);
                ds = p * (dp - dotS[lane]);
            }
            for (int ii = 0; ii < kKeys; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
                for (int t = 0; t < kLanes; ++t) {
                    const int d = lane + 32 * t;
                    if (d < HD) {
                        dvA[t] = fmaf(pi, Ds[ii * KD + d], dvA[t]);
                        dkA[t] = fmaf(dsi, Qs[ii * KD + d], dkA[t]);
                    }
                }
            }
        }
    }
    if (j >= L) return;
    const long long at = ((long long)b * L + j) * ks + (long long)kvh * HD;
#pragma unroll
    for (int t = 0; t < kLanes; ++t) {
        const int d = lane + 32 * t;
        if (d < HD) {
            dk[at + d] = dkA[t] * scale;
            dv[at + d] = dvA[t];
        }
    }
}

__device__ __forceinline__ void dqF32(const float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, const float* __restrict__ dout,
                                      const float* __restrict__ lse, const float* __restrict__ dots,
                                      float* __restrict__ dq, int L, int H, int KVH, int window, float scale) {
    __shared__ float Ks[kKeys * KD], Vs[kKeys * KD], Qs[kRows * HD], Ds[kRows * HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = blockIdx.x * kRows, h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const long long qs = (long long)H * HD, ks = (long long)KVH * HD;
    const float* kb = k + (long long)b * L * ks + (long long)kvh * HD;
    const float* vb = v + (long long)b * L * ks + (long long)kvh * HD;
    loadRows(Qs, HD, q + (long long)b * L * qs + (long long)h * HD, qs, i0, kRows, L);
    loadRows(Ds, HD, dout + (long long)b * L * qs + (long long)h * HD, qs, i0, kRows, L);
    const int w = windowOrAll(window), i = i0 + warp;
    const float lseI = i < L ? lse[((long long)b * H + h) * L + i] : 0.f;
    const float dotI = i < L ? dots[((long long)b * H + h) * L + i] : 0.f;
    const int kLo = max(0, i0 - w + 1), kHi = min(L, i0 + kRows);
    float acc[kLanes];
#pragma unroll
    for (int t = 0; t < kLanes; ++t) acc[t] = 0.f;
    for (int j0 = kLo; j0 < kHi; j0 += kKeys) {
        __syncthreads();
        loadRows(Ks, KD, kb, ks, j0, kKeys, kHi);
        loadRows(Vs, KD, vb, ks, j0, kKeys, kHi);
        __syncthreads();
        const int j = j0 + lane;
        float ds = 0.f;
        if (i < L && j < kHi && j <= i && i - j < w) {
            float s = 0.f, dp = 0.f;
#pragma unroll 8
            for (int d = 0; d < HD; ++d) {
                s = fmaf(Qs[warp * HD + d], Ks[lane * KD + d], s);
                dp = fmaf(Ds[warp * HD + d], Vs[lane * KD + d], dp);
            }
            ds = expf(scale * s - lseI) * (dp - dotI);
        }
        for (int jj = 0; jj < kKeys; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
            for (int t = 0; t < kLanes; ++t) {
                const int d = lane + 32 * t;
                if (d < HD) acc[t] = fmaf(dsj, Ks[jj * KD + d], acc[t]);
            }
        }
    }
    if (i >= L) return;
    float* out = dq + ((long long)b * L + i) * qs + (long long)h * HD;
#pragma unroll
    for (int t = 0; t < kLanes; ++t) {
        const int d = lane + 32 * t;
        if (d < HD) out[d] = acc[t] * scale;
    }
}

// D_i = dO_i . O_i for `rows` = batch * length * heads rows (in that order), one warp per row,
// written [batch, heads, length].
template <typename T>
__device__ __forceinline__ void rowDots(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ dots,
                                        int L, int H, long long rows) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float sum = 0.f;
    for (int d = lane; d < HD; d += 32) sum = fmaf(decode(out[row * HD + d]), decode(dout[row * HD + d]), sum);
    sum = warpSum(sum);
    const int h = (int)(row % H);
    const long long bi = row / H;  // b * L + i
    const long long b = bi / L, i = bi % L;
    if (lane == 0) dots[(b * H + h) * L + i] = sum;
}

}  // namespace attn

// ---- entry points -----------------------------------------------------------------------------
// forward:  grid (ceil(L/64), H, B), 128 threads (bf16); (ceil(L/4), H, B), 128 threads (f32)
// dot:      grid (ceil(B*L*H/4)), 128 threads
// dkdv:     grid (ceil(L/64), KVH, B) bf16, (ceil(L/4), KVH, B) f32; 128 threads
// dq:       as forward

extern "C" __global__ void __launch_bounds__(128) attn_forward_bf16(
    const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* o, float* lse,
    int L, int H, int KVH, int window, float scale) {
    attn::forwardBF16(q, k, v, o, lse, L, H, KVH, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attn_forward_f32(
    const float* q, const float* k, const float* v, float* o, float* lse, int L, int H, int KVH, int window, float scale) {
    attn::forwardF32(q, k, v, o, lse, L, H, KVH, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attn_dot_bf16(
    const unsigned short* o, const unsigned short* dout, float* dots, int L, int H, long long rows) {
    attn::rowDots(o, dout, dots, L, H, rows);
}
extern "C" __global__ void __launch_bounds__(128) attn_dot_f32(
    const float* o, const float* dout, float* dots, int L, int H, long long rows) {
    attn::rowDots(o, dout, dots, L, H, rows);
}
extern "C" __global__ void __launch_bounds__(128) attn_dkdv_bf16(
    const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* dout,
    const float* lse, const float* dots, unsigned short* dk, unsigned short* dv,
    int L, int H, int KVH, int window, float scale) {
    attn::dkdvBF16(q, k, v, dout, lse, dots, dk, dv, L, H, KVH, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attn_dkdv_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dots,
    float* dk, float* dv, int L, int H, int KVH, int window, float scale) {
    attn::dkdvF32(q, k, v, dout, lse, dots, dk, dv, L, H, KVH, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attn_dq_bf16(
    const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned short* dout,
    const float* lse, const float* dots, unsigned short* dq, int L, int H, int KVH, int window, float scale) {
    attn::dqBF16(q, k, v, dout, lse, dots, dq, L, H, KVH, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attn_dq_f32(
    const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* dots,
    float* dq, int L, int H, int KVH, int window, float scale) {
    attn::dqF32(q, k, v, dout, lse, dots, dq, L, H, KVH, window, scale);
}
