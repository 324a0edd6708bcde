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
#include <cstring>
#include <map>
#include <tuple>
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
          // The shared expert: once per stage in the moe_mode exchange (EP index 0 adds it, the
          // exchange sums over the stage); under a schedule once per EP index (every moe-TP
          // group runs it on its own tokens, the schedule's reduce-scatter sums the group).
          CHECK(sh.shared_expert == (sh.moe_sched != gpu::MoeSched::none || info.moe_ep_rank == 0));
          // Its width tiles once over the moe-TP group (counted on EP index 0).
          if (info.moe_ep_rank == 0)
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

// ----------------------------------------------------------------------------- scheduled MoE (host logic)

namespace {
// One rank's piece of the routing exchange: count, ids, weights (f32 bits), padded to stage_tokens.
void put_piece(std::vector<int32_t>& buf, int r, int64_t stage_tokens, int k, const sim::ReplicaRouting& rt) {
  const int64_t words = gpu::routing_words(stage_tokens, k);
  int32_t* p = buf.data() + r * words;
  p[0] = rt.num_tokens;
  for (std::size_t i = 0; i < rt.topk_ids.size(); ++i) {
    p[1 + i] = rt.topk_ids[i];
    const float f = float(rt.topk_weights[i]);
    std::memcpy(p + 1 + stage_tokens * k + int64_t(i), &f, 4);
  }
}
sim::ReplicaRouting routing_of(int n, int k, int E, int seed) {
  sim::ReplicaRouting rt;
  rt.num_tokens = n;
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < k; ++j) {
      rt.topk_ids.push_back((t * 7 + j * 5 + seed * 3) % E);  // distinct per token while 5 * j < E
      rt.topk_weights.push_back(0.125 * (1 + ((t + j + seed) % 7)));
    }
  return rt;
}
}  // namespace

TEST_CASE("scheduled MoE: which plans run by schedule") {
  const ModelSpec shared = tiny();                          // a shared expert (Qwen2-MoE)
  const ModelSpec plain = tiny("Qwen3MoeForCausalLM");      // no shared expert
  auto layout = [](int atp, int adp, int mtp, int mep, MoeComm c) {
    Layout l;
    l.attn_tp = atp, l.attn_dp = adp, l.moe_tp = mtp, l.moe_ep = mep, l.moe_comm = c;
    return l;
  };
  CHECK(gpu::moe_sched_for(layout(1, 4, 1, 4, MoeComm::nccl_a2a), plain) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(2, 2, 1, 4, MoeComm::nccl_a2a), plain) == gpu::MoeSched::ep);
  // a2a with TP inside the experts: the EP schedule with the moe-TP all-gather / reduce-scatter.
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::nccl_a2a), plain) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(1, 4, 2, 2, MoeComm::nccl_a2a), plain) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(4, 1, 2, 2, MoeComm::nccl_a2a), plain) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::fused), plain) == gpu::MoeSched::fused);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::rs_a2a_ag), plain) == gpu::MoeSched::rs_a2a_ag);
  CHECK(gpu::moe_sched_for(layout(4, 1, 4, 1, MoeComm::tp_allreduce), plain) == gpu::MoeSched::none);
  // A shared expert runs inside the schedules (on each moe-TP group's own tokens).
  CHECK(gpu::moe_sched_for(layout(1, 4, 1, 4, MoeComm::nccl_a2a), shared) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::nccl_a2a), shared) == gpu::MoeSched::ep);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::fused), shared) == gpu::MoeSched::fused);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::rs_a2a_ag), shared) == gpu::MoeSched::rs_a2a_ag);
  CHECK(gpu::moe_sched_for(layout(2, 2, 2, 2, MoeComm::tp_allreduce), shared) == gpu::MoeSched::none);
  // Every planner layout: the shard carries the layout's schedule, and every layout whose plan
  // says a2a, fused or rs-a2a-ag (with an EP degree > 1 and a stage of > 1 rank) has one, with
  // and without a shared expert.
  for (const ModelSpec* m : {&plain, &shared})
  for (int R : {2, 4, 8})
    for (const Layout& l : planner::enumerate_layouts(R)) {
      if (l.pp > m->num_layers) continue;
      CAPTURE(l.name());
      const auto rm = build_rank_map(cluster_of(R), *m, l);
      for (const auto& info : rm) CHECK(shard_for_rank(l, info, *m).moe_sched == gpu::moe_sched_for(l, *m));
      const gpu::MoeSched got = gpu::moe_sched_for(l, *m);
      if (l.moe_comm == MoeComm::tp_allreduce || l.stage_size() == 1) {
        CHECK(got == gpu::MoeSched::none);
      } else {
        const gpu::MoeSched want = l.moe_comm == MoeComm::nccl_a2a ? gpu::MoeSched::ep
                                   : l.moe_comm == MoeComm::fused  ? gpu::MoeSched::fused
                                                                   : gpu::MoeSched::rs_a2a_ag;
        CHECK(got == want);
      }
    }
}

TEST_CASE("scheduled MoE: the routing exchange gives one table per replica, uneven and empty replicas included") {
  const int S = 8, A = 2, k = 3, E = 16;
  const int64_t Ts = 5;
  const std::vector<int> n = {5, 0, 3, 1};  // tokens per replica; replica 1 has none
  std::vector<int32_t> buf(std::size_t(S * gpu::routing_words(Ts, k)), -7);
  std::vector<sim::ReplicaRouting> want;
  for (int d = 0; d < S / A; ++d) {
    want.push_back(routing_of(n[std::size_t(d)], k, E, d));
    for (int a = 0; a < A; ++a) put_piece(buf, d * A + a, Ts, k, want.back());
  }
  const auto got = gpu::unpack_routing(buf, S, A, Ts, k);
  REQUIRE(got.size() == want.size());
  for (std::size_t d = 0; d < got.size(); ++d) {
    CHECK(got[d].num_tokens == want[d].num_tokens);
    CHECK(got[d].topk_ids == want[d].topk_ids);
    CHECK(got[d].topk_weights == want[d].topk_weights);  // multiples of 1/8: exact in f32
  }
  // Peers of one replica that disagree, a count above the piece, a wrong size.
  auto bad = buf;
  bad[std::size_t(gpu::routing_words(Ts, k))] = 4;  // rank 1 (replica 0) says 4 tokens, rank 0 says 5
  CHECK_THROWS_AS(gpu::unpack_routing(bad, S, A, Ts, k), RuntimeError);
  bad = buf;
  bad[0] = 6;
  CHECK_THROWS_AS(gpu::unpack_routing(bad, S, A, Ts, k), InputError);
  CHECK_THROWS_AS(gpu::unpack_routing(std::span<const int32_t>(buf).first(buf.size() - 1), S, A, Ts, k), InputError);
}

TEST_CASE("scheduled MoE: the expert slots carry every (row, expert) pair of the schedule once") {
  sim::CommGeometry g;
  g.num_ranks = 8, g.gpus_per_node = 8, g.attn_tp = 2, g.attn_dp = 4, g.moe_tp = 2, g.moe_ep = 4;
  g.num_experts = 16, g.top_k = 3, g.hidden = 8, g.elem_bytes = 2;
  const std::vector<int> n = {5, 0, 3, 1};
  std::vector<sim::ReplicaRouting> rt;
  for (int d = 0; d < 4; ++d) rt.push_back(routing_of(n[std::size_t(d)], g.top_k, g.num_experts, d));
  // Fused: every (token, expert) of every replica appears in exactly one group's slots, with its weight.
  const auto fs = sim::build_fused_schedule(g, rt);
  std::map<std::tuple<int, int, int>, double> seen;  // (replica, token, global expert) -> weight
  for (int q = 0; q < 4; ++q) {
    const auto& xs = fs.expert_side[std::size_t(q)];
    const auto sl = gpu::fused_expert_slots(xs, g.top_k);
    REQUIRE(sl.rows == xs.num_rows());
    REQUIRE(sl.ids.size() == std::size_t(sl.rows * g.top_k));
    for (int64_t r = 0; r < sl.rows; ++r) {
      int blk = 0;
      while (xs.block_row_offset[std::size_t(blk) + 1] <= r) ++blk;
      const int src = ((q - blk) % 4 + 4) % 4;
      for (int j = 0; j < g.top_k; ++j) {
        const int e = sl.ids[std::size_t(r * g.top_k + j)];
        if (e < 0) continue;
        CHECK(e < 4);
        CHECK(seen.emplace(std::make_tuple(src, xs.row_src_token[std::size_t(r)], q * 4 + e),
                           sl.weights[std::size_t(r * g.top_k + j)]).second);
      }
    }
  }
  std::size_t pairs = 0;
  for (int d = 0; d < 4; ++d)
    for (int t = 0; t < n[std::size_t(d)]; ++t)
      for (int j = 0; j < g.top_k; ++j) {
        ++pairs;
        const auto it = seen.find(std::make_tuple(d, t, rt[std::size_t(d)].topk_ids[std::size_t(t * g.top_k + j)]));
        REQUIRE(it != seen.end());
        CHECK(it->second == rt[std::size_t(d)].topk_weights[std::size_t(t * g.top_k + j)]);
      }
  CHECK(seen.size() == pairs);
  // EP (moe_tp 1): one unweighted slot per received row, its local expert, in (source, expert) order.
  g.moe_tp = 1, g.moe_ep = 8;
  const auto es = sim::build_ep_schedule(g, rt, sim::EpSource::split);
  int64_t rows = 0;
  for (int r = 0; r < 8; ++r) {
    const auto sl = gpu::ep_expert_slots(es, r);
    CHECK(sl.k == 1);
    REQUIRE(sl.rows == es.ranks[std::size_t(r)].recv_rows());
    std::size_t i = 0;
    for (int src = 0; src < 8; ++src)
      for (int e = 0; e < 2; ++e)
        for (int64_t c = 0; c < es.ranks[std::size_t(r)].recv_counts[std::size_t(src * 2 + e)]; ++c, ++i) {
          CHECK(sl.ids[i] == e);
          CHECK(sl.weights[i] == 1.f);
        }
    rows += sl.rows;
  }
  CHECK(rows == int64_t(pairs));
  // EP with moe_tp 2 (EP 4, 4 local experts): every member of an EP index runs the index's
  // gathered rows (both members' received rows, member order), the same slots on both.
  g.moe_tp = 2, g.moe_ep = 4;
  const auto et = sim::build_ep_schedule(g, rt, sim::EpSource::split);
  int64_t tp_rows = 0;
  for (int r = 0; r < 8; ++r) {
    const auto sl = gpu::ep_expert_slots(et, r);
    CHECK(sl.k == 1);
    const int base = r - r % 2;
    REQUIRE(sl.rows == et.ranks[std::size_t(base)].recv_rows() + et.ranks[std::size_t(base + 1)].recv_rows());
    CHECK(sl.ids == gpu::ep_expert_slots(et, base).ids);
    std::size_t i = 0;
    for (int u = base; u < base + 2; ++u) {
      CHECK(et.ranks[std::size_t(u)].gather_begin == int64_t(i));
      for (int src = 0; src < 8; ++src)
        for (int e = 0; e < 4; ++e)
          for (int64_t c = 0; c < et.ranks[std::size_t(u)].recv_counts[std::size_t(src * 4 + e)]; ++c, ++i)
            CHECK(sl.ids[i] == e);
    }
    if (r % 2 == 0) tp_rows += sl.rows;
  }
  CHECK(tp_rows == int64_t(pairs));
  // The bytes a rank moves by the schedule: the summed rounds (+ the final all-gather, fused).
  const auto b = gpu::schedule_bytes(es, 0);
  CHECK(b.dispatch == es.ranks[0].dispatch_bytes.inter_bytes + es.ranks[0].dispatch_bytes.intra_bytes);
  CHECK(b.combine == es.ranks[0].combine_bytes.inter_bytes + es.ranks[0].combine_bytes.intra_bytes);
  double d0 = 0, c0 = 0;
  for (const auto& st : fs.steps[0]) {
    d0 += st.dispatch_bytes.intra_bytes + st.dispatch_bytes.inter_bytes;
    c0 += st.combine_bytes.intra_bytes + st.combine_bytes.inter_bytes;
  }
  c0 += fs.final_ag_bytes[0].intra_bytes + fs.final_ag_bytes[0].inter_bytes;
  CHECK(gpu::schedule_bytes(fs, 0).dispatch == d0);
  CHECK(gpu::schedule_bytes(fs, 0).combine == c0);
  CHECK(d0 > 0);
}
