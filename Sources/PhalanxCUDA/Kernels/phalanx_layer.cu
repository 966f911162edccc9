// The element-wise middle of the Phalanx layer (SWR.md section 6) between its two matrix products,
// forward and backward, each ONE kernel: gates, b * v, the jagged-window recurrence (block 16,
// k = 2) and the post-gating. Compiled by NVRTC appended to jagged_window.cu, whose storage types
// (swr::Float32, swr::BFloat16), vector loads and head sums it uses.
//
// Layouts (rows = batch * length, sequence s = rows s*length ..< (s+1)*length; row-major):
//   z         [rows, stride]  the input projection x W_in^T WITHOUT bias, columns
//                             b [KVH*16] | c [KVH*16] | v [H*16] | a [H] | padding up to stride
//                             (stride a multiple of 8, so every 4- or 8-channel vector is aligned)
//   bias      [P] float32     the biases in the same column order (the v part is zero, unused)
//   mixed     [rows, H*16]    s * c + v, the input of proj_out; dmixed its gradient
//   carriers  [batch, blocks, H, 16] float32: each block's terminal local state (blocks =
//                             ceil(length / 16)), written forward, read backward
//   dz        [rows, stride]  the gradient of z (the pre-activation projections)
// Head h reads kv head h / (H / KVH).
//
// Forward, per row i and head h (channels k of the head):
//   a = scale * sigmoid(z_a + bias_a),  b = sigmoid(z_b + bias_b),  c = z_c + bias_c,  v = z_v
//   s = SWR_jagged(a, b * v)   (w_i = a_i w_{i-1} + u_i, g_i = a_i g_{i-1} from 0 and 1 at each
//                               block start, s_i = w_i + g_i * carrier of the previous block)
//   mixed = s * c + v
// Only `mixed` and the carriers are written: backward recomputes a, b, u and s from z, which the
// layer keeps, and takes each block's carrier from the forward.
//
// Backward, given dmixed (SWR.md section 5 for the recurrence, with dy = ds = dmixed * c):
//   dz_v = dmixed + du * b;  dz_b = sum_group du * v * b (1 - b);  dz_c = sum_group dmixed * s
//   dz_a = da * a * (1 - a / scale)
// The bias gradient (the sums over rows of dz_b, dz_c, dz_a) is not formed here: the host adds it
// with a matrix product (ones^T dz), whose order of additions is fixed, so runs give the same bits.
// Each head's dz_b and dz_c terms are written at dbHeads + dbOffset and dcHeads + dcOffset with row
// stride headStride: with H = KVH the group sums are single terms, so these are dz's own b and c
// columns; otherwise two scratch [rows, H*16], and phalanx_group_sum adds each group into dz.
//
// Threads: one per (sequence, chunk of whole blocks, head, V channels: 4 or 8 forward, 4
// backward), ordered so that a warp covers consecutive heads of one row (contiguous memory).
// Forward, a chunk recomputes the carrier of the block before it (a one-block halo); backward,
// the carrier adjoint of the block after it. Rows are loaded a group at a time (all loads of the
// group issued before any arithmetic), with no per-row bounds tests in whole blocks.

namespace phalanx {

using swr::kBlock;
// Rows are loaded in groups of up to 8 (RowGroup) without per-row bounds inside a full block.
static_assert(kBlock % 8 == 0, "the Phalanx layer kernels take block lengths that are multiples of 8");
using swr::kHeadDim;

// The problem of one launch.
struct Shape {
    int batch, length, heads, kvHeads;
    long long stride;  // row stride of z and dz, in elements
    float scale;       // gate scale
    int chunkBlocks;
    __device__ __forceinline__ int group() const { return heads / kvHeads; }
    __device__ __forceinline__ int blocks() const { return (length + kBlock - 1) / kBlock; }
    __device__ __forceinline__ long long width() const { return (long long)heads * kHeadDim; }
};

// Where one thread works.
struct Lane {
    bool valid;
    long long sequence, row0;  // its sequence and that sequence's first row
    int head, channel, groupLane;
    int r0, r1;      // its rows within the sequence, r0 a block start
    int bIndex, cIndex, vIndex, aIndex;  // its columns of z (and of the bias)

    template <int V>
    __device__ __forceinline__ static Lane locate(const Shape& shape, long long tid) {
        constexpr int G = kHeadDim / V;
        Lane lane;
        const int rowLanes = shape.heads * G;
        const int blocks = shape.blocks();
        const int chunks = (blocks + shape.chunkBlocks - 1) / shape.chunkBlocks;
        lane.valid = tid < (long long)shape.batch * chunks * rowLanes;
        if (!lane.valid) return lane;
        const int within = (int)(tid % rowLanes);
        const long long rest = tid / rowLanes;
        const int chunk = (int)(rest % chunks);
        lane.sequence = rest / chunks;
        lane.row0 = lane.sequence * shape.length;
        lane.head = within / G;
        lane.groupLane = within % G;
        lane.channel = lane.groupLane * V;
        lane.r0 = chunk * shape.chunkBlocks * kBlock;
        lane.r1 = min(shape.length, lane.r0 + shape.chunkBlocks * kBlock);
        const int kv = lane.head / shape.group();
        lane.bIndex = kv * kHeadDim + lane.channel;
        lane.cIndex = (shape.kvHeads + kv) * kHeadDim + lane.channel;
        lane.vIndex = (2 * shape.kvHeads + lane.head) * kHeadDim + lane.channel;
        lane.aIndex = (2 * shape.kvHeads + shape.heads) * kHeadDim + lane.head;
        return lane;
    }

    // The carrier slot of block t of the lane's sequence (its first channel).
    __device__ __forceinline__ long long carrier(const Shape& shape, int t) const {
        return ((sequence * shape.blocks() + t) * shape.heads + head) * kHeadDim + channel;
    }
};

// 1 / (1 + e^-x) with the hardware exponential and reciprocal (a few ulp from the exact value,
// far inside the float32 check's tolerance); 0 and 1 at the extremes, as the exact function.
__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(1.0f + __expf(-x)); }

template <class S, int V>
__device__ __forceinline__ void store(typename S::Element* p, const float (&x)[V]) {
    constexpr int kWords = V * S::kBytes / 4;
    unsigned w[kWords];
    S::template pack<V>(x, w);
    swr::storeWords<kWords>(p, w);
}

// The biases of one thread's columns.
template <int V>
struct Bias {
    float a, b[V], c[V];
    __device__ __forceinline__ void load(const float* __restrict__ bias, const Lane& lane) {
        a = bias[lane.aIndex];
#pragma unroll
        for (int k = 0; k < V; ++k) { b[k] = bias[lane.bIndex + k]; c[k] = bias[lane.cIndex + k]; }
    }
};

// R rows of one thread's columns, raw (as stored): the gate and the b, v, c vectors of z and
// the dmixed vector, each only when asked for. Rows from `row` of the lane's sequence; without
// kFull only the first n (the others are left unset and must not be read).
template <class S, int V, int R>
struct RowGroup {
    static constexpr int kWords = V * S::kBytes / 4;
    float a[R];
    unsigned b[R][kWords], v[R][kWords], c[R][kWords], dm[R][kWords];

    template <bool kFull, bool kA, bool kB, bool kV, bool kC, bool kDm>
    __device__ __forceinline__ void load(const typename S::Element* __restrict__ z,
                                         const typename S::Element* __restrict__ dmixed,
                                         const Shape& shape, const Lane& lane, int row, int n) {
#pragma unroll
        for (int j = 0; j < R; ++j) {
            if (kFull || j < n) {
                const long long r = lane.row0 + row + j;
                const typename S::Element* zr = z + r * shape.stride;
                if (kA) a[j] = S::gate(zr + lane.aIndex);
                if (kB) swr::loadWords<kWords>(zr + lane.bIndex, b[j]);
                if (kV) swr::loadWords<kWords>(zr + lane.vIndex, v[j]);
                if (kC) swr::loadWords<kWords>(zr + lane.cIndex, c[j]);
                if (kDm) swr::loadWords<kWords>(dmixed + r * shape.width() + lane.head * kHeadDim + lane.channel, dm[j]);
            }
        }
    }
};

// The terminal local state of the whole block from `row`: the carrier the next block sees.
template <class S, int V, int R>
__device__ __forceinline__ void carrierOf(const typename S::Element* __restrict__ z, const Shape& shape, const Lane& lane,
                                          const Bias<V>& bias, int row, float (&p)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = 0.0f;
#pragma unroll
    for (int r0 = 0; r0 < kBlock; r0 += R) {
        RowGroup<S, V, R> rows;
        rows.template load<true, true, true, true, false, false>(z, nullptr, shape, lane, row + r0, R);
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const float a = shape.scale * sigmoid(rows.a[j] + bias.a);
#pragma unroll
            for (int k = 0; k < V; ++k)
                p[k] = fmaf(a, p[k], sigmoid(S::channel(rows.b[j], k) + bias.b[k]) * S::channel(rows.v[j], k));
        }
    }
}

// ---- forward ------------------------------------------------------------------------------------

// One block of n rows (16 when kFull) from `row`, with carrier p: writes mixed, leaves the block's
// terminal local state in w.
template <class S, int V, int R, bool kFull>
__device__ __forceinline__ void forwardBlock(const typename S::Element* __restrict__ z, typename S::Element* __restrict__ mixed,
                                             const Shape& shape, const Lane& lane, const Bias<V>& bias, int row, int n,
                                             const float (&p)[V], float (&w)[V]) {
    float g = 1.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = 0.0f;
#pragma unroll
    for (int r0 = 0; r0 < kBlock; r0 += R) {
        if (!kFull && r0 >= n) break;
        RowGroup<S, V, R> rows;
        rows.template load<kFull, true, true, true, true, false>(z, nullptr, shape, lane, row + r0, n - r0);
#pragma unroll
        for (int j = 0; j < R; ++j) {
            if (kFull || r0 + j < n) {
                const float a = shape.scale * sigmoid(rows.a[j] + bias.a);
                g *= a;
                float out[V];
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const float v = S::channel(rows.v[j], k);
                    w[k] = fmaf(a, w[k], sigmoid(S::channel(rows.b[j], k) + bias.b[k]) * v);
                    const float s = fmaf(g, p[k], w[k]);
                    out[k] = fmaf(s, S::channel(rows.c[j], k) + bias.c[k], v);
                }
                store<S, V>(mixed + (lane.row0 + row + r0 + j) * shape.width() + lane.head * kHeadDim + lane.channel, out);
            }
        }
    }
}

template <class S, int V, int R>
__device__ __forceinline__ void forward(const typename S::Element* __restrict__ z, const float* __restrict__ biases,
                                        typename S::Element* __restrict__ mixed, float* __restrict__ carriers,
                                        const Shape& shape, long long tid) {
    const Lane lane = Lane::locate<V>(shape, tid);
    if (!lane.valid) return;
    Bias<V> bias;
    bias.load(biases, lane);
    float p[V];
    if (lane.r0 > 0) carrierOf<S, V, R>(z, shape, lane, bias, lane.r0 - kBlock, p);
    else {
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = 0.0f;
    }
    for (int row = lane.r0; row < lane.r1; row += kBlock) {
        const int n = min(kBlock, lane.r1 - row);
        float w[V];
        unsigned bits[V];
        if (n == kBlock) forwardBlock<S, V, R, true>(z, mixed, shape, lane, bias, row, n, p, w);
        else forwardBlock<S, V, R, false>(z, mixed, shape, lane, bias, row, n, p, w);
        swr::Float32::pack<V>(w, bits);
        swr::storeWords<V>(carriers + lane.carrier(shape, row / kBlock), bits);
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = w[k];
    }
}

// ---- backward -----------------------------------------------------------------------------------

// Where backward writes.
template <class S, int V>
struct Gradients {
    typename S::Element* dz;
    typename S::Element* dbHeads;
    typename S::Element* dcHeads;
    long long headStride;
};

// One row i of the reverse sweep, its raw b, v, c and dmixed in slot j of `rows`: its gate a_i,
// the next gate (1 at the block's last row), g_i, g_{i-1}, w_i and w_{i-1} (1 and 0 before the
// block). Updates the sweep's running lw, lg and dp and writes the row's gradients.
template <class S, int V, int R>
__device__ __forceinline__ void sweepRow(const RowGroup<S, V, R>& rows, int j, long long r, Gradients<S, V>& out,
                                         const Shape& shape, const Lane& lane, const Bias<V>& bias,
                                         float a, float aNext, float g, float gBefore,
                                         const float (&w)[V], const float (&wBefore)[V], const float (&p)[V],
                                         float (&lw)[V], float (&lg)[V], float (&dp)[V]) {
    float terms = 0.0f, dv[V], db[V], dc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float dm = S::channel(rows.dm[j], k);
        const float ds = dm * (S::channel(rows.c[j], k) + bias.c[k]);
        const float b = sigmoid(S::channel(rows.b[j], k) + bias.b[k]);
        lw[k] = fmaf(aNext, lw[k], ds);
        lg[k] = fmaf(aNext, lg[k], ds * p[k]);
        terms = fmaf(lw[k], wBefore[k], terms);
        terms = fmaf(lg[k], gBefore, terms);
        dp[k] = fmaf(g, ds, dp[k]);
        dv[k] = fmaf(lw[k], b, dm);
        db[k] = lw[k] * S::channel(rows.v[j], k) * b * (1.0f - b);
        dc[k] = dm * fmaf(g, p[k], w[k]);
    }
    typename S::Element* dzr = out.dz + r * shape.stride;
    store<S, V>(dzr + lane.vIndex, dv);
    store<S, V>(out.dbHeads + r * out.headStride + lane.head * kHeadDim + lane.channel, db);
    store<S, V>(out.dcHeads + r * out.headStride + lane.head * kHeadDim + lane.channel, dc);
    const float da = swr::headSum<V>(terms) * a * (1.0f - a / shape.scale);
    if (lane.groupLane == 0) S::storeGate(dzr + lane.aIndex, da);
}

// The forward scan of one block of every thread of a thread block, in shared memory: slot
// [i][threadIdx.x] is thread threadIdx.x's value at row i (consecutive threads, consecutive banks).
template <int V>
struct SharedScan {
    static constexpr int kThreads = 128;
    float a[kBlock][kThreads], g[kBlock][kThreads], w[kBlock][V][kThreads];
};

// One block of n rows (16 when kFull) from `row` with carrier p, last row to first. Its forward
// scan (gates, inclusive gate products, local states) goes to shared memory rather than registers,
// and rows are visited R at a time in loops that are not unrolled, so that a thread holds only R
// rows of loads and more threads fit on a multiprocessor (measured 1.9x faster than holding the
// scan in registers). `carry` holds dp of the block after on entry (added at the block's last
// row) and this block's dp on return.
template <class S, int V, int R, bool kFull>
__device__ __forceinline__ void backwardBlock(const typename S::Element* __restrict__ z,
                                                    const typename S::Element* __restrict__ dmixed, Gradients<S, V>& out,
                                                    const Shape& shape, const Lane& lane, const Bias<V>& bias, int row, int n,
                                                    const float (&p)[V], float (&carry)[V], SharedScan<V>& scan) {
    const int t = threadIdx.x;
    float gRun = 1.0f, wRun[V] = {};
#pragma unroll 1
    for (int r0 = 0; r0 < kBlock; r0 += R) {
        if (!kFull && r0 >= n) break;
        RowGroup<S, V, R> rows;
        rows.template load<kFull, true, true, true, false, false>(z, nullptr, shape, lane, row + r0, n - r0);
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int i = r0 + j;
            if (kFull || i < n) {
                const float a = shape.scale * sigmoid(rows.a[j] + bias.a);
                gRun *= a;
                scan.a[i][t] = a;
                scan.g[i][t] = gRun;
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    wRun[k] = fmaf(a, wRun[k], sigmoid(S::channel(rows.b[j], k) + bias.b[k]) * S::channel(rows.v[j], k));
                    scan.w[i][k][t] = wRun[k];
                }
            }
        }
    }
    float lw[V], lg[V], dp[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { lw[k] = carry[k]; lg[k] = 0.0f; dp[k] = 0.0f; }
#pragma unroll 1
    for (int r0 = (n - 1) / R * R; r0 >= 0; r0 -= R) {
        RowGroup<S, V, R> rows;
        rows.template load<kFull, false, true, true, true, true>(z, dmixed, shape, lane, row + r0, n - r0);
#pragma unroll
        for (int j = R - 1; j >= 0; --j) {
            const int i = r0 + j;
            if (kFull || i < n) {
                float w[V], wBefore[V];
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    w[k] = scan.w[i][k][t];
                    wBefore[k] = i > 0 ? scan.w[i - 1][k][t] : 0.0f;
                }
                sweepRow<S, V, R>(rows, j, lane.row0 + row + i, out, shape, lane, bias, scan.a[i][t],
                                  i == n - 1 ? 1.0f : scan.a[i + 1][t], scan.g[i][t], i > 0 ? scan.g[i - 1][t] : 1.0f,
                                  w, wBefore, p, lw, lg, dp);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) carry[k] = dp[k];
}

template <class S, int V, int R>
__device__ __forceinline__ void backward(const typename S::Element* __restrict__ z, const float* __restrict__ biases,
                                         const typename S::Element* __restrict__ dmixed,
                                         const float* __restrict__ carriers, Gradients<S, V> out,
                                         const Shape& shape, long long tid) {
    const Lane lane = Lane::locate<V>(shape, tid);
    if (!lane.valid) return;
    Bias<V> bias;
    bias.load(biases, lane);

    // dp of the block after the chunk (zero at the sequence's end): sum of g_j * dmixed_j * c_j.
    float carry[V];
#pragma unroll
    for (int k = 0; k < V; ++k) carry[k] = 0.0f;
    if (lane.r1 < shape.length) {
        const int n = min(kBlock, shape.length - lane.r1);
        float g = 1.0f;
#pragma unroll 1
        for (int r0 = 0; r0 < kBlock; r0 += R) {
            if (r0 >= n) break;
            RowGroup<S, V, R> rows;
            rows.template load<false, true, false, false, true, true>(z, dmixed, shape, lane, lane.r1 + r0, n - r0);
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if (r0 + j < n) {
                    g *= shape.scale * sigmoid(rows.a[j] + bias.a);
#pragma unroll
                    for (int k = 0; k < V; ++k)
                        carry[k] = fmaf(g, S::channel(rows.dm[j], k) * (S::channel(rows.c[j], k) + bias.c[k]), carry[k]);
                }
            }
        }
    }

    __shared__ SharedScan<V> scan;
    const int firstBlock = lane.r0 / kBlock, lastBlock = (lane.r1 - 1) / kBlock;
    for (int t = lastBlock; t >= firstBlock; --t) {
        const int row = t * kBlock;
        const int n = min(kBlock, lane.r1 - row);
        float p[V];
        unsigned bits[V];
        if (t > 0) swr::loadWords<V>(carriers + lane.carrier(shape, t - 1), bits);
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = t > 0 ? __uint_as_float(bits[k]) : 0.0f;
        if (n == kBlock) backwardBlock<S, V, R, true>(z, dmixed, out, shape, lane, bias, row, n, p, carry, scan);
        else backwardBlock<S, V, R, false>(z, dmixed, out, shape, lane, bias, row, n, p, carry, scan);
    }
}

// dz[r, column0 + kv*16 + k] = sum over the group's heads h of heads[r, h*16 + k].
template <class S>
__device__ __forceinline__ void groupSum(const typename S::Element* __restrict__ heads, typename S::Element* __restrict__ dz,
                                         long long rows, int headCount, int kvHeads, long long stride, int column0,
                                         long long tid) {
    const long long perRow = (long long)kvHeads * kHeadDim;
    if (tid >= rows * perRow) return;
    const long long r = tid / perRow;
    const int within = (int)(tid % perRow);
    const int kv = within / kHeadDim, k = within % kHeadDim;
    const int group = headCount / kvHeads;
    const typename S::Element* source = heads + r * headCount * kHeadDim + kv * group * kHeadDim + k;
    float sum = 0.0f;
    for (int h = 0; h < group; ++h) sum += S::gate(source + h * kHeadDim);
    S::storeGate(dz + r * stride + column0 + within, sum);
}

}  // namespace phalanx

// ---- entry points -------------------------------------------------------------------------------
// phalanx_forward_{f32,bf16}_v{V}_r{R} and phalanx_backward_{f32,bf16}_v4_s{R}: V channels per
// thread, R rows loaded together; a one-dimensional grid over batch * chunks * heads * (16 / V)
// threads (backward: thread blocks of exactly 128). phalanx_group_sum_{f32,bf16}: one thread
// per (row, kv channel).

#define PHALANX_SHAPE                                                                              \
    phalanx::Shape shape{batch, length, heads, kvHeads, stride, scale, chunkBlocks}

#define PHALANX_FORWARD(TYPE, STORAGE, V, R)                                                       \
    extern "C" __global__ void phalanx_forward_##TYPE##_v##V##_r##R(                               \
        const swr::STORAGE::Element* z, const float* bias, swr::STORAGE::Element* mixed,           \
        float* carriers, int batch, int length, int heads, int kvHeads, long long stride,          \
        float scale, int chunkBlocks) {                                                            \
        PHALANX_SHAPE;                                                                             \
        phalanx::forward<swr::STORAGE, V, R>(z, bias, mixed, carriers, shape, SWR_THREAD_INDEX);   \
    }

// Backward: at most 128 threads per block (the shared scan's size) and 4 blocks per multiprocessor
// (what its 48 KB of shared memory allow), so registers are capped at 128.
#define PHALANX_BACKWARD(TYPE, STORAGE, V, R)                                                      \
    extern "C" __global__ void __launch_bounds__(128, 4) phalanx_backward_##TYPE##_v##V##_s##R(    \
        const swr::STORAGE::Element* z, const float* bias, const swr::STORAGE::Element* dmixed,    \
        const float* carriers, swr::STORAGE::Element* dz, swr::STORAGE::Element* dbHeads,          \
        long long dbOffset, swr::STORAGE::Element* dcHeads, long long dcOffset,                    \
        long long headStride, int batch, int length, int heads, int kvHeads,                       \
        long long stride, float scale, int chunkBlocks) {                                          \
        PHALANX_SHAPE;                                                                             \
        phalanx::Gradients<swr::STORAGE, V> out{dz, dbHeads + dbOffset, dcHeads + dcOffset, headStride}; \
        phalanx::backward<swr::STORAGE, V, R>(z, bias, dmixed, carriers, out, shape,                \
                                              SWR_THREAD_INDEX);                                   \
    }

#define PHALANX_GROUP_SUM(TYPE, STORAGE)                                                           \
    extern "C" __global__ void phalanx_group_sum_##TYPE(                                           \
        const swr::STORAGE::Element* heads, swr::STORAGE::Element* dz, long long rows,             \
        int headCount, int kvHeads, long long stride, int column0) {                               \
        phalanx::groupSum<swr::STORAGE>(heads, dz, rows, headCount, kvHeads, stride, column0,      \
                                        SWR_THREAD_INDEX);                                         \
    }

#define PHALANX_KERNELS(TYPE, STORAGE)                                                             \
    PHALANX_FORWARD(TYPE, STORAGE, 4, 1)                                                           \
    PHALANX_FORWARD(TYPE, STORAGE, 4, 4)                                                           \
    PHALANX_FORWARD(TYPE, STORAGE, 8, 1)                                                           \
    PHALANX_FORWARD(TYPE, STORAGE, 8, 2)                                                           \
    PHALANX_BACKWARD(TYPE, STORAGE, 4, 1)                                                          \
    PHALANX_BACKWARD(TYPE, STORAGE, 4, 2)                                                          \
    PHALANX_BACKWARD(TYPE, STORAGE, 4, 4)                                                          \
    PHALANX_GROUP_SUM(TYPE, STORAGE)

PHALANX_KERNELS(f32, Float32)
PHALANX_KERNELS(bf16, BFloat16)
