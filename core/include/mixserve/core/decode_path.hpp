// Which kernels the executor's forward step runs, read by the executor (executor/src/
// model_forward.cpp, GpuModel) and by the cost model (simulator/src/cost_model.cpp), so the
// launches the cost model counts and costs are the ones the executor makes (docs/profile-h200.md
// "What the cost model mirrors"). The expert kernel's rule is core/expert_path.hpp.
#pragma once
#include <cstdint>
#include <string_view>

#include "mixserve/core/expert_path.hpp"

namespace mixserve {

// The decode kernels (docs/forward.md "Decode step", GpuModelConfig::decode_kernels) run on an
// unsharded model only: a sharded one (any of attn TP/DP, MoE TP/EP, PP > 1) keeps the previous
// kernels (verified on the whole model only, docs/distributed.md).
inline constexpr bool decode_kernels_enabled(bool requested, bool sharded) { return requested && !sharded; }

// Steps of at most this many tokens run the dense projections (fused q|k|v with bias, o_proj,
// shared/dense FFN with SwiGLU fused into its down projection) on the bandwidth GEMV
// (executor/expert_gemm.hpp launch_gemv) instead of cuBLASLt.
inline constexpr int64_t kDecodeGemvMaxTokens = 8;
inline constexpr bool uses_dense_gemv(bool decode_kernels, int64_t tokens) {
  return decode_kernels && tokens <= kDecodeGemvMaxTokens;
}
// One projection of inner size k in such a step: the GEMV when the kernel takes k
// (core/expert_path.hpp gemv_k_fits), else the cuBLASLt GEMM.
inline constexpr bool dense_gemv_for(bool decode_kernels, int64_t tokens, int64_t k) {
  return uses_dense_gemv(decode_kernels, tokens) && gemv_k_fits(k);
}

// Router logits (fp32 out): the GEMV for the steps that take the dense GEMV, else the fp32
// linear (launch_linear_fp32).
inline constexpr bool router_uses_gemv(bool decode_kernels, int64_t tokens) {
  return uses_dense_gemv(decode_kernels, tokens);
}

// Router logits, top-k and the permute in one launch (kernels/moe_route.cuh) for the steps that
// take the dense GEMV: one launch instead of the router GEMV, the top-k and the one-launch permute.
// Off by default (GpuModelConfig::fused_moe_route): on the H200 the fused launch made the 48-layer
// b=1 decode step slower (session 4 call 2, docs/forward.md), its last block routes and permutes
// alone after the logits.
inline constexpr bool kFusedMoeRouteDefault = false;
inline constexpr bool uses_fused_moe_route(bool decode_kernels, int64_t tokens, bool enabled = kFusedMoeRouteDefault) {
  return enabled && uses_dense_gemv(decode_kernels, tokens);
}

// Grouped expert GEMV v2 (launch_grouped_gemv_v2: SwiGLU fused into the down projection, only the
// experts with rows) up to this many tokens when the device GEMV path is taken
// (core/expert_path.hpp), v1 (launch_grouped_gemv + a SwiGLU launch) above.
inline constexpr int64_t kGroupedGemvV2MaxTokens = kDecodeGemvMaxTokens;
inline constexpr bool uses_grouped_gemv_v2(bool decode_kernels, int64_t tokens,
                                           int64_t v2_max_tokens = kGroupedGemvV2MaxTokens) {
  return decode_kernels && tokens <= v2_max_tokens;
}

// The fused batch-1 decode layer (executor gpu/decode_layer.hpp): a step of one sequence and one
// token with the decode kernels runs the MoE layers the kernel supports in one launch (consecutive
// layers together). Off by default (`mixserve-run bench --fused-decode-layer`); the cost model
// costs it from the profile's fused_decode_layer points when asked (CostModelOptions).
inline constexpr bool kFusedDecodeLayerDefault = false;
inline constexpr bool uses_fused_decode_layer(bool decode_kernels, bool enabled, int64_t tokens, int64_t seqs) {
  return decode_kernels && enabled && tokens == 1 && seqs == 1;
}

// Programmatic dependent launches between the layer's kernels (steps that take the dense GEMV).
inline constexpr bool uses_programmatic_launch(bool decode_kernels, bool requested, int64_t tokens) {
  return requested && uses_dense_gemv(decode_kernels, tokens);
}

// Steps with decode_kernels, whatever their size: one fused QK-norm + RoPE + KV-write launch
// (when the q/k norms are per head or absent) reading a RoPE table built once per step; the
// layer's closing residual add fused into the next layer's input RMSNorm (the last layer keeps
// its add); the permute in one launch up to kPermuteSingleLaunchMaxPairs (token, expert) pairs
// (kernels/permute.cuh, same value), four launches above.
inline constexpr bool uses_fused_qk_rope_kv(bool decode_kernels, bool per_head_or_no_qk_norm) {
  return decode_kernels && per_head_or_no_qk_norm;
}
// The q/k norms' layout (model/src/weights.cpp): OLMoE normalises the whole projected q and k,
// the others (Qwen3) each head.
inline constexpr bool qk_norm_per_head(std::string_view architecture) {
  return architecture != "OlmoeForCausalLM";
}
inline constexpr int64_t kPermuteSingleLaunchMaxPairsCore = 128;
inline constexpr int permute_launches(bool decode_kernels, int64_t pairs) {
  return pairs == 0 ? 0 : (decode_kernels && pairs <= kPermuteSingleLaunchMaxPairsCore ? 1 : 4);
}

// Steps with decode_kernels, whatever their size: the attention's split-KV merge inside the
// attention launch (kernels/attention.cuh merge_tickets), so attention is one launch with or
// without splits. Off by default (GpuModelConfig::fused_attention_merge): slower on the H200 in
// the 48-layer b=1 decode step (session 4 call 2, docs/forward.md).
inline constexpr bool kFusedAttentionMergeDefault = false;
inline constexpr bool uses_fused_attention_merge(bool decode_kernels, bool enabled = kFusedAttentionMergeDefault) {
  return enabled && decode_kernels;
}
inline constexpr int attention_launch_count(bool decode_kernels, bool splits) {
  return splits && !uses_fused_attention_merge(decode_kernels) ? 2 : 1;
}

// Decode-only steps that the benchmarks (offline and online) run as a CUDA graph, with CUDA graphs
// on (the default; --no-cuda-graph turns them off) and the automatic expert path: an unsharded
// model (multi-rank decode steps run eagerly), and either no MoE layer or at most `max_rows`
// routed rows (tokens x top_k; the device GEMV's bound, executor/graph.hpp
// decode_step_graphable). The cost model takes the profile's per-launch graph saving off such
// steps (HardwareProfile::graph_launch).
inline constexpr bool decode_step_graphed(bool cuda_graphs, bool sharded, bool has_moe, int64_t tokens, int top_k,
                                          int64_t max_rows = kDeviceGemvMaxRows) {
  return cuda_graphs && !sharded && tokens > 0 && (!has_moe || tokens * top_k <= max_rows);
}

// Tags of the profile's GEMV tables (HardwareProfile::gemv rows' `impl`, and the
// ExpertGemmPoint::distribution prefix of the grouped GEMV v2, mixserve-profile gemv):
//   "gemv"        - launch_gemv, bf16 out (q|k|v fused with bias, o_proj, FFN gate|up);
//   "gemv_swiglu" - launch_gemv with the SwiGLU applied to its [m, 2k] input (FFN down);
//   "gemv_fp32"   - launch_gemv with fp32 out (router logits);
//   "gemv2:<dist>" on an expert point - launch_grouped_gemv_v2 (down projection: its SwiGLU
//                   input, as the executor runs it).
inline constexpr std::string_view kGemvImplPlain = "gemv";
inline constexpr std::string_view kGemvImplSwiglu = "gemv_swiglu";
inline constexpr std::string_view kGemvImplFp32 = "gemv_fp32";
inline constexpr std::string_view kExpertGemvV2Tag = "gemv2:";

}  // namespace mixserve
