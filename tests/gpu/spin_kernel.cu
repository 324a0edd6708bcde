// A kernel that runs for a known wall time: one thread spins until the GPU's global nanosecond
// timer has advanced by `ns`. Used to check the timing helper against a known lower bound.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "mixserve/gpu/check.hpp"

namespace mixserve::test {

namespace {
__device__ inline uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
static __global__ void spin_kernel(uint64_t ns) {
  const uint64_t start = global_ns();
  while (global_ns() - start < ns) {
  }
}
}  // namespace

void launch_spin(uint64_t ns, cudaStream_t s) {
  spin_kernel<<<1, 1, 0, s>>>(ns);
  MIXSERVE_LAUNCH_CHECK("spin_kernel");
}

}  // namespace mixserve::test
