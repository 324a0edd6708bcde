#include "mixserve/kernels/router.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

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
constexpr unsigned kFull = 0xffffffffu;

// (value desc, id asc): does (va, ia) beat (vb, ib)?
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}
// Warp-wide arg-max under beats(); every lane ends with the winner.
__device__ __forceinline__ void warp_argmax(float& v, int& id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, off);
    const int oi = __shfl_xor_sync(kFull, id, off);
    if (beats(ov, oi, v, id)) {
      v = ov;
      id = oi;
    }
  }
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// One warp per token; lane l holds experts l + 32 j, j < kPerLane.
template <int kPerLane>
static __global__ void __launch_bounds__(kThreads) router_kernel(RouterParams p) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= p.num_tokens) return;  // the whole warp leaves together
  const int E = p.num_experts;
  const float* lg = p.logits + t * E;  // [num_experts]
  const float kNegInf = -INFINITY;
  float logit[kPerLane], sel[kPerLane];  // selection score per held expert (-inf: not eligible)
  bool present[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int e = lane + 32 * j;
    present[j] = e < E;
    logit[j] = present[j] ? lg[e] : kNegInf;
    sel[j] = logit[j];
    // Sigmoid scores are needed for selection only when a bias is added or groups are summed;
    // otherwise the logits order the experts identically.
    if (p.scoring == RouterScoring::sigmoid && (p.correction_bias || p.num_groups > 1) && present[j])
      sel[j] = sigmoidf(logit[j]) + (p.correction_bias ? p.correction_bias[e] : 0.0f);
  }
  if (p.num_groups > 1) {
    // Group score = sum of the two best selection scores in the group (one if the group has one).
    const int group_size = E / p.num_groups;
    float gscore = kNegInf;  // lane g < num_groups keeps group g's score
    for (int g = 0; g < p.num_groups; ++g) {
      float b1 = kNegInf, b2 = kNegInf;
      int i1 = INT_MAX;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int e = lane + 32 * j;
        if (present[j] && e / group_size == g && beats(sel[j], e, b1, i1)) {
          b2 = b1;
          b1 = sel[j];
          i1 = e;
        } else if (present[j] && e / group_size == g && sel[j] > b2) {
          b2 = sel[j];
        }
      }
      // Merge the lanes' (best, second) pairs: the top two of the union.
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float o1 = __shfl_xor_sync(kFull, b1, off), o2 = __shfl_xor_sync(kFull, b2, off);
        const float n1 = fmaxf(b1, o1);
        const float n2 = fmaxf(fminf(b1, o1), fmaxf(b2, o2));
        b1 = n1;
        b2 = n2;
      }
      const float score = group_size >= 2 ? b1 + b2 : b1;
      if (lane == g) gscore = score;
    }
    // Keep the topk_groups best groups (lower group id wins ties).
    unsigned keep = 0;
    int gid = lane < p.num_groups ? lane : INT_MAX;
    float gv = lane < p.num_groups ? gscore : kNegInf;
    for (int r = 0; r < p.topk_groups; ++r) {
      float v = gv;
      int id = gid;
      warp_argmax(v, id);
      keep |= 1u << id;
      if (lane == id) {
        gv = kNegInf;
        gid = INT_MAX;
      }
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (present[j] && !((keep >> ((lane + 32 * j) / group_size)) & 1u)) sel[j] = kNegInf;
  }
  // top_k rounds of the warp arg-max; lane r keeps the r-th id.
  unsigned taken = 0;
  int my_id = -1;
  for (int r = 0; r < p.top_k; ++r) {
    float v = kNegInf;
    int id = INT_MAX;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (present[j] && !((taken >> j) & 1u) && beats(sel[j], lane + 32 * j, v, id)) {
        v = sel[j];
        id = lane + 32 * j;
      }
    warp_argmax(v, id);
    if (lane == r) my_id = id;
    if (lane == (id & 31)) taken |= 1u << (id >> 5);
  }
  // Weights: lane r < top_k handles slot r.
  const bool mine = lane < p.top_k;
  const float x = mine ? lg[my_id] : 0.0f;
  float w = 0.0f;
  if (p.scoring == RouterScoring::softmax_topk) {
    float m = kNegInf;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) m = fmaxf(m, logit[j]);
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if (present[j]) s += expf(logit[j] - m);
    s = warp_sum(s);
    w = mine ? expf(x - m) / s : 0.0f;
  } else if (p.scoring == RouterScoring::topk_softmax) {
    const float m = __shfl_sync(kFull, x, 0);  // slot 0 holds the largest logit
    w = mine ? expf(x - m) : 0.0f;
    w /= warp_sum(w);
  } else {
    w = mine ? sigmoidf(x) : 0.0f;
  }
  if (p.renormalize && p.scoring != RouterScoring::topk_softmax) w /= warp_sum(w);
  if (mine) {
    p.topk_ids[t * p.top_k + lane] = my_id;
    p.topk_weights[t * p.top_k + lane] = w * p.routed_scaling;
  }
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

// The one place runtime values become template arguments: registers per lane from num_experts.
template <class F>
void dispatch_router(int num_experts, F&& f) {
  using std::integral_constant;
  if (num_experts >= 1 && num_experts <= 32) return f(integral_constant<int, 1>{});
  if (num_experts > 32 && num_experts <= 64) return f(integral_constant<int, 2>{});
  if (num_experts > 64 && num_experts <= 128) return f(integral_constant<int, 4>{});
  if (num_experts > 128 && num_experts <= 256) return f(integral_constant<int, 8>{});
  throw InputError("router: no kernel for num_experts=" + std::to_string(num_experts) +
                   " (legal: 1..256; kernels for <= 32, <= 64, <= 128, <= 256 experts)");
}
}  // namespace

bool is_supported(const RouterParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_router(const RouterParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("router: " + err);
  if (p.num_tokens == 0) return;
  const int64_t blocks = (p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) throw InputError("router: num_tokens=" + std::to_string(p.num_tokens) + " exceeds the grid");
  dispatch_router(p.num_experts, [&](auto per_lane) {
    detail::launch_kernel(p.pdl, router_kernel<decltype(per_lane)::value>, dim3(static_cast<unsigned>(blocks)),
                          dim3(kThreads), 0, stream, p);
  });
  MIXSERVE_LAUNCH_CHECK("router_kernel");
}

}  // namespace mixserve::kernels
