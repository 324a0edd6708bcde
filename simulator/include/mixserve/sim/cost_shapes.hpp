// Layout geometry shared by the two cost models: which domain a group lives in, the per-rank
// weight shards and KV bytes, and the legality checks the cost models rely on.
#pragma once
#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/sim/op_timer.hpp"

namespace mixserve::sim {

// `count` ranks at `stride` inside a stage (node-major ranks, stages aligned to node
// boundaries or inside one node): how many nodes they span. TP groups are stride 1, EP groups
// stride moe_tp.
CommGroup comm_group(int stride, int count, int gpus_per_node);

// Weight bytes held by one rank, per item (the most loaded rank of its stage; every rank of a
// stage holds the same shapes). Per layer values are for one decoder layer of that kind.
struct RankWeights {
  double attention_layer = 0;  // projections: TP shards, replicated MLA down-projections,
                               // KV heads replicated when attn_tp > num_kv_heads
  double norms_layer = 0;      // RMSNorm weights (replicated)
  double router_layer = 0;     // gate (replicated, bf16)
  double experts_layer = 0;    // E/moe_ep experts, each sharded over moe_tp
  double shared_layer = 0;     // shared experts sharded over moe_tp
  double dense_layer = 0;      // dense FFN sharded over attn_tp
  double embedding = 0;        // vocab-parallel over attn_tp (first stage)
  double lm_head = 0;          // vocab-parallel over attn_tp (last stage; tied: a copy when pp>1)
};
RankWeights rank_weights(const ModelSpec& m, const Layout& l);

// KV-cache bytes per token per layer on one rank. MLA: the latent (kv_lora + rope), held in
// full by every TP rank. GQA/MHA: 2 * max(1, kv_heads / attn_tp) * head_dim.
double kv_bytes_per_token_layer(const ModelSpec& m, const Layout& l);

// Throws InputError (naming the layout key) unless the layout folds onto the cluster:
// degrees powers of two, attn_tp*attn_dp == moe_tp*moe_ep, world == cluster world, heads
// divisible by attn_tp, experts by moe_ep, expert width by moe_tp, pp <= layers, and moe_comm
// consistent with moe_ep (tp_allreduce iff moe_ep == 1).
void check_layout(const ModelSpec& m, const ClusterSpec& c, const Layout& l);

}  // namespace mixserve::sim
