// Programmatic dependent launch (PDL, sm_90): a kernel launched with `pdl` may be scheduled while
// the previous kernel of its stream is still finishing; it must call wait_for_previous_kernel()
// before it touches any memory (read or write), which returns once that kernel has completed and
// its writes are visible. This hides the launch latency between the small dependent kernels of a
// decode step (also inside a CUDA graph, where the edge becomes a programmatic one). Without the
// attribute, or before sm_90, the wait is a no-op and the launch is an ordinary one.
// Include from .cu files only.
#pragma once
#include <cstddef>
#include <utility>

#include <cuda_runtime.h>

#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels::detail {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the stream's next kernel, when it was launched with `pdl`, be scheduled now instead of when
// this kernel's blocks exit; it still waits in wait_for_previous_kernel() until this kernel has
// completed, so this changes no result. A kernel launched with `pdl` calls it after its own wait,
// so at most one kernel ahead is resident early; a kernel launched without it (attention, its
// merge) may call it at entry. The next one can meanwhile do work that does not depend on this
// one (the GEMV prefetches its weights into L2). A no-op without such a dependent.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asynchronous L2 prefetch hint of [p, p + bytes): p 16-byte aligned, bytes a multiple of 16 (sm_90;
// elsewhere a no-op). For data no earlier kernel writes (weights), so it may precede the wait.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when `pdl`.
template <class... KArgs, class... Args>
void launch_kernel(bool pdl, void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (!pdl) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  MIXSERVE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace mixserve::kernels::detail
