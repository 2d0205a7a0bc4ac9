// pybind11 bindings of mugv_kernels._C. Tensors arrive as raw device pointers (ints) and
// the caller's CUDA stream as an int, so the module does not link against torch and
// builds on machines without a GPU (calling it there raises a CUDA error).

#include <pybind11/pybind11.h>

#include <cstdint>

#include "kernels.h"

namespace py = pybind11;

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void conv3d_fwd(uintptr_t x, uintptr_t context, uintptr_t weight, uintptr_t bias, uintptr_t y, int is_bf16,
                int64_t B, int64_t C_in, int64_t T, int64_t H, int64_t W, int64_t C_out, int kT, int kH, int kW,
                int stride_t, int stride_h, int stride_w, int dil_t, int dil_h, int dil_w, int front, int pad_h,
                int pad_w, int64_t T_out, int64_t H_out, int64_t W_out, int P, bool replicate, uintptr_t stream) {
  mugv::Conv3dParams p{};
  p.x = x;
  p.context = context;
  p.weight = weight;
  p.bias = bias;
  p.y = y;
  p.dtype = is_bf16 ? 2 : 1;
  p.B = B;
  p.C_in = C_in;
  p.T = T;
  p.H = H;
  p.W = W;
  p.C_out = C_out;
  p.kT = kT;
  p.kH = kH;
  p.kW = kW;
  p.stride_t = stride_t;
  p.stride_h = stride_h;
  p.stride_w = stride_w;
  p.dil_t = dil_t;
  p.dil_h = dil_h;
  p.dil_w = dil_w;
  p.front = front;
  p.pad_h = pad_h;
  p.pad_w = pad_w;
  p.T_out = T_out;
  p.H_out = H_out;
  p.W_out = W_out;
  p.P = P;
  p.replicate = replicate;
  mugv::causal_conv3d_fwd(p, as_stream(stream));
}

void gn_fwd(uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd, int dtype,
            int64_t B, int64_t C, int64_t S, int64_t G, int64_t sxb, int64_t sxc, int64_t sxs, int64_t syb,
            int64_t syc, int64_t sys, double eps, bool silu, uintptr_t stream) {
  mugv::GroupNormParams p{};
  p.x = x;
  p.y = y;
  p.weight = weight;
  p.bias = bias;
  p.mean = mean;
  p.rstd = rstd;
  p.dtype = dtype;
  p.B = B;
  p.C = C;
  p.S = S;
  p.G = G;
  p.sxb = sxb;
  p.sxc = sxc;
  p.sxs = sxs;
  p.syb = syb;
  p.syc = syc;
  p.sys = sys;
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  mugv::group_norm_silu_fwd(p, as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mugv CUDA kernels (csrc/): causal 3D convolution and GroupNorm+SiLU forwards";
  m.attr("cuda_archs") = MUGV_CUDA_ARCHS;
  m.def("causal_conv3d_fwd", &conv3d_fwd,
        "Causal 3D conv forward, NDHWC bf16/fp16 (pointers and stream as ints; see csrc/kernels.h)",
        py::arg("x"), py::arg("context"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("is_bf16"),
        py::arg("B"), py::arg("C_in"), py::arg("T"), py::arg("H"), py::arg("W"), py::arg("C_out"), py::arg("kT"),
        py::arg("kH"), py::arg("kW"), py::arg("stride_t"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("dil_t"), py::arg("dil_h"), py::arg("dil_w"), py::arg("front"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("T_out"), py::arg("H_out"), py::arg("W_out"), py::arg("P"), py::arg("replicate"),
        py::arg("stream"));
  m.def("group_norm_silu_fwd", &gn_fwd,
        "GroupNorm(+SiLU) forward on [B, C, S] with element strides (see csrc/kernels.h)", py::arg("x"),
        py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("dtype"),
        py::arg("B"), py::arg("C"), py::arg("S"), py::arg("G"), py::arg("sxb"), py::arg("sxc"), py::arg("sxs"),
        py::arg("syb"), py::arg("syc"), py::arg("sys"), py::arg("eps"), py::arg("silu"), py::arg("stream"));
}
