// FaceMoE routing op (facemoe::TopKMoE v1) as CUDA kernels, compiled at run time with NVRTC.
//
// For tokens x [T, d]: logits z = x router^T [T, N]; per token the top-k experts (ties: lower
// index first, as torch.topk); gate weights = softmax over the k selected logits (or the raw
// selected logits); y = sum_j w_j * (GELU(x W1_e + b1_e) W2_e + b2_e). Only the k selected
// experts run for a token:
//
//   moe_gate_*       one warp per token: logits, top-k, gate weights, per-expert counts
//   moe_offsets      exclusive scan of the counts (one thread; N is small)
//   moe_permute      token permutation by expert: slot (t, j) -> row of expert e's group
//   moe_expert_up_*  per-expert tiled GEMM on gathered rows: H = GELU(X[perm] W1_e + b1_e)
//   moe_expert_down_* per-expert tiled GEMM: Y_e = H W2_e + b2_e (float)
//   moe_combine_*    y[t] = sum_j w[t, j] * Y[slot(t, j)], in slot order (deterministic)
//
// Accumulation is float for both float and half tensors. Weight layouts follow the ONNX node:
// router [N, d], w1 [N, d, h], b1 [N, h], w2 [N, h, d], b2 [N, d]. The source needs no headers
// (NVRTC ships without cuda_fp16.h): half is a 16-bit storage type converted with PTX cvt.

#ifndef MOE_MAX_EXPERTS
#define MOE_MAX_EXPERTS 64
#endif
#define MOE_GATE_WARPS 4
#define MOE_TILE 16

struct __align__(2) half_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float v) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}

__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

template <typename T>
__device__ void gate(const T* __restrict__ x, const T* __restrict__ router, int tokens, int dim,
                     int experts, int top_k, int raw_logits, int* __restrict__ top_idx,
                     float* __restrict__ top_w, int* __restrict__ counts) {
    __shared__ float logits[MOE_GATE_WARPS][MOE_MAX_EXPERTS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = blockIdx.x * MOE_GATE_WARPS + warp;
    if (t >= tokens) return;  // whole warp leaves together; only warp-level sync below
    const T* row = x + (size_t)t * dim;
    for (int e = 0; e < experts; ++e) {
        const T* w = router + (size_t)e * dim;
        float acc = 0.0f;
        for (int c = lane; c < dim; c += 32) acc += to_float(row[c]) * to_float(w[c]);
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) logits[warp][e] = acc;
    }
    __syncwarp();
    if (lane != 0) return;
    const float* z = logits[warp];
    float val[MOE_MAX_EXPERTS];
    int idx[MOE_MAX_EXPERTS];
    unsigned long long taken = 0ull;
    for (int j = 0; j < top_k; ++j) {
        int best = -1;
        float best_val = 0.0f;
        for (int e = 0; e < experts; ++e) {
            if ((taken >> e) & 1ull) continue;
            if (best < 0 || z[e] > best_val) {  // strict: ties keep the lower index
                best = e;
                best_val = z[e];
            }
        }
        taken |= 1ull << best;
        idx[j] = best;
        val[j] = best_val;
    }
    float sum = 0.0f;
    if (!raw_logits) {
        for (int j = 0; j < top_k; ++j) {
            val[j] = expf(val[j] - z[idx[0]]);  // idx[0] holds the largest logit
            sum += val[j];
        }
    }
    for (int j = 0; j < top_k; ++j) {
        top_idx[(size_t)t * top_k + j] = idx[j];
        top_w[(size_t)t * top_k + j] = raw_logits ? val[j] : val[j] / sum;
        atomicAdd(&counts[idx[j]], 1);
    }
}

// C rows of expert e (blockIdx.z) = act(A_e [rows, kdim] @ B_e [kdim, n] + bias_e).
// A_e's row r is a[perm[begin + r]] when GATHER, else a[begin + r]; C's row is begin + r.
template <typename TA, typename TC, bool GATHER, bool GELU>
__device__ void grouped_gemm(const TA* __restrict__ a, const int* __restrict__ perm,
                             const int* __restrict__ offsets, const TA* __restrict__ b,
                             const TA* __restrict__ bias, TC* __restrict__ c, int kdim, int n) {
    __shared__ float as[MOE_TILE][MOE_TILE + 1];
    __shared__ float bs[MOE_TILE][MOE_TILE + 1];
    const int e = blockIdx.z;
    const int begin = offsets[e];
    const int rows = offsets[e + 1] - begin;
    const int row0 = blockIdx.y * MOE_TILE;
    if (row0 >= rows) return;  // uniform over the block: no thread reaches a barrier alone
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r = row0 + ty;
    const int col = blockIdx.x * MOE_TILE + tx;
    const TA* arow = nullptr;
    if (r < rows) arow = a + (size_t)(GATHER ? perm[begin + r] : begin + r) * kdim;
    const TA* be = b + (size_t)e * kdim * n;
    float acc = 0.0f;
    for (int k0 = 0; k0 < kdim; k0 += MOE_TILE) {
        const int ka = k0 + tx, kb = k0 + ty;
        as[ty][tx] = (arow != nullptr && ka < kdim) ? to_float(arow[ka]) : 0.0f;
        bs[ty][tx] = (kb < kdim && col < n) ? to_float(be[(size_t)kb * n + col]) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MOE_TILE; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    if (r < rows && col < n) {
        float v = acc + to_float(bias[(size_t)e * n + col]);
        if (GELU) v = gelu_erf(v);
        c[(size_t)(begin + r) * n + col] = from_float<TC>(v);
    }
}

template <typename T>
__device__ void combine(const float* __restrict__ expert_out, const int* __restrict__ slot_row,
                        const float* __restrict__ top_w, int tokens, int dim, int top_k,
                        T* __restrict__ y) {
    const size_t total = (size_t)tokens * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / dim, col = i % dim;
        float acc = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            const size_t s = t * top_k + j;
            acc += top_w[s] * expert_out[(size_t)slot_row[s] * dim + col];
        }
        y[i] = from_float<T>(acc);
    }
}

extern "C" __global__ void moe_offsets(const int* __restrict__ counts, int experts,
                                       int* __restrict__ offsets, int* __restrict__ cursor) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int sum = 0;
    for (int e = 0; e < experts; ++e) {
        offsets[e] = sum;
        cursor[e] = sum;
        sum += counts[e];
    }
    offsets[experts] = sum;
}

extern "C" __global__ void moe_permute(const int* __restrict__ top_idx, int slots, int top_k,
                                       int* __restrict__ cursor, int* __restrict__ perm,
                                       int* __restrict__ slot_row) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= slots) return;
    const int row = atomicAdd(&cursor[top_idx[s]], 1);
    perm[row] = s / top_k;
    slot_row[s] = row;
}

#define MOE_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(MOE_GATE_WARPS * 32) moe_gate_##SUFFIX(         \
        const T* x, const T* router, int tokens, int dim, int experts, int top_k, int raw_logits, \
        int* top_idx, float* top_w, int* counts) {                                               \
        gate<T>(x, router, tokens, dim, experts, top_k, raw_logits, top_idx, top_w, counts);     \
    }                                                                                            \
    extern "C" __global__ void moe_expert_up_##SUFFIX(const T* x, const int* perm,               \
                                                      const int* offsets, const T* w1,           \
                                                      const T* b1, T* hidden, int dim, int hid) { \
        grouped_gemm<T, T, true, true>(x, perm, offsets, w1, b1, hidden, dim, hid);              \
    }                                                                                            \
    extern "C" __global__ void moe_expert_down_##SUFFIX(const T* hidden, const int* offsets,     \
                                                        const T* w2, const T* b2, float* out,    \
                                                        int hid, int dim) {                      \
        grouped_gemm<T, float, false, false>(hidden, nullptr, offsets, w2, b2, out, hid, dim);   \
    }                                                                                            \
    extern "C" __global__ void moe_combine_##SUFFIX(const float* expert_out, const int* slot_row, \
                                                    const float* top_w, int tokens, int dim,     \
                                                    int top_k, T* y) {                           \
        combine<T>(expert_out, slot_row, top_w, tokens, dim, top_k, y);                          \
    }

MOE_KERNELS(float, f32)
MOE_KERNELS(half_t, f16)
