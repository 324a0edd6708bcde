// Elementwise kernels. axpby: out[i] = alpha * x[i] + beta * y[i] over bf16 vectors, computed in
// fp32. The profiler times it to measure achieved memory bandwidth (bytes = 3 * num_elements * 2:
// two reads and one write); the executor uses it for residual adds.
// Algorithm: grid-stride loop over 16-byte vectors (8 bf16) when all pointers are 16-byte aligned,
// then a scalar tail; otherwise a scalar loop. No synchronisation beyond stream order.
// Requirements: any SM >= 8.0; x, y and out may alias only if identical (in-place).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

struct AxpbyParams {
  const __nv_bfloat16* x = nullptr;  // [num_elements]
  const __nv_bfloat16* y = nullptr;  // [num_elements]
  __nv_bfloat16* out = nullptr;      // [num_elements]
  int64_t num_elements = 0;
  float alpha = 1.0f, beta = 1.0f;
};

// True when launch_axpby can run these parameters on `device` (num_elements >= 0, pointers set
// when num_elements > 0, compute capability >= 8.0).
bool is_supported(const AxpbyParams& p, int device);
// Throws mixserve::InputError for unsupported parameters; launch errors are checked.
void launch_axpby(const AxpbyParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
