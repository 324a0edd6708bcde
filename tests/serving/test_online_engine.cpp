// The online engine's host side (executor/online_engine.hpp) without a device. Driven by the cost
// model's clock instead of the host's, it must be the serving simulator: the same per-replica
// batches step for step and the same metrics (TTFT, ITL, E2EL, preemptions, empty replica-steps)
// for 1, 2 and 4 attention-DP replicas, round-robin and least-loaded routing, Poisson and burst
// arrivals, and a KV cache small enough to preempt. The model's inputs are checked too: every
// SequenceStep carries the sequence's own tokens (prompt, then the ids sampled for it, which a
// fake sampler makes unique per (request, position)), block ids of its replica's pool that no
// other sequence of the same step holds, enough blocks for its positions; and bad configs are
// InputErrors.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/online_engine.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/workload_gen.hpp"

using namespace mixserve;

namespace {

// The fake sampler: the id a request gets when its length reaches `len` tokens.
int32_t fake_id(int32_t request, int64_t len) { return static_cast<int32_t>((request * 31 + len) % 1000); }

struct Case {
  int dp = 1;
  sim::RouterKind router = sim::RouterKind::round_robin;
  ArrivalKind arrival = ArrivalKind::poisson;
  int64_t kv_blocks = 0;  // 0: enough for everything
};

std::string name_of(const Case& c) {
  return "dp " + std::to_string(c.dp) + ", " + std::string(sim::to_string(c.router)) + ", " +
         std::string(to_string(c.arrival)) + ", kv_blocks " + std::to_string(c.kv_blocks);
}

// The cluster's 8 GPUs as attention TP(8/dp) x DP(dp), MoE TP(8/dp) x EP(dp).
Layout layout_for(int dp) {
  Layout l;
  l.attn_dp = dp;
  l.attn_tp = 8 / dp;
  l.moe_ep = dp;
  l.moe_tp = 8 / dp;
  l.moe_comm = dp > 1 ? MoeComm::nccl_a2a : MoeComm::tp_allreduce;
  return l;
}

void run_case(const Case& c) {
  INFO(name_of(c));
  const ModelSpec model = model::with_num_layers(load_model("qwen3-30b-a3b"), 4);
  const ClusterSpec cluster = load_cluster(std::string(MIXSERVE_SOURCE_DIR) + "/configs/clusters/h200-1x8.yaml");
  const Layout layout = layout_for(c.dp);
  const auto cm = sim::make_cost_model("mixserve", model, cluster, load_profile("h200"), layout,
                                       sim::CostModelOptions{});
  WorkloadSpec w = load_workload("sharegpt-paper");
  w.arrival = c.arrival;
  w.rate = 40;  // req/s: queues build up, replicas go idle between bursts of arrivals
  w.num_requests = 60;
  w.seed = 17;
  w.max_seq_len = 1024;
  RuntimeLimits lim;
  lim.max_num_seqs = 8;
  lim.max_num_batched_tokens = 512;
  lim.kv_block_tokens = 16;
  sim::ServingConfig cfg = sim::serving_config_for(*cm, layout, lim, w);
  cfg.sample_moe_load = false;
  cfg.router = c.router;
  cfg.record_steps = true;
  if (c.kv_blocks > 0) cfg.limits.kv_blocks = c.kv_blocks;
  const sim::RequestStream stream = sim::generate_requests(w);
  const size_t n = stream.requests.size();
  REQUIRE(n == 60);

  std::vector<std::vector<int32_t>> prompts(n);
  for (size_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < stream.requests[i].input_tokens; ++k)
      prompts[i].push_back(static_cast<int32_t>(-1 - int64_t(i) * 100000 - k));  // unique, never an id
  auto content = [&](int32_t req, int64_t pos) {
    return pos < int64_t(prompts[size_t(req)].size()) ? prompts[size_t(req)][size_t(pos)] : fake_id(req, pos);
  };

  const sim::SimResult want = sim::simulate(*cm, cfg, stream);
  gpu::OnlineEngine eng(cfg, stream, prompts);
  CHECK(eng.num_replicas() == c.dp);
  double t = 0, sum_ms = 0;
  size_t k = 0;
  int64_t bad_tokens = 0, bad_blocks = 0, bad_steps = 0;
  while (!eng.done()) {
    eng.admit_until(t);
    if (!eng.has_work()) {
      t = eng.next_arrival_s();
      REQUIRE(t < 1e9);
      continue;
    }
    const auto& st = eng.schedule();
    REQUIRE(st.replicas.size() == size_t(c.dp));
    REQUIRE(k < want.steps.size());
    for (int d = 0; d < c.dp; ++d) {
      const auto& x = want.steps[k].batches[size_t(d)];
      const auto& y = st.replicas[size_t(d)];
      if (x.prefill_tokens != y.prefill_tokens || x.num_prefill_seqs != y.num_prefill_seqs ||
          x.num_decode != y.num_decode || x.decode_context != y.decode_context ||
          x.prefill_attn_pairs != y.prefill_attn_pairs)
        ++bad_steps;
    }
    // The model's inputs: own tokens, own blocks of the replica's pool, enough of them.
    std::vector<std::vector<int32_t>> ids(size_t(c.dp));
    for (int d = 0; d < c.dp; ++d) {
      std::set<int32_t> used;
      REQUIRE(st.batches[size_t(d)].size() == st.lists[size_t(d)].size());
      for (size_t j = 0; j < st.lists[size_t(d)].size(); ++j) {
        const int32_t req = st.lists[size_t(d)][j].seq;
        const model::SequenceStep& q = st.batches[size_t(d)][j];
        CHECK(eng.replica_of(req) == d);
        CHECK(int64_t(q.tokens.size()) == st.lists[size_t(d)][j].tokens);
        for (size_t p = 0; p < q.tokens.size(); ++p)
          bad_tokens += q.tokens[p] != content(req, q.position + int64_t(p));
        if (int64_t(q.block_table.size()) < sim::blocks_for(q.position + int64_t(q.tokens.size()), 16)) ++bad_blocks;
        for (int32_t b : q.block_table) {
          if (b < 0 || b >= cfg.limits.kv_blocks || !used.insert(b).second) ++bad_blocks;
        }
        ids[size_t(d)].push_back(fake_id(req, q.position + int64_t(q.tokens.size())));
      }
    }
    const double step_us = cm->step(std::span<const sim::ReplicaBatch>(st.replicas), false).time_us;
    CHECK(step_us == doctest::Approx(want.steps[k].time_us).epsilon(1e-12));
    eng.take_tokens(ids);
    t += step_us * 1e-6;  // the simulator's t_end
    eng.complete(t);
    sum_ms += step_us / 1e3;
    ++k;
  }
  CHECK(bad_steps == 0);
  CHECK(bad_tokens == 0);
  CHECK(bad_blocks == 0);
  CHECK(k == want.steps.size());
  const sim::SimResult got = eng.result(sum_ms);
  const auto& a = got.metrics;
  const auto& b = want.metrics;
  CHECK(a.completed == 60);
  CHECK(a.num_steps == b.num_steps);
  CHECK(a.num_preemptions == b.num_preemptions);
  CHECK(a.num_empty_replica_steps == b.num_empty_replica_steps);
  CHECK(a.total_output_tokens == b.total_output_tokens);
  CHECK(a.max_concurrent_requests == b.max_concurrent_requests);
  CHECK(a.max_output_tokens_per_s == b.max_output_tokens_per_s);
  for (const auto& [x, y] : {std::pair{a.duration_s, b.duration_s}, {a.ttft.mean, b.ttft.mean},
                             {a.ttft.p99, b.ttft.p99}, {a.itl.mean, b.itl.mean}, {a.itl.p99, b.itl.p99},
                             {a.tpot.mean, b.tpot.mean}, {a.e2el.mean, b.e2el.mean},
                             {a.mean_step_time_ms, b.mean_step_time_ms}, {a.busy_fraction, b.busy_fraction},
                             {a.mean_tokens_per_step, b.mean_tokens_per_step}})
    CHECK(x == doctest::Approx(y).epsilon(1e-9));
  for (size_t i = 0; i < n; ++i) CHECK(got.requests[i].replica == want.requests[i].replica);
  // Every request has its output length in ids, each the one sampled at its position.
  const auto out = eng.output_ids();
  int64_t bad_ids = 0;
  for (size_t i = 0; i < n; ++i) {
    CHECK(int64_t(out[i].size()) == stream.requests[i].output_tokens);
    for (size_t g = 0; g < out[i].size(); ++g)
      bad_ids += out[i][g] != fake_id(int32_t(i), stream.requests[i].input_tokens + int64_t(g));
  }
  CHECK(bad_ids == 0);
  if (c.kv_blocks > 0) CHECK(b.num_preemptions > 0);  // the small cache did preempt
  if (c.dp > 1) CHECK(b.num_empty_replica_steps > 0);  // idle replicas stepped with empty batches
}

}  // namespace

TEST_CASE("online engine on the cost model's clock = the serving simulator, 1-4 attention-DP replicas") {
  for (const int dp : {1, 2, 4})
    for (const ArrivalKind arrival : {ArrivalKind::poisson, ArrivalKind::burst})
      run_case(Case{dp, sim::RouterKind::round_robin, arrival, 0});
  run_case(Case{2, sim::RouterKind::least_loaded, ArrivalKind::poisson, 0});
  run_case(Case{4, sim::RouterKind::least_loaded, ArrivalKind::burst, 0});
  // 70 blocks of 16 tokens per replica (a request of up to 1024 tokens needs 64): preemptions.
  run_case(Case{1, sim::RouterKind::round_robin, ArrivalKind::burst, 70});
  run_case(Case{2, sim::RouterKind::round_robin, ArrivalKind::poisson, 70});
}

TEST_CASE("online engine: round-robin routing by arrival order; bad configs are InputErrors") {
  sim::RequestStream s;
  for (int i = 0; i < 7; ++i) s.requests.push_back(sim::Request{i, 0.1 * i, 3, 2, -1});
  std::vector<std::vector<int32_t>> prompts(7, std::vector<int32_t>{1, 2, 3});
  sim::ServingConfig cfg;
  cfg.num_replicas = 3;
  cfg.limits.kv_blocks = 8;
  gpu::OnlineEngine eng(cfg, s, prompts);
  eng.admit_until(0.35);  // requests 0-3 arrived
  CHECK(eng.next_arrival_s() == doctest::Approx(0.4));
  CHECK(eng.replica_of(0) == 0);
  CHECK(eng.replica_of(1) == 1);
  CHECK(eng.replica_of(2) == 2);
  CHECK(eng.replica_of(3) == 0);
  CHECK(eng.replica_of(4) == -1);  // not arrived
  const auto& st = eng.schedule();
  CHECK(st.lists[0].size() == 2);
  CHECK(st.lists[1].size() == 1);
  CHECK(st.empty_replicas == 0);
  CHECK_THROWS_AS(eng.complete(1.0), RuntimeError);           // the ids first
  CHECK_THROWS_AS(eng.take_tokens({{1, 2}, {3}}), RuntimeError);  // 2 replicas' ids for 3
  CHECK_THROWS_AS(eng.take_tokens({{1}, {3}, {4}}), RuntimeError);  // replica 0 ran 2 sequences

  auto error_of = [&](const sim::ServingConfig& c, const sim::RequestStream& rs,
                      const std::vector<std::vector<int32_t>>& p) -> std::string {
    try {
      gpu::OnlineEngine e(c, rs, p);
    } catch (const InputError& e) {
      return e.what();
    }
    return "no InputError";
  };
  auto pp = cfg;
  pp.pp = 2;
  CHECK(error_of(pp, s, prompts).find("pp 1") != std::string::npos);
  auto pinned = s;
  pinned.requests[5].replica = 3;
  CHECK(error_of(cfg, pinned, prompts).find("replica 3 not in the plan") != std::string::npos);
  auto short_prompt = prompts;
  short_prompt[2].pop_back();
  CHECK(error_of(cfg, s, short_prompt).find("prompt ids") != std::string::npos);
  CHECK(error_of(cfg, s, std::vector<std::vector<int32_t>>(6)).find("6 prompts for 7 requests") != std::string::npos);
}
