// Router top-k: from the router GEMM's fp32 logits, the top_k expert ids and their weights per
// token, with the scoring rules of the supported models:
//   softmax_topk  p = softmax(logits) over all experts; select the top_k p; w = p (Qwen2/Qwen3-MoE,
//                 Mixtral, OLMoE; renormalize: w /= sum(w), Mixtral and Qwen3 norm_topk_prob)
//   topk_softmax  select the top_k logits; w = softmax over those k (gpt-oss); always sums to 1
//   sigmoid       s = sigmoid(logits); select the top_k (s + correction_bias); w = s (the bias only
//                 steers selection), renormalize optional (DeepSeek-V3), optionally group-limited:
//                 experts in num_groups equal groups, a group's score = the sum of its two best
//                 (s + bias), only the topk_groups best groups are eligible (masked with -inf, as
//                 vLLM's grouped_topk)
// then every weight is multiplied by routed_scaling (1 for all but DeepSeek-V3, 2.5).
// Selection is on the logits themselves where the score is monotone in them (softmax modes and
// sigmoid without bias or groups), so it does not depend on exp rounding.
// Ties: the LOWER expert id wins (also for groups: the lower group id). Ids come out in
// descending score order. Logits must be finite.
// Algorithm: one warp per token; lane l holds experts l, l+32, ... (ceil(E/32) rounded up to a
// power of two registers: template); top_k rounds of a warp arg-max by butterfly shuffles with the
// (score desc, id asc) order; softmax max/sum by warp reductions (fixed order: deterministic).
// Sync contract: stream order only. Requirements: SM >= 8.0.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include <cuda_runtime_api.h>

namespace mixserve::kernels {

#define MIXSERVE_ROUTER_SCORINGS(X) \
  X(softmax_topk)                   \
  X(topk_softmax)                   \
  X(sigmoid)

enum class RouterScoring {
#define MIXSERVE_X(name) name,
  MIXSERVE_ROUTER_SCORINGS(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(RouterScoring s);

inline constexpr int kRouterMaxExperts = 256;
inline constexpr int kRouterMaxTopK = 8;
inline constexpr int kRouterMaxGroups = 32;

struct RouterParams {
  const float* logits = nullptr;           // [num_tokens, num_experts]
  const float* correction_bias = nullptr;  // [num_experts] or null; sigmoid scoring only
  int32_t* topk_ids = nullptr;             // [num_tokens, top_k], descending score
  float* topk_weights = nullptr;           // [num_tokens, top_k]
  int64_t num_tokens = 0;
  int num_experts = 0;                     // 1..kRouterMaxExperts
  int top_k = 0;                           // 1..min(kRouterMaxTopK, num_experts)
  RouterScoring scoring = RouterScoring::softmax_topk;
  bool renormalize = false;                // w /= sum of the k weights (softmax_topk, sigmoid)
  float routed_scaling = 1.0f;             // > 0
  int num_groups = 1;                      // sigmoid only; divides num_experts, <= kRouterMaxGroups
  int topk_groups = 1;                     // groups kept, 1..num_groups, enough experts for top_k
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;
};

// "" when the parameters are legal (the device is not checked), else why not, naming the legal values.
std::string router_unsupported_reason(const RouterParams& p);
bool is_supported(const RouterParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_router(const RouterParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
