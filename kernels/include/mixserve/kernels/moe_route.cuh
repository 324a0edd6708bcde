// Router logits + top-k + permute in one launch, for decode-sized steps (<= kMoeRouteMaxTokens
// tokens): what the router GEMV (fp32 logits), launch_router and the one-launch launch_permute
// produce, in one kernel.
//   logits[t, e] = sum_c x[t, c] * w[e, c]          (bf16 in, fp32 accumulate and out)
//   topk ids / weights of every token               exactly router.cuh's rules and order
//   counts, offsets, slot_row, permuted_token, permuted_x   exactly permute.cuh's
// Routing and maps are bit-identical to launch_router + launch_permute on the same logits (the
// same device code: detail/router_device.cuh, detail/permute_device.cuh). The logits themselves
// are summed in another order than the GEMV's (expert_gemm.hpp), so they may differ from its
// logits in the last bits.
// Algorithm: one warp per expert (4 per block) streams its weight row in 16-byte loads (issued
// before the previous kernel is waited for: an L2 prefetch of the block's rows) and dots it with
// the T token rows (L1-resident), reduced by shuffles. Each block then fences its logits and takes
// a ticket (atomic counter); the last block to arrive resets the counter to zero (for the next
// launch and CUDA-graph replays), stages all logits in shared memory (read through L2), routes
// (a warp per token), rebuilds the permute maps in shared memory, writes them and gathers the
// T * top_k rows.
// Sync contract: stream order only; the ticket must not be shared by concurrent launches.
// Requirements: SM >= 8.0 (PDL and the L2 prefetch: sm_90, no-ops before); hidden a multiple of 8;
// x, w and the permute's x / permuted_x 16-byte aligned.
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "mixserve/kernels/permute.cuh"
#include "mixserve/kernels/router.cuh"

namespace mixserve::kernels {

inline constexpr int kMoeRouteMaxTokens = 8;

struct MoeRouteParams {
  const __nv_bfloat16* weights = nullptr;  // [num_experts, hidden] router weight (Linear [out, in])
  float* logits = nullptr;                 // [num_tokens, num_experts] fp32, written
  // The router's rules and outputs (router.num_tokens, num_experts, top_k, scoring, ...);
  // router.logits is ignored (the kernel's own logits are routed).
  RouterParams router;
  // The permute's outputs and x (permute.x: the token rows [num_tokens, hidden], also the input of
  // the logits; permute.topk_ids must be router.topk_ids; num_tokens, top_k and num_experts equal
  // the router's). permute.workspace is not used (single-launch form).
  PermuteParams permute;
  int32_t* ticket = nullptr;  // one int32, zero before the first launch; every launch leaves it zero
  // Programmatic dependent launch (kernels/detail/pdl.cuh): the weights are prefetched into L2
  // before the wait for the previous kernel.
  bool pdl = false;
};

// "" when supported, else why not (legal values named).
std::string moe_route_unsupported_reason(const MoeRouteParams& p);
bool is_supported(const MoeRouteParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_moe_route(const MoeRouteParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
