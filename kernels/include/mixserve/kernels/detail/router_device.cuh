// Device side of the router (router.cuh): the per-token top-k of router_kernel, shared with the
// fused router + permute launch (moe_route.cuh) so that both route identically, bit for bit.
// Include from .cu files only.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cuda_runtime.h>

#include "mixserve/core/error.hpp"
#include "mixserve/kernels/router.cuh"

namespace mixserve::kernels::detail {

inline constexpr unsigned kRouterFullMask = 0xffffffffu;

// (value desc, id asc): does (va, ia) beat (vb, ib)?
__device__ __forceinline__ bool beats(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}
// A 32-bit key ordered as beats() orders values: a larger float has a larger key, -0 and +0 are
// equal, 0 is below every value (the key of an expert that is not eligible), and NaN, which never
// beats anything, maps to 0 too.
__device__ __forceinline__ unsigned order_key(float v) {
  if (v != v) return 0u;
  const unsigned b = __float_as_uint(v + 0.0f);  // -0 + 0 = +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// Warp-wide arg-max under beats(); every lane ends with the winner.
__device__ __forceinline__ void warp_argmax(float& v, int& id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kRouterFullMask, v, off);
    const int oi = __shfl_xor_sync(kRouterFullMask, id, off);
    if (beats(ov, oi, v, id)) {
      v = ov;
      id = oi;
    }
  }
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kRouterFullMask, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kRouterFullMask, v, off));
  return v;
}
__device__ __forceinline__ float router_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// Top-k ids and weights of token t from its logits lg [num_experts] (global or shared memory), one
// warp: lane l holds experts l + 32 j, j < kPerLane (kPerLane * 32 >= num_experts). Writes
// p.topk_ids[t, :] and p.topk_weights[t, :]; p.logits is not read. The whole warp must call it.
template <int kPerLane>
__device__ __forceinline__ void route_token(const RouterParams& p, const float* lg, int64_t t, int lane) {
  const int E = p.num_experts;
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
      sel[j] = router_sigmoidf(logit[j]) + (p.correction_bias ? p.correction_bias[e] : 0.0f);
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
        const float o1 = __shfl_xor_sync(kRouterFullMask, b1, off), o2 = __shfl_xor_sync(kRouterFullMask, b2, off);
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
  // top_k rounds of the warp arg-max under beats(); lane r keeps the r-th id. Each round is two
  // warp reductions of 32-bit keys (redux.sync, sm_80+) instead of 5 rounds of shuffling
  // (value, id) pairs: the largest order key, then the lowest id holding it.
  unsigned key[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) key[j] = present[j] ? order_key(sel[j]) : 0u;
  unsigned taken = 0;
  int my_id = -1;
  for (int r = 0; r < p.top_k; ++r) {
    unsigned best = 0;
    int id = INT_MAX;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)  // j ascending: the lane's lowest id among its equal keys
      if (!((taken >> j) & 1u) && key[j] > best) {
        best = key[j];
        id = lane + 32 * j;
      }
    const unsigned top = __reduce_max_sync(kRouterFullMask, best);
    const unsigned won = __reduce_min_sync(kRouterFullMask, top != 0u && best == top ? unsigned(id) : UINT_MAX);
    id = won == UINT_MAX ? INT_MAX : int(won);  // INT_MAX: nothing eligible left (as beats() leaves it)
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
    const float m = __shfl_sync(kRouterFullMask, x, 0);  // slot 0 holds the largest logit
    w = mine ? expf(x - m) : 0.0f;
    w /= warp_sum(w);
  } else {
    w = mine ? router_sigmoidf(x) : 0.0f;
  }
  if (p.renormalize && p.scoring != RouterScoring::topk_softmax) w /= warp_sum(w);
  if (mine) {
    p.topk_ids[t * p.top_k + lane] = my_id;
    p.topk_weights[t * p.top_k + lane] = w * p.routed_scaling;
  }
}

// The one place runtime values become template arguments: registers per lane from num_experts
// (router_kernel and the fused router + permute).
template <class F>
void dispatch_router_per_lane(int num_experts, F&& f) {
  using std::integral_constant;
  if (num_experts >= 1 && num_experts <= 32) return f(integral_constant<int, 1>{});
  if (num_experts > 32 && num_experts <= 64) return f(integral_constant<int, 2>{});
  if (num_experts > 64 && num_experts <= 128) return f(integral_constant<int, 4>{});
  if (num_experts > 128 && num_experts <= 256) return f(integral_constant<int, 8>{});
  throw InputError("router: no kernel for num_experts=" + std::to_string(num_experts) +
                   " (legal: 1..256; kernels for <= 32, <= 64, <= 128, <= 256 experts)");
}

}  // namespace mixserve::kernels::detail
