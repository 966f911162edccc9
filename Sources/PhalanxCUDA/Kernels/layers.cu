// The language model's element-wise and row-wise layers on the GPU: RMSNorm, RoPE, the SwiGLU
// activation, embedding gather and its gradient, residual dropout, fused cross-entropy, the
// gradient norm and clip scale, fused AdamW, and small helpers (add, convert, fill, scale).
// Compiled at run time by NVRTC with no include path (see KernelCache.swift); needs no header.
// Driven by CUDALayerKernels.swift, which states each kernel's formula and layout.
//
// Storage: every activation buffer is float32 or bfloat16 (raw bits, round to nearest even on
// store); arithmetic and accumulation are float32 (double where a sum spans a whole tensor);
// weights, master copies, moments and every parameter gradient are float32. Kernel names end in
// the activation storage (`_f32`, `_bf16`) and, for the row kernels, in how rows are read:
// `_vec` (16-byte loads; rows must start 16-byte aligned) or `_scalar` (any size or offset).
//
// Determinism: no atomics anywhere. Every reduction has a fixed order that depends only on the
// shapes (never on timing or on the device's multiprocessor count): in-thread sums in index
// order, warp sums by xor butterflies (every lane ends with the same bits, as float addition is
// commutative), warps of a group in index order through shared memory, thread blocks in index
// order by a second kernel. Two runs give the same bits.
//
// Exactness against the CPU layers: where the CPU evaluates a formula with separate roundings,
// the kernels use the `__f*_rn` intrinsics, which NVRTC never contracts into fused multiply-adds,
// so RoPE, SwiGLU, dropout, the embedding gradient and AdamW round exactly as the CPU does (up to
// `expf` against the CPU's polynomial exponential in SwiGLU and cross-entropy).

namespace layers {

typedef unsigned long long u64;

__device__ __forceinline__ float negativeInfinity() { return __int_as_float(0xff800000); }
__device__ __forceinline__ bool finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

// ---- storage ----------------------------------------------------------------------------------

struct F32 {
    typedef float E;
    static constexpr int kBytes = 4;
    __device__ __forceinline__ static float get(const float* p) { return *p; }
    __device__ __forceinline__ static void put(float* p, float x) { *p = x; }
};

struct BF16 {
    typedef unsigned short E;
    static constexpr int kBytes = 2;
    __device__ __forceinline__ static float decode(unsigned bits) { return __uint_as_float(bits << 16); }
    // Round to nearest even, as the host's BFloat16.bits(_:) does; NaN becomes 0x7FC0.
    __device__ __forceinline__ static unsigned encode(float x) {
        unsigned u = __float_as_uint(x);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
        return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    }
    __device__ __forceinline__ static float get(const unsigned short* p) { return decode(*p); }
    __device__ __forceinline__ static void put(unsigned short* p, float x) { *p = (unsigned short)encode(x); }
};

// K consecutive numbers at p (aligned to K numbers) to float32 and back, in one load or store of
// K * kBytes bytes (two when that is 32).
template <class S, int K>
__device__ __forceinline__ void load(const typename S::E* p, float (&x)[K]) {
    constexpr int bytes = K * S::kBytes;
    unsigned w[(bytes + 3) / 4];
    if constexpr (bytes == 32) {
        uint4 a = reinterpret_cast<const uint4*>(p)[0], b = reinterpret_cast<const uint4*>(p)[1];
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if constexpr (bytes == 16) {
        uint4 a = *reinterpret_cast<const uint4*>(p);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    } else if constexpr (bytes == 8) {
        uint2 a = *reinterpret_cast<const uint2*>(p);
        w[0] = a.x; w[1] = a.y;
    } else if constexpr (bytes == 4) {
        w[0] = *reinterpret_cast<const unsigned*>(p);
    } else {
        w[0] = *reinterpret_cast<const unsigned short*>(p);
    }
    if constexpr (S::kBytes == 4) {
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = __uint_as_float(w[k]);
    } else {
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = __uint_as_float(k % 2 == 0 ? w[k / 2] << 16 : w[k / 2] & 0xffff0000u);
    }
}

template <class S, int K>
__device__ __forceinline__ void store(typename S::E* p, const float (&x)[K]) {
    constexpr int bytes = K * S::kBytes;
    unsigned w[(bytes + 3) / 4];
    if constexpr (S::kBytes == 4) {
#pragma unroll
        for (int k = 0; k < K; ++k) w[k] = __float_as_uint(x[k]);
    } else {
#pragma unroll
        for (int k = 0; k < K; k += 2) w[k / 2] = BF16::encode(x[k]) | (k + 1 < K ? BF16::encode(x[k + 1]) << 16 : 0u);
    }
    if constexpr (bytes == 32) {
        reinterpret_cast<uint4*>(p)[0] = make_uint4(w[0], w[1], w[2], w[3]);
        reinterpret_cast<uint4*>(p)[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else if constexpr (bytes == 16) {
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if constexpr (bytes == 8) {
        *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else if constexpr (bytes == 4) {
        *reinterpret_cast<unsigned*>(p) = w[0];
    } else {
        *reinterpret_cast<unsigned short*>(p) = (unsigned short)w[0];
    }
}

// ---- reductions -------------------------------------------------------------------------------

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warpSum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sums of (a, b) over the T threads of this thread's group (T a multiple of 32, groups of
// T consecutive threads); every thread of the group gets the same bits. Called by every thread
// of the block the same number of times (it synchronises the block when T > 32).
__device__ __forceinline__ void groupSum2(float& a, float& b, int T, float2* scratch) {
    a = warpSum(a);
    b = warpSum(b);
    if (T == 32) return;
    const int warp = threadIdx.x / 32, first = (threadIdx.x / T) * (T / 32);
    __syncthreads();  // earlier readers of scratch are done
    if (threadIdx.x % 32 == 0) scratch[warp] = make_float2(a, b);
    __syncthreads();
    a = 0.0f;
    b = 0.0f;
    for (int k = 0; k < T / 32; ++k) {
        a += scratch[first + k].x;
        b += scratch[first + k].y;
    }
}

// Online softmax statistics: (maximum, sum of exp(z - maximum)).
struct Softmax {
    float m, s;
    __device__ __forceinline__ void add(float z) {
        if (z > m) {
            s = (m == negativeInfinity() ? 0.0f : s * expf(m - z)) + 1.0f;
            m = z;
        } else if (z != negativeInfinity()) {  // exp(-inf) adds 0 (and -inf - -inf would be NaN); NaN propagates
            s += expf(z - m);
        }
    }
    // Symmetric in the two operands, so every lane of a butterfly ends with the same bits.
    __device__ __forceinline__ static Softmax combine(Softmax p, Softmax q) {
        const float m = fmaxf(p.m, q.m);
        if (m == negativeInfinity()) return {m, p.s + q.s};
        return {m, p.s * expf(p.m - m) + q.s * expf(q.m - m)};
    }
};

__device__ __forceinline__ Softmax warpCombine(Softmax v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Softmax other = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = Softmax::combine(v, other);
    }
    return v;
}

// ---- RMSNorm ----------------------------------------------------------------------------------
//
// A group of T threads per row (T a multiple of 32; thread blocks of max(T, 256) threads hold
// 256/T groups), rows taken in tiles of one row per group. Thread t of a group owns the units
// t, t + T, ... (a unit is N numbers: 16 bytes on the _vec path, one number on the _scalar path);
// the host picks T so that a thread owns at most 32 numbers, which forward keeps in registers
// between its two passes (one read of x, one write of y).

template <class S, int N>
__device__ __forceinline__ void rmsnormForward(const typename S::E* __restrict__ x, const float* __restrict__ w,
                                               typename S::E* __restrict__ y, int rows, int dim, float eps, int T) {
    constexpr int C = 32 / N;  // units per thread at most
    __shared__ float2 scratch[32];
    const int groups = blockDim.x / T, g = threadIdx.x / T, t = threadIdx.x % T;
    const int units = dim / N;
    for (long long base = (long long)blockIdx.x * groups; base < rows; base += (long long)gridDim.x * groups) {
        const long long row = base + g;
        const bool active = row < rows;
        float cache[C][N];
        float sum = 0.0f, unused = 0.0f;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int u = t + T * i;
            if (active && u < units) {
                load<S, N>(x + row * dim + (long long)u * N, cache[i]);
#pragma unroll
                for (int k = 0; k < N; ++k) sum += cache[i][k] * cache[i][k];
            }
        }
        groupSum2(sum, unused, T, scratch);
        const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int u = t + T * i;
            if (active && u < units) {
                float wv[N], out[N];
                load<F32, N>(w + (long long)u * N, wv);
#pragma unroll
                for (int k = 0; k < N; ++k) out[k] = __fmul_rn(__fmul_rn(cache[i][k], scale), wv[k]);
                store<S, N>(y + row * dim + (long long)u * N, out);
            }
        }
    }
}

// dx for every row, and each thread block's partial weight gradient (the sum over its rows of
// dy * xhat) in partial[blockIdx.x, dim]; rmsnorm_weight_grad then adds the blocks in order.
template <class S, int N>
__device__ __forceinline__ void rmsnormBackward(const typename S::E* __restrict__ x, const float* __restrict__ w,
                                                const typename S::E* __restrict__ dy, typename S::E* __restrict__ dx,
                                                float* __restrict__ partial, int rows, int dim, float eps, int T) {
    constexpr int C = 32 / N;
    __shared__ float2 scratch[32];
    __shared__ __align__(16) float tile[8192];  // groups x dim partial sums when a block holds several groups
    const int groups = blockDim.x / T, g = threadIdx.x / T, t = threadIdx.x % T;
    const int units = dim / N;
    float dw[C][N];
#pragma unroll
    for (int i = 0; i < C; ++i)
#pragma unroll
        for (int k = 0; k < N; ++k) dw[i][k] = 0.0f;
    for (long long base = (long long)blockIdx.x * groups; base < rows; base += (long long)gridDim.x * groups) {
        const long long row = base + g;
        const bool active = row < rows;
        float sum = 0.0f, dot = 0.0f;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int u = t + T * i;
            if (active && u < units) {
                float xv[N], gv[N], wv[N];
                load<S, N>(x + row * dim + (long long)u * N, xv);
                load<S, N>(dy + row * dim + (long long)u * N, gv);
                load<F32, N>(w + (long long)u * N, wv);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    sum += xv[k] * xv[k];
                    dot += gv[k] * wv[k] * xv[k];
                }
            }
        }
        groupSum2(sum, dot, T, scratch);
        const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        const float meanGX = dot * scale / (float)dim;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int u = t + T * i;
            if (active && u < units) {
                float xv[N], gv[N], wv[N], out[N];
                load<S, N>(x + row * dim + (long long)u * N, xv);
                load<S, N>(dy + row * dim + (long long)u * N, gv);
                load<F32, N>(w + (long long)u * N, wv);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    const float xhat = xv[k] * scale;
                    out[k] = scale * (gv[k] * wv[k] - xhat * meanGX);
                    dw[i][k] += gv[k] * xhat;
                }
                store<S, N>(dx + row * dim + (long long)u * N, out);
            }
        }
    }
    // The block's partial: its groups added in group order.
    float* out = partial + (long long)blockIdx.x * dim;
    if (groups == 1) {
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int u = t + T * i;
            if (u < units) store<F32, N>(out + (long long)u * N, dw[i]);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < C; ++i) {
        const int u = t + T * i;
        if (u < units) store<F32, N>(tile + g * dim + u * N, dw[i]);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < groups; ++q) s += tile[q * dim + c];
        out[c] = s;
    }
}

// dw[c] += sum over b < blocks of partial[b, c], in order of b; one thread per column.
extern "C" __global__ void rmsnorm_weight_grad(const float* __restrict__ partial, float* __restrict__ dw,
                                               int blocks, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += partial[(long long)b * dim + c];
    dw[c] += s;
}

// ---- RoPE -------------------------------------------------------------------------------------
//
// One thread per K pairs (i, i + half) of one (row, head): K = 4 numbers in one load per half
// (float32) or 8 (bfloat16), or 1 on the _scalar path. cos and sin are the host's table
// [positions, half] (computed in double precision, as the CPU's); position = start + row % length.

template <class S, int K>
__device__ __forceinline__ void rope(typename S::E* __restrict__ x, const float* __restrict__ cosines,
                                     const float* __restrict__ sines, long long rows, int length, int heads,
                                     int headDim, int start, int inverse) {
    const int half = headDim / 2, perHead = half / K;
    const long long threads = rows * heads * perHead;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < threads; i += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(i % perHead) * K;
        const long long rowHead = i / perHead;
        const long long row = rowHead / heads;
        const long long position = start + row % length;
        typename S::E* first = x + rowHead * headDim + j;
        float a[K], b[K], c[K], s[K];
        load<S, K>(first, a);
        load<S, K>(first + half, b);
        load<F32, K>(cosines + position * half + j, c);
        load<F32, K>(sines + position * half + j, s);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const float sk = inverse ? -s[k] : s[k];
            const float ak = a[k], bk = b[k];
            a[k] = __fsub_rn(__fmul_rn(ak, c[k]), __fmul_rn(bk, sk));
            b[k] = __fadd_rn(__fmul_rn(bk, c[k]), __fmul_rn(ak, sk));
        }
        store<S, K>(first, a);
        store<S, K>(first + half, b);
    }
}

// ---- element-wise kernels ---------------------------------------------------------------------
//
// One thread per K consecutive numbers of a row (K = 8 on the _vec path, 1 on _scalar), grid
// striding; `columns` numbers per row, rows `ld*` apart (the host checks alignment for _vec).

__device__ __forceinline__ float sigmoid(float z) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z))); }

// h = silu(g) * u = (g * sigmoid(g)) * u
template <class S, int K>
__device__ __forceinline__ void swigluForward(const typename S::E* __restrict__ gate, const typename S::E* __restrict__ up,
                                              long long ldIn, typename S::E* __restrict__ h, long long ldOut,
                                              long long rows, int columns) {
    const int perRow = columns / K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * perRow; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / perRow;
        const int c = (int)(i % perRow) * K;
        float g[K], u[K], out[K];
        load<S, K>(gate + r * ldIn + c, g);
        load<S, K>(up + r * ldIn + c, u);
#pragma unroll
        for (int k = 0; k < K; ++k) out[k] = __fmul_rn(__fmul_rn(g[k], sigmoid(g[k])), u[k]);
        store<S, K>(h + r * ldOut + c, out);
    }
}

// du = (dh * g) * s,   dg = ((dh * u) * s) * (1 + g * (1 - s)),   s = sigmoid(g)
// dGate may be dh itself (each thread reads its numbers before writing them).
template <class S, int K>
__device__ __forceinline__ void swigluBackward(const typename S::E* gate, const typename S::E* up, long long ldIn,
                                               const typename S::E* dh, long long ldDh,
                                               typename S::E* dGate, typename S::E* dUp, long long ldOut,
                                               long long rows, int columns) {
    const int perRow = columns / K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * perRow; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / perRow;
        const int c = (int)(i % perRow) * K;
        float g[K], u[K], d[K], dg[K], du[K];
        load<S, K>(gate + r * ldIn + c, g);
        load<S, K>(up + r * ldIn + c, u);
        load<S, K>(dh + r * ldDh + c, d);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const float s = sigmoid(g[k]);
            du[k] = __fmul_rn(__fmul_rn(d[k], g[k]), s);
            dg[k] = __fmul_rn(__fmul_rn(__fmul_rn(d[k], u[k]), s),
                              __fadd_rn(1.0f, __fmul_rn(g[k], __fsub_rn(1.0f, s))));
        }
        store<S, K>(dUp + r * ldOut + c, du);
        store<S, K>(dGate + r * ldOut + c, dg);
    }
}

// y[r, :] = W[tokens[r], :] (W float32); a token outside 0..<vocabulary gives a row of NaN.
template <class S, int K>
__device__ __forceinline__ void embeddingForward(const int* __restrict__ tokens, const float* __restrict__ table,
                                                 typename S::E* __restrict__ y, long long rows, int dim, int vocabulary) {
    const int perRow = dim / K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * perRow; i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / perRow;
        const int c = (int)(i % perRow) * K;
        const int token = tokens[r];
        float v[K];
        if (token >= 0 && token < vocabulary) {
            load<F32, K>(table + (long long)token * dim + c, v);
        } else {
#pragma unroll
            for (int k = 0; k < K; ++k) v[k] = __int_as_float(0x7fc00000);
        }
        store<S, K>(y + r * dim + c, v);
    }
}

// For each used token (blockIdx.x over `used`), dW[token, :] += dy[p, :] for its positions p in
// ascending order, added one at a time onto dW as the CPU does; blockIdx.y over column tiles.
template <class S, int K>
__device__ __forceinline__ void embeddingBackward(const int* __restrict__ tokens, const int* __restrict__ offsets,
                                                  const int* __restrict__ positions, const typename S::E* __restrict__ dy,
                                                  float* __restrict__ dw, int dim) {
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * K;
    if (c >= dim) return;
    const long long token = tokens[blockIdx.x];
    float acc[K];
    load<F32, K>(dw + token * dim + c, acc);
    const int end = offsets[blockIdx.x + 1];
    int q = offsets[blockIdx.x];
    // Four rows in flight at a time, added in order.
    for (; q + 4 <= end; q += 4) {
        float g[4][K];
#pragma unroll
        for (int u = 0; u < 4; ++u) load<S, K>(dy + (long long)positions[q + u] * dim + c, g[u]);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int k = 0; k < K; ++k) acc[k] = __fadd_rn(acc[k], g[u][k]);
    }
    for (; q < end; ++q) {
        float g[K];
        load<S, K>(dy + (long long)positions[q] * dim + c, g);
#pragma unroll
        for (int k = 0; k < K; ++k) acc[k] = __fadd_rn(acc[k], g[k]);
    }
    store<F32, K>(dw + token * dim + c, acc);
}

// SplitMix64's finaliser (Dropout.swift).
__device__ __forceinline__ u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// x[i] = keep(index + i) ? x[i] * keepScale : 0, keep(e) = mix(stream + e * 0xD1B54A32D192ED03) >> 40 >= threshold
template <class S, int K>
__device__ __forceinline__ void dropout(typename S::E* __restrict__ x, long long count, u64 stream, u64 threshold,
                                        float keepScale, u64 index) {
    const long long units = count / K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < units; i += (long long)gridDim.x * blockDim.x) {
        float v[K];
        load<S, K>(x + i * K, v);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const u64 e = index + (u64)(i * K + k);
            const bool keep = (mix(stream + e * 0xD1B54A32D192ED03ull) >> 40) >= threshold;
            v[k] = keep ? __fmul_rn(v[k], keepScale) : 0.0f;
        }
        store<S, K>(x + i * K, v);
    }
}

// y = y + x (y in storage Y, x in X), y = x converted, x = value, x = x * a.
template <class Y, class X, int K>
__device__ __forceinline__ void add(typename Y::E* __restrict__ y, const typename X::E* __restrict__ x, long long count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count / K; i += (long long)gridDim.x * blockDim.x) {
        float a[K], b[K];
        load<Y, K>(y + i * K, a);
        load<X, K>(x + i * K, b);
#pragma unroll
        for (int k = 0; k < K; ++k) a[k] = __fadd_rn(a[k], b[k]);
        store<Y, K>(y + i * K, a);
    }
}

template <class Y, class X, int K>
__device__ __forceinline__ void convert(typename Y::E* __restrict__ y, const typename X::E* __restrict__ x, long long count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count / K; i += (long long)gridDim.x * blockDim.x) {
        float a[K];
        load<X, K>(x + i * K, a);
        store<Y, K>(y + i * K, a);
    }
}

template <class S, int K>
__device__ __forceinline__ void fill(typename S::E* __restrict__ x, long long count, float value) {
    float a[K];
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = value;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count / K; i += (long long)gridDim.x * blockDim.x)
        store<S, K>(x + i * K, a);
}

template <class S, int K>
__device__ __forceinline__ void scale(typename S::E* __restrict__ x, long long count, float factor) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count / K; i += (long long)gridDim.x * blockDim.x) {
        float a[K];
        load<S, K>(x + i * K, a);
#pragma unroll
        for (int k = 0; k < K; ++k) a[k] = __fmul_rn(a[k], factor);
        store<S, K>(x + i * K, a);
    }
}

// ---- cross-entropy ----------------------------------------------------------------------------
//
// A group of T threads per row, as RMSNorm (thread blocks of max(T, 256)); any V: each row is
// read as a scalar head up to 16-byte alignment, 16-byte units, and a scalar tail. Pass 1: online
// softmax statistics (max, sum of exp) per thread, combined over the group in a fixed order;
// pass 2 (re-reading the row, from cache) writes the gradient in place:
//
//     loss[r] = log(total) + max - z[t],   z[j] = exp(z[j] - max) * (scale / total) - (j == t ? scale : 0)
//
// A target outside 0..<V gives a NaN loss and no one-hot term.

template <class S, class F>
__device__ __forceinline__ void forRow(typename S::E* row, int n, int t, int T, F f) {
    constexpr int N = 16 / S::kBytes;
    const int misaligned = (int)((reinterpret_cast<unsigned long long>(row) & 15ull) / S::kBytes);
    const int head = min(n, misaligned == 0 ? 0 : N - misaligned);
    const int units = (n - head) / N;
    if (t < head) {
        float v[1] = {S::get(row + t)};
        if (f(t, v)) S::put(row + t, v[0]);
    }
    for (int u = t; u < units; u += T) {
        const int j = head + u * N;
        float v[N];
        load<S, N>(row + j, v);
        if (f(j, v)) store<S, N>(row + j, v);
    }
    const int tail = head + units * N + t;
    if (tail < n) {
        float v[1] = {S::get(row + tail)};
        if (f(tail, v)) S::put(row + tail, v[0]);
    }
}

// Pass 1: adds each number to the softmax statistics; changes nothing.
struct Gather {
    Softmax* stats;
    template <int K>
    __device__ __forceinline__ bool operator()(int, float (&v)[K]) const {
#pragma unroll
        for (int k = 0; k < K; ++k) stats->add(v[k]);
        return false;
    }
};

// Pass 2: each number to its gradient.
struct Gradient {
    float maximum, inverse, scale;
    int target;
    template <int K>
    __device__ __forceinline__ bool operator()(int j, float (&v)[K]) const {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const float p = __fmul_rn(expf(v[k] - maximum), inverse);
            v[k] = j + k == target ? __fsub_rn(p, scale) : p;
        }
        return true;
    }
};

template <class S>
__device__ __forceinline__ void crossEntropy(typename S::E* __restrict__ logits, const int* __restrict__ targets,
                                             float* __restrict__ losses, int rows, int V, float scale, int T) {
    __shared__ float2 scratch[32];
    const int groups = blockDim.x / T, g = threadIdx.x / T, t = threadIdx.x % T;
    for (long long base = (long long)blockIdx.x * groups; base < rows; base += (long long)gridDim.x * groups) {
        const long long r = base + g;
        const bool active = r < rows;
        typename S::E* row = logits + (active ? r : 0) * V;
        // The target's logit is read before any thread of the group writes the row.
        const int target = active ? targets[r] : -1;
        const bool valid = target >= 0 && target < V;
        const float targetLogit = valid && t == 0 ? S::get(row + target) : 0.0f;
        Softmax stats = {negativeInfinity(), 0.0f};
        if (active) {
            forRow<S>(row, V, t, T, Gather{&stats});
        }
        stats = warpCombine(stats);
        if (T > 32) {
            const int warp = threadIdx.x / 32, first = (threadIdx.x / T) * (T / 32);
            __syncthreads();
            if (threadIdx.x % 32 == 0) scratch[warp] = make_float2(stats.m, stats.s);
            __syncthreads();
            stats = {scratch[first].x, scratch[first].y};
            for (int k = 1; k < T / 32; ++k) stats = Softmax::combine(stats, {scratch[first + k].x, scratch[first + k].y});
        }
        __syncwarp();
        if (!active) continue;
        if (t == 0) losses[r] = valid ? logf(stats.s) + stats.m - targetLogit : __int_as_float(0x7fc00000);
        forRow<S>(row, V, t, T, Gradient{stats.m, scale / stats.s, scale, target});
    }
}

// ---- sums over whole tensors (double, fixed order) --------------------------------------------

// A block's threads sum their values; thread 0 gets the total (same order every run).
__device__ __forceinline__ double blockSum(double v, double* scratch) {
    v = warpSum(v);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x == 0)
        for (int k = 0; k < (int)blockDim.x / 32; ++k) s += scratch[k];
    return s;
}

// out[0] = float(sum of losses[0..<count] in double / divisor); one block.
extern "C" __global__ void mean_loss(const float* __restrict__ losses, long long count, long long divisor, float* __restrict__ out) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) s += (double)losses[i];
    s = blockSum(s, scratch);
    if (threadIdx.x == 0) out[0] = (float)(s / (double)divisor);
}

// partial[slot + b] = sum of g[i]^2 (double) over chunk b of `chunk` numbers; one block per chunk.
extern "C" __global__ void sum_squares(const float* __restrict__ g, long long count, long long chunk, double* __restrict__ partial) {
    __shared__ double scratch[32];
    const long long begin = blockIdx.x * chunk, end = begin + chunk < count ? begin + chunk : count;
    double s = 0.0;
    if (chunk % 4 == 0 && (reinterpret_cast<unsigned long long>(g) & 15ull) == 0) {
        const long long units = (end - begin) / 4;
        for (long long u = threadIdx.x; u < units; u += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(g + begin)[u];
            s += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
        for (long long i = begin + units * 4 + threadIdx.x; i < end; i += blockDim.x) s += (double)g[i] * g[i];
    } else {
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) s += (double)g[i] * g[i];
    }
    s = blockSum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// The clip state of CUDALayerKernels.clipState: {norm, scale, nonFinite (0 or 1, as a uint32), 0}
// from the partial sums, as clipGradients computes them:
//   norm = float(sqrt(sum)),  scale = maxNorm > 0 && norm > maxNorm && norm finite ? maxNorm / norm : 1
extern "C" __global__ void clip_state(const double* __restrict__ partial, int count, float maxNorm, float* __restrict__ state) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = blockSum(s, scratch);
    if (threadIdx.x == 0) {
        const float norm = (float)sqrt(s);
        const bool isFinite = finite(norm);
        state[0] = norm;
        state[1] = maxNorm > 0.0f && norm > maxNorm && isFinite ? __fdiv_rn(maxNorm, norm) : 1.0f;
        state[2] = __uint_as_float(isFinite ? 0u : 1u);
        state[3] = 0.0f;
    }
}

// ---- AdamW ------------------------------------------------------------------------------------
//
// With g = gradient * clip scale (state[1]); nothing changes when state[2] (non-finite) is set:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g
//   w = w - lr ((m / c1) / (sqrt(v / c2) + eps) + decay w);  copy = bfloat16(w) when copy != null

template <int K>
__device__ __forceinline__ void adamw(float* __restrict__ w, const float* __restrict__ grad, float* __restrict__ m1,
                                      float* __restrict__ m2, unsigned short* __restrict__ copy, long long count,
                                      const float* __restrict__ state, float lr, float beta1, float beta2, float eps,
                                      float decay, float c1, float c2) {
    if (__float_as_uint(state[2]) != 0u) return;
    const float clip = state[1];
    const float a1 = __fsub_rn(1.0f, beta1), a2 = __fsub_rn(1.0f, beta2);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count / K; i += (long long)gridDim.x * blockDim.x) {
        float wv[K], gv[K], mv[K], vv[K];
        load<F32, K>(w + i * K, wv);
        load<F32, K>(grad + i * K, gv);
        load<F32, K>(m1 + i * K, mv);
        load<F32, K>(m2 + i * K, vv);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const float g = __fmul_rn(gv[k], clip);
            const float m = __fadd_rn(__fmul_rn(beta1, mv[k]), __fmul_rn(a1, g));
            const float v = __fadd_rn(__fmul_rn(beta2, vv[k]), __fmul_rn(__fmul_rn(a2, g), g));
            mv[k] = m;
            vv[k] = v;
            const float step = __fadd_rn(__fdiv_rn(__fdiv_rn(m, c1), __fadd_rn(__fsqrt_rn(__fdiv_rn(v, c2)), eps)),
                                         __fmul_rn(decay, wv[k]));
            wv[k] = __fsub_rn(wv[k], __fmul_rn(lr, step));
        }
        store<F32, K>(w + i * K, wv);
        store<F32, K>(m1 + i * K, mv);
        store<F32, K>(m2 + i * K, vv);
        if (copy) store<BF16, K>(copy + i * K, wv);
    }
}

}  // namespace layers

// ---- entry points -----------------------------------------------------------------------------

using namespace layers;

#define LAYERS_ROW_KERNELS(NAME, S, N)                                                                                 \
    extern "C" __global__ void rmsnorm_forward_##NAME(const S::E* x, const float* w, S::E* y, int rows, int dim,      \
                                                      float eps, int T) {                                              \
        rmsnormForward<S, N>(x, w, y, rows, dim, eps, T);                                                             \
    }                                                                                                                  \
    extern "C" __global__ void rmsnorm_backward_##NAME(const S::E* x, const float* w, const S::E* dy, S::E* dx,       \
                                                       float* partial, int rows, int dim, float eps, int T) {          \
        rmsnormBackward<S, N>(x, w, dy, dx, partial, rows, dim, eps, T);                                              \
    }

#define LAYERS_ELEMENT_KERNELS(NAME, S, K)                                                                             \
    extern "C" __global__ void rope_##NAME(S::E* x, const float* cosines, const float* sines, long long rows,         \
                                           int length, int heads, int headDim, int start, int inverse) {              \
        rope<S, (K > 4 && S::kBytes == 4 ? 4 : K)>(x, cosines, sines, rows, length, heads, headDim, start, inverse);  \
    }                                                                                                                  \
    extern "C" __global__ void swiglu_forward_##NAME(const S::E* gate, const S::E* up, long long ldIn, S::E* h,       \
                                                     long long ldOut, long long rows, int columns) {                   \
        swigluForward<S, K>(gate, up, ldIn, h, ldOut, rows, columns);                                                 \
    }                                                                                                                  \
    extern "C" __global__ void swiglu_backward_##NAME(const S::E* gate, const S::E* up, long long ldIn,               \
                                                      const S::E* dh, long long ldDh, S::E* dGate, S::E* dUp,          \
                                                      long long ldOut, long long rows, int columns) {                  \
        swigluBackward<S, K>(gate, up, ldIn, dh, ldDh, dGate, dUp, ldOut, rows, columns);                            \
    }                                                                                                                  \
    extern "C" __global__ void embedding_forward_##NAME(const int* tokens, const float* table, S::E* y,               \
                                                        long long rows, int dim, int vocabulary) {                     \
        embeddingForward<S, K>(tokens, table, y, rows, dim, vocabulary);                                              \
    }                                                                                                                  \
    extern "C" __global__ void embedding_backward_##NAME(const int* tokens, const int* offsets, const int* positions, \
                                                         const S::E* dy, float* dw, int dim) {                         \
        embeddingBackward<S, K>(tokens, offsets, positions, dy, dw, dim);                                             \
    }                                                                                                                  \
    extern "C" __global__ void dropout_##NAME(S::E* x, long long count, u64 stream, u64 threshold, float keepScale,   \
                                              u64 index) {                                                             \
        dropout<S, K>(x, count, stream, threshold, keepScale, index);                                                 \
    }                                                                                                                  \
    extern "C" __global__ void fill_##NAME(S::E* x, long long count, float value) { fill<S, K>(x, count, value); }    \
    extern "C" __global__ void scale_##NAME(S::E* x, long long count, float factor) { scale<S, K>(x, count, factor); }

#define LAYERS_PAIR_KERNELS(NAME, Y, X, K)                                                                             \
    extern "C" __global__ void add_##NAME(Y::E* y, const X::E* x, long long count) { add<Y, X, K>(y, x, count); }     \
    extern "C" __global__ void convert_##NAME(Y::E* y, const X::E* x, long long count) {                              \
        convert<Y, X, K>(y, x, count);                                                                                 \
    }

LAYERS_ROW_KERNELS(f32_vec, F32, 4)
LAYERS_ROW_KERNELS(f32_scalar, F32, 1)
LAYERS_ROW_KERNELS(bf16_vec, BF16, 8)
LAYERS_ROW_KERNELS(bf16_scalar, BF16, 1)
LAYERS_ELEMENT_KERNELS(f32_vec, F32, 8)
LAYERS_ELEMENT_KERNELS(f32_scalar, F32, 1)
LAYERS_ELEMENT_KERNELS(bf16_vec, BF16, 8)
LAYERS_ELEMENT_KERNELS(bf16_scalar, BF16, 1)
LAYERS_PAIR_KERNELS(f32_f32_vec, F32, F32, 8)
LAYERS_PAIR_KERNELS(f32_f32_scalar, F32, F32, 1)
LAYERS_PAIR_KERNELS(f32_bf16_vec, F32, BF16, 8)
LAYERS_PAIR_KERNELS(f32_bf16_scalar, F32, BF16, 1)
LAYERS_PAIR_KERNELS(bf16_f32_vec, BF16, F32, 8)
LAYERS_PAIR_KERNELS(bf16_f32_scalar, BF16, F32, 1)
LAYERS_PAIR_KERNELS(bf16_bf16_vec, BF16, BF16, 8)
LAYERS_PAIR_KERNELS(bf16_bf16_scalar, BF16, BF16, 1)

extern "C" __global__ void cross_entropy_f32(float* logits, const int* targets, float* losses, int rows, int V,
                                             float scale, int T) {
    crossEntropy<F32>(logits, targets, losses, rows, V, scale, T);
}
extern "C" __global__ void cross_entropy_bf16(unsigned short* logits, const int* targets, float* losses, int rows, int V,
                                              float scale, int T) {
    crossEntropy<BF16>(logits, targets, losses, rows, V, scale, T);
}

extern "C" __global__ void adamw_vec(float* w, const float* g, float* m, float* v, unsigned short* copy, long long count,
                                     const float* state, float lr, float beta1, float beta2, float eps, float decay,
                                     float c1, float c2) {
    adamw<4>(w, g, m, v, copy, count, state, lr, beta1, beta2, eps, decay, c1, c2);
}
extern "C" __global__ void adamw_scalar(float* w, const float* g, float* m, float* v, unsigned short* copy,
                                        long long count, const float* state, float lr, float beta1, float beta2,
                                        float eps, float decay, float c1, float c2) {
    adamw<1>(w, g, m, v, copy, count, state, lr, beta1, beta2, eps, decay, c1, c2);
}
