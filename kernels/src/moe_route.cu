#include "mixserve/kernels/moe_route.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"
#include "mixserve/kernels/detail/permute_device.cuh"
#include "mixserve/kernels/detail/router_device.cuh"

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {
constexpr int kWarps = 4;  // experts per block, one warp each
constexpr int kThreads = kWarps * 32;
constexpr int kVec = 8;     // bf16 per 16-byte vector
constexpr int kUnroll = 8;  // 16-byte weight loads in flight per lane
static_assert(kMoeRouteMaxTokens <= kWarps * 2, "the last block routes with a warp per token, two rounds at most");

__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float (&f)[kVec]) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec / 2; ++j) {
    const float2 v = __bfloat1622float2(h[j]);
    f[2 * j] = v.x;
    f[2 * j + 1] = v.y;
  }
}

// grid ceil(E / kWarps) blocks of kThreads; dynamic shared memory: the last block's logits
// [T, E] fp32 then the permute maps (detail::permute_maps_smem_ints).
template <int kPerLane>
static __global__ void __launch_bounds__(kThreads) moe_route_kernel(MoeRouteParams p) {
  extern __shared__ int32_t s_mem[];
  __shared__ int s_last;
  const int E = p.router.num_experts;
  const int T = static_cast<int>(p.router.num_tokens);
  const int64_t H = p.permute.hidden;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int e = int(blockIdx.x) * kWarps + warp;
  const __nv_bfloat16* wrow = p.weights + int64_t(e) * H;  // [hidden]
  // The weights do not depend on the previous kernel: start their way into L2 before waiting.
  if (e < E && lane == 0) detail::prefetch_l2(wrow, static_cast<unsigned>(H * 2));
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();

  if (e < E) {
    float acc[kMoeRouteMaxTokens];
#pragma unroll
    for (int t = 0; t < kMoeRouteMaxTokens; ++t) acc[t] = 0.0f;
    const auto* w4 = reinterpret_cast<const uint4*>(wrow);
    const int nvec = static_cast<int>(H / kVec);
    for (int v0 = lane; v0 < nvec; v0 += 32 * kUnroll) {
      uint4 wv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + 32 * u;
        wv[u] = v < nvec ? __ldg(w4 + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = v0 + 32 * u;
        if (v >= nvec) break;
        float wf[kVec];
        bf16x8_to_float(wv[u], wf);
#pragma unroll
        for (int t = 0; t < kMoeRouteMaxTokens; ++t) {
          if (t >= T) break;
          float xf[kVec];
          bf16x8_to_float(*reinterpret_cast<const uint4*>(p.permute.x + int64_t(t) * H + int64_t(v) * kVec), xf);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[t] += wf[j] * xf[j];
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMoeRouteMaxTokens; ++t) {
      if (t >= T) break;
      float s = acc[t];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) p.logits[int64_t(t) * E + e] = s;  // [num_tokens, num_experts]
    }
  }

  // Ticket: the last block to finish its logits routes and permutes.
  __threadfence();  // this thread's logits are visible device-wide before the block's ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const int before = atomicAdd(p.ticket, 1);
    s_last = before == int(gridDim.x) - 1;
    if (s_last) *p.ticket = 0;  // every block has counted: ready for the next launch (graph replays)
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  float* s_logits = reinterpret_cast<float*>(s_mem);  // [T, E]
  for (int i = threadIdx.x; i < T * E; i += kThreads) s_logits[i] = __ldcg(p.logits + i);
  __syncthreads();
  for (int t = warp; t < T; t += kWarps) detail::route_token<kPerLane>(p.router, s_logits + t * E, t, lane);
  __syncthreads();  // the top-k ids (global, written by this block) before the permute reads them
  const int pairs = T * p.router.top_k;
  const detail::PermuteMapsSmem m = detail::permute_maps_carve(s_mem + T * E, pairs, E);
  detail::permute_build_maps(p.router.topk_ids, pairs, E, m);
  detail::permute_write_maps(p.permute, pairs, m);
  detail::permute_gather_rows<kVec>(p.permute, pairs, m, 0, 1);
}

std::size_t smem_bytes(const MoeRouteParams& p) {
  const int T = static_cast<int>(p.router.num_tokens), E = p.router.num_experts;
  return sizeof(float) * std::size_t(T) * std::size_t(E) +
         sizeof(int32_t) * detail::permute_maps_smem_ints(T * p.router.top_k, E);
}
}  // namespace

std::string moe_route_unsupported_reason(const MoeRouteParams& p) {
  const RouterParams& r = p.router;
  const PermuteParams& q = p.permute;
  if (r.num_tokens < 0 || r.num_tokens > kMoeRouteMaxTokens)
    return "num_tokens=" + std::to_string(r.num_tokens) + " (legal: 0.." + std::to_string(kMoeRouteMaxTokens) +
           "; larger steps: the router GEMM, launch_router and launch_permute)";
  if (q.num_tokens != r.num_tokens || q.num_experts != r.num_experts || q.top_k != r.top_k)
    return "permute.num_tokens/num_experts/top_k=" + std::to_string(q.num_tokens) + "/" +
           std::to_string(q.num_experts) + "/" + std::to_string(q.top_k) + " differ from the router's " +
           std::to_string(r.num_tokens) + "/" + std::to_string(r.num_experts) + "/" + std::to_string(r.top_k);
  if (q.topk_ids != r.topk_ids) return "permute.topk_ids must be router.topk_ids (the permute reads the routing)";
  if (q.hidden < kVec || q.hidden % kVec != 0)
    return "hidden=" + std::to_string(q.hidden) + " (legal: a multiple of 8, >= 8)";
  if (!p.weights || !p.logits || !p.ticket || !q.x || !q.permuted_x)
    return "weights, logits, ticket, permute.x and permute.permuted_x must be set";
  if (!aligned16(p.weights) || !aligned16(q.x) || !aligned16(q.permuted_x))
    return "weights, permute.x and permute.permuted_x must be 16-byte aligned";
  RouterParams rl = r;
  rl.logits = p.logits;
  if (auto why = router_unsupported_reason(rl); !why.empty()) return "router: " + why;
  PermuteParams qv = q;  // the single-launch form needs no workspace: checked as if it had one
  qv.workspace = qv.expert_counts;
  qv.workspace_bytes = permute_workspace_bytes(q.num_tokens, q.top_k, q.num_experts);
  if (auto why = permute_unsupported_reason(qv); !why.empty()) return "permute: " + why;
  return {};
}

bool is_supported(const MoeRouteParams& p, int device) {
  return moe_route_unsupported_reason(p).empty() && detail::device_is_sm80_or_newer(device);
}

void launch_moe_route(const MoeRouteParams& p, cudaStream_t stream) {
  if (auto why = moe_route_unsupported_reason(p); !why.empty()) throw InputError("moe_route: " + why);
  if (p.router.num_tokens == 0) {  // no pairs: the permute's zero counts and offsets
    launch_permute(p.permute, stream);
    return;
  }
  const unsigned blocks = static_cast<unsigned>((p.router.num_experts + kWarps - 1) / kWarps);
  detail::dispatch_router_per_lane(p.router.num_experts, [&](auto per_lane) {
    detail::launch_kernel(p.pdl, moe_route_kernel<decltype(per_lane)::value>, dim3(blocks), dim3(kThreads),
                          smem_bytes(p), stream, p);
  });
  MIXSERVE_LAUNCH_CHECK("moe_route_kernel");
}

}  // namespace mixserve::kernels
