// Small kernels of the model forward: see model_forward_kernels.hpp.
#include "mixserve/gpu/model_forward_kernels.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {
namespace {

__global__ void gather_rows_kernel(const __nv_bfloat16* __restrict__ src, const int32_t* __restrict__ index,
                                   __nv_bfloat16* __restrict__ out, int64_t width) {
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* s = src + int64_t(index[r]) * width;
  __nv_bfloat16* o = out + r * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) o[c] = s[c];
}

__global__ void add_bias_kernel(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                                int64_t num_rows, int64_t width) {
  const int64_t n = num_rows * width;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(bias[i % width]));
}

constexpr int kLinearThreads = 256;

// One block per row; x row staged in shared memory as fp32; warp w computes columns w, w + 8, ...
__global__ void linear_fp32_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                   float* __restrict__ out, int n, int width) {
  extern __shared__ float xs[];
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) xs[c] = __bfloat162float(xr[c]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = warp; j < n; j += kLinearThreads / 32) {
    const __nv_bfloat16* wr = w + int64_t(j) * width;
    float acc = 0.0f;
    if (width % 8 == 0 && (reinterpret_cast<uintptr_t>(w) & 15) == 0) {
      for (int c = lane * 8; c < width; c += 32 * 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(wr + c);
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = __bfloat1622float2(p[q]);
          acc += f.x * xs[c + 2 * q] + f.y * xs[c + 2 * q + 1];
        }
      }
    } else {
      for (int c = lane; c < width; c += 32) acc += __bfloat162float(wr[c]) * xs[c];
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[r * n + j] = acc;
  }
}

}  // namespace

void launch_gather_rows(const __nv_bfloat16* src, const int32_t* index, __nv_bfloat16* out, int64_t num_rows,
                        int64_t width, cudaStream_t stream) {
  if (num_rows < 0 || width < 1) throw InputError("gather_rows: num_rows >= 0 and width >= 1 required");
  if (num_rows == 0) return;
  gather_rows_kernel<<<static_cast<unsigned>(num_rows), 256, 0, stream>>>(src, index, out, width);
  MIXSERVE_LAUNCH_CHECK("gather_rows_kernel");
}

void launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t num_rows, int64_t width,
                     cudaStream_t stream) {
  if (num_rows < 0 || width < 1) throw InputError("add_bias: num_rows >= 0 and width >= 1 required");
  if (num_rows == 0) return;
  const int64_t n = num_rows * width;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  add_bias_kernel<<<blocks, 256, 0, stream>>>(x, bias, num_rows, width);
  MIXSERVE_LAUNCH_CHECK("add_bias_kernel");
}

void launch_linear_fp32(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int64_t num_rows, int n,
                        int width, cudaStream_t stream) {
  if (num_rows < 0 || n < 1 || width < 1 || width > kLinearFp32MaxWidth)
    throw InputError("linear_fp32: num_rows=" + std::to_string(num_rows) + " n=" + std::to_string(n) +
                     " width=" + std::to_string(width) + " (need num_rows >= 0, n >= 1, 1 <= width <= " +
                     std::to_string(kLinearFp32MaxWidth) + ")");
  if (num_rows == 0) return;
  const std::size_t smem = std::size_t(width) * sizeof(float);
  if (smem > 48 * 1024)
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(linear_fp32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  linear_fp32_kernel<<<static_cast<unsigned>(num_rows), kLinearThreads, smem, stream>>>(x, w, out, n, width);
  MIXSERVE_LAUNCH_CHECK("linear_fp32_kernel");
}

}  // namespace mixserve::gpu
