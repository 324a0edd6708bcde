// The shapes mixserve-profile measures (host logic, no CUDA): the GEMM (n, k) families and expert
// GEMM families a model needs at each TP degree (what the planner asks the cost model for), a
// generic grid, the token sweeps, and the routed-token distributions of the expert benchmark.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mixserve/core/model.hpp"
#include "mixserve/core/types.hpp"

namespace mixserve::profiler {

struct GemmFamily {      // one (n, k, dtype) swept over m
  std::string label;     // "deepseek-v3 tp8 attn.o_proj"
  int64_t n = 0, k = 0;
  DType dtype = DType::bf16;
};

struct ExpertFamily {    // one grouped GEMM family swept over routed rows
  std::string label;     // "qwen3-235b-a22b tp1 ep8 experts.gate_up"
  int num_experts = 0;   // local experts
  int64_t n = 0, k = 0;  // per-expert weight [n, k] (out features, in features)
  DType dtype = DType::bf16;
};

// The dtype a weight of this model dtype is timed in: bf16/fp16 -> bf16, fp8 -> fp8, fp8_block ->
// fp8_block. Empty for dtypes cuBLASLt cannot run on Hopper (fp32 weights, mxfp4).
std::vector<DType> timed_dtype(DType weight_dtype);

// Linear layers of one decoder layer (and the LM head) on one rank at attention TP `tp`:
// attention projections (GQA/MHA: qkv, o; MLA: q_a+kv_a fused, q_b, kv_b, o), dense FFN and
// shared experts (gate_up, down; the dense FFN at TP `tp`), lm_head. Families whose n or k is
// not divisible by tp, or not aligned for cuBLASLt, are left out.
std::vector<GemmFamily> model_gemm_families(const ModelSpec& m, int tp);
// Routed-expert GEMMs on one rank for MoE TP `tp` and EP `ep` (num_experts / ep local experts,
// gate_up n = 2 * I / tp, down k = I / tp).
std::vector<ExpertFamily> model_expert_families(const ModelSpec& m, int tp, int ep);
// Generic square-ish grid: every (n, k) in `dims` x `dims`, bf16 and fp8.
std::vector<GemmFamily> generic_gemm_families(const std::vector<int64_t>& dims);
// Remove families with identical (n, k, dtype), keeping the first label.
std::vector<GemmFamily> unique_families(std::vector<GemmFamily> f);
std::vector<ExpertFamily> unique_families(std::vector<ExpertFamily> f);

// Rows per expert for `total_rows` routed rows over `num_experts` experts:
//   "uniform"  - as even as possible (the first experts take the remainder);
//   "zipf:S"   - expert i gets a share proportional to 1 / (i + 1)^S (largest remainders);
//   "empty:F"  - the first round(F * E) experts get nothing, the rest uniform;
//   "routed:K" - as a router picks them: ceil(total_rows / K) tokens, each sending its rows to K
//                distinct experts drawn uniformly at random (min(K, E); the last token takes the
//                remainder), from a fixed seed per (E, total_rows, K), so a profile is reproducible.
//                Unlike "uniform" the rows per expert scatter around the mean as a real step's do
//                (docs/fidelity.md: tile and chunk counts of the grouped kernels follow the largest
//                experts, so an evenly split table point is a best case).
// The counts always sum to total_rows. Throws InputError for an unknown distribution.
std::vector<int64_t> tokens_per_expert(const std::string& distribution, int num_experts,
                                       int64_t total_rows);

// Powers of `factor` from lo to hi inclusive (nccl-tests -b/-e/-f): 8, 16, ... .
std::vector<int64_t> geometric_sizes(int64_t lo, int64_t hi, int64_t factor);

}  // namespace mixserve::profiler
