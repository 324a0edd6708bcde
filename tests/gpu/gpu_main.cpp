// doctest main for GPU tests: without a visible CUDA device the binary prints
// "skipped: no GPU" and exits with 77, which CTest reports as skipped (SKIP_RETURN_CODE), never
// as passed. MIXSERVE_GPU_TEST_MIN_DEVICES (compile definition) raises the device count needed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "mixserve/gpu/runtime.hpp"

#ifndef MIXSERVE_GPU_TEST_MIN_DEVICES
#define MIXSERVE_GPU_TEST_MIN_DEVICES 1
#endif

int main(int argc, char** argv) {
  const int n = mixserve::gpu::device_count_or_zero();
  if (n < MIXSERVE_GPU_TEST_MIN_DEVICES) {
    std::printf("skipped: no GPU (%d CUDA device(s) visible, %d needed)\n", n, MIXSERVE_GPU_TEST_MIN_DEVICES);
    return 77;
  }
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  return ctx.run();
}
