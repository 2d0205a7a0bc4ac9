// Runtime flags -> template constants, in one place (flash-attn's static_switch.h idea).
//   BOOL_SWITCH(cond, NAME, [&] { kernel<NAME>(...); });
//   FLOAT_DTYPE_SWITCH(code, T, [&] { kernel<T>(...); });   // 0 fp32, 1 fp16, 2 bf16
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// dtype codes shared with the Python side (mugv_kernels/ops/*.py)
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#define HALF_DTYPE_SWITCH(CODE, T, ...)                                                    \
  [&] {                                                                                    \
    if ((CODE) == kFloat16) {                                                              \
      using T = __half;                                                                    \
      return __VA_ARGS__();                                                                \
    } else if ((CODE) == kBFloat16) {                                                      \
      using T = __nv_bfloat16;                                                             \
      return __VA_ARGS__();                                                                \
    }                                                                                      \
    throw std::invalid_argument("dtype code must be 1 (fp16) or 2 (bf16), got " +         \
                                std::to_string(CODE));                                     \
  }()

#define FLOAT_DTYPE_SWITCH(CODE, T, ...)                                                   \
  [&] {                                                                                    \
    if ((CODE) == kFloat32) {                                                              \
      using T = float;                                                                     \
      return __VA_ARGS__();                                                                \
    } else if ((CODE) == kFloat16) {                                                       \
      using T = __half;                                                                    \
      return __VA_ARGS__();                                                                \
    } else if ((CODE) == kBFloat16) {                                                      \
      using T = __nv_bfloat16;                                                             \
      return __VA_ARGS__();                                                                \
    }                                                                                      \
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + \
                                std::to_string(CODE));                                     \
  }()
