// CPU reference forward of the MoE decoder, in float64 over the bf16-rounded weights (Eigen),
// for tiny configurations. It is the oracle the GPU executor is compared with, layer by layer
// and on the final logits.
//
// One step = a batch of sequences, each with its new tokens (a prefill chunk or one decode
// token), the position of its first new token and its block table. K and V of every layer live
// in a paged cache of num_blocks blocks of block_size tokens that persists across steps: the
// token at position p of a sequence sits in block block_table[p / block_size], slot
// p % block_size. Blocks are owned by the caller (the scheduler), as in the executor.
//
// Per layer: RMSNorm -> attention (GQA/MHA; QKV bias; QK-norm per head (Qwen3) or over the
// whole projection (OLMoE); RoPE rotate-half; causal over the cache) -> residual -> RMSNorm ->
// MoE (softmax router, top-k with the lower expert id winning ties, optional renormalisation,
// SwiGLU experts, shared expert with optional sigmoid gate) or dense SwiGLU FFN -> residual.
// Then the final RMSNorm and the LM head (the embedding when tied).
// Attention (GQA vs MLA) and routing (softmax vs sigmoid group-limited) are separate steps
// selected per model, so MLA and DeepSeek routing can be added beside them.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "mixserve/model/weights.hpp"

namespace mixserve::model {

struct KVCacheConfig {
  int block_size = 16;  // tokens per block
  int num_blocks = 0;   // blocks in the pool (per layer)
};

struct SequenceStep {
  std::vector<int32_t> tokens;       // new tokens: a prefill chunk or one decode token
  int64_t position = 0;              // position of tokens[0] (tokens already in the cache)
  std::vector<int32_t> block_table;  // covers positions [0, position + tokens.size())
};

struct StepOutput {
  int64_t num_tokens = 0;             // rows, sequences in batch order, tokens in order
  std::vector<int64_t> seq_offsets;   // first row of each sequence; size = batch + 1
  std::vector<double> logits;         // [num_tokens, vocab]
  // Residual stream [num_layers][num_tokens, hidden] after each layer's attention block
  // (x + attn(x)) and after the whole layer: compare the GPU layer by layer, and within a layer
  // tell attention from FFN errors.
  std::vector<std::vector<double>> attn_hidden;
  std::vector<std::vector<double>> layer_hidden;
  // Routing per MoE layer ([num_tokens, top_k], in descending weight); empty for dense layers.
  std::vector<std::vector<int32_t>> topk_ids;
  std::vector<std::vector<double>> topk_weights;
};

// Softmax over the router logits, top-k (the lower expert id wins ties), optionally
// renormalised to sum 1, then scaled by `scale` (routed_scaling_factor). ids/weights: top_k each.
void route_softmax_topk(std::span<const double> logits, int top_k, bool renormalize, double scale,
                        std::span<int32_t> ids, std::span<double> weights);

class ReferenceModel {
 public:
  // Widens the weights to double once. InputError if the model uses something the reference
  // does not implement (sliding-window attention) or the cache config is invalid.
  ReferenceModel(const WeightSet& weights, KVCacheConfig kv);
  ~ReferenceModel();
  ReferenceModel(const ReferenceModel&) = delete;
  ReferenceModel& operator=(const ReferenceModel&) = delete;

  const ModelSpec& spec() const;
  const KVCacheConfig& kv_config() const;

  // Runs one step and writes the new tokens' K/V into the cache. InputError on a bad batch:
  // empty token list, token id out of range, negative position, a block table too short or
  // naming a block out of range, or two sequences of the step sharing a block.
  StepOutput step(const std::vector<SequenceStep>& batch);

  // Zeros the whole cache.
  void reset_cache();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mixserve::model
