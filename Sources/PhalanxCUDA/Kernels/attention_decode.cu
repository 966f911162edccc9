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
// value sum (online softmax) over tiles of 32 positions whose key and value rows it reads whole
// and coalesced (see attend). With one split the warp writes the output; otherwise it writes its partial (max, sum, D sums) and
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

// 16 bytes of a row as float32: 4 float32 or 8 bfloat16 numbers (the overload is picked by the
// array's length, 16 / sizeof(T)).
__device__ __forceinline__ void unpack(const uint4 v, float (&x)[4]) {
    x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y); x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(const uint4 v, float (&x)[8]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) { x[2 * t] = __uint_as_float(w[t] << 16); x[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u); }
}

// Sums lists of partial dot products over groups of 2 * Width lanes (lane t of a group holding
// list[c], c < 2 * Width, for rows c): at each step a lane keeps the half of its list that its
// bit `Width` selects, adds its partner's copy of that half (lane distance Width), and the list
// and the distance halve. Lane t ends with the whole sum of row t in partial[0].
template <int Width, int N>
__device__ __forceinline__ void transposeReduce(float (&partial)[N], int t) {
    if constexpr (Width > 0) {
        const bool upper = (t & Width) != 0;
#pragma unroll
        for (int x = 0; x < Width; ++x) {
            const float keep = upper ? partial[x + Width] : partial[x], send = upper ? partial[x] : partial[x + Width];
            partial[x] = keep + __shfl_xor_sync(0xffffffffu, send, Width);
        }
        transposeReduce<Width / 2>(partial, t);
    }
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
// (batch * n, H, ceil(splits / 4)). The warp walks its positions in tiles of 32, and reads every
// key and value row of a tile whole and coalesced: a group of kLanesPerRow lanes reads one row,
// 16 bytes per lane, so one load instruction covers kRowsPerLoad consecutive rows and a tile takes
// kLoads instructions for its keys and as many for its values, all issued before any arithmetic
// (each lane's rows' addresses come from the lane that looked them up, by shuffles). Each lane's
// kLoads partial dot products (its 16 bytes of channels) are summed over its group by a transpose
// reduction: halving the list and the lane distance at each of log2(kLanesPerRow) steps leaves
// lane (group, t) with the whole dot product of row t * kRowsPerLoad + group. Online softmax over
// the 32 scores, then each group adds its rows' weighted values; the groups' sums are added by
// shuffles at the end (a fixed order). partial: [batch * n, H, splits] maxima and sums, and
// [batch * n, H, splits, HD] weighted value sums (float32).
template <typename T>
__device__ __forceinline__ void attend(const T* __restrict__ queries, T* __restrict__ outputs, const int* __restrict__ starts,
                                       KeyValueSource<T> source, float* __restrict__ partialMax, float* __restrict__ partialSum,
                                       float* __restrict__ partialValues, int heads, int window, int splits, float scale) {
    constexpr int kVector = 16 / (int)sizeof(T);       // numbers per 16 bytes
    constexpr int kLanesPerRow = HD / kVector;         // lanes reading one row
    constexpr int kRowsPerLoad = 32 / kLanesPerRow;    // rows per load instruction
    constexpr int kLoads = 32 / kRowsPerLoad;          // load instructions per tile of 32 rows
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.z * 4 + warp, h = blockIdx.y, row = blockIdx.x;
    if (split >= splits) return;
    const int b = row / source.n, i = row % source.n;
    const int start = starts[b], position = start + i;
    const int first = window > 0 ? max(0, position - window + 1) : 0;
    const int g = h / (heads / source.kvHeads);
    const int lo = first + split * kSplit, hi = min(position + 1, lo + kSplit);  // [lo, hi)
    const int group = lane / kLanesPerRow, t = lane % kLanesPerRow, channel0 = t * kVector;
    float q[kVector];
    unpack(*reinterpret_cast<const uint4*>(queries + ((long long)row * heads + h) * HD + channel0), q);
#pragma unroll
    for (int k = 0; k < kVector; ++k) q[k] *= scale;
    float m = kNegInf, l = 0.0f, acc[kVector];
#pragma unroll
    for (int k = 0; k < kVector; ++k) acc[k] = 0.0f;
    for (int tile = lo; tile < hi; tile += 32) {
        // Lane j looks up position tile + j (the last visible one past the end: read, weighted 0).
        const int p = min(tile + lane, hi - 1);
        const unsigned long long keyRow = reinterpret_cast<unsigned long long>(source.key(b, g, p, start));
        const unsigned long long valueRow = reinterpret_cast<unsigned long long>(source.value(b, g, p, start));
        uint4 keys[kLoads], values[kLoads];
#pragma unroll
        for (int c = 0; c < kLoads; ++c) {
            const int r = c * kRowsPerLoad + group;
            keys[c] = *(reinterpret_cast<const uint4*>(__shfl_sync(0xffffffffu, keyRow, r)) + t);
        }
#pragma unroll
        for (int c = 0; c < kLoads; ++c) {
            const int r = c * kRowsPerLoad + group;
            values[c] = *(reinterpret_cast<const uint4*>(__shfl_sync(0xffffffffu, valueRow, r)) + t);
        }
        float partial[kLoads];
#pragma unroll
        for (int c = 0; c < kLoads; ++c) {
            float k[kVector];
            unpack(keys[c], k);
            float s = 0.0f;
#pragma unroll
            for (int x = 0; x < kVector; ++x) s = fmaf(q[x], k[x], s);
            partial[c] = s;
        }
        transposeReduce<kLanesPerRow / 2>(partial, t);
        const bool valid = tile + t * kRowsPerLoad + group < hi;
        const float s = valid ? partial[0] : kNegInf;
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
        for (int c = 0; c < kLoads; ++c) {
            // Row c * kRowsPerLoad + group's weight is on lane (group, t = c).
            const float weight = __shfl_sync(0xffffffffu, e, group * kLanesPerRow + c);
            float v[kVector];
            unpack(values[c], v);
#pragma unroll
            for (int k = 0; k < kVector; ++k) acc[k] = fmaf(weight, v[k], acc[k]);
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
