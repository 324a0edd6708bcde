#include "mixserve/kernels/swiglu.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <algorithm>
#include <string>
#include <type_traits>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {
constexpr int kThreads = 256;
constexpr int kVecWide = 8;  // bf16 per 16-byte vector
static_assert(kVecWide * sizeof(__nv_bfloat16) == 16, "one vector must be 16 bytes");


__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

template <int kVec>
static __global__ void __launch_bounds__(kThreads) swiglu_kernel(SwigluParams p) {
  int64_t rows = p.num_rows;
  if (p.num_rows_device) rows = min(rows, int64_t(*p.num_rows_device));
  const int64_t vec_per_row = p.inter / kVec;
  const int64_t total = rows * vec_per_row;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / vec_per_row, c = (idx - r * vec_per_row) * kVec;
    const __nv_bfloat16* g = p.gate_up + r * 2 * p.inter + c;  // gate [r, c..c+kVec)
    const __nv_bfloat16* u = g + p.inter;                        // up   [r, c..c+kVec)
    __nv_bfloat16* o = p.out + r * p.inter + c;
    if constexpr (kVec == 1) {
      *o = __float2bfloat16_rn(silu_mul(__bfloat162float(*g), __bfloat162float(*u)));
    } else {
      const uint4 gr = *reinterpret_cast<const uint4*>(g), ur = *reinterpret_cast<const uint4*>(u);
      uint4 orw;
      const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&gr);
      const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&ur);
      auto* o2 = reinterpret_cast<__nv_bfloat162*>(&orw);
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) {
        const float2 gf = __bfloat1622float2(g2[j]), uf = __bfloat1622float2(u2[j]);
        o2[j] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
      }
      *reinterpret_cast<uint4*>(o) = orw;
    }
  }
}

std::string check_params(const SwigluParams& p) {
  if (p.num_rows < 0) return "num_rows=" + std::to_string(p.num_rows) + " (need >= 0)";
  if (p.inter < 1) return "inter=" + std::to_string(p.inter) + " (need >= 1)";
  if (p.num_rows > 0 && (!p.gate_up || !p.out)) return "gate_up and out must be set";
  return {};
}

// The one place runtime values become template arguments.
template <class F>
void dispatch_swiglu(int vec, F&& f) {
  if (vec == kVecWide) return f(std::integral_constant<int, kVecWide>{});
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  throw InputError("swiglu: no kernel for vector width " + std::to_string(vec) + " (legal: 1 or 8)");
}
}  // namespace

bool is_supported(const SwigluParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_swiglu(const SwigluParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("swiglu: " + err);
  if (p.num_rows == 0) return;
  int device = 0, sms = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const bool vec_ok = p.inter % kVecWide == 0 && aligned16(p.gate_up) && aligned16(p.out);
  dispatch_swiglu(vec_ok ? kVecWide : 1, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    const int64_t work = p.num_rows * (p.inter / kVec);
    // Enough blocks to fill the chip several times over; the grid-stride loop does the rest.
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * 16));
    swiglu_kernel<kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  });
  MIXSERVE_LAUNCH_CHECK("swiglu_kernel");
}

}  // namespace mixserve::kernels
