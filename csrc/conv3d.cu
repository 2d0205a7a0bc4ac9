// Causal 3D convolution forward: implicit GEMM on tensor cores (WMMA bf16/fp16 -> fp32).
//
// GEMM view (NDHWC): rows m = (b, to, ho, wo) output positions (M = B*T_out*H_out*W_out),
// columns n = output channels, reduction k = (kt, kh, kw, ci) (K = kT*kH*kW*C_in, input
// channels innermost, matching the weight layout [C_out, kT, kH, kW, C_in] = [C_out, K]).
//   A[m, k] = x_virtual[b, to*st - front + kt*dt, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw, ci]
//   B[k, n] = weight[n, k]
// The padded input is never materialized: out-of-range positions read as zero, frames
// before the clip come from `context` or frame 0 (replicate), frames after from frame T-1
// (replicate) or zero. The output row m is contiguous in y (NDHWC), so y[m, n] = y + m*C_out + n.
//
// Tiles: 128 x 64 per block of 8 warps (each warp 32 x 32 = 2 x 2 WMMA 16x16x16 fragments),
// K steps of 32 staged through shared memory; fp32 accumulators go through shared memory
// in the epilogue, where the bias is added and the result rounded to T once.
// When C_in % 8 == 0 (every VAE layer but the first) A and B tiles load as 16-byte vectors
// (8 channels of one tap); otherwise element by element.

#include <mma.h>

#include "checks.h"
#include "dtype_utils.cuh"
#include "kernels.h"
#include "static_switch.h"

namespace mugv {
namespace {

using namespace nvcuda;

constexpr int BM = 128, BN = 64, BK = 32, NTHREADS = 256;
constexpr int LDA = BK + 8, LDB = BK + 8, LDC = BN + 4;  // padded rows: fewer bank conflicts
constexpr int AB_BYTES = (BM * LDA + BN * LDB) * 2;
constexpr int C_BYTES = BM * LDC * 4;
constexpr int SMEM_BYTES = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;

struct OutPos {
  int64_t b;
  int to, ho, wo;
};

__device__ __forceinline__ OutPos decompose(int64_t m, const Conv3dParams& p) {
  OutPos o;
  o.wo = static_cast<int>(m % p.W_out);
  m /= p.W_out;
  o.ho = static_cast<int>(m % p.H_out);
  m /= p.H_out;
  o.to = static_cast<int>(m % p.T_out);
  o.b = m / p.T_out;
  return o;
}

// Address of x_virtual[o + tap, ci], or nullptr where the virtual input is a zero
// (context, replicate and bias are runtime flags: uniform branches, fewer instantiations).
template <typename T>
__device__ __forceinline__ const T* source(const Conv3dParams& p, const T* x, const T* ctx, const OutPos& o,
                                           int64_t k) {
  const int tap = static_cast<int>(k / p.C_in);
  const int64_t ci = k - static_cast<int64_t>(tap) * p.C_in;
  const int khw = p.kH * p.kW;
  const int kt = tap / khw;
  const int kh = (tap - kt * khw) / p.kW;
  const int kw = tap - kt * khw - kh * p.kW;
  const int hs = o.ho * p.stride_h - p.pad_h + kh * p.dil_h;
  const int ws = o.wo * p.stride_w - p.pad_w + kw * p.dil_w;
  if (hs < 0 || hs >= p.H || ws < 0 || ws >= p.W) return nullptr;
  int ts = o.to * p.stride_t - p.front + kt * p.dil_t;
  if (ts < 0) {
    if (ctx != nullptr) {
      if (ts < -p.P) return nullptr;
      return ctx + (((o.b * p.P + (ts + p.P)) * p.H + hs) * p.W + ws) * p.C_in + ci;
    }
    if (!p.replicate) return nullptr;
    ts = 0;
  } else if (ts >= p.T) {
    if (!p.replicate) return nullptr;
    ts = static_cast<int>(p.T) - 1;
  }
  return x + (((o.b * p.T + ts) * p.H + hs) * p.W + ws) * p.C_in + ci;
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(NTHREADS) conv3d_fwd_kernel(const Conv3dParams p) {
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  T* As = reinterpret_cast<T*>(smem);  // [BM][LDA]
  T* Bs = As + BM * LDA;               // [BN][LDB]
  float* Cs = reinterpret_cast<float*>(smem);  // [BM][LDC], reused after the main loop

  const T* x = reinterpret_cast<const T*>(p.x);
  const T* ctx = reinterpret_cast<const T*>(p.context);
  const T* w = reinterpret_cast<const T*>(p.weight);
  const int64_t M = p.B * p.T_out * p.H_out * p.W_out;
  const int64_t K = static_cast<int64_t>(p.kT) * p.kH * p.kW * p.C_in;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp % 4, wn = warp / 4;  // warp tile: rows wm*32.., columns wn*32..

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // VEC: this thread's two A rows (tid/4 and 64 + tid/4), 8 channels at column (tid%4)*8
  OutPos a_pos[2];
  bool a_ok[2];
  if (VEC) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t m = m0 + (tid >> 2) + 64 * i;
      a_ok[i] = m < M;
      a_pos[i] = decompose(a_ok[i] ? m : 0, p);
    }
  }

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    if (VEC) {
      const int kk = (tid & 3) * 8;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = (tid >> 2) + 64 * i;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (a_ok[i] && k0 + kk < K) {
          const T* src = source<T>(p, x, ctx, a_pos[i], k0 + kk);
          if (src != nullptr) v = *reinterpret_cast<const uint4*>(src);
        }
        *reinterpret_cast<uint4*>(As + row * LDA + kk) = v;
      }
      const int n = tid >> 2;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (n0 + n < p.C_out && k0 + kk < K) v = *reinterpret_cast<const uint4*>(w + (n0 + n) * K + k0 + kk);
      *reinterpret_cast<uint4*>(Bs + n * LDB + kk) = v;
    } else {
#pragma unroll 4
      for (int e = tid; e < BM * BK; e += NTHREADS) {
        const int row = e / BK, kk = e % BK;
        const int64_t m = m0 + row;
        T v = from_float<T>(0.0f);
        if (m < M && k0 + kk < K) {
          const T* src = source<T>(p, x, ctx, decompose(m, p), k0 + kk);
          if (src != nullptr) v = *src;
        }
        As[row * LDA + kk] = v;
      }
#pragma unroll 4
      for (int e = tid; e < BN * BK; e += NTHREADS) {
        const int n = e / BK, kk = e % BK;
        T v = from_float<T>(0.0f);
        if (n0 + n < p.C_out && k0 + kk < K) v = w[(n0 + n) * K + k0 + kk];
        Bs[n * LDB + kk] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * LDB + kk, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  T* y = reinterpret_cast<T*>(p.y);
  const float* bias = reinterpret_cast<const float*>(p.bias);
  for (int e = tid; e < BM * BN; e += NTHREADS) {
    const int row = e / BN, col = e % BN;
    const int64_t m = m0 + row;
    const int n = n0 + col;
    if (m < M && n < p.C_out) {
      float v = Cs[row * LDC + col];
      if (bias != nullptr) v += bias[n];
      y[m * p.C_out + n] = from_float<T>(v);
    }
  }
}

}  // namespace

void causal_conv3d_fwd(const Conv3dParams& p, cudaStream_t stream) {
  CHECK_PTR(p.x);
  CHECK_PTR(p.weight);
  CHECK_PTR(p.y);
  CHECK_POSITIVE(p.B);
  CHECK_POSITIVE(p.C_in);
  CHECK_POSITIVE(p.C_out);
  CHECK_POSITIVE(p.T);
  CHECK_POSITIVE(p.H);
  CHECK_POSITIVE(p.W);
  CHECK_POSITIVE(p.kT);
  CHECK_POSITIVE(p.kH);
  CHECK_POSITIVE(p.kW);
  MUGV_CHECK(p.kH % 2 == 1 && p.kW % 2 == 1, "spatial kernel sizes must be odd, got kH=" << p.kH << ", kW=" << p.kW);
  CHECK_POSITIVE(p.stride_t);
  CHECK_POSITIVE(p.stride_h);
  CHECK_POSITIVE(p.stride_w);
  CHECK_POSITIVE(p.dil_t);
  CHECK_POSITIVE(p.dil_h);
  CHECK_POSITIVE(p.dil_w);
  CHECK_POSITIVE(p.T_out);
  CHECK_POSITIVE(p.H_out);
  CHECK_POSITIVE(p.W_out);
  CHECK_NONNEG(p.P);
  MUGV_CHECK(p.context == 0 || p.P == p.front, "context must hold P == front frames, got P=" << p.P
                                                                                               << ", front=" << p.front);
  const int64_t M = p.B * p.T_out * p.H_out * p.W_out;
  const int64_t K = static_cast<int64_t>(p.kT) * p.kH * p.kW * p.C_in;
  MUGV_CHECK(K < (int64_t(1) << 31), "reduction size kT*kH*kW*C_in must be < 2^31, got " << K);
  const bool vec = p.C_in % 8 == 0 && p.x % 16 == 0 && p.weight % 16 == 0 && p.context % 16 == 0;
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>((p.C_out + BN - 1) / BN));
  MUGV_CHECK(grid.y <= 65535, "C_out too large: " << p.C_out);
  HALF_DTYPE_SWITCH(p.dtype, T, [&] {
    BOOL_SWITCH(vec, VEC, [&] { conv3d_fwd_kernel<T, VEC><<<grid, NTHREADS, 0, stream>>>(p); });
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace mugv
