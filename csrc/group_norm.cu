// GroupNorm (+ SiLU) forward for [B, C, S] tensors of any (b, c, s) element strides.
//
//   stats:    block (b*G + g, chunk) reduces its positions' (count, mean, M2) by Welford,
//             merged across threads with Chan et al.'s parallel formula (no cancellation)
//   finalize: one thread per (b, g) merges the chunks -> mean, rstd = 1/sqrt(M2/n + eps)
//   apply:    y = silu((x - mean) * rstd * w + b), one read and one write per element
// Elements of a chunk are visited with the unit-stride dimension fastest (channels for
// channels-last, positions for NCDHW), so loads and stores coalesce in both layouts.

#include <algorithm>

#include "checks.h"
#include "dtype_utils.cuh"
#include "kernels.h"
#include "static_switch.h"

namespace mugv {
namespace {

constexpr int NTHREADS = 256;

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Welford block_merge(Welford v) {
  __shared__ Welford warp_vals[NTHREADS / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford o{__shfl_down_sync(0xffffffffu, v.n, off), __shfl_down_sync(0xffffffffu, v.mean, off),
              __shfl_down_sync(0xffffffffu, v.m2, off)};
    v = merge(v, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < NTHREADS / 32 ? warp_vals[lane] : Welford{0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Welford o{__shfl_down_sync(0xffffffffu, v.n, off), __shfl_down_sync(0xffffffffu, v.mean, off),
                __shfl_down_sync(0xffffffffu, v.m2, off)};
      v = merge(v, o);
    }
  }
  return v;  // valid in thread 0
}

// Element e of the chunk [s_start, s_end) x [0, Cg) -> (channel in group, position).
__device__ __forceinline__ void element(int64_t e, int64_t len, int64_t Cg, bool c_fast, int64_t& c, int64_t& s) {
  if (c_fast) {
    c = e % Cg;
    s = e / Cg;
  } else {
    c = e / len;
    s = e % len;
  }
}

template <typename T>
__global__ void __launch_bounds__(NTHREADS)
    gn_stats_kernel(const GroupNormParams p, int64_t s_per_chunk, bool c_fast, float* part) {
  const int64_t bg = blockIdx.x;
  const int n_chunks = gridDim.y;
  const int64_t b = bg / p.G, g = bg % p.G, Cg = p.C / p.G;
  const int64_t s_start = static_cast<int64_t>(blockIdx.y) * s_per_chunk;
  const int64_t len = std::min(p.S - s_start, s_per_chunk);
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.sxb + g * Cg * p.sxc + s_start * p.sxs;
  Welford v{0.0f, 0.0f, 0.0f};
  for (int64_t e = threadIdx.x; e < len * Cg; e += NTHREADS) {
    int64_t c, s;
    element(e, len, Cg, c_fast, c, s);
    const float xv = to_float(x[c * p.sxc + s * p.sxs]);
    v.n += 1.0f;
    const float d = xv - v.mean;
    v.mean += d / v.n;
    v.m2 += d * (xv - v.mean);
  }
  v = block_merge(v);
  if (threadIdx.x == 0) {
    float* out = part + 3 * (bg * n_chunks + blockIdx.y);
    out[0] = v.n;
    out[1] = v.mean;
    out[2] = v.m2;
  }
}

__global__ void gn_finalize_kernel(const GroupNormParams p, int n_chunks, const float* part) {
  const int64_t bg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bg >= p.B * p.G) return;
  Welford v{0.0f, 0.0f, 0.0f};
  for (int i = 0; i < n_chunks; ++i) {
    const float* q = part + 3 * (bg * n_chunks + i);
    v = merge(v, Welford{q[0], q[1], q[2]});
  }
  reinterpret_cast<float*>(p.mean)[bg] = v.mean;
  reinterpret_cast<float*>(p.rstd)[bg] = rsqrtf(v.m2 / fmaxf(v.n, 1.0f) + p.eps);
}

template <typename T, bool SILU>
__global__ void __launch_bounds__(NTHREADS) gn_apply_kernel(const GroupNormParams p, int64_t s_per_chunk, bool c_fast) {
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / p.G, g = bg % p.G, Cg = p.C / p.G;
  const int64_t s_start = static_cast<int64_t>(blockIdx.y) * s_per_chunk;
  const int64_t len = std::min(p.S - s_start, s_per_chunk);
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.sxb + g * Cg * p.sxc + s_start * p.sxs;
  T* y = reinterpret_cast<T*>(p.y) + b * p.syb + g * Cg * p.syc + s_start * p.sys;
  const float* w = reinterpret_cast<const float*>(p.weight) + g * Cg;
  const float* bias = reinterpret_cast<const float*>(p.bias) + g * Cg;
  const float mean = reinterpret_cast<const float*>(p.mean)[bg];
  const float rstd = reinterpret_cast<const float*>(p.rstd)[bg];
  for (int64_t e = threadIdx.x; e < len * Cg; e += NTHREADS) {
    int64_t c, s;
    element(e, len, Cg, c_fast, c, s);
    float z = (to_float(x[c * p.sxc + s * p.sxs]) - mean) * rstd;
    if (p.weight != 0) z *= w[c];
    if (p.bias != 0) z += bias[c];
    if (SILU) z = z / (1.0f + __expf(-z));
    y[c * p.syc + s * p.sys] = from_float<T>(z);
  }
}

}  // namespace

void group_norm_silu_fwd(const GroupNormParams& p, cudaStream_t stream) {
  CHECK_PTR(p.x);
  CHECK_PTR(p.y);
  CHECK_PTR(p.mean);
  CHECK_PTR(p.rstd);
  CHECK_POSITIVE(p.B);
  CHECK_POSITIVE(p.C);
  CHECK_POSITIVE(p.S);
  CHECK_POSITIVE(p.G);
  MUGV_CHECK(p.C % p.G == 0, "num_groups must divide C, got C=" << p.C << ", G=" << p.G);
  MUGV_CHECK(p.eps > 0.0f, "eps must be positive, got " << p.eps);
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t BG = p.B * p.G;
  const int64_t Cg = p.C / p.G;
  // ~4 blocks per SM, each at least 4K elements
  const int64_t want = std::max<int64_t>(1, (4 * sms + BG - 1) / BG);
  const int64_t max_chunks = std::max<int64_t>(1, p.S * Cg / 4096);
  const int64_t chunks = std::min<int64_t>({want, max_chunks, p.S, 65535});
  const int64_t s_per_chunk = (p.S + chunks - 1) / chunks;
  const int n_chunks = static_cast<int>((p.S + s_per_chunk - 1) / s_per_chunk);
  MUGV_CHECK(BG < (int64_t(1) << 31), "B*G too large: " << BG);
  const bool c_fast = p.sxc < p.sxs;
  float* part = nullptr;
  CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&part), sizeof(float) * 3 * BG * n_chunks, stream));
  const dim3 grid(static_cast<unsigned>(BG), static_cast<unsigned>(n_chunks));
  FLOAT_DTYPE_SWITCH(p.dtype, T, [&] { gn_stats_kernel<T><<<grid, NTHREADS, 0, stream>>>(p, s_per_chunk, c_fast, part); });
  gn_finalize_kernel<<<static_cast<unsigned>((BG + 127) / 128), 128, 0, stream>>>(p, n_chunks, part);
  FLOAT_DTYPE_SWITCH(p.dtype, T, [&] {
    BOOL_SWITCH(p.silu, SILU, [&] { gn_apply_kernel<T, SILU><<<grid, NTHREADS, 0, stream>>>(p, s_per_chunk, c_fast); });
  });
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaFreeAsync(part, stream));
}

}  // namespace mugv
