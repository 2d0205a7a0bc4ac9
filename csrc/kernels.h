// Host-side entry points of the CUDA kernels (called by the pybind11 bindings in
// mugv_C.cpp). Pointers are raw device addresses handed over from PyTorch; the stream is
// the caller's current CUDA stream. No torch headers: the module builds without torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mugv {

// Causal 3D convolution forward, NDHWC, bf16/fp16 in/out, fp32 accumulation.
//   x       [B, T, H, W, C_in]            (channels_last_3d storage of [B, C_in, T, H, W])
//   context [B, P, H, W, C_in] or null    (frames before x; replaces the front padding)
//   weight  [C_out, kT, kH, kW, C_in]     (= [C_out, K], K = kT*kH*kW*C_in)
//   bias    [C_out] fp32 or null
//   y       [B, T_out, H_out, W_out, C_out]
// Source frame of output frame `to` and tap `kt`: to*stride_t - front + kt*dilation_t
// (< 0: context, zeros, or frame 0 with replicate; >= T: zeros or frame T-1).
struct Conv3dParams {
  uintptr_t x, context, weight, bias, y;
  int dtype;  // DTypeCode
  int64_t B, C_in, T, H, W, C_out;
  int kT, kH, kW;
  int stride_t, stride_h, stride_w, dil_t, dil_h, dil_w;
  int front, pad_h, pad_w;
  int64_t T_out, H_out, W_out;
  int P;
  bool replicate;
};

void causal_conv3d_fwd(const Conv3dParams& p, cudaStream_t stream);

// GroupNorm (+ SiLU) forward. x, y: [B, C, S] with element strides (sb, sc, ss) each
// (contiguous NCDHW: (C*S, S, 1); channels-last: (S*C, 1, C)). weight/bias fp32 [C] or
// null. mean/rstd: fp32 [B, G] outputs.
struct GroupNormParams {
  uintptr_t x, y, weight, bias, mean, rstd;
  int dtype;  // DTypeCode
  int64_t B, C, S, G;
  int64_t sxb, sxc, sxs, syb, syc, sys;
  float eps;
  bool silu;
};

void group_norm_silu_fwd(const GroupNormParams& p, cudaStream_t stream);

}  // namespace mugv
