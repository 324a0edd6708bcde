// The weight set of one MoE decoder of the Qwen3-MoE / Qwen2-MoE / Mixtral / OLMoE family:
// every tensor with its Hugging Face name and shape, stored as bf16 bit patterns.
// Sources: synthetic (seeded) or safetensors checkpoints (one file or a sharded set with its
// index), validated tensor by tensor against the expected names, shapes and dtypes.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "mixserve/core/model.hpp"

namespace mixserve::model {

// X(enum, Hugging Face architecture): the architectures whose tensor names this module knows.
// DeepSeek (MLA, sigmoid group-limited routing) and gpt-oss come next.
#define MIXSERVE_MODEL_FAMILIES(X)            \
  X(qwen3_moe, "Qwen3MoeForCausalLM")         \
  X(qwen2_moe, "Qwen2MoeForCausalLM")         \
  X(mixtral, "MixtralForCausalLM")            \
  X(olmoe, "OlmoeForCausalLM")

enum class Family {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_MODEL_FAMILIES(MIXSERVE_X)
#undef MIXSERVE_X
};

std::string_view to_string(Family f);
// InputError naming the architecture and listing the supported ones.
Family family_of(const ModelSpec& m);

// Which of the three SwiGLU projections: gate (silu branch), up, down.
enum class FfnProj { gate, up, down };

// Hugging Face tensor names. One place builds every name; the expected-tensor list, the
// synthetic initialiser, the loader and the reference forward all use these.
namespace names {
std::string embed();                   // model.embed_tokens.weight
std::string final_norm();              // model.norm.weight
std::string lm_head();                 // lm_head.weight (absent when tied)
std::string input_norm(int layer);     // model.layers.{i}.input_layernorm.weight
std::string post_attn_norm(int layer); // model.layers.{i}.post_attention_layernorm.weight
// what: "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"; suffix "weight" or "bias".
std::string attn(int layer, std::string_view what, std::string_view suffix = "weight");
std::string router(Family f, int layer);  // mlp.gate.weight | block_sparse_moe.gate.weight
std::string expert(Family f, int layer, int e, FfnProj p);  // ...experts.{e}.{gate,up,down}_proj | w1,w3,w2
std::string shared_expert(int layer, FfnProj p);  // mlp.shared_expert.{gate,up,down}_proj.weight
std::string shared_expert_gate(int layer);        // mlp.shared_expert_gate.weight
std::string dense(int layer, FfnProj p);          // mlp.{gate,up,down}_proj.weight
}  // namespace names

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch order: Linear weights are [out, in]
  int64_t numel() const;
};

// Every tensor of the model in a fixed order (embedding, layers in order, final norm, LM head).
// InputError if the model is outside the family (MLA, sigmoid routing, biased routers/experts,
// attention sinks) or its numbers do not fit together.
std::vector<TensorSpec> expected_tensors(const ModelSpec& m);

// The first n layers at full width (--num-layers): everything else unchanged.
// InputError unless 1 <= n <= m.num_layers.
ModelSpec with_num_layers(const ModelSpec& m, int n);

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint16_t> bf16;  // row-major, numel() values
  int64_t numel() const;
};

class WeightSet {
 public:
  // All expected tensors, zero-filled.
  explicit WeightSet(ModelSpec spec);

  const ModelSpec& spec() const { return spec_; }
  Family family() const { return family_; }
  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* find(std::string_view name) const;
  // RuntimeError naming the tensor when absent.
  const Tensor& at(std::string_view name) const;
  Tensor& at(std::string_view name);
  int64_t total_elements() const;

 private:
  ModelSpec spec_;
  Family family_;
  std::vector<Tensor> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

// Seeded synthetic weights: each tensor draws from its own stream (seed, tensor name), so the
// first N layers of a model are the same whatever num_layers is. Linear weights uniform with
// variance 1/fan_in (outputs keep the scale of their inputs), embeddings variance 1, norm
// weights 1 + U(-0.1, 0.1), biases U(-0.1, 0.1). Values are rounded to bf16.
WeightSet synthetic_weights(const ModelSpec& m, uint64_t seed);

// Load from a .safetensors file, a model.safetensors.index.json, or a directory holding one of
// them. BF16 is taken as is; F16 and F32 are rounded to bf16 (nearest even). num_layers > 0 loads
// the first num_layers layers only and skips the checkpoint's later layers.
// InputError naming the file and tensor: corrupt file (see SafetensorsFile), missing tensor,
// unexpected tensor, wrong dtype, wrong shape, a checkpoint of another model, an index that
// points at a missing shard or a tensor the shard does not hold.
WeightSet load_weights(const ModelSpec& m, const std::filesystem::path& path, int num_layers = 0);

// Write the weight set as one BF16 safetensors file (metadata: format pt, architecture).
void save_weights(const WeightSet& w, const std::filesystem::path& file);
// Write it as shards of about max_shard_bytes plus model.safetensors.index.json in dir.
void save_weights_sharded(const WeightSet& w, const std::filesystem::path& dir,
                          uint64_t max_shard_bytes);

}  // namespace mixserve::model
