// Deterministic device-side fills for test and profiling data: element i of a buffer gets a
// value drawn from a counter-based hash of (seed, i), uniform in [lo, hi), rounded to the
// buffer's type. The same (seed, i) gives the same value on any device and in host code
// (fill_value_host), so CPU references can regenerate inputs without copying them back.
// No synchronisation beyond stream order.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "mixserve/core/types.hpp"

namespace mixserve::kernels {

struct FillParams {
  void* data = nullptr;        // [num_elements] of `dtype`
  int64_t num_elements = 0;
  DType dtype = DType::bf16;   // fp32, bf16 or fp8_e4m3 (fp8_block data is e4m3 too)
  uint64_t seed = 1;
  float lo = -1.0f, hi = 1.0f;
};

bool is_supported(const FillParams& p);
void launch_fill_uniform(const FillParams& p, cudaStream_t stream);

// The value (before rounding to dtype) that launch_fill_uniform writes at index i.
float fill_value_host(uint64_t seed, int64_t i, float lo, float hi);

}  // namespace mixserve::kernels
