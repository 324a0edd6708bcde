#include "mixserve/kernels/fill.cuh"

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {

namespace {
// splitmix64 finaliser: a bijective 64-bit mix, good enough for test data.
__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__host__ __device__ inline float hashed_uniform(uint64_t seed, int64_t i, float lo, float hi) {
  const uint64_t h = mix64(seed * 0xD1B54A32D192ED03ull ^ static_cast<uint64_t>(i));
  const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in fp32
  return lo + (hi - lo) * u;
}

template <class T>
static __global__ void fill_kernel(T* data, int64_t n, uint64_t seed, float lo, float hi) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = hashed_uniform(seed, i, lo, hi);
    if constexpr (std::is_same_v<T, float>) data[i] = v;
    else data[i] = T(v);
  }
}
}  // namespace

float fill_value_host(uint64_t seed, int64_t i, float lo, float hi) { return hashed_uniform(seed, i, lo, hi); }

bool is_supported(const FillParams& p) {
  const bool type_ok = p.dtype == DType::fp32 || p.dtype == DType::bf16 || p.dtype == DType::fp8_e4m3 ||
                       p.dtype == DType::fp8_block;
  return type_ok && p.num_elements >= 0 && (p.num_elements == 0 || p.data) && p.lo <= p.hi;
}

void launch_fill_uniform(const FillParams& p, cudaStream_t stream) {
  if (!is_supported(p))
    throw InputError("fill: dtype " + std::string(to_string(p.dtype)) + " num_elements=" + std::to_string(p.num_elements) +
                     " range [" + std::to_string(p.lo) + ", " + std::to_string(p.hi) +
                     ") unsupported (need fp32, bf16, fp8 or fp8_block128, n >= 0, data set, lo <= hi)");
  if (p.num_elements == 0) return;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((p.num_elements + kThreads - 1) / kThreads, 65535));
  switch (p.dtype) {
    case DType::fp32:
      fill_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(p.data), p.num_elements, p.seed, p.lo, p.hi);
      break;
    case DType::bf16:
      fill_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(p.data), p.num_elements, p.seed, p.lo, p.hi);
      break;
    default:
      fill_kernel<__nv_fp8_e4m3><<<blocks, kThreads, 0, stream>>>(static_cast<__nv_fp8_e4m3*>(p.data), p.num_elements, p.seed, p.lo, p.hi);
      break;
  }
  MIXSERVE_LAUNCH_CHECK("fill_kernel");
}

}  // namespace mixserve::kernels
