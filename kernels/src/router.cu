#include "mixserve/kernels/router.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"
#include "mixserve/kernels/detail/router_device.cuh"

#include <climits>
#include <cmath>
#include <string>
#include <type_traits>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {

std::string_view to_string(RouterScoring s) {
  switch (s) {
#define MIXSERVE_X(name) \
  case RouterScoring::name: return #name;
    MIXSERVE_ROUTER_SCORINGS(MIXSERVE_X)
#undef MIXSERVE_X
  }
  return "?";
}

namespace {
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;

// One warp per token; lane l holds experts l + 32 j, j < kPerLane (detail/router_device.cuh).
template <int kPerLane>
static __global__ void __launch_bounds__(kThreads) router_kernel(RouterParams p) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= p.num_tokens) return;  // the whole warp leaves together
  detail::route_token<kPerLane>(p, p.logits + t * p.num_experts, t, lane);
}

std::string check_params(const RouterParams& p) {
  if (p.num_tokens < 0) return "num_tokens=" + std::to_string(p.num_tokens) + " (need >= 0)";
  if (p.num_experts < 1 || p.num_experts > kRouterMaxExperts)
    return "num_experts=" + std::to_string(p.num_experts) + " (legal: 1.." + std::to_string(kRouterMaxExperts) + ")";
  if (p.top_k < 1 || p.top_k > kRouterMaxTopK || p.top_k > p.num_experts)
    return "top_k=" + std::to_string(p.top_k) + " (legal: 1..min(" + std::to_string(kRouterMaxTopK) +
           ", num_experts=" + std::to_string(p.num_experts) + "))";
  if (!(p.routed_scaling > 0.0f) || !std::isfinite(p.routed_scaling))
    return "routed_scaling=" + std::to_string(p.routed_scaling) + " (need finite and > 0)";
  if (p.correction_bias && p.scoring != RouterScoring::sigmoid)
    return "correction_bias with scoring " + std::string(to_string(p.scoring)) + " (legal only with sigmoid)";
  if (p.num_groups < 1 || p.num_groups > kRouterMaxGroups || p.num_experts % p.num_groups != 0)
    return "num_groups=" + std::to_string(p.num_groups) + " (legal: 1.." + std::to_string(kRouterMaxGroups) +
           " dividing num_experts=" + std::to_string(p.num_experts) + ")";
  if (p.num_groups > 1 && p.scoring != RouterScoring::sigmoid)
    return "num_groups=" + std::to_string(p.num_groups) + " with scoring " + std::string(to_string(p.scoring)) +
           " (group-limited routing is legal only with sigmoid)";
  if (p.topk_groups < 1 || p.topk_groups > p.num_groups)
    return "topk_groups=" + std::to_string(p.topk_groups) + " (legal: 1..num_groups=" + std::to_string(p.num_groups) + ")";
  if (int64_t(p.topk_groups) * (p.num_experts / p.num_groups) < p.top_k)
    return "topk_groups=" + std::to_string(p.topk_groups) + " keeps " +
           std::to_string(p.topk_groups * (p.num_experts / p.num_groups)) + " experts, fewer than top_k=" +
           std::to_string(p.top_k);
  if (p.num_tokens > 0 && (!p.logits || !p.topk_ids || !p.topk_weights))
    return "logits, topk_ids and topk_weights must be set";
  return {};
}

}  // namespace

std::string router_unsupported_reason(const RouterParams& p) { return check_params(p); }

bool is_supported(const RouterParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_router(const RouterParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("router: " + err);
  if (p.num_tokens == 0) return;
  const int64_t blocks = (p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) throw InputError("router: num_tokens=" + std::to_string(p.num_tokens) + " exceeds the grid");
  detail::dispatch_router_per_lane(p.num_experts, [&](auto per_lane) {
    detail::launch_kernel(p.pdl, router_kernel<decltype(per_lane)::value>, dim3(static_cast<unsigned>(blocks)),
                          dim3(kThreads), 0, stream, p);
  });
  MIXSERVE_LAUNCH_CHECK("router_kernel");
}

}  // namespace mixserve::kernels
