// The exact linear recurrence x_i = a_i x_{i-1} + u_i (SWR.md sections 1, 2 and 5) on the GPU
// through the hierarchical decomposition, block length 16, head dim 16, from x_{-1} = 0.
// Compiled by NVRTC appended to jagged_window.cu, whose storage types, vector loads and head sums
// it uses.
//
// Three launches per direction:
//   1. exact_carriers: every block t in parallel solves w_i = a_i w_{i-1} + u_i from 0 inside the
//      block and keeps only its carrier v_t (the terminal w) and compound gate c_t (the product of
//      its gates), float32.
//   2. exact_scan: per (sequence, head, channel), the carrier scan S_t = c_t S_{t-1} + v_t over
//      the blocks, in place (S_{-1} = 0). A long carrier scan is an exact recurrence itself: the
//      host decomposes it again with the float32 kernels (blocks of blocks) until it is short.
//   3. exact_apply: every block in parallel reruns its recurrence from S_{t-1}, which equals
//      w_i + g_t[i] S_{t-1} exactly, and writes x once.
//
// Backward is the same recurrence run in reverse time (SWR.md section 5):
//   lam_i = dx_i + a_{i+1} lam_{i+1}  (lam_n = 0),   du_i = lam_i,   da_i = <lam_i, x_{i-1}>
// With `reverse` set, position p of a sequence of length n is row n-1-p, its input is dx there and
// its gate a_{row+1} (1 at the last row, where nothing follows); exact_apply then also writes
// da_row = sum over the 16 channels of lam_row x_{row-1} (x_{-1} = 0), from the forward output x.
//
// Layouts as jagged_window.cu: gates [rows, heads], values [rows, heads, 16], sequences of
// `length` rows back to back; carriers [batch, blocks, heads, 16] and compounds [batch, blocks,
// heads] float32. Threads of launches 1 and 3: one per (sequence, block, head, 4 channels), a warp
// covering 8 heads of one block; launch 2: one per (sequence, head, channel).

namespace exact {

using swr::kBlock;
using swr::kHeadDim;
constexpr int V = 4;

struct Lane {
    bool valid;
    long long sequence;
    int block, head, channel, groupLane;

    __device__ __forceinline__ static Lane locate(int batch, int length, int heads, long long tid) {
        constexpr int G = kHeadDim / V;
        Lane lane;
        const int rowLanes = heads * G;
        const int blocks = (length + kBlock - 1) / kBlock;
        lane.valid = tid < (long long)batch * blocks * rowLanes;
        if (!lane.valid) return lane;
        const int within = (int)(tid % rowLanes);
        const long long rest = tid / rowLanes;
        lane.block = (int)(rest % blocks);
        lane.sequence = rest / blocks;
        lane.head = within / G;
        lane.groupLane = within % G;
        lane.channel = lane.groupLane * V;
        return lane;
    }
};

// Gate and input of position p of the lane's sequence (forward or reverse time).
template <class S>
__device__ __forceinline__ void step(const typename S::Element* __restrict__ a, const typename S::Element* __restrict__ u,
                                     const Lane& lane, int length, int heads, int reverse, int p,
                                     float& gate, float (&x)[V], long long& row) {
    const int r = reverse ? length - 1 - p : p;
    row = lane.sequence * length + r;
    if (!reverse) gate = S::gate(a + row * heads + lane.head);
    else gate = r + 1 < length ? S::gate(a + (row + 1) * heads + lane.head) : 1.0f;
    constexpr int kWords = V * S::kBytes / 4;
    unsigned w[kWords];
    swr::loadWords<kWords>(u + (row * heads + lane.head) * kHeadDim + lane.channel, w);
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = S::channel(w, k);
}

template <class S>
__device__ __forceinline__ void carriers(const typename S::Element* __restrict__ a, const typename S::Element* __restrict__ u,
                                         float* __restrict__ carrier, float* __restrict__ compound,
                                         int batch, int length, int heads, int reverse, long long tid) {
    const Lane lane = Lane::locate(batch, length, heads, tid);
    if (!lane.valid) return;
    const int blocks = (length + kBlock - 1) / kBlock;
    const int p0 = lane.block * kBlock, n = min(kBlock, length - p0);
    float w[V] = {0.0f, 0.0f, 0.0f, 0.0f}, c = 1.0f;
#pragma unroll
    for (int j = 0; j < kBlock; ++j) {
        if (j < n) {
            float gate, x[V];
            long long row;
            step<S>(a, u, lane, length, heads, reverse, p0 + j, gate, x, row);
            c *= gate;
#pragma unroll
            for (int k = 0; k < V; ++k) w[k] = fmaf(gate, w[k], x[k]);
        }
    }
    const long long index = (lane.sequence * blocks + lane.block) * heads + lane.head;
    *reinterpret_cast<float4*>(carrier + index * kHeadDim + lane.channel) = make_float4(w[0], w[1], w[2], w[3]);
    if (lane.groupLane == 0) compound[index] = c;
}

// S_t = c_t S_{t-1} + v_t over the blocks of one (sequence, head, channel), in place. Loads of a
// group of blocks are issued together, ahead of the dependent multiply-adds.
__device__ __forceinline__ void scan(float* __restrict__ carrier, const float* __restrict__ compound,
                                     int batch, int blocks, int heads, long long tid) {
    const int perSequence = heads * kHeadDim;
    if (tid >= (long long)batch * perSequence) return;
    const long long sequence = tid / perSequence;
    const int within = (int)(tid % perSequence), head = within / kHeadDim;
    float* v = carrier + sequence * blocks * perSequence + within;
    const float* c = compound + sequence * blocks * heads + head;
    constexpr int kAhead = 16;
    float state = 0.0f;
    for (int t0 = 0; t0 < blocks; t0 += kAhead) {
        float cs[kAhead], vs[kAhead];
#pragma unroll
        for (int j = 0; j < kAhead; ++j) {
            const bool inside = t0 + j < blocks;
            cs[j] = inside ? c[(long long)(t0 + j) * heads] : 0.0f;
            vs[j] = inside ? v[(long long)(t0 + j) * perSequence] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < kAhead; ++j) {
            state = fmaf(cs[j], state, vs[j]);
            if (t0 + j < blocks) v[(long long)(t0 + j) * perSequence] = state;
        }
    }
}

template <class S>
__device__ __forceinline__ void apply(const typename S::Element* __restrict__ a, const typename S::Element* __restrict__ u,
                                      const float* __restrict__ carrier, typename S::Element* __restrict__ out,
                                      const typename S::Element* __restrict__ x, typename S::Element* __restrict__ da,
                                      int batch, int length, int heads, int reverse, long long tid) {
    const Lane lane = Lane::locate(batch, length, heads, tid);
    if (!lane.valid) return;
    const int blocks = (length + kBlock - 1) / kBlock;
    const int p0 = lane.block * kBlock, n = min(kBlock, length - p0);
    constexpr int kWords = V * S::kBytes / 4;
    float state[V] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (lane.block > 0) {
        const long long index = (lane.sequence * blocks + lane.block - 1) * heads + lane.head;
        const float4 s = *reinterpret_cast<const float4*>(carrier + index * kHeadDim + lane.channel);
        state[0] = s.x; state[1] = s.y; state[2] = s.z; state[3] = s.w;
    }
#pragma unroll
    for (int j = 0; j < kBlock; ++j) {
        if (j < n) {
            float gate, input[V];
            long long row;
            step<S>(a, u, lane, length, heads, reverse, p0 + j, gate, input, row);
#pragma unroll
            for (int k = 0; k < V; ++k) state[k] = fmaf(gate, state[k], input[k]);
            const long long element = (row * heads + lane.head) * kHeadDim + lane.channel;
            unsigned w[kWords];
            S::template pack<V>(state, w);
            swr::storeWords<kWords>(out + element, w);
            if (reverse) {
                // da_row = <lam_row, x_{row-1}>, x before the sequence's first row is 0.
                float terms = 0.0f;
                if (row > lane.sequence * length) {
                    unsigned before[kWords];
                    swr::loadWords<kWords>(x + element - (long long)heads * kHeadDim, before);
#pragma unroll
                    for (int k = 0; k < V; ++k) terms = fmaf(state[k], S::channel(before, k), terms);
                }
                const float total = swr::headSum<V>(terms);
                if (lane.groupLane == 0) S::storeGate(da + row * heads + lane.head, total);
            }
        }
    }
}

}  // namespace exact

// ---- entry points -------------------------------------------------------------------------------
// exact_carriers_*, exact_apply_*: one-dimensional grid over batch * blocks * heads * 4 threads.
// exact_scan: over batch * heads * 16 threads.

#define EXACT_KERNELS(TYPE, STORAGE)                                                               \
    extern "C" __global__ void exact_carriers_##TYPE(const swr::STORAGE::Element* a,               \
        const swr::STORAGE::Element* u, float* carrier, float* compound, int batch, int length,    \
        int heads, int reverse) {                                                                  \
        exact::carriers<swr::STORAGE>(a, u, carrier, compound, batch, length, heads, reverse,      \
                                      SWR_THREAD_INDEX);                                           \
    }                                                                                              \
    extern "C" __global__ void exact_apply_##TYPE(const swr::STORAGE::Element* a,                  \
        const swr::STORAGE::Element* u, const float* carrier, swr::STORAGE::Element* out,          \
        const swr::STORAGE::Element* x, swr::STORAGE::Element* da, int batch, int length,          \
        int heads, int reverse) {                                                                  \
        exact::apply<swr::STORAGE>(a, u, carrier, out, x, da, batch, length, heads, reverse,       \
                                   SWR_THREAD_INDEX);                                              \
    }

EXACT_KERNELS(f32, Float32)
EXACT_KERNELS(bf16, BFloat16)

extern "C" __global__ void exact_scan(float* carrier, const float* compound, int batch, int blocks, int heads) {
    exact::scan(carrier, compound, batch, blocks, heads, SWR_THREAD_INDEX);
}
