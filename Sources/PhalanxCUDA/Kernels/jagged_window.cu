// The jagged-window sliding window recurrence on the GPU (SWR.md sections 3 and 5), k = 1 or 2,
// block length 16, head dim 16. Compiled at run time by NVRTC (see KernelCache.swift); needs no
// header.
//
// Layout (batched sequences, `length` rows each, sequence s = rows s*length ..< (s+1)*length):
//   inputs u, outputs y, and their gradients: [rows, heads, 16]
//   gates a and their gradient:               [rows, heads]
// Storage is float32 or bfloat16 (raw bits); arithmetic is float32 in both, with exactly the
// operations of the CPU operator (Sources/SWR/JaggedWindow.swift, Backward.swift), so float32
// results equal it up to summation order in the gradient reductions.
//
// Parallel decomposition: one thread per (sequence, head, group of V channels, chunk of time).
// A chunk is `chunkBlocks` whole blocks; it needs nothing from other threads, because
//   - forward: a chunk only needs the carrier of the block before it, recomputed from that
//     block's gates and inputs (a one-block halo);
//   - backward: a chunk needs that carrier too, and the carrier adjoint dp of the block after it,
//     recomputed from that block's gates and output gradients (a halo on each side).
// Within a chunk the thread streams over time with vector loads (V channels of one row in one
// load), its block's values in registers, and the block boundary carried through registers.
// Threads are ordered (sequence, chunk, head, channel group) from slowest to fastest, so a warp
// reads and writes contiguous memory at each row. The host picks the chunk length so that one
// wave of resident threads covers the problem (CUDAJaggedWindow.Tuning).
//
// Measured on an H200 (dim 2048, 32K tokens, `phalanx bench cuda`): forward at 87% (float32) and
// 84% (bfloat16) of the device-to-device copy bandwidth, backward at 75% and 66%.

namespace swr {

// The shape constants come from the host as compile definitions (KernelSources.definitions), so
// one number, the model configuration's, reaches every kernel.
#if !defined(SWR_BLOCK_LENGTH) || !defined(SWR_HEAD_DIM)
#error "compile with -DSWR_BLOCK_LENGTH=<positions per block> -DSWR_HEAD_DIM=<channels per head>"
#endif
constexpr int kBlock = SWR_BLOCK_LENGTH;  // positions per block, l
constexpr int kHeadDim = SWR_HEAD_DIM;    // channels per head, DH
// A whole block of gates and values lives in registers; a head is 16 / V threads of V channels.
static_assert(kBlock >= 1 && kBlock <= 16, "block length must be in 1...16 on the GPU");
static_assert(kHeadDim == 16, "the kernels assign 16 / V threads of V channels to a head");

// ---- storage: float32 or bfloat16 bits, converted to float32 on load --------------------------

struct Float32 {
    typedef float Element;
    static constexpr int kBytes = 4;
    __device__ __forceinline__ static float gate(const float* p) { return *p; }
    __device__ __forceinline__ static void storeGate(float* p, float x) { *p = x; }
    // Word k of a vector holds channel k.
    __device__ __forceinline__ static float channel(const unsigned* w, int k) {
        return __uint_as_float(w[k]);
    }
    template <int V>
    __device__ __forceinline__ static void pack(const float (&x)[V], unsigned (&w)[V]) {
#pragma unroll
        for (int k = 0; k < V; ++k) w[k] = __float_as_uint(x[k]);
    }
};

struct BFloat16 {
    typedef unsigned short Element;
    static constexpr int kBytes = 2;
    __device__ __forceinline__ static float decode(unsigned bits) { return __uint_as_float(bits << 16); }
    // Round to nearest even, as the host's BFloat16.bits(_:) does; NaN stays NaN. On the device
    // one cvt.rn.bf16x2.f32 converts two numbers (Ampere and later); elsewhere the same rounding
    // in integer arithmetic.
    __device__ __forceinline__ static unsigned encode(float x) {
        unsigned u = __float_as_uint(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
        return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    }
    // low -> bits 0..15, high -> bits 16..31.
    __device__ __forceinline__ static unsigned encodePair(float low, float high) {
#ifdef __CUDA_ARCH__
        unsigned bits;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(high), "f"(low));
        return bits;
#else
        return encode(low) | (encode(high) << 16);
#endif
    }
    __device__ __forceinline__ static float gate(const unsigned short* p) { return decode(*p); }
    __device__ __forceinline__ static void storeGate(unsigned short* p, float x) {
        *p = (unsigned short)(encodePair(x, 0.0f) & 0xffffu);
    }
    // Word k/2 of a vector holds channels k (low half) and k+1 (high half): little-endian.
    __device__ __forceinline__ static float channel(const unsigned* w, int k) {
        return (k & 1) ? __uint_as_float(w[k >> 1] & 0xffff0000u) : __uint_as_float(w[k >> 1] << 16);
    }
    template <int V>
    __device__ __forceinline__ static void pack(const float (&x)[V], unsigned (&w)[V / 2]) {
#pragma unroll
        for (int k = 0; k < V / 2; ++k) w[k] = encodePair(x[2 * k], x[2 * k + 1]);
    }
};

// N 32-bit words from (to) memory aligned to the vector's size: one 4-, 8- or 16-byte access,
// or several 16-byte ones.
template <int N>
__device__ __forceinline__ void loadWords(const void* p, unsigned (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int k = 0; k < N / 4; ++k) {
            uint4 q = reinterpret_cast<const uint4*>(p)[k];
            w[4 * k] = q.x; w[4 * k + 1] = q.y; w[4 * k + 2] = q.z; w[4 * k + 3] = q.w;
        }
    } else if constexpr (N == 2) {
        uint2 q = *reinterpret_cast<const uint2*>(p);
        w[0] = q.x; w[1] = q.y;
    } else {
        static_assert(N == 1, "vector of 1, 2 or a multiple of 4 words");
        w[0] = *reinterpret_cast<const unsigned*>(p);
    }
}

template <int N>
__device__ __forceinline__ void storeWords(void* p, const unsigned (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int k = 0; k < N / 4; ++k)
            reinterpret_cast<uint4*>(p)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    } else if constexpr (N == 2) {
        *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else {
        static_assert(N == 1, "vector of 1, 2 or a multiple of 4 words");
        *reinterpret_cast<unsigned*>(p) = w[0];
    }
}

// Where one thread works: its sequence, head, channels and rows [r0, r1) (r0 a block start).
struct Work {
    bool valid;
    long long gate0;    // index of (row 0 of the sequence, head) in the gates
    long long element0; // index of (row 0 of the sequence, head, first channel) in the inputs
    int r0, r1;
    int groupLane;      // 0 ..< G: which channel group of the head

    template <int V>
    __device__ __forceinline__ static Work locate(long long tid, int batch, int length, int heads,
                                                  int chunkBlocks) {
        constexpr int G = kHeadDim / V;
        Work work;
        const int rowLanes = heads * G;
        const int blocks = (length + kBlock - 1) / kBlock;
        const int chunks = (blocks + chunkBlocks - 1) / chunkBlocks;
        work.valid = tid < (long long)batch * chunks * rowLanes;
        if (!work.valid) return work;
        const int lane = (int)(tid % rowLanes);
        const long long rest = tid / rowLanes;
        const int chunk = (int)(rest % chunks);
        const long long sequence = rest / chunks;
        const int head = lane / G;
        work.groupLane = lane % G;
        work.gate0 = sequence * length * heads + head;
        work.element0 = work.gate0 * kHeadDim + work.groupLane * V;
        work.r0 = chunk * chunkBlocks * kBlock;
        work.r1 = min(length, work.r0 + chunkBlocks * kBlock);
        return work;
    }
};

// One block's gates and inputs (or output gradients) of one thread, `n` rows from `row`; rows
// past `n` read as padding: gate 1, value 0 (SWR.md section 3: padding at the end changes nothing
// before it).
template <class S, int V>
struct BlockLoad {
    static constexpr int kWords = V * S::kBytes / 4;
    float a[kBlock];
    unsigned x[kBlock][kWords];

    __device__ __forceinline__ void load(const typename S::Element* __restrict__ gates,
                                         const typename S::Element* __restrict__ values,
                                         const Work& work, int heads, int row, int n) {
        const typename S::Element* g = gates + work.gate0 + (long long)row * heads;
        const typename S::Element* x0 = values + work.element0 + (long long)row * heads * kHeadDim;
        if (n == kBlock) {  // every block but a sequence's last: no per-row tests
#pragma unroll
            for (int j = 0; j < kBlock; ++j) {
                a[j] = S::gate(g + j * heads);
                loadWords<kWords>(x0 + j * heads * kHeadDim, x[j]);
            }
            return;
        }
#pragma unroll
        for (int j = 0; j < kBlock; ++j) {
            if (j < n) {
                a[j] = S::gate(g + j * heads);
                loadWords<kWords>(x0 + j * heads * kHeadDim, x[j]);
            } else {
                a[j] = 1.0f;
#pragma unroll
                for (int k = 0; k < kWords; ++k) x[j][k] = 0u;
            }
        }
    }
};

// ---- forward ------------------------------------------------------------------------------------
//
//   w_i = a_i w_{i-1} + u_i,  g_i = a_i g_{i-1}  (restarting from 0 and 1 at each block start)
//   y_i = w_i + g_i v_{t-1}   (k = 2; v_{t-1} the previous block's terminal w, 0 for block 0)
//   y_i = w_i                 (k = 1)
//
// One block of the forward: n rows (all 16 when kFull) from `block`, carrier v; leaves the block's
// terminal local state in w and writes the outputs from `out` on (row stride `rowElements`).
template <class S, int V, bool kFull>
__device__ __forceinline__ void forwardBlock(const BlockLoad<S, V>& block, int n, const float (&v)[V], float (&w)[V],
                                             typename S::Element* __restrict__ out, long long rowElements) {
    constexpr int kWords = BlockLoad<S, V>::kWords;
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = 0.0f;
    float g = 1.0f;
#pragma unroll
    for (int j = 0; j < kBlock; ++j) {
        if (kFull || j < n) {
            const float aj = block.a[j];
            g *= aj;
            float result[V];
#pragma unroll
            for (int k = 0; k < V; ++k) {
                w[k] = fmaf(aj, w[k], S::channel(block.x[j], k));
                result[k] = fmaf(g, v[k], w[k]);
            }
            unsigned words[kWords];
            S::template pack<V>(result, words);
            storeWords<kWords>(out + j * rowElements, words);
        }
    }
}

// The thread's chunk, block by block; the next block's loads are issued before the current
// block is computed (two blocks of registers), so memory stays busy while the thread computes.
template <class S, int V>
__device__ __forceinline__ void jaggedForward(const typename S::Element* __restrict__ a,
                                              const typename S::Element* __restrict__ u,
                                              typename S::Element* __restrict__ y,
                                              int batch, int length, int heads, int chunkBlocks,
                                              int neighbour, long long tid) {
    const Work work = Work::locate<V>(tid, batch, length, heads, chunkBlocks);
    if (!work.valid) return;
    const long long rowElements = (long long)heads * kHeadDim;

    float v[V];  // carrier: the previous block's terminal local state
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = 0.0f;
    BlockLoad<S, V> next;
    const bool halo = neighbour && work.r0 > 0;
    if (halo) next.load(a, u, work, heads, work.r0 - kBlock, kBlock);
    BlockLoad<S, V> first;
    first.load(a, u, work, heads, work.r0, min(kBlock, work.r1 - work.r0));
    if (halo) {
#pragma unroll
        for (int j = 0; j < kBlock; ++j)
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = fmaf(next.a[j], v[k], S::channel(next.x[j], k));
    }
    next = first;

    for (int row = work.r0; row < work.r1; row += kBlock) {
        const int n = min(kBlock, work.r1 - row);
        const BlockLoad<S, V> block = next;
        if (row + kBlock < work.r1) next.load(a, u, work, heads, row + kBlock, min(kBlock, work.r1 - row - kBlock));
        float w[V];
        typename S::Element* out = y + work.element0 + (long long)row * rowElements;
        if (n == kBlock) forwardBlock<S, V, true>(block, kBlock, v, w, out, rowElements);
        else forwardBlock<S, V, false>(block, n, v, w, out, rowElements);
        if (neighbour) {
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = w[k];
        }
    }
}

// ---- backward -----------------------------------------------------------------------------------
//
// Per block t with carrier p = v_{t-1} (SWR.md section 5), given dy:
//   dp_t = sum_{i in t} g_i dy_i                 (added at block t-1's last row)
//   lw_i = dy_i + a_{i+1} lw_{i+1}               (a_{i+1} taken as 1 at the block's last row,
//                                                 where lw starts from dp_{t+1})
//   lg_i = dy_i p + a_{i+1} lg_{i+1}             (per channel; starts from 0)
//   du_i = lw_i,   da_i = sum_c lw_i W_{i-1} + lg_i G_{i-1}   (W, G before the block: 0, 1)
// Blocks of a chunk are visited last to first. Each step reads its block's dy and the block
// before (whose terminal local state is p) together, so both arrive in one memory round trip,
// then reads its own gates and inputs again (from L1: the step before read them as its block
// before) to rebuild its local states: one block of states in registers instead of two.

// Sum over the G = 16 / V threads of one head (adjacent lanes of one warp).
template <int V>
__device__ __forceinline__ float headSum(float x) {
    constexpr int G = kHeadDim / V;
    if constexpr (G > 1) {
        const unsigned lane = threadIdx.x & 31u;
        const unsigned mask = ((1u << G) - 1u) << (lane & ~(unsigned)(G - 1));
#pragma unroll
        for (int offset = G / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset);
    }
    return x;
}

// A block's forward scan for the backward pass: its gates, the local state after each row and
// the inclusive gate product at each row.
template <int V>
struct ScannedBlock {
    float a[kBlock];
    float w[kBlock][V];  // w after row j
    float g[kBlock];     // g after row j

    template <class S>
    __device__ __forceinline__ void scan(const BlockLoad<S, V>& block) {
        float gj = 1.0f;
#pragma unroll
        for (int j = 0; j < kBlock; ++j) {
            a[j] = block.a[j];
            gj *= block.a[j];
            g[j] = gj;
#pragma unroll
            for (int k = 0; k < V; ++k)
                w[j][k] = fmaf(block.a[j], j > 0 ? w[j - 1][k] : 0.0f, S::channel(block.x[j], k));
        }
    }
};

// dp of the block after the chunk (ascending, as the CPU sums it): the carry into the chunk's
// last row. Zero where the chunk ends the sequence.
template <class S, int V>
__device__ __forceinline__ void rightHalo(const typename S::Element* __restrict__ a,
                                          const typename S::Element* __restrict__ dy, const Work& work,
                                          int length, int heads, int neighbour, float (&carry)[V]) {
#pragma unroll
    for (int k = 0; k < V; ++k) carry[k] = 0.0f;
    if (neighbour && work.r1 < length) {
        BlockLoad<S, V> halo;
        halo.load(a, dy, work, heads, work.r1, min(kBlock, length - work.r1));
        float g = 1.0f;
#pragma unroll
        for (int j = 0; j < kBlock; ++j) {
            g *= halo.a[j];
#pragma unroll
            for (int k = 0; k < V; ++k) carry[k] = fmaf(g, S::channel(halo.x[j], k), carry[k]);
        }
    }
}

// The reverse sweep over one block of n rows (all 16 when kFull) starting at `row`, given their dy:
// writes du and da, and replaces `carry` (dp of the block after) by this block's dp.
template <class S, int V, bool kFull>
__device__ __forceinline__ void sweep(const ScannedBlock<V>& current, const float (&p)[V], float (&carry)[V],
                                      const unsigned (&dyBlock)[kBlock][BlockLoad<S, V>::kWords],
                                      int row, int n, int neighbour, const Work& work, int heads,
                                      typename S::Element* __restrict__ du, typename S::Element* __restrict__ da) {
    constexpr int kWords = BlockLoad<S, V>::kWords;
    const long long rowElements = (long long)heads * kHeadDim;
    float lw[V], lg[V], dp[V];
#pragma unroll
    for (int k = 0; k < V; ++k) { lw[k] = carry[k]; lg[k] = 0.0f; dp[k] = 0.0f; }
#pragma unroll
    for (int j = kBlock - 1; j >= 0; --j) {
        if (kFull || j < n) {
            const float aNext = j == n - 1 ? 1.0f : current.a[j + 1];
            const float gBefore = j > 0 ? current.g[j - 1] : 1.0f;
            float out[V];
            float terms = 0.0f;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const float dyk = S::channel(dyBlock[j], k);
                lw[k] = fmaf(aNext, lw[k], dyk);
                out[k] = lw[k];
                terms = fmaf(lw[k], j > 0 ? current.w[j - 1][k] : 0.0f, terms);
                if (neighbour) {
                    lg[k] = fmaf(aNext, lg[k], dyk * p[k]);
                    terms = fmaf(lg[k], gBefore, terms);
                    dp[k] = fmaf(current.g[j], dyk, dp[k]);
                }
            }
            unsigned words[kWords];
            S::template pack<V>(out, words);
            storeWords<kWords>(du + work.element0 + (long long)(row + j) * rowElements, words);
            const float total = headSum<V>(terms);
            if (work.groupLane == 0) S::storeGate(da + work.gate0 + (long long)(row + j) * heads, total);
        }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) carry[k] = dp[k];
}


template <class S, int V>
__device__ __forceinline__ void jaggedBackward(const typename S::Element* __restrict__ a,
                                               const typename S::Element* __restrict__ u,
                                               const typename S::Element* __restrict__ dy,
                                               typename S::Element* __restrict__ du,
                                               typename S::Element* __restrict__ da,
                                               int batch, int length, int heads, int chunkBlocks,
                                               int neighbour, long long tid) {
    const Work work = Work::locate<V>(tid, batch, length, heads, chunkBlocks);
    if (!work.valid) return;
    const long long rowElements = (long long)heads * kHeadDim;
    constexpr int kWords = BlockLoad<S, V>::kWords;
    float carry[V];
    rightHalo<S, V>(a, dy, work, length, heads, neighbour, carry);
    const int firstBlock = work.r0 / kBlock;
    const int lastBlock = (work.r1 - 1) / kBlock;

    for (int t = lastBlock; t >= firstBlock; --t) {
        const int row = t * kBlock;
        const int n = min(kBlock, work.r1 - row);
        unsigned dyBlock[kBlock][kWords];
#pragma unroll
        for (int j = 0; j < kBlock; ++j) {
            if (j < n) {
                loadWords<kWords>(dy + work.element0 + (long long)(row + j) * rowElements, dyBlock[j]);
            } else {
#pragma unroll
                for (int k = 0; k < kWords; ++k) dyBlock[j][k] = 0u;
            }
        }
        float p[V];
#pragma unroll
        for (int k = 0; k < V; ++k) p[k] = 0.0f;
        if (neighbour && t > 0) {
            BlockLoad<S, V> before;
            before.load(a, u, work, heads, row - kBlock, kBlock);
#pragma unroll
            for (int j = 0; j < kBlock; ++j)
#pragma unroll
                for (int k = 0; k < V; ++k) p[k] = fmaf(before.a[j], p[k], S::channel(before.x[j], k));
        }
        ScannedBlock<V> current;
        {
            BlockLoad<S, V> block;
            block.load(a, u, work, heads, row, n);
            current.template scan<S>(block);
        }
        if (n == kBlock) sweep<S, V, true>(current, p, carry, dyBlock, row, kBlock, neighbour, work, heads, du, da);
        else sweep<S, V, false>(current, p, carry, dyBlock, row, n, neighbour, work, heads, du, da);
    }
}

}  // namespace swr

// ---- entry points -------------------------------------------------------------------------------
// swr_jagged_{forward,backward}_{f32,bf16}_v{V}: V channels per thread (16 / V threads per head).
// Grid: one-dimensional, ceil(batch * chunks * heads * (16 / V) / blockDim.x) blocks, blockDim.x
// a multiple of 32.

#define SWR_THREAD_INDEX ((long long)blockIdx.x * blockDim.x + threadIdx.x)

#define SWR_FORWARD(NAME, STORAGE, V)                                                              \
    extern "C" __global__ void NAME(const swr::STORAGE::Element* a, const swr::STORAGE::Element* u,    \
                                    swr::STORAGE::Element* y, int batch, int length, int heads,        \
                                    int chunkBlocks, int neighbour) {                                  \
        swr::jaggedForward<swr::STORAGE, V>(a, u, y, batch, length, heads, chunkBlocks, neighbour,     \
                                            SWR_THREAD_INDEX);                                         \
    }

#define SWR_BACKWARD(NAME, STORAGE, V)                                                             \
    extern "C" __global__ void NAME(const swr::STORAGE::Element* a, const swr::STORAGE::Element* u,    \
                                    const swr::STORAGE::Element* dy, swr::STORAGE::Element* du,        \
                                    swr::STORAGE::Element* da, int batch, int length, int heads,       \
                                    int chunkBlocks, int neighbour) {                                  \
        swr::jaggedBackward<swr::STORAGE, V>(a, u, dy, du, da, batch, length, heads, chunkBlocks,      \
                                             neighbour, SWR_THREAD_INDEX);                             \
    }

SWR_FORWARD(swr_jagged_forward_f32_v4, Float32, 4)
SWR_FORWARD(swr_jagged_forward_bf16_v4, BFloat16, 4)
SWR_BACKWARD(swr_jagged_backward_f32_v4, Float32, 4)
SWR_BACKWARD(swr_jagged_backward_f32_v2, Float32, 2)
SWR_BACKWARD(swr_jagged_backward_bf16_v4, BFloat16, 4)
SWR_BACKWARD(swr_jagged_backward_bf16_v2, BFloat16, 2)
