// Processor hints that Swift has no spelling for. Header-only: every function inlines.
#ifndef CPHALANX_INTRINSICS_H
#define CPHALANX_INTRINSICS_H


/// Tells the core that the caller is in a spin-wait loop (x86 `pause`, Arm `yield`), which
/// frees resources for the sibling hyper-thread and saves power while a worker waits.
static inline __attribute__((always_inline)) void phalanx_spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/// Asks for the cache line holding `address` ahead of use (read), into the level-2 cache
/// (`prefetcht1` on x86). Kernels that walk memory backwards need it: hardware prefetchers follow
/// ascending streams far better than descending. Into level 2, not 1: requests into level 1 hold
/// its few miss buffers for the whole trip to memory (one core of the AMD EPYC, `bench operators`:
/// the exact backward, a descending scan, 70.9 ms with requests into level 1, 44.9 into level 2).
static inline __attribute__((always_inline)) void phalanx_prefetch(const void *address) {
    __builtin_prefetch(address, 0, 2);
}

/// The same for a line about to be written.
static inline __attribute__((always_inline)) void phalanx_prefetch_for_write(const void *address) {
    __builtin_prefetch(address, 1, 3);
}

/// 1 when the compile target has 32 registers of 16 floats (AVX-512), 0 otherwise (AVX2's 16
/// registers of 8 floats, NEON's 32 of 4): a compile-time constant for Swift kernels that size
/// their register blocks (a block of 16 `SIMD16` accumulators fits only the first; elsewhere it
/// spills to the stack on every multiply-add).
#if defined(__AVX512F__)
#define PHALANX_WIDE_VECTORS 1
#else
#define PHALANX_WIDE_VECTORS 0
#endif

typedef float phalanx_float16 __attribute__((ext_vector_type(16)));
typedef float phalanx_float8 __attribute__((ext_vector_type(8)));
typedef float phalanx_float4 __attribute__((ext_vector_type(4)));

/// The lane-wise maximum of two 16-float vectors (`maxnum`: a NaN lane takes the other operand).
/// Written in C because Swift's `replacing(with:where:)` spelling of it, fed by a load, compiles to
/// 4-lane masked loads and inserts (measured at 5% of the attention forward) instead of `vmaxps`.
static inline __attribute__((always_inline)) phalanx_float16 phalanx_max16(phalanx_float16 a, phalanx_float16 b) {
    return __builtin_elementwise_max(a, b);
}

/// The sum of 16 lanes as a pairwise tree of vector adds (Swift sees `SIMD16<Float>`). Written in
/// C because Swift's `SIMD16.sum()` is a chain of 15 scalar adds, and a tree spelled with
/// `lowHalf`/`highHalf` makes the compiler split the multiply feeding it into 2-lane pieces.
static inline __attribute__((always_inline)) float phalanx_sum16(phalanx_float16 v) {
    phalanx_float8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                     + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    phalanx_float4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    b = b + __builtin_shufflevector(b, b, 2, 3, 0, 1);
    return b[0] + b[1];
}

/// The lane sums of 16 vectors of 16 floats stored one after another at `values` (any
/// alignment): `result[h] = sum_k values[16 h + k]`, by a tree that halves the vectors at each
/// level (15 vector adds and 30 shuffles, against about 8 instructions per vector summed alone).
static inline __attribute__((always_inline)) phalanx_float16 phalanx_sums16x16(const float *values) {
    phalanx_float16 v[16], s[8], t[4], u[2];
    __builtin_memcpy(v, values, sizeof(v));
    for (int i = 0; i < 8; i++)  // [v_{2i} halves folded | v_{2i+1} halves folded], 8 lanes each
        s[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)  // 4 lanes per vector
        t[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(s[2 * i], s[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)  // 2 lanes per vector
        u[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(t[2 * i], t[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(u[0], u[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(u[0], u[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/// The lane sums of 8 vectors of 16 floats stored one after another at `values`: `result[h] =
/// sum_k values[16 h + k]`, the tree of `phalanx_sums16x16` sized for 16 registers of 8 floats
/// (AVX2): each vector's halves are added first, so the tree holds 8 registers, not 32.
static inline __attribute__((always_inline)) phalanx_float8 phalanx_sums8x16(const float *values) {
    phalanx_float8 f[8], s[4], t[2];
    for (int i = 0; i < 8; i++) {
        phalanx_float8 low, high;
        __builtin_memcpy(&low, values + 16 * i, sizeof(low));
        __builtin_memcpy(&high, values + 16 * i + 8, sizeof(high));
        f[i] = low + high;
    }
    for (int i = 0; i < 4; i++)  // [f_{2i} halves folded | f_{2i+1} halves folded], 4 lanes each
        s[i] = __builtin_shufflevector(f[2 * i], f[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + __builtin_shufflevector(f[2 * i], f[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)  // 2 lanes per vector
        t[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13)
             + __builtin_shufflevector(s[2 * i], s[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(t[0], t[1], 0, 2, 4, 6, 8, 10, 12, 14)
         + __builtin_shufflevector(t[0], t[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

/// Stores 16 floats at a 64-byte aligned address without reading the line first and without
/// keeping it in cache (a non-temporal store): for outputs far larger than the caches, it saves
/// the read that an ordinary store of a missing line costs.
static inline __attribute__((always_inline)) void phalanx_stream16(float *address, phalanx_float16 v) {
    __builtin_nontemporal_store(v, (phalanx_float16 *)address);
}

/// Orders earlier non-temporal stores before later stores (x86 `sfence`); call once after a
/// streaming loop, before another thread may read its output.
static inline __attribute__((always_inline)) void phalanx_stream_fence(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_sfence();
#endif
}


/// Whether this processor runs the AVX-512 foundation, byte/word, doubleword/quadword and
/// vector-length instructions (the set OpenBLAS's SkylakeX kernels use); 0 on other architectures.
static inline int phalanx_cpu_has_avx512(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

#endif
