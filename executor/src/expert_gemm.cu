// Grouped expert GEMV over device-side expert offsets: see expert_gemm.hpp.
#include "mixserve/gpu/expert_gemm.hpp"

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = kGroupedGemvColsPerBlock;
constexpr int kRows = kGroupedGemvRowsPerChunk;
static_assert(kCols % kWarps == 0, "every warp owns the same number of columns");

__global__ void __launch_bounds__(kThreads) grouped_gemv_kernel(GroupedGemvParams p) {
  extern __shared__ uint4 smem[];  // [kRows, k / 8] activation rows as 16-byte vectors
  const int e = blockIdx.y;
  const int row_begin = p.expert_offsets[e], row_end = p.expert_offsets[e + 1];
  if (row_end <= row_begin) return;
  const int64_t kv = p.k / 8;  // 16-byte vectors per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const __nv_bfloat16* w = p.weights + int64_t(e) * p.n * p.k;
  for (int r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int nr = min(kRows, row_end - r0);
    __syncthreads();  // previous chunk's readers are done
    const uint4* a = reinterpret_cast<const uint4*>(p.act + int64_t(r0) * p.k);
    for (int64_t i = threadIdx.x; i < int64_t(nr) * kv; i += kThreads) smem[i] = a[i];
    __syncthreads();
    for (int cc = 0; cc < kCols / kWarps; ++cc) {
      const int64_t col = int64_t(blockIdx.x) * kCols + warp * (kCols / kWarps) + cc;
      const uint4* wr = reinterpret_cast<const uint4*>(w + col * p.k);
      float acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
#pragma unroll 4
      for (int64_t v = lane; v < kv; v += 32) {
        const uint4 wv = __ldg(wr + v);
        const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
        float2 wf[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) wf[q] = __bfloat1622float2(w2[q]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < nr) {
            const uint4 av = smem[r * kv + v];
            const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&av);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float2 af = __bfloat1622float2(a2[q]);
              acc[r] += wf[q].x * af.x + wf[q].y * af.y;
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      }
      if (lane == 0) {
        for (int r = 0; r < nr; ++r) p.out[int64_t(r0 + r) * p.n + col] = __float2bfloat16(acc[r]);
      }
    }
  }
}

}  // namespace

std::string grouped_gemv_unsupported_reason(const GroupedGemvParams& p) {
  if (p.num_experts < 1 || p.num_experts > 65535)
    return "num_experts=" + std::to_string(p.num_experts) + " (legal: 1..65535)";
  if (p.k < 8 || p.k % 8 != 0 || p.k > kGroupedGemvMaxK)
    return "k=" + std::to_string(p.k) + " (legal: a multiple of 8 in 8.." + std::to_string(kGroupedGemvMaxK) + ")";
  if (p.n < kCols || p.n % kCols != 0)
    return "n=" + std::to_string(p.n) + " (legal: a positive multiple of " + std::to_string(kCols) + ")";
  if (!p.act || !p.weights || !p.out || !p.expert_offsets)
    return "a null pointer (act, weights, out, expert_offsets must be set)";
  if ((reinterpret_cast<uintptr_t>(p.act) | reinterpret_cast<uintptr_t>(p.weights)) % 16 != 0)
    return "act or weights not 16-byte aligned";
  return "";
}

void launch_grouped_gemv(const GroupedGemvParams& p, cudaStream_t stream) {
  const std::string why = grouped_gemv_unsupported_reason(p);
  if (!why.empty()) throw InputError("grouped_gemv: unsupported parameters: " + why);
  const std::size_t smem = std::size_t(kRows) * std::size_t(p.k) * 2;
  if (smem > 48 * 1024)
    MIXSERVE_CUDA_CHECK(
        cudaFuncSetAttribute(grouped_gemv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.n / kCols), static_cast<unsigned>(p.num_experts));
  grouped_gemv_kernel<<<grid, kThreads, smem, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("grouped_gemv_kernel");
}

}  // namespace mixserve::gpu
