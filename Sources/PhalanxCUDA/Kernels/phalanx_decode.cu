// Decoding the Phalanx layer from its state (SWR.md sections 3 and 6): the element-wise middle of
// the layer continued from a per-sequence state rather than from the start of each sequence.
// Compiled by NVRTC appended to jagged_window.cu and phalanx_layer.cu, whose storage types,
// sigmoid and loads it uses, so that every operation is the parallel forward's own (decoding
// after a prompt repeats the forward's float32 arithmetic on the same stored projections).
//
// State, float32, per sequence s and head h (channels k of the head):
//   local   [batch, H, 16]  w: the running local state of the current block
//   gate    [batch, H]      g: the inclusive gate product since the block start
//   carrier [batch, H, 16]  v: the terminal local state of the previous block
//   offsets [batch] int32   the position inside the block of each sequence's next row
// At a block start (offset 0) local is 0 and gate 1.
//
// Layouts as in phalanx_layer.cu: z [batch * n, stride] WITHOUT bias (columns b | c | v | a),
// bias [P] float32, mixed [batch * n, H*16]; n rows per sequence in this call.

namespace phalanx {

// Continues every sequence by n rows, one thread per (sequence, head, channel): per row
//   a = scale * sigmoid(z_a + bias_a);  g *= a;  w = a w + sigmoid(z_b + bias_b) v
//   s = g carrier + w;  mixed = s (z_c + bias_c) + v
// and at the end of a block (offset reaches l): carrier = w, w = 0, g = 1, offset = 0.
template <class S>
__device__ __forceinline__ void step(const typename S::Element* __restrict__ z, const float* __restrict__ bias,
                                     typename S::Element* __restrict__ mixed, float* __restrict__ local,
                                     float* __restrict__ gate, float* __restrict__ carrier,
                                     const int* __restrict__ offsets, int batch, int n, int heads, int kvHeads,
                                     long long stride, float scale, long long tid) {
    const long long width = (long long)heads * kHeadDim;
    if (tid >= batch * width) return;
    const int k = (int)(tid % kHeadDim);
    const int h = (int)((tid / kHeadDim) % heads);
    const long long sequence = tid / width;
    const int kv = h / (heads / kvHeads);
    const int bIndex = kv * kHeadDim + k, cIndex = (kvHeads + kv) * kHeadDim + k;
    const int vIndex = (2 * kvHeads + h) * kHeadDim + k, aIndex = (2 * kvHeads + heads) * kHeadDim + h;
    const float biasA = bias[aIndex], biasB = bias[bIndex], biasC = bias[cIndex];
    const long long slot = sequence * width + (long long)h * kHeadDim + k;
    float w = local[slot], p = carrier[slot], g = gate[sequence * heads + h];
    int offset = offsets[sequence];
    for (int i = 0; i < n; ++i) {
        const long long r = sequence * n + i;
        const typename S::Element* zr = z + r * stride;
        const float a = scale * sigmoid(S::gate(zr + aIndex) + biasA);
        const float v = S::gate(zr + vIndex);
        g *= a;
        w = fmaf(a, w, sigmoid(S::gate(zr + bIndex) + biasB) * v);
        const float s = fmaf(g, p, w);
        S::storeGate(mixed + r * width + h * kHeadDim + k, fmaf(s, S::gate(zr + cIndex) + biasC, v));
        if (++offset == kBlock) {
            p = w;
            w = 0.0f;
            g = 1.0f;
            offset = 0;
        }
    }
    local[slot] = w;
    carrier[slot] = p;
    if (k == 0) gate[sequence * heads + h] = g;
}

// The state after the parallel forward (phalanx_forward) of n rows from the start of every
// sequence, from its carriers [batch, ceil(n / l), H, 16] (each block's terminal local state) and
// z: with r = n mod l and T = ceil(n / l) blocks,
//   r == 0:  carrier = carriers[T-1], local = 0, gate = 1
//   r  > 0:  carrier = carriers[T-2] (0 when T = 1), local = carriers[T-1],
//            gate = product over the last r rows of scale * sigmoid(z_a + bias_a)
// One thread per (sequence, head, channel); n >= 1.
template <class S>
__device__ __forceinline__ void stateAfterForward(const typename S::Element* __restrict__ z, const float* __restrict__ bias,
                                                  const float* __restrict__ carriers, float* __restrict__ local,
                                                  float* __restrict__ gate, float* __restrict__ carrier, int batch, int n,
                                                  int heads, int kvHeads, long long stride, float scale, long long tid) {
    const long long width = (long long)heads * kHeadDim;
    if (tid >= batch * width) return;
    const int k = (int)(tid % kHeadDim);
    const int h = (int)((tid / kHeadDim) % heads);
    const long long sequence = tid / width;
    const int blocks = (n + kBlock - 1) / kBlock, r = n % kBlock;
    const long long slot = sequence * width + (long long)h * kHeadDim + k;
    auto carrierOfBlock = [&](int t) { return carriers[((sequence * blocks + t) * heads + h) * kHeadDim + k]; };
    if (r == 0) {
        carrier[slot] = carrierOfBlock(blocks - 1);
        local[slot] = 0.0f;
        if (k == 0) gate[sequence * heads + h] = 1.0f;
        return;
    }
    carrier[slot] = blocks >= 2 ? carrierOfBlock(blocks - 2) : 0.0f;
    local[slot] = carrierOfBlock(blocks - 1);
    if (k == 0) {
        const int aIndex = (2 * kvHeads + heads) * kHeadDim + h;
        float g = 1.0f;
        for (int i = n - r; i < n; ++i) g *= scale * sigmoid(S::gate(z + (sequence * n + i) * stride + aIndex) + bias[aIndex]);
        gate[sequence * heads + h] = g;
    }
}

}  // namespace phalanx

// ---- entry points -------------------------------------------------------------------------------
// phalanx_step_{f32,bf16} and phalanx_state_after_forward_{f32,bf16}: one thread per (sequence,
// head, channel), a one-dimensional grid.

#define PHALANX_DECODE_KERNELS(TYPE, STORAGE)                                                      \
    extern "C" __global__ void phalanx_step_##TYPE(                                                \
        const swr::STORAGE::Element* z, const float* bias, swr::STORAGE::Element* mixed,           \
        float* local, float* gate, float* carrier, const int* offsets, int batch, int n,           \
        int heads, int kvHeads, long long stride, float scale) {                                   \
        phalanx::step<swr::STORAGE>(z, bias, mixed, local, gate, carrier, offsets, batch, n,       \
                                    heads, kvHeads, stride, scale, SWR_THREAD_INDEX);              \
    }                                                                                              \
    extern "C" __global__ void phalanx_state_after_forward_##TYPE(                                 \
        const swr::STORAGE::Element* z, const float* bias, const float* carriers, float* local,   \
        float* gate, float* carrier, int batch, int n, int heads, int kvHeads, long long stride,   \
        float scale) {                                                                             \
        phalanx::stateAfterForward<swr::STORAGE>(z, bias, carriers, local, gate, carrier, batch,   \
                                                 n, heads, kvHeads, stride, scale,                 \
                                                 SWR_THREAD_INDEX);                                \
    }

PHALANX_DECODE_KERNELS(f32, Float32)
PHALANX_DECODE_KERNELS(bf16, BFloat16)
