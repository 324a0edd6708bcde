#include "mixserve/kernels/combine.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

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


template <int kVec>
__device__ __forceinline__ void axpy_vec(const __nv_bfloat16* src, float w, float (&acc)[kVec]) {
  if constexpr (kVec == 1) {
    acc[0] += w * __bfloat162float(*src);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j) {
      const float2 v = __bfloat1622float2(h[j]);
      acc[2 * j] += w * v.x;
      acc[2 * j + 1] += w * v.y;
    }
  }
}

// One block per token: rows and weights staged in shared memory, threads over hidden vectors.
template <int kVec>
static __global__ void __launch_bounds__(kThreads) combine_kernel(CombineParams p) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  __shared__ int64_t s_row[kCombineMaxTopK];  // [top_k], < 0: no contribution
  __shared__ float s_w[kCombineMaxTopK];      // [top_k]
  __shared__ float s_gate;
  const int64_t t = blockIdx.x;
  if (threadIdx.x < p.top_k) {
    s_row[threadIdx.x] = p.slot_row[t * p.top_k + threadIdx.x];
    s_w[threadIdx.x] = p.topk_weights[t * p.top_k + threadIdx.x];
  }
  if (threadIdx.x == 0) s_gate = p.shared_gate ? 1.0f / (1.0f + expf(-p.shared_gate[t])) : 1.0f;
  __syncthreads();
  const int64_t num_vec = p.hidden / kVec;
  for (int64_t v = threadIdx.x; v < num_vec; v += kThreads) {
    float acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = 0.0f;
    for (int j = 0; j < p.top_k; ++j)  // fixed slot order: deterministic
      if (s_row[j] >= 0) axpy_vec<kVec>(p.expert_out + s_row[j] * p.hidden + v * kVec, s_w[j], acc);
    if (p.shared_out) axpy_vec<kVec>(p.shared_out + t * p.hidden + v * kVec, s_gate, acc);
    __nv_bfloat16* o = p.out + t * p.hidden + v * kVec;  // [num_tokens, hidden]
    if constexpr (kVec == 1) {
      *o = __float2bfloat16_rn(acc[0]);
    } else {
      uint4 raw;
      auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) h[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
      *reinterpret_cast<uint4*>(o) = raw;
    }
  }
}

std::string check_params(const CombineParams& p) {
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff)
    return "num_tokens=" + std::to_string(p.num_tokens) + " (legal: 0..2^31-1)";
  if (p.top_k < 1 || p.top_k > kCombineMaxTopK)
    return "top_k=" + std::to_string(p.top_k) + " (legal: 1.." + std::to_string(kCombineMaxTopK) + ")";
  if (p.hidden < 1) return "hidden=" + std::to_string(p.hidden) + " (need >= 1)";
  if (p.shared_gate && !p.shared_out) return "shared_gate is set without shared_out";
  if (p.num_tokens > 0 && (!p.expert_out || !p.slot_row || !p.topk_weights || !p.out))
    return "expert_out, slot_row, topk_weights and out must be set";
  return {};
}

// The one place runtime values become template arguments.
template <class F>
void dispatch_combine(int vec, F&& f) {
  if (vec == kVecWide) return f(std::integral_constant<int, kVecWide>{});
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  throw InputError("combine: no kernel for vector width " + std::to_string(vec) + " (legal: 1 or 8)");
}
}  // namespace

bool is_supported(const CombineParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_combine(const CombineParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("combine: " + err);
  if (p.num_tokens == 0) return;
  const bool vec_ok = p.hidden % kVecWide == 0 && aligned16(p.expert_out) && aligned16(p.out) &&
                      (!p.shared_out || aligned16(p.shared_out));
  dispatch_combine(vec_ok ? kVecWide : 1, [&](auto vec) {
    detail::launch_kernel(p.pdl, combine_kernel<decltype(vec)::value>, dim3(static_cast<unsigned>(p.num_tokens)),
                          dim3(kThreads), 0, stream, p);
  });
  MIXSERVE_LAUNCH_CHECK("combine_kernel");
}

}  // namespace mixserve::kernels
