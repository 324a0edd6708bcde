// Shards of the distributed forward and the executor's plan checks (shard.hpp), CPU only: for
// every layout the planner emits for 1-8 ranks, the ranks' slices tile each dimension exactly
// once per group (query heads over the attention TP group, KV heads cover the heads' groups,
// experts over the EP group, expert/shared/dense widths over the TP group, layers over the
// stages), and a plan whose world size, GPU count, model or rank map does not match is refused
// with a message naming what differs. The rendezvous of the ranks' threads (argument order,
// disjoint groups, errors and abort reaching every member) and the bench's refusal of a
// multi-GPU plan without --emulate-ranks / --gpu-per-rank.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/planner/search.hpp"

using namespace mixserve;
using gpu::shard_dims;
using gpu::shard_for_rank;

namespace {

ModelSpec tiny(const char* arch = "Qwen2MoeForCausalLM", int kv_heads = 2) {
  return import_hf_config(std::string(R"({"architectures": [")") + arch + R"("], "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": )" + std::to_string(kv_heads) + R"(,
    "head_dim": 64, "vocab_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128,
    "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": true, "mlp_only_layers": [0],
    "shared_expert_intermediate_size": 64, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": false})",
                          "tiny/config.json");
}

ClusterSpec cluster_of(int gpus) {
  ClusterSpec c = load_cluster("h200-1x8");
  c.num_nodes = gpus >= 4 ? 2 : 1;
  c.gpus_per_node = gpus / c.num_nodes;
  c.nics_per_node = c.num_nodes > 1 ? c.gpus_per_node : 0;
  return c;
}

Plan plan_for(const ModelSpec& m, const ClusterSpec& c, const Layout& l) {
  Plan p;
  p.model = m;
  p.cluster = c;
  p.chosen.layout = l;
  p.rank_map = build_rank_map(c, m, l);
  return p;
}

}  // namespace

TEST_CASE("shards tile every dimension once per group, for every planner layout of 1-8 ranks") {
  const ModelSpec m = tiny();
  int checked = 0;
  for (int P : {1, 2, 4, 8}) {
    const ClusterSpec c = cluster_of(P);
    for (const Layout& l : planner::enumerate_layouts(P)) {
      if (planner::first_structural_failure(m, c, l)) continue;
      INFO(l.name());
      const auto map = build_rank_map(c, m, l);
      const int S = l.stage_size();
      for (int stage = 0; stage < l.pp; ++stage) {
        std::vector<int> heads(8, 0), experts(16, 0), inter(128, 0), shared(64, 0), dense(128, 0);
        for (int q = 0; q < S; ++q) {
          const RankInfo& info = map[std::size_t(stage * S + q)];
          const auto sh = shard_for_rank(l, info, m);
          const auto d = shard_dims(m, sh);
          CHECK(d.layer_begin == info.layer_begin);
          CHECK(d.layer_end == info.layer_end);
          CHECK(sh.moe_mode == (S == 1 ? gpu::MoeMode::none
                                       : l.attn_dp == 1 ? gpu::MoeMode::replicated : gpu::MoeMode::gathered));
          if (info.attn_dp_rank == 0)
            for (int h = d.q_head0; h < d.q_head0 + d.q_heads; ++h) ++heads[std::size_t(h)];
          // Every query head of the shard finds its KV head (GQA group of 4) in the shard.
          for (int h = d.q_head0; h < d.q_head0 + d.q_heads; ++h) {
            CHECK(h / 4 >= d.kv_head0);
            CHECK(h / 4 < d.kv_head0 + d.kv_heads);
          }
          for (int e = d.expert0; e < d.expert0 + d.experts; ++e)
            if (info.moe_tp_rank == 0) ++experts[std::size_t(e)];
          if (info.moe_ep_rank == 0)
            for (int64_t i = d.inter0; i < d.inter0 + d.inter; ++i) ++inter[std::size_t(i)];
          if (sh.shared_expert)
            for (int64_t i = d.shared0; i < d.shared0 + d.shared; ++i) ++shared[std::size_t(i)];
          if (info.attn_dp_rank == 0)
            for (int64_t i = d.dense0; i < d.dense0 + d.dense; ++i) ++dense[std::size_t(i)];
        }
        for (int v : heads) CHECK(v == 1);
        for (int v : experts) CHECK(v == 1);
        for (int v : inter) CHECK(v == 1);
        for (int v : shared) CHECK(v == 1);
        for (int v : dense) CHECK(v == 1);
      }
      ++checked;
    }
  }
  CHECK(checked >= 40);
}

TEST_CASE("shard dims: KV heads replicated when attention TP exceeds them") {
  const ModelSpec m = tiny();
  gpu::ShardSpec s;
  s.attn_tp = 8;
  std::vector<int> kv;
  for (int r = 0; r < 8; ++r) {
    s.attn_rank = r;
    const auto d = shard_dims(m, s);
    CHECK(d.q_heads == 1);
    CHECK(d.kv_heads == 1);
    kv.push_back(d.kv_head0);
  }
  CHECK(kv == std::vector<int>{0, 0, 0, 0, 1, 1, 1, 1});
  s.attn_tp = 2;
  s.attn_rank = 1;
  const auto d = shard_dims(m, s);
  CHECK(d.q_head0 == 4);
  CHECK(d.q_heads == 4);
  CHECK(d.kv_head0 == 1);
  CHECK(d.kv_heads == 1);
}

TEST_CASE("shard dims refuse what the model does not divide") {
  gpu::ShardSpec s;
  s.attn_tp = 3;
  CHECK_THROWS_WITH_AS(shard_dims(tiny(), s), doctest::Contains("query heads 8 not divisible by attention TP 3"),
                       InputError);
  s.attn_tp = 4;
  s.attn_rank = 0;
  ModelSpec odd = tiny();
  odd.attention.num_heads = 12;
  odd.attention.num_kv_heads = 6;
  CHECK_THROWS_WITH_AS(shard_dims(odd, s), doctest::Contains("KV heads 6 and attention TP 4"), InputError);
  s = {};
  s.expert_begin = 12;
  s.expert_end = 20;
  CHECK_THROWS_WITH_AS(shard_dims(tiny(), s), doctest::Contains("expert range [12, 20) outside [0, 16)"), InputError);
}

TEST_CASE("a plan whose world size, GPU count, model or rank map does not match is refused") {
  const ModelSpec m = tiny();
  const ClusterSpec c = cluster_of(4);
  Layout l;
  l.attn_tp = 2;
  l.attn_dp = 2;
  l.moe_tp = 2;
  l.moe_ep = 2;
  l.moe_comm = MoeComm::fused;
  const Plan p = plan_for(m, c, l);
  gpu::LaunchShape ok{4, 1, 1};
  CHECK_NOTHROW(gpu::check_plan_for_run(p, m, ok));
  SUBCASE("world size") {
    CHECK_THROWS_WITH_AS(gpu::check_plan_for_run(p, m, {8, 1, 1}), doctest::Contains("needs 4 ranks; launched with 8"),
                         InputError);
  }
  SUBCASE("GPU count") {
    CHECK_THROWS_WITH_AS(gpu::check_plan_for_run(p, m, {4, 4, 1}), doctest::Contains("needs 4 GPU(s) in this process; 1 visible"),
                         InputError);
  }
  SUBCASE("model") {
    ModelSpec other = m;
    other.name = "other";
    other.hidden_size = 256;
    CHECK_THROWS_WITH_AS(gpu::check_plan_for_run(p, other, ok), doctest::Contains("hidden_size=128"), InputError);
  }
  SUBCASE("rank map") {
    Plan bad = p;
    std::swap(bad.rank_map[1].moe_ep_rank, bad.rank_map[2].moe_ep_rank);
    CHECK_THROWS_WITH_AS(gpu::check_plan_for_run(bad, m, ok), doctest::Contains("rank_map[1] differs"), InputError);
  }
  SUBCASE("layout the model does not divide") {
    const ModelSpec olmoe = import_hf_config(R"({"architectures": ["OlmoeForCausalLM"], "hidden_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 72,
      "intermediate_size": 32, "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": false,
      "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})",
                                             "olmoe/config.json");
    CHECK_THROWS_WITH_AS(gpu::check_plan_for_run(plan_for(olmoe, c, l), olmoe, ok),
                         doctest::Contains("QK-norm over the whole projection"), InputError);
  }
}

TEST_CASE("rendezvous: the last member runs the operation with every argument in group order") {
  gpu::Rendezvous rdv;
  const std::vector<int> group = {3, 1, 2, 0};
  std::vector<int> order;
  int runs = 0;
  std::vector<std::thread> threads;
  for (int u = 0; u < 4; ++u)
    threads.emplace_back([&, u] {
      for (int it = 0; it < 50; ++it) {
        const int mine = 100 * it + u;
        rdv.meet(group, u, &mine, [&](std::span<const void* const> args) {
          ++runs;
          for (const void* a : args) order.push_back(*static_cast<const int*>(a));
        });
      }
    });
  for (auto& t : threads) t.join();
  CHECK(runs == 50);
  REQUIRE(order.size() == 200);
  for (int it = 0; it < 50; ++it)
    for (int u = 0; u < 4; ++u) CHECK(order[std::size_t(4 * it + u)] == 100 * it + u);
}

TEST_CASE("rendezvous: disjoint groups meet independently; an operation's error reaches every member") {
  gpu::Rendezvous rdv;
  std::atomic<int> a_runs{0}, b_runs{0}, errors{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      const std::vector<int> g = r < 2 ? std::vector<int>{0, 1} : std::vector<int>{2, 3};
      for (int it = 0; it < 20; ++it)
        rdv.meet(g, r % 2, nullptr, [&](std::span<const void* const>) { ++(r < 2 ? a_runs : b_runs); });
      try {
        rdv.meet(g, r % 2, nullptr, [](std::span<const void* const>) { throw InputError("bad step"); });
      } catch (const InputError&) {
        ++errors;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(a_runs == 20);
  CHECK(b_runs == 20);
  CHECK(errors == 4);
}

TEST_CASE("rendezvous: abort releases a member waiting for a peer that failed") {
  gpu::Rendezvous rdv;
  std::atomic<bool> released{false};
  std::thread waiter([&] {
    try {
      rdv.meet({0, 1}, 0, nullptr, [](std::span<const void* const>) {});
    } catch (const RuntimeError& e) {
      released = std::string(e.what()).find("aborted") != std::string::npos;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it wait (the result holds either way)
  rdv.abort();
  waiter.join();
  CHECK(released);
  CHECK_THROWS_AS(rdv.meet({0, 1}, 1, nullptr, [](std::span<const void* const>) {}), RuntimeError);
}

TEST_CASE("bench: a multi-GPU plan needs --emulate-ranks or --gpu-per-rank (no device work)") {
  const ModelSpec m = tiny("Qwen3MoeForCausalLM");
  Layout l;
  l.attn_tp = 2;
  l.moe_tp = 2;
  Plan p = plan_for(m, cluster_of(2), l);
  p.chosen.limits.max_num_seqs = 16;
  p.chosen.limits.max_num_batched_tokens = 256;
  gpu::BenchConfig c;
  c.batch = 2;
  c.input_len = 8;
  c.output_len = 2;
  CHECK_THROWS_WITH_AS(gpu::check_bench_plan(p, c, "p.yaml"), doctest::Contains("--emulate-ranks"), InputError);
  c.emulate_ranks = true;
  CHECK_NOTHROW(gpu::check_bench_plan(p, c, "p.yaml"));
  c.gpu_per_rank = true;
  CHECK_THROWS_WITH_AS(gpu::check_bench_plan(p, c, "p.yaml"), doctest::Contains("exclude each other"), InputError);
  c.emulate_ranks = false;
  CHECK_NOTHROW(gpu::check_bench_plan(p, c, "p.yaml"));
}
