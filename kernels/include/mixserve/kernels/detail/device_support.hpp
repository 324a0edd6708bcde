// Host-side helpers every kernel launcher shares: pointer alignment for 16-byte vector paths and
// the minimum compute capability of the kernels (bf16 tensor cores and cp.async: sm_80 or newer).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace mixserve::kernels::detail {

// True when p may be read and written with 16-byte vector accesses.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// True when `device` has compute capability 8.0 or newer; false also when it cannot be queried.
inline bool device_is_sm80_or_newer(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major >= 8;
}

}  // namespace mixserve::kernels::detail
