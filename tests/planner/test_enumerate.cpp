// Search space: enumeration counts derived by hand, every predicate's rejections, baselines.
#include <doctest/doctest.h>

#include <algorithm>
#include <limits>
#include <map>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/planner/search.hpp"

using namespace mixserve;
using namespace mixserve::planner;

namespace {

// A small GQA MoE model built by hand (Qwen3-235B-like shapes, few layers).
ModelSpec gqa_model() {
  ModelSpec m;
  m.name = "test-gqa";
  m.hidden_size = 4096;
  m.num_layers = 6;
  m.vocab_size = 1000;
  m.attention.type = AttentionType::gqa;
  m.attention.num_heads = 64;
  m.attention.num_kv_heads = 4;
  m.attention.head_dim = 128;
  m.moe.num_experts = 128;
  m.moe.top_k = 8;
  m.moe.expert_intermediate_size = 1536;
  m.layers.assign(6, LayerSpec{});
  return m;
}

ClusterSpec cluster(int nodes, int gpus) {
  ClusterSpec c;
  c.name = "test-cluster";
  c.num_nodes = nodes;
  c.gpus_per_node = gpus;
  return c;
}

}  // namespace

TEST_CASE("objective and MoE comm names round-trip through their one table") {
  for (const auto& n : objective_names()) {
    auto o = parse_objective(n);
    REQUIRE(o.has_value());
    CHECK(to_string(*o) == n);
  }
  CHECK_FALSE(parse_objective("latency").has_value());
  for (MoeComm c : {MoeComm::tp_allreduce, MoeComm::nccl_a2a, MoeComm::rs_a2a_ag, MoeComm::fused}) {
    auto p = parse_moe_comm(to_string(c));
    REQUIRE(p.has_value());
    CHECK(*p == c);
  }
  CHECK(parse_moe_comm("nccl_a2a") == MoeComm::nccl_a2a);
  CHECK_FALSE(parse_moe_comm("ring").has_value());
}

TEST_CASE("enumeration counts match a hand count") {
  // Hand count for a stage of S = 2^s GPUs: attention has s+1 (tp, dp) splits. MoE:
  //   ep == 1             -> 1 comm (allreduce)           : (s+1) layouts
  //   tp == 1, ep == S    -> 1 comm (a2a)                 : (s+1) layouts (s >= 1)
  //   1 < tp < S (s-1 ways) -> a2a for every attention split, plus rs-a2a-ag and fused for the
  //                          one split with attn_tp == moe_tp: (s+1) + 2 each.
  // S=1: 1. S=2: 2+2 = 4. S=4: 3+3+5 = 11. S=8: 4+4+2*6 = 20.
  // P=4 sums S=4,2,1 (pp=1,2,4): 16. P=8 sums S=8,4,2,1: 36.
  CHECK(enumerate_layouts(1).size() == 1);
  CHECK(enumerate_layouts(2).size() == 5);
  CHECK(enumerate_layouts(4).size() == 16);
  CHECK(enumerate_layouts(8).size() == 36);
  CHECK(enumerate_layouts(6).empty());
  CHECK(enumerate_layouts(0).empty());

  const auto all = enumerate_layouts(8);
  std::map<MoeComm, int> by_comm;
  for (const Layout& l : all) {
    CHECK(l.attn_tp * l.attn_dp == l.moe_tp * l.moe_ep);
    CHECK(l.world_size() == 8);
    ++by_comm[l.moe_comm];
    if (l.moe_comm == MoeComm::tp_allreduce) CHECK(l.moe_ep == 1);
    if (l.moe_comm == MoeComm::nccl_a2a) CHECK(l.moe_ep > 1);
    if (l.moe_comm == MoeComm::fused || l.moe_comm == MoeComm::rs_a2a_ag) {
      CHECK(l.moe_ep > 1);
      CHECK(l.moe_tp > 1);
      CHECK(l.attn_tp == l.moe_tp);
    }
  }
  // fused: (tp,ep) = (2,4), (4,2) at pp=1 and (2,2) at pp=2 -> 3.
  CHECK(by_comm[MoeComm::fused] == 3);
  CHECK(by_comm[MoeComm::rs_a2a_ag] == 3);
  // allreduce: one per attention split per pp: 4 + 3 + 2 + 1.
  CHECK(by_comm[MoeComm::tp_allreduce] == 10);
  // No duplicates.
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t j = i + 1; j < all.size(); ++j) CHECK_FALSE(all[i] == all[j]);
}

TEST_CASE("limit candidates: powers of two up to the batch limit times each token budget") {
  auto l = limit_candidates(16, {2048, 8192}, 4096);
  CHECK(l.size() == 5 * 2);  // seqs 1 2 4 8 16
  CHECK(l.front().max_num_seqs == 1);
  CHECK(l.back().max_num_seqs == 16);
  CHECK(l.back().max_num_batched_tokens == 8192);
  CHECK(l.back().max_model_len == 4096);
  auto odd = limit_candidates(12, {4096}, 0);
  CHECK(odd.size() == 5);  // 1 2 4 8 12
  CHECK(odd.back().max_num_seqs == 12);
}

namespace {
bool passes(const char* name, const ModelSpec& m, const Layout& l,
            const MemoryBreakdown* mem = nullptr) {
  const ClusterSpec c = cluster(1, l.world_size());
  for (const auto& p : predicates())
    if (p.name == name) return p.fn(PredicateInput{m, c, l, mem});
  FAIL("no predicate " << name);
  return false;
}
Layout lay(int atp, int adp, int mtp, int mep, int pp = 1) {
  Layout l;
  l.attn_tp = atp, l.attn_dp = adp, l.moe_tp = mtp, l.moe_ep = mep, l.pp = pp;
  l.moe_comm = mep > 1 ? MoeComm::nccl_a2a : MoeComm::tp_allreduce;
  return l;
}
}  // namespace

TEST_CASE("each predicate rejects what it must and accepts the rest") {
  ModelSpec m = gqa_model();
  CHECK(predicates().size() == 6);
  CHECK(predicates().back().name == "fits_memory");

  CHECK(passes("heads_divisible", m, lay(64, 1, 64, 1)));
  CHECK_FALSE(passes("heads_divisible", m, lay(128, 1, 128, 1)));

  // 4 KV heads: TP 2 splits them, TP 8 replicates each head on two ranks; both legal.
  CHECK(passes("kv_heads", m, lay(2, 1, 2, 1)));
  CHECK(passes("kv_heads", m, lay(8, 1, 8, 1)));
  m.attention.num_kv_heads = 12;  // 12 % 8 != 0 and 8 % 12 != 0
  CHECK_FALSE(passes("kv_heads", m, lay(8, 1, 8, 1)));
  CHECK(passes("kv_heads", m, lay(4, 1, 4, 1)));
  m.attention.type = AttentionType::mla;  // latent cache: any TP
  CHECK(passes("kv_heads", m, lay(8, 1, 8, 1)));
  m = gqa_model();

  CHECK(passes("experts_divisible", m, lay(1, 128, 1, 128)));
  CHECK_FALSE(passes("experts_divisible", m, lay(1, 256, 1, 256)));
  m.moe.num_experts = 6;
  CHECK_FALSE(passes("experts_divisible", m, lay(1, 4, 1, 4)));
  CHECK(passes("experts_divisible", m, lay(1, 2, 1, 2)));
  m = gqa_model();

  CHECK(passes("expert_width_divisible", m, lay(1, 512, 512, 1)));    // 1536 = 512 * 3
  CHECK_FALSE(passes("expert_width_divisible", m, lay(1, 1024, 1024, 1)));
  m.moe.num_shared_experts = 1;
  m.moe.shared_intermediate_size = 2 * 3 * 5;  // 30: divisible by 2, not by 4
  CHECK(passes("expert_width_divisible", m, lay(2, 1, 2, 1)));
  CHECK_FALSE(passes("expert_width_divisible", m, lay(4, 1, 4, 1)));
  m = gqa_model();
  m.dense_intermediate_size = 18432;  // 2^11 * 9
  CHECK(passes("expert_width_divisible", m, lay(8, 1, 1, 8)));
  m.dense_intermediate_size = 100;    // 4 * 25: dense layers run at max(attn_tp, moe_tp)
  CHECK_FALSE(passes("expert_width_divisible", m, lay(8, 1, 1, 8)));
  CHECK(passes("expert_width_divisible", m, lay(4, 2, 1, 8)));
  m = gqa_model();

  CHECK(passes("layers_divisible_pp", m, lay(1, 1, 1, 1, 4)));  // 6 layers: 2,2,1,1
  CHECK_FALSE(passes("layers_divisible_pp", m, lay(1, 1, 1, 1, 8)));

  MemoryBreakdown mem;
  mem.fits = true;
  CHECK(passes("fits_memory", m, lay(1, 1, 1, 1), &mem));
  mem.fits = false;
  CHECK_FALSE(passes("fits_memory", m, lay(1, 1, 1, 1), &mem));
  CHECK_FALSE(passes("fits_memory", m, lay(1, 1, 1, 1), nullptr));

  CHECK_FALSE(first_structural_failure(m, cluster(1, 8), lay(8, 1, 8, 1)).has_value());
  CHECK(first_structural_failure(m, cluster(1, 8), lay(1, 1, 1, 1, 8)) == "layers_divisible_pp");
}

TEST_CASE("Table II baselines on the paper's two clusters") {
  const ClusterSpec h20 = cluster(2, 8), ascend = cluster(4, 8);
  // paper.md §7.5: vLLM TP+PP = TP8 PP2 (H20), TP8 PP4 (910B).
  CHECK(baseline_layout("vllm-tp-pp", h20) == lay(8, 1, 8, 1, 2));
  CHECK(baseline_layout("vllm-tp-pp", ascend) == lay(8, 1, 8, 1, 4));
  // vLLM DP+EP: TP8 + DP2, EP16 / TP4 + DP8, EP32.
  CHECK(baseline_layout("vllm-dp-ep-tp8", h20) == lay(8, 2, 1, 16));
  CHECK(baseline_layout("vllm-dp-ep-tp4", ascend) == lay(4, 8, 1, 32));
  // Tutel TP+EP: TP8 + DP2, TP8 + EP2 / TP4 + DP4, TP4 + EP4, RS/A2A/AG unfused.
  Layout t8 = lay(8, 2, 8, 2);
  t8.moe_comm = MoeComm::rs_a2a_ag;
  CHECK(baseline_layout("tutel-tp-ep-tp8", h20) == t8);
  Layout t4 = lay(4, 4, 4, 4);
  t4.moe_comm = MoeComm::rs_a2a_ag;
  CHECK(baseline_layout("tutel-tp-ep-tp4", h20) == t4);
  // Every applicable baseline is a point of the search space.
  for (const ClusterSpec& c : {h20, ascend, cluster(1, 8), cluster(8, 8)}) {
    const auto all = enumerate_layouts(c.world_size());
    for (const auto& n : baseline_names()) {
      auto l = baseline_layout(n, c);
      if (!l) continue;
      CHECK_MESSAGE(std::find(all.begin(), all.end(), *l) != all.end(), n);
    }
  }
  CHECK_FALSE(baseline_layout("vllm-dp-ep-tp8", cluster(1, 4)).has_value());
  CHECK_THROWS_AS(baseline_layout("sglang", h20), InputError);
}

TEST_CASE("tie-break helpers") {
  const ClusterSpec c = cluster(2, 8);
  CHECK(cross_node_gpus(lay(8, 1, 8, 1, 2), c) == 0);   // TP8 in a node, PP across
  CHECK(cross_node_gpus(lay(8, 2, 8, 2), c) == 16);     // EP across the two nodes
  CHECK(cross_node_gpus(lay(16, 1, 16, 1), c) == 16);   // TP16 spans nodes
  CHECK(cross_node_gpus(lay(8, 1, 1, 8, 2), c) == 0);   // EP8 inside each node's stage
  PlanCandidate a, b;
  a.layout = lay(8, 1, 8, 1, 2);
  b.layout = lay(8, 2, 8, 2);
  a.metrics.throughput_tok_s = b.metrics.throughput_tok_s = 100;
  CHECK(better(a, b, Objective::throughput, c));  // tie on everything: fewer cross-node GPUs
  b.metrics.ttft_ms = 5;
  a.metrics.ttft_ms = 6;
  CHECK(better(b, a, Objective::throughput, c));  // throughput tie: lower TTFT first
  a.metrics.ttft_ms = b.metrics.ttft_ms = 0;
  b.metrics.throughput_tok_s = 101;
  CHECK(better(b, a, Objective::throughput, c));
  a.metrics.ttft_ms = 10;
  b.metrics.ttft_ms = 20;
  CHECK(better(a, b, Objective::ttft, c));
  // Both saturated: the one serving more tokens/s wins, whatever the ITL.
  a.metrics.ttft_ms = b.metrics.ttft_ms = std::numeric_limits<double>::infinity();
  a.metrics.itl_ms = 1;
  b.metrics.itl_ms = 2;
  a.metrics.throughput_tok_s = 50;
  b.metrics.throughput_tok_s = 60;
  CHECK(better(b, a, Objective::ttft, c));
  CHECK_FALSE(better(a, b, Objective::ttft, c));
  CHECK(better(b, a, Objective::itl, c));  // saturated both: throughput, not ITL, decides
  // A candidate that keeps up beats a saturated one whatever the objective says.
  a.metrics.ttft_ms = 500;
  CHECK(better(a, b, Objective::itl, c));
  CHECK(better(a, b, Objective::throughput, c));
}

TEST_CASE("fits_memory: worst-case MoE buffers that exceed the GPU reject the layout, naming the parts") {
  // DeepSeek-V3 at EP 8 on one 8 x H200 node with 32768 tokens per replica: the executor's
  // expert buffers hold 8 replicas x 32768 tokens x top-8 rows (+ the bucketed room) and its
  // FusedMoeComm 8 x 32768 received rows, far beyond what the ~94 GiB of weights leave.
  SearchInputs in;
  in.model = load_model("deepseek-v3");
  in.cluster = load_cluster("h200-1x8");
  in.profile = load_profile("h200-datasheet");
  SearchOptions opt;
  opt.batched_tokens = {32768};
  opt.max_batch = 256;
  Layout l;
  l.attn_tp = 1, l.attn_dp = 8, l.moe_tp = 1, l.moe_ep = 8, l.pp = 1, l.moe_comm = MoeComm::fused;
  std::string why;
  CHECK_FALSE(evaluate_layout(in, opt, l, &why).has_value());
  CAPTURE(why);
  CHECK(why.rfind("fits_memory (", 0) == 0);
  CHECK(why.find("comm_buffers") != std::string::npos);
  CHECK(why.find("exceed") != std::string::npos);
  CHECK(why.find("the largest after the weights: activations") != std::string::npos);
  // The same layout at 2048 tokens fits.
  opt.batched_tokens = {2048};
  CHECK(evaluate_layout(in, opt, l, &why).has_value());
}
