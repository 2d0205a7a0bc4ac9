// Argument checks with readable messages (flash-attn's CHECK_* style). They throw
// std::invalid_argument, which pybind11 turns into a Python ValueError; CUDA errors throw
// std::runtime_error (RuntimeError).
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

#define MUGV_CHECK(cond, msg)                                                     \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::ostringstream mugv_oss_;                                               \
      mugv_oss_ << __func__ << ": " << msg << " (check `" #cond "` failed)";      \
      throw std::invalid_argument(mugv_oss_.str());                               \
    }                                                                             \
  } while (0)

#define CHECK_POSITIVE(v) MUGV_CHECK((v) > 0, #v " must be positive, got " << (v))
#define CHECK_NONNEG(v) MUGV_CHECK((v) >= 0, #v " must be >= 0, got " << (v))
#define CHECK_PTR(p) MUGV_CHECK((p) != 0, #p " must be a device pointer, got null")
#define CHECK_ALIGNED(p, bytes) \
  MUGV_CHECK((p) % (bytes) == 0, #p " must be " << (bytes) << "-byte aligned")

#define CUDA_CHECK(expr)                                                               \
  do {                                                                                 \
    cudaError_t mugv_err_ = (expr);                                                    \
    if (mugv_err_ != cudaSuccess) {                                                    \
      throw std::runtime_error(std::string(__func__) + ": " #expr " failed: " +       \
                               cudaGetErrorString(mugv_err_));                         \
    }                                                                                  \
  } while (0)
