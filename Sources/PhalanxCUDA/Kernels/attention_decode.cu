// Attention while decoding: the queries of a chunk (one token per sequence in a decode step, or a
// prefill chunk) against a paged key/value cache plus the chunk's own keys, causal, in a sliding
// window or not; the rotary embedding at each sequence's own positions; appending the chunk's keys
// and values to the cache. Compiled by NVRTC with -DATTN_HEAD_DIM=<channels per head> (16, 32, 64
// or 128); needs no header.
//
// Layouts (row-major, channels contiguous; storage float32 or bfloat16, arithmetic float32):
//   queries, outputs  [batch, n, H, D]       the chunk's n rows per sequence
//   keys, values      [batch, n, KVH, D]     the chunk's own (rotated keys), read for positions >= start
//   starts            [batch] int32          each sequence's position of the chunk's first row
//   cache pages       [batch, KVH, slots, D] one page holds `slots` positions of every sequence;
//                                            `pageTable` holds each page's address, keys then values
//                                            ([2, pages] 64-bit). Position p lives in page p / slots,
//                                            slot p % slots; a ring (sliding window) is one page
//                                            whose slot is p % slots.
// Head h reads kv head h / (H / KVH). Row i of sequence b sits at position starts[b] + i and sees
// positions j with max(0, p - window + 1) <= j <= p (window 0: all from 0).
//
// Work split (flash-decoding): the visible positions of a (row, head) are cut into splits of
// kSplit positions; one warp per (row, head, split) keeps a running maximum, sum and weighted
// value sum (online softmax), lane j scoring position j of each tile of 32. With one split the
// warp writes the output; otherwise it writes its partial (max, sum, D sums) and
// decode_combine_* adds the splits of each (row, head) in split order (deterministic: no atomics).

#ifndef ATTN_HEAD_DIM
#error "compile with -DATTN_HEAD_DIM=<channels per head>"
#endif
constexpr int HD = ATTN_HEAD_DIM;
// The value rows are read by power-of-two groups of lanes, 16 bytes each (see attend).
static_assert(HD == 16 || HD == 32 || HD == 64 || HD == 128, "the decode kernels take head dims 16, 32, 64, 128");
constexpr int kSplit = 256;                 // positions per warp
constexpr int kPerLane = (HD + 31) / 32;    // channels per lane of the combine: lane + 32 t

#define kNegInf (-__int_as_float(0x7f800000))
typedef unsigned short bf16;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const bf16* p) { return __uint_as_float(((unsigned)*p) << 16); }
__device__ __forceinline__ void storeValue(float* p, float x) { *p = x; }
__device__ __forceinline__ void storeValue(bf16* p, float x) {
    unsigned bits;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(0.0f), "f"(x));
    *p = (bf16)(bits & 0xffffu);
}

// q . k over HD channels: k read 16 bytes at a time, q from shared memory (float32).
__device__ __forceinline__ float dot(const float* q, const float* k) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < HD; c += 4) {
        const float4 v = *reinterpret_cast<const float4*>(k + c);
        s = fmaf(q[c], v.x, s); s = fmaf(q[c + 1], v.y, s); s = fmaf(q[c + 2], v.z, s); s = fmaf(q[c + 3], v.w, s);
    }
    return s;
}
__device__ __forceinline__ float dot(const float* q, const bf16* k) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < HD; c += 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(k + c);
        const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            s = fmaf(q[c + 2 * t], __uint_as_float(w[t] << 16), s);
            s = fmaf(q[c + 2 * t + 1], __uint_as_float(w[t] & 0xffff0000u), s);
        }
    }
    return s;
}

// 16 bytes of a row as float32: 4 float32 or 8 bfloat16 numbers.
__device__ __forceinline__ void load16(const float* p, float (&x)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
__device__ __forceinline__ void load16(const bf16* p, float (&x)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) { x[2 * t] = __uint_as_float(w[t] << 16); x[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u); }
}

// Where position p of sequence b, kv head g lives: the cache below `start`, the chunk from it.
template <typename T>
struct KeyValueSource {
    const unsigned long long* pageTable;
    int pages, slots, ring, batch, kvHeads, n;
    const T* chunkKeys;
    const T* chunkValues;

    __device__ __forceinline__ long long cacheOffset(int b, int g, int p) const {
        return (((long long)b * kvHeads + g) * slots + p % slots) * HD;
    }
    __device__ __forceinline__ const T* key(int b, int g, int p, int start) const {
        if (p >= start) return chunkKeys + (((long long)b * n + (p - start)) * kvHeads + g) * HD;
        return reinterpret_cast<const T*>(pageTable[ring ? 0 : p / slots]) + cacheOffset(b, g, p);
    }
    __device__ __forceinline__ const T* value(int b, int g, int p, int start) const {
        if (p >= start) return chunkValues + (((long long)b * n + (p - start)) * kvHeads + g) * HD;
        return reinterpret_cast<const T*>(pageTable[pages + (ring ? 0 : p / slots)]) + cacheOffset(b, g, p);
    }
};

// One warp per (row, head, split); blockDim.x = 128 (4 warps, consecutive splits), grid
// (batch * n, H, ceil(splits / 4)). Per tile of 32 positions: lane j scores position j (its key
// row read 16 bytes at a time), then the weighted values are summed with the warp cut into
// groups of kLanesPerRow lanes, each group reading one value row 16 bytes per lane, so that a
// load instruction covers 32 / kLanesPerRow rows; the groups' sums are added by shuffles at the
// end (a fixed order). partial: [batch * n, H, splits] maxima and sums, and
// [batch * n, H, splits, HD] weighted value sums (float32).
template <typename T>
__device__ __forceinline__ void attend(const T* __restrict__ queries, T* __restrict__ outputs, const int* __restrict__ starts,
                                       KeyValueSource<T> source, float* __restrict__ partialMax, float* __restrict__ partialSum,
                                       float* __restrict__ partialValues, int heads, int window, int splits, float scale) {
    __shared__ float sharedQuery[4][HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.z * 4 + warp, h = blockIdx.y, row = blockIdx.x;
    const int b = row / source.n, i = row % source.n;
    const int start = starts[b], position = start + i;
    const int first = window > 0 ? max(0, position - window + 1) : 0;
    const int g = h / (heads / source.kvHeads);
    const T* q = queries + ((long long)row * heads + h) * HD;
    for (int c = lane; c < HD; c += 32) sharedQuery[warp][c] = load(q + c) * scale;
    __syncwarp();
    if (split >= splits) return;
    const int lo = first + split * kSplit, hi = min(position + 1, lo + kSplit);  // [lo, hi)
    constexpr int kVector = 16 / (int)sizeof(T);       // numbers per 16 bytes
    constexpr int kLanesPerRow = HD / kVector;         // lanes reading one value row
    constexpr int kRowsPerLoad = 32 / kLanesPerRow;    // value rows per load instruction
    const int rowInLoad = lane / kLanesPerRow, channel0 = (lane % kLanesPerRow) * kVector;
    float m = kNegInf, l = 0.0f, acc[kVector];
#pragma unroll
    for (int k = 0; k < kVector; ++k) acc[k] = 0.0f;
    for (int tile = lo; tile < hi; tile += 32) {
        const int p = tile + lane;
        const bool valid = p < hi;
        const float s = valid ? dot(sharedQuery[warp], source.key(b, g, p, start)) : kNegInf;
        float tileMax = s;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, o));
        const float newMax = fmaxf(m, tileMax);
        const float correction = expf(m - newMax);  // 0 on the first tile (m = -inf)
        const float e = valid ? expf(s - newMax) : 0.0f;
        float tileSum = e;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) tileSum += __shfl_xor_sync(0xffffffffu, tileSum, o);
        l = fmaf(l, correction, tileSum);
#pragma unroll
        for (int k = 0; k < kVector; ++k) acc[k] *= correction;
#pragma unroll
        for (int j0 = 0; j0 < 32; j0 += kRowsPerLoad) {
            const int j = j0 + rowInLoad;
            const float weight = __shfl_sync(0xffffffffu, e, j);
            if (tile + j < hi) {
                float v[kVector];
                load16(source.value(b, g, tile + j, start) + channel0, v);
#pragma unroll
                for (int k = 0; k < kVector; ++k) acc[k] = fmaf(weight, v[k], acc[k]);
            }
        }
        m = newMax;
    }
#pragma unroll
    for (int o = kLanesPerRow; o < 32; o <<= 1) {
#pragma unroll
        for (int k = 0; k < kVector; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], o);
    }
    const long long slot = ((long long)row * heads + h) * splits + split;
    if (splits > 1 && lane == 0) {
        partialMax[slot] = m;
        partialSum[slot] = l;
    }
    if (lane >= kLanesPerRow) return;
    if (splits == 1) {
        const float inverse = 1.0f / l;
        T* out = outputs + ((long long)row * heads + h) * HD + channel0;
#pragma unroll
        for (int k = 0; k < kVector; ++k) storeValue(out + k, acc[k] * inverse);
        return;
    }
#pragma unroll
    for (int k = 0; k < kVector; ++k) partialValues[slot * HD + channel0 + k] = acc[k];
}

// out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s, splits in order. One
// warp per (row, head), grid (ceil(rows * H / 4)), blockDim 128. A split with no visible
// position (m = -inf) adds nothing.
template <typename T>
__device__ __forceinline__ void combine(const float* __restrict__ partialMax, const float* __restrict__ partialSum,
                                        const float* __restrict__ partialValues, T* __restrict__ outputs, long long rowHeads,
                                        int splits) {
    const long long pair = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (pair >= rowHeads) return;
    float maximum = kNegInf;
    for (int s = 0; s < splits; ++s) maximum = fmaxf(maximum, partialMax[pair * splits + s]);
    float total = 0.0f, acc[kPerLane];
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) acc[t] = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float m = partialMax[pair * splits + s];
        if (m == kNegInf) continue;
        const float factor = expf(m - maximum);
        total = fmaf(partialSum[pair * splits + s], factor, total);
#pragma unroll
        for (int t = 0; t < kPerLane; ++t) {
            const int c = lane + 32 * t;
            if (c < HD) acc[t] = fmaf(partialValues[(pair * splits + s) * HD + c], factor, acc[t]);
        }
    }
    const float inverse = 1.0f / total;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
        const int c = lane + 32 * t;
        if (c < HD) storeValue(outputs + pair * HD + c, acc[t] * inverse);
    }
}

// Rotates the chunk's queries [batch, n, H, D] and keys [batch, n, KVH, D] in place, row i of
// sequence b at position starts[b] + i, by the rotate-half rule of RotaryEmbedding:
//   y[c] = x[c] cos - x[c + D/2] sin,   y[c + D/2] = x[c + D/2] cos + x[c] sin
// with cos, sin [positions, D/2] float32. One thread per (row, head of q or k, pair c < D/2).
template <typename T>
__device__ __forceinline__ void rotate(T* __restrict__ queries, T* __restrict__ keys, const int* __restrict__ starts,
                                       const float* __restrict__ cosines, const float* __restrict__ sines, int n, int heads,
                                       int kvHeads, long long rows) {
    constexpr int half = HD / 2;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int headsBoth = heads + kvHeads;
    if (tid >= rows * headsBoth * half) return;
    const int c = (int)(tid % half);
    const int head = (int)((tid / half) % headsBoth);
    const long long row = tid / ((long long)half * headsBoth);
    const int position = starts[row / n] + (int)(row % n);
    T* x = head < heads ? queries + (row * heads + head) * HD : keys + (row * kvHeads + (head - heads)) * HD;
    const float cs = cosines[(long long)position * half + c], sn = sines[(long long)position * half + c];
    const float a = load(x + c), b = load(x + c + half);
    storeValue(x + c, a * cs - b * sn);
    storeValue(x + c + half, b * cs + a * sn);
}

// Writes the chunk's keys and values [batch, n, KVH, D] into the cache at positions starts[b] + i.
// In a ring only the last `slots` positions of each sequence are written (an earlier one would
// share a slot with a later one). One thread per (row, kv head, 16 bytes of the head's row).
template <typename T>
__device__ __forceinline__ void append(const T* __restrict__ keys, const T* __restrict__ values, const int* __restrict__ starts,
                                       KeyValueSource<T> source, long long rows) {
    constexpr int kVector = 16 / (int)sizeof(T), kChunks = HD / kVector;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= rows * source.kvHeads * kChunks) return;
    const int c = (int)(tid % kChunks) * kVector;
    const int g = (int)((tid / kChunks) % source.kvHeads);
    const long long row = tid / ((long long)kChunks * source.kvHeads);
    const int b = (int)(row / source.n), i = (int)(row % source.n);
    if (source.ring && i < source.n - source.slots) return;
    const int p = starts[b] + i;
    const long long from = (row * source.kvHeads + g) * HD + c, to = source.cacheOffset(b, g, p) + c;
    const int page = source.ring ? 0 : p / source.slots;
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(source.pageTable[page]) + to) = *reinterpret_cast<const uint4*>(keys + from);
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(source.pageTable[source.pages + page]) + to) =
        *reinterpret_cast<const uint4*>(values + from);
}

// ---- entry points -------------------------------------------------------------------------------

#define DECODE_SOURCE(T)                                                                           \
    KeyValueSource<T> source{pageTable, pages, slots, ring, batch, kvHeads, n, chunkKeys, chunkValues}

#define DECODE_KERNELS(TYPE, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) decode_attend_##TYPE(                       \
        const T* queries, T* outputs, const int* starts, const unsigned long long* pageTable,      \
        int pages, int slots, int ring, int batch, int kvHeads, int n, const T* chunkKeys,         \
        const T* chunkValues, float* partialMax, float* partialSum, float* partialValues,          \
        int heads, int window, int splits, float scale) {                                          \
        DECODE_SOURCE(T);                                                                          \
        attend<T>(queries, outputs, starts, source, partialMax, partialSum, partialValues, heads,  \
                  window, splits, scale);                                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) decode_combine_##TYPE(                      \
        const float* partialMax, const float* partialSum, const float* partialValues, T* outputs,  \
        long long rowHeads, int splits) {                                                          \
        combine<T>(partialMax, partialSum, partialValues, outputs, rowHeads, splits);              \
    }                                                                                              \
    extern "C" __global__ void decode_rotate_##TYPE(T* queries, T* keys, const int* starts,        \
                                                    const float* cosines, const float* sines,      \
                                                    int n, int heads, int kvHeads, long long rows) { \
        rotate<T>(queries, keys, starts, cosines, sines, n, heads, kvHeads, rows);                 \
    }                                                                                              \
    extern "C" __global__ void decode_append_##TYPE(                                               \
        const T* keys, const T* values, const int* starts, const unsigned long long* pageTable,    \
        int pages, int slots, int ring, int batch, int kvHeads, int n, long long rows) {           \
        const T* chunkKeys = nullptr;                                                              \
        const T* chunkValues = nullptr;                                                            \
        DECODE_SOURCE(T);                                                                          \
        append<T>(keys, values, starts, source, rows);                                             \
    }

DECODE_KERNELS(f32, float)
DECODE_KERNELS(bf16, bf16)
