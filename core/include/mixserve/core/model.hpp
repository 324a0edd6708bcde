// Model specification: the architecture numbers the planner, simulator and executor need.
// Read from our YAML schema or imported from a Hugging Face config.json (io.hpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mixserve/core/types.hpp"

namespace mixserve {

#define MIXSERVE_ATTENTION_TYPES(X) X(mha, "mha") X(gqa, "gqa") X(mla, "mla")
enum class AttentionType {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_ATTENTION_TYPES(MIXSERVE_X)
#undef MIXSERVE_X
};

struct AttentionSpec {
  AttentionType type = AttentionType::gqa;
  int num_heads = 0;     // query heads
  int num_kv_heads = 0;  // KV heads (MLA: the config value; the cache holds one latent per token)
  int head_dim = 0;      // GQA/MHA: per-head q/k/v width. MLA: qk_nope + qk_rope
  // MLA only (0 = absent). q_lora_rank 0 means a full q projection (DeepSeek-V2-Lite).
  int q_lora_rank = 0;
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  bool qk_norm = false;    // Qwen3, OLMoE
  bool qkv_bias = false;   // Qwen2
  bool o_bias = false;     // gpt-oss attention_bias covers q,k,v and o
  bool sinks = false;      // gpt-oss attention sinks (one scalar per head)
  int sliding_window = 0;  // tokens; 0 = none. Which layers use it: LayerSpec::sliding
};

#define MIXSERVE_SCORING(X) X(softmax, "softmax") X(sigmoid, "sigmoid")
enum class Scoring {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_SCORING(MIXSERVE_X)
#undef MIXSERVE_X
};

struct MoESpec {
  int num_experts = 0;                // routed experts
  int top_k = 0;
  int expert_intermediate_size = 0;   // per routed expert FFN width
  int num_shared_experts = 0;
  int shared_intermediate_size = 0;   // total width of all shared experts together
  bool shared_expert_gate = false;    // Qwen2-MoE: sigmoid(x·w) scales the shared expert
  Scoring scoring = Scoring::softmax;
  bool topk_before_softmax = false;   // gpt-oss: top-k on logits, then softmax over the k
  bool norm_topk_prob = false;        // renormalise the k weights to sum to 1
  double routed_scaling_factor = 1.0;
  int n_group = 1;                    // DeepSeek-V3 group-limited routing
  int topk_group = 1;
  bool router_bias = false;           // gpt-oss router linear has a bias
  bool score_correction_bias = false; // DeepSeek-V3 e_score_correction_bias (selection only)
  bool expert_bias = false;           // gpt-oss expert linears have biases
  // A shared expert that runs (some width): what the executor, the schedules and the cost model
  // test before they add its work.
  bool has_shared_expert() const { return num_shared_experts > 0 && shared_intermediate_size > 0; }
};

struct LayerSpec {
  bool moe = true;       // FFN is MoE (else dense of width dense_intermediate_size)
  bool sliding = false;  // attention uses the sliding window
};

struct ModelSpec {
  std::string name;           // e.g. "deepseek-r1"
  std::string architecture;   // HF class, e.g. "DeepseekV3ForCausalLM"
  std::string source;         // where the numbers come from (URL / file)
  int hidden_size = 0;
  int num_layers = 0;
  int vocab_size = 0;
  bool tie_word_embeddings = false;
  int dense_intermediate_size = 0;  // width of the dense FFN layers that exist (0 if none)
  AttentionSpec attention;
  MoESpec moe;
  std::vector<LayerSpec> layers;    // size num_layers
  int num_mtp_layers = 0;           // DeepSeek MTP modules: not served, not counted in totals
  DType weight_dtype = DType::bf16;         // non-expert weights
  DType expert_weight_dtype = DType::bf16;  // routed + shared expert weights
  DType activation_dtype = DType::bf16;
  DType kv_dtype = DType::bf16;
  int max_position_embeddings = 0;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;

  int num_moe_layers() const;
  int num_dense_layers() const;
  // Width of the query projection output (heads * q head dim); != hidden for many models.
  int64_t q_width() const;
};

// Parameter and memory accounting (describe). Counts are elements, not bytes.
struct ParamBreakdown {
  int64_t embedding = 0;
  int64_t lm_head = 0;               // 0 when tied
  int64_t attention = 0;             // all layers, projections (+ biases, sinks)
  int64_t norms = 0;                 // RMSNorm weights (layer norms, qk-norms, final norm, MLA norms)
  int64_t dense_ffn = 0;             // all dense layers
  int64_t routed_experts = 0;        // all MoE layers, all experts
  int64_t shared_experts = 0;        // all MoE layers
  int64_t router = 0;                // gate weights (+bias)
  int64_t total() const;
  // Per-token active: everything but the routed experts, plus top_k/num_experts of them.
  int64_t active = 0;
  int64_t per_expert = 0;            // one routed expert of one layer
};

ParamBreakdown count_params(const ModelSpec& m);
// Weight bytes given the model's dtypes (non-expert vs expert weights).
double weight_bytes(const ModelSpec& m);
// KV-cache bytes per token over all layers (MLA: kv_lora_rank + qk_rope_head_dim per layer;
// GQA/MHA: 2 * kv_heads * head_dim per layer), in the model's kv_dtype.
double kv_bytes_per_token(const ModelSpec& m);

std::string_view to_string(AttentionType t);
std::string_view to_string(Scoring s);

}  // namespace mixserve
