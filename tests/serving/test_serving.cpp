// Serving simulator invariants, against test doubles of the cost model (test_doubles.hpp):
// conservation, determinism, scheduler limits, preemption, Little's law, M/D/1, DP-attention
// stragglers, metric definitions, capacity search.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/serving_report.hpp"
#include "test_doubles.hpp"

using namespace mixserve;
using namespace mixserve::sim;
using mixserve::sim::testing::constant_cost;
using mixserve::sim::testing::LinearCost;

namespace {

WorkloadSpec poisson_workload(double rate, int n, double in_mean, double out_mean, uint64_t seed) {
  WorkloadSpec w;
  w.name = "test";
  w.arrival = ArrivalKind::poisson;
  w.rate = rate;
  w.num_requests = n;
  w.seed = seed;
  w.input.kind = w.output.kind = LengthKind::lognormal;
  w.input.mean = in_mean;
  w.input.stddev = in_mean;
  w.output.mean = out_mean;
  w.output.stddev = out_mean;
  w.input.max = 8 * in_mean;
  w.output.max = 8 * out_mean;
  return w;
}

ServingConfig config(int replicas, int64_t kv_blocks, int max_seqs = 64, int64_t budget = 2048) {
  ServingConfig c;
  c.num_replicas = replicas;
  c.limits.max_num_seqs = max_seqs;
  c.limits.max_num_batched_tokens = budget;
  c.limits.kv_block_tokens = 16;
  c.limits.kv_blocks = kv_blocks;
  c.record_steps = true;
  return c;
}

// Token accounting from the step records alone (independent of the request records).
struct StepTotals {
  int64_t prefill = 0, decode = 0, max_seqs = 0, max_tokens = 0;
};
StepTotals totals(const SimResult& r) {
  StepTotals t;
  for (const auto& s : r.steps)
    for (const auto& b : s.batches) {
      t.prefill += b.prefill_tokens;
      t.decode += b.num_decode;
      t.max_seqs = std::max<int64_t>(t.max_seqs, b.num_prefill_seqs + b.num_decode);
      t.max_tokens = std::max(t.max_tokens, b.tokens());
    }
  return t;
}

}  // namespace

TEST_CASE("router names round-trip through their one table") {
  const auto names = router_names();
  CHECK(names == std::vector<std::string>{"round-robin", "least-loaded"});
  for (const auto& n : names) {
    const auto r = parse_router(n);
    REQUIRE(r.has_value());
    CHECK(to_string(*r) == n);
  }
  CHECK_FALSE(parse_router("random").has_value());
  CHECK_FALSE(parse_router("round_robin").has_value());
}

TEST_CASE("percentiles follow numpy's linear interpolation") {
  // numpy.percentile([1, 2, 3, 4], 90): position 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3) = 3.7.
  const std::vector<double> v = {1, 2, 3, 4};
  CHECK(percentile(v, 90) == doctest::Approx(3.7));
  CHECK(percentile(v, 50) == doctest::Approx(2.5));
  CHECK(percentile(v, 0) == 1);
  CHECK(percentile(v, 100) == 4);
  const LatencyStats s = latency_stats({4, 1, 3, 2});
  CHECK(s.mean == 2.5);
  CHECK(s.median == 2.5);
  CHECK(s.stddev == doctest::Approx(std::sqrt(1.25)));  // population std, as numpy.std
  // latency_stats selects instead of sorting: the same order statistics as percentile() of the
  // sorted values, exactly, at awkward sizes (with ties: values rounded to a coarse grid).
  Rng rng(5);
  for (size_t n : {size_t(1), size_t(2), size_t(3), size_t(7), size_t(10), size_t(101), size_t(997)}) {
    CAPTURE(n);
    std::vector<double> x(n);
    for (double& e : x) e = std::round(rng.uniform() * 50) / 4;
    const LatencyStats ls = latency_stats(x);
    std::sort(x.begin(), x.end());
    CHECK(ls.median == percentile(x, 50));
    CHECK(ls.p90 == percentile(x, 90));
    CHECK(ls.p99 == percentile(x, 99));
  }
}

TEST_CASE("every request finishes exactly once and tokens are conserved") {
  const LinearCost cm(2000, 20, 0.01);
  for (int replicas : {1, 3}) {
    for (bool decode_first : {true, false}) {
      CAPTURE(replicas);
      CAPTURE(decode_first);
      ServingConfig cfg = config(replicas, 1 << 16);
      cfg.limits.decode_first = decode_first;
      const RequestStream s = generate_requests(poisson_workload(20, 600, 300, 100, 3));
      const SimResult r = simulate(cm, cfg, s);
      REQUIRE(r.requests.size() == s.requests.size());
      std::set<int64_t> ids;
      int64_t in = 0, out = 0, bad_order = 0;
      for (const auto& q : r.requests) {
        ids.insert(q.id);
        in += q.input_tokens;
        out += q.output_tokens;
        bad_order += !(q.arrival_s <= q.first_token_s && q.first_token_s <= q.finish_s);
      }
      CHECK(ids.size() == s.requests.size());
      CHECK(bad_order == 0);
      CHECK(r.metrics.completed == int64_t(s.requests.size()));
      CHECK(r.metrics.num_preemptions == 0);  // the cache is large enough
      const StepTotals t = totals(r);
      CHECK(t.prefill == in);                              // every prompt token computed once
      CHECK(t.decode == out - int64_t(s.requests.size()));  // the prefill yields the first token
      CHECK(r.itls_ms.size() == size_t(out) - s.requests.size());
      CHECK(r.metrics.total_output_tokens == out);
    }
  }
}

TEST_CASE("the scheduler obeys max_num_seqs, the token budget and chunked prefill") {
  const LinearCost cm(1000, 10);
  ServingConfig cfg = config(1, 1 << 16, /*max_seqs=*/8, /*budget=*/256);
  WorkloadSpec w = poisson_workload(50, 300, 600, 50, 5);
  const RequestStream s = generate_requests(w);
  const SimResult r = simulate(cm, cfg, s);
  const StepTotals t = totals(r);
  CHECK(t.max_seqs <= 8);
  CHECK(t.max_tokens <= 256);
  CHECK(t.max_seqs == 8);    // the load saturates the batch
  CHECK(t.max_tokens == 256);
  // Prompts longer than the budget are split into chunks: more prefill entries than requests.
  int64_t prefill_entries = 0;
  for (const auto& st : r.steps) prefill_entries += st.batches[0].num_prefill_seqs;
  CHECK(prefill_entries > int64_t(s.requests.size()));
  // Without chunked prefill a prompt longer than the budget can never run.
  cfg.limits.chunked_prefill = false;
  CHECK_THROWS_AS(simulate(cm, cfg, s), InputError);
}

TEST_CASE("a full KV cache preempts by recompute and everything still finishes") {
  const LinearCost cm(1000, 10, 0.01);
  // 64 blocks of 16 tokens = 1024 tokens per replica: far less than the load wants.
  ServingConfig cfg = config(1, 64, 64, 2048);
  WorkloadSpec w = poisson_workload(40, 200, 200, 200, 9);
  w.input.max = w.output.max = 500;
  const RequestStream s = generate_requests(w);
  const SimResult r = simulate(cm, cfg, s);
  CHECK(r.metrics.completed == 200);
  CHECK(r.metrics.num_preemptions > 0);
  int64_t in = 0, out = 0, pre = 0;
  for (const auto& q : r.requests) {
    in += q.input_tokens;
    out += q.output_tokens;
    pre += q.preemptions;
  }
  CHECK(pre == r.metrics.num_preemptions);
  const StepTotals t = totals(r);
  // Recompute re-prefills prompts and generated tokens: more computed tokens than the minimum,
  // but exactly one new token per decode entry and per completed (re)prefill.
  CHECK(t.prefill + t.decode > in + out - 200);
  CHECK(r.itls_ms.size() == size_t(out - 200));
  // A request longer than the whole cache is rejected up front, and so is one longer than
  // max_model_len.
  RequestStream big;
  big.requests.push_back(Request{0, 0.0, 1000, 100, -1});
  CHECK_THROWS_AS(simulate(cm, cfg, big), InputError);
  big.requests[0] = Request{0, 0.0, 300, 300, -1};
  CHECK_NOTHROW(simulate(cm, cfg, big));
  cfg.limits.max_model_len = 512;
  CHECK_THROWS_AS(simulate(cm, cfg, big), InputError);
  // Open-loop arrivals out of order are rejected, not silently reordered.
  RequestStream unsorted;
  unsorted.requests = {Request{0, 1.0, 10, 10, -1}, Request{1, 0.5, 10, 10, -1}};
  CHECK_THROWS_AS(simulate(cm, cfg, unsorted), InputError);
}

TEST_CASE("simulation is deterministic for a seed") {
  const LinearCost cm(1500, 15, 0.02);
  ServingConfig cfg = config(2, 4096);
  cfg.router = RouterKind::least_loaded;
  const WorkloadSpec w = poisson_workload(30, 500, 400, 150, 11);
  const SimResult a = simulate(cm, cfg, generate_requests(w));
  const SimResult b = simulate(cm, cfg, generate_requests(w));
  bool same = a.requests.size() == b.requests.size();
  for (size_t i = 0; same && i < a.requests.size(); ++i)
    same = a.requests[i].finish_s == b.requests[i].finish_s &&
           a.requests[i].first_token_s == b.requests[i].first_token_s &&
           a.requests[i].replica == b.requests[i].replica;
  CHECK(same);
  CHECK(a.metrics.num_steps == b.metrics.num_steps);
}

TEST_CASE("Little's law holds on a steady run within 5%") {
  // L (time-average number of requests in the system over the middle of the run) against
  // lambda (the configured rate) * W (mean sojourn of the requests that arrived in that window).
  const LinearCost cm(3000, 20, 0.005);
  ServingConfig cfg = config(2, 1 << 16);
  const double rate = 25;
  const WorkloadSpec w = poisson_workload(rate, 20000, 200, 120, 17);
  const SimResult r = simulate(cm, cfg, generate_requests(w));
  const double t_last_arrival = r.requests.back().arrival_s;
  const double t1 = 0.1 * t_last_arrival, t2 = 0.9 * t_last_arrival;
  std::vector<std::pair<double, int>> ev;
  double w_sum = 0;
  int w_n = 0;
  for (const auto& q : r.requests) {
    ev.emplace_back(q.arrival_s, 1);
    ev.emplace_back(q.finish_s, -1);
    if (q.arrival_s >= t1 && q.arrival_s < t2) {
      w_sum += q.finish_s - q.arrival_s;
      ++w_n;
    }
  }
  std::sort(ev.begin(), ev.end());
  double area = 0, t_prev = 0;
  int n_in = 0;
  for (const auto& [t, d] : ev) {
    const double a = std::clamp(t_prev, t1, t2), b = std::clamp(t, t1, t2);
    area += n_in * (b - a);
    n_in += d;
    t_prev = t;
  }
  const double L = area / (t2 - t1);
  const double lambda_W = rate * (w_sum / w_n);
  CAPTURE(L);
  CAPTURE(lambda_W);
  CHECK(L > 5);  // a loaded system, not a trivially empty one
  CHECK(std::abs(L - lambda_W) <= 0.05 * lambda_W);
}

TEST_CASE("a single server with constant step time matches M/D/1 within 5%") {
  // One sequence at a time, one token per request: each request is one step of D seconds, so
  // the engine is an M/D/1 queue. Pollaczek-Khinchine: Wq = rho * D / (2 (1 - rho)).
  const double D_us = 10000;
  const auto cm = constant_cost(D_us);
  ServingConfig cfg = config(1, 1024, /*max_seqs=*/1);
  cfg.record_steps = false;
  for (double rho : {0.5, 0.8}) {
    CAPTURE(rho);
    WorkloadSpec w = poisson_workload(rho / (D_us * 1e-6), 200000, 1, 1, 23);
    w.input.kind = w.output.kind = LengthKind::fixed;
    w.input.value = w.output.value = 1;
    const SimResult r = simulate(cm, cfg, generate_requests(w));
    const double D = D_us * 1e-3;  // ms
    const double wq_sim = r.metrics.ttft.mean - D;
    const double wq_theory = rho * D / (2 * (1 - rho));
    CAPTURE(wq_sim);
    CAPTURE(wq_theory);
    CHECK(std::abs(wq_sim - wq_theory) <= 0.05 * wq_theory);
  }
}

TEST_CASE("a DP-attention group with an overloaded rank is slower by what the cost model says") {
  // 16 requests pinned to 2 replicas, all at t = 0, 1 prompt token, 50 output tokens: every
  // step carries the same batch, so the run lasts 50 steps of the cost model's time for it.
  const LinearCost cm(1000, 100);
  ServingConfig cfg = config(2, 1 << 12);
  auto run = [&](int on_rank0) {
    RequestStream s;
    for (int i = 0; i < 16; ++i) s.requests.push_back(Request{i, 0.0, 1, 50, i < on_rank0 ? 0 : 1});
    return simulate(cm, cfg, s);
  };
  const SimResult balanced = run(8), skewed = run(12);
  std::vector<ReplicaBatch> bal(2), skw(2);
  bal[0].num_decode = bal[1].num_decode = 8;
  skw[0].num_decode = 12;
  skw[1].num_decode = 4;
  const double predicted = cm.step(skw, false).time_us / cm.step(bal, false).time_us;
  const double measured = skewed.metrics.duration_s / balanced.metrics.duration_s;
  CHECK(predicted > 1.2);
  CHECK(measured == doctest::Approx(predicted).epsilon(1e-9));
  // One request on 2 replicas: the idle replica runs an empty batch every step.
  RequestStream one;
  one.requests.push_back(Request{0, 0.0, 10, 5, -1});
  const SimResult r1 = simulate(cm, cfg, one);
  CHECK(r1.metrics.num_empty_replica_steps == r1.metrics.num_steps);
}

TEST_CASE("routers: round robin alternates, least loaded balances unequal requests") {
  const LinearCost cm(1000, 10);
  ServingConfig cfg = config(2, 1 << 14);
  RequestStream s;
  // Long, short, long, short...: round robin puts all long ones on replica 0.
  for (int i = 0; i < 8; ++i) s.requests.push_back(Request{i, 0.001 * i, 16, i % 2 ? 2 : 400, -1});
  const SimResult rr = simulate(cm, cfg, s);
  for (const auto& q : rr.requests) CHECK(q.replica == int(q.id % 2));
  cfg.router = RouterKind::least_loaded;
  const SimResult ll = simulate(cm, cfg, s);
  std::map<int, int> long_per_replica;
  for (const auto& q : ll.requests)
    if (q.output_tokens == 400) ++long_per_replica[q.replica];
  CHECK(long_per_replica[0] >= 1);
  CHECK(long_per_replica[1] >= 1);
  CHECK(ll.metrics.duration_s < rr.metrics.duration_s);
}

TEST_CASE("closed loop keeps exactly N requests in flight") {
  const LinearCost cm(1000, 10);
  ServingConfig cfg = config(1, 1 << 14);
  WorkloadSpec w = poisson_workload(1, 400, 100, 50, 29);
  w.arrival = ArrivalKind::closed_loop;
  w.concurrency = 8;
  const SimResult r = simulate(cm, cfg, generate_requests(w));
  CHECK(r.metrics.completed == 400);
  CHECK(r.metrics.max_concurrent_requests == 8);
  const StepTotals t = totals(r);
  CHECK(t.max_seqs <= 8);
}

TEST_CASE("metrics follow vLLM's definitions") {
  // Two requests, constant 10 ms steps, one replica: request 0 (prompt 4, 3 tokens) alone, then
  // request 1 arriving later. Hand-derived timeline in ms: r0 prefill [0,10) -> token 1 at 10,
  // decodes at 20, 30 -> finish 30. r1 arrives at 100: tokens at 110 and 120.
  const auto cm = constant_cost(10000);
  ServingConfig cfg = config(1, 1024);
  cfg.slo_ttft_ms = 10;
  cfg.slo_tpot_ms = 10;
  RequestStream s;
  s.requests.push_back(Request{0, 0.0, 4, 3, -1});
  s.requests.push_back(Request{1, 0.1, 4, 2, -1});
  const SimResult r = simulate(cm, cfg, s);
  const ServingMetrics& m = r.metrics;
  CHECK(r.requests[0].ttft_ms() == doctest::Approx(10));
  CHECK(r.requests[0].e2el_ms() == doctest::Approx(30));
  CHECK(r.requests[0].tpot_ms() == doctest::Approx(10));  // (30 - 10) / (3 - 1)
  CHECK(r.requests[1].ttft_ms() == doctest::Approx(10));
  CHECK(m.duration_s == doctest::Approx(0.12));
  CHECK(m.request_throughput == doctest::Approx(2 / 0.12));
  CHECK(m.output_throughput == doctest::Approx(5 / 0.12));
  CHECK(m.total_token_throughput == doctest::Approx(13 / 0.12));
  CHECK(m.good_requests == 2);
  CHECK(m.request_goodput == doctest::Approx(2 / 0.12));
  CHECK(m.itl.mean == doctest::Approx(10));
  CHECK(r.itls_ms.size() == 3);
  const auto j = metrics_to_json(m, cfg);
  for (const char* key : {"completed", "duration", "total_input_tokens", "total_output_tokens",
                          "request_throughput", "output_throughput", "total_token_throughput",
                          "request_goodput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
                          "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                          "p90_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "mixserve_num_steps"}) {
    CAPTURE(key);
    CHECK(j.contains(key));
  }
  CHECK(j["total_input_tokens"] == 8);
  const std::string csv = requests_csv(r);
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 3);
  const auto trace = chrome_trace(r);
  CHECK(trace["traceEvents"].size() == r.steps.size());
  // A tighter TTFT SLO than the step time: nobody is good.
  cfg.slo_ttft_ms = 5;
  CHECK(compute_metrics(r, cfg).good_requests == 0);
}

TEST_CASE("pipeline stages overlap micro-batches") {
  // PP = 2: a step takes 20 ms end to end, a stage 10 ms; micro-batches of the two slots
  // interleave one stage apart.
  class PipeCost final : public StepCostModel {
   public:
    std::string name() const override { return "pipe"; }
    StepCost step(std::span<const ReplicaBatch>, bool) const override {
      StepCost c;
      c.time_us = 20000;
      c.stage_time_us = 10000;
      return c;
    }
    MemoryBreakdown memory(const RuntimeLimits&) const override { return {}; }
  } cm;
  ServingConfig cfg = config(1, 1 << 12);
  RequestStream s;
  for (int i = 0; i < 2; ++i) s.requests.push_back(Request{i, 0.0, 1, 100, -1});
  cfg.pp = 1;
  const double t1 = simulate(cm, cfg, s).metrics.duration_s;
  cfg.pp = 2;
  const SimResult r2 = simulate(cm, cfg, s);
  // pp = 1: both in one batch, 100 steps of 20 ms = 2 s. pp = 2: one request per slot; the
  // slots enter the pipeline 10 ms (one stage) apart and each steps every 20 ms: 2.01 s.
  CHECK(t1 == doctest::Approx(2.0));
  CHECK(r2.metrics.duration_s == doctest::Approx(2.01));
  REQUIRE(r2.steps.size() >= 3);
  CHECK(r2.steps[1].start_s - r2.steps[0].start_s == doctest::Approx(0.01));
  CHECK(r2.steps[1].micro_batch != r2.steps[0].micro_batch);
}

TEST_CASE("capacity search: rescaling time rescales the capacity") {
  // Dimensional analysis: multiplying every step time and every SLO by c and dividing the rate
  // by c gives the same simulation, so the sustained rate must scale by 1/c (within the search
  // tolerance) -- independent of how the simulator computes it.
  const WorkloadSpec w = poisson_workload(1, 400, 200, 60, 31);
  ServingConfig cfg = config(1, 1 << 14);
  cfg.record_steps = false;
  CapacityOptions opt;
  opt.slo_ttft_ms = 200;
  opt.slo_tpot_ms = 25;
  opt.num_requests = 200;
  opt.trial_duration_s = 3;  // trials of max(200, 3 s of arrivals) requests
  opt.rel_tol = 0.01;
  const LinearCost fast(2000, 20, 0.01);
  const LinearCost slow(4000, 40, 0.02);
  int trials = 0;
  double best_sustained = 0;
  opt.on_trial = [&](double rate, int, bool sustained) {
    ++trials;
    if (sustained) best_sustained = std::max(best_sustained, rate);
  };
  const CapacityResult a = capacity_search(fast, cfg, w, opt, 8);
  CHECK(trials == a.simulations);
  CHECK(best_sustained == a.max_rate);
  opt.on_trial = nullptr;
  CapacityOptions opt2 = opt;
  opt2.slo_ttft_ms *= 2;
  opt2.slo_tpot_ms *= 2;
  opt2.trial_duration_s *= 2;
  opt2.start_rate = 0.5;
  const CapacityResult b = capacity_search(slow, cfg, w, opt2, 8);
  CAPTURE(a.max_rate);
  CAPTURE(b.max_rate);
  CHECK(a.max_rate > 0);
  CHECK(a.at_max.slo_attainment >= 0.9);
  CHECK(a.max_rate_per_gpu == doctest::Approx(a.max_rate / 8));
  CHECK(b.max_rate * 2 == doctest::Approx(a.max_rate).epsilon(0.03));
  // The trial at the found rate spans the requested arrival window.
  CHECK(a.at_max.completed == std::max<int64_t>(200, int64_t(std::ceil(a.max_rate * 3))));
  // A burst workload has no rate to search.
  WorkloadSpec burst = w;
  burst.arrival = ArrivalKind::burst;
  CHECK_THROWS_AS(capacity_search(fast, cfg, burst, opt, 8), InputError);
}

TEST_CASE("the Pareto front keeps the points no other point dominates") {
  const std::vector<CurvePoint> pts = {
      {"a", 10, 100, ""}, {"a", 20, 300, ""}, {"b", 15, 90, ""}, {"b", 20, 250, ""},
      {"c", 5, 200, ""}};
  const auto f = pareto_front(pts);
  REQUIRE(f.size() == 2);
  CHECK(f[0] == 2);  // (15, 90) dominates (10, 100) and (5, 200)
  CHECK(f[1] == 3);  // (20, 250) dominates (20, 300)
  const std::string svg = pareto_svg(pts, "t", "x", "y");
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
}

TEST_CASE("burstier arrivals at the same rate wait longer") {
  // Gamma inter-arrivals with shape < 1 cluster requests; at the same mean rate a queue sees
  // longer waits (Kingman: the wait grows with the arrival CV^2 = 1/shape).
  const LinearCost cm(2000, 20, 0.01);
  ServingConfig cfg = config(1, 1 << 16, 16, 1024);
  cfg.record_steps = false;
  WorkloadSpec w = poisson_workload(12, 4000, 200, 60, 37);
  const double poisson_ttft = simulate(cm, cfg, generate_requests(w)).metrics.ttft.mean;
  w.arrival = ArrivalKind::gamma;
  w.burstiness = 0.2;
  const double bursty_ttft = simulate(cm, cfg, generate_requests(w)).metrics.ttft.mean;
  CAPTURE(poisson_ttft);
  CAPTURE(bursty_ttft);
  CHECK(bursty_ttft > 1.5 * poisson_ttft);
}

TEST_CASE("the real cost model drives a plan's layout end to end") {
  // DeepSeek-V2-Lite on one 8 x H200 node, attention TP1 x DP8, MoE EP8: KV blocks come from the
  // memory model, every request finishes, the DP group's step times are the cost model's.
  const ModelSpec model = load_model("deepseek-v2-lite");
  const ClusterSpec cluster = load_cluster("h200-1x8");
  const HardwareProfile profile = load_profile(cluster.profile);
  Layout l;
  l.attn_dp = 8;
  l.moe_ep = 8;
  l.moe_comm = MoeComm::nccl_a2a;
  WorkloadSpec w = load_workload("sharegpt-like");
  w.num_requests = 300;
  w.rate = 20;
  const auto cm = make_cost_model("mixserve", model, cluster, profile, l, {});
  ServingConfig cfg = serving_config_for(*cm, l, RuntimeLimits{}, w);
  CHECK(cfg.num_replicas == 8);
  CHECK(cfg.limits.kv_blocks == cm->memory(cfg.limits).kv_tokens / cfg.limits.kv_block_tokens);
  cfg.record_steps = true;
  const SimResult r = simulate(*cm, cfg, generate_requests(w));
  CHECK(r.metrics.completed == 300);
  REQUIRE(!r.steps.empty());
  int64_t mismatched = 0;
  for (size_t i = 0; i < r.steps.size(); i += 97) {
    // Every step carries the MoE load sampled for it (26 MoE layers), and costs exactly that.
    CHECK(r.steps[i].moe_max_over_mean.size() == 26);
    mismatched += r.steps[i].time_us !=
                  cm->step(r.steps[i].batches, false, MoeStepLoad{r.steps[i].moe_max_over_mean}).time_us;
  }
  CHECK(mismatched == 0);
  CHECK(r.metrics.mean_moe_max_over_mean > 1.0);
  CHECK(r.metrics.ttft.p90 > 0);
  CHECK(r.metrics.itl.mean > 0);
}

TEST_CASE("sampled MoE load per step: deterministic, skew lengthens steps as the expected load does") {
  // DeepSeek-V2-Lite, 8 x H200, attention DP8, MoE EP8 (a2a): the same 400 requests with
  // uniform and zipf(1.0) routing, loads sampled per step vs the expected maximum.
  const ModelSpec model = load_model("deepseek-v2-lite");
  const ClusterSpec cluster = load_cluster("h200-1x8");
  const HardwareProfile profile = load_profile(cluster.profile);
  Layout l;
  l.attn_dp = 8;
  l.moe_ep = 8;
  l.moe_comm = MoeComm::nccl_a2a;
  WorkloadSpec w = load_workload("sharegpt-like");
  w.num_requests = 400;
  w.rate = 30;
  const RequestStream stream = generate_requests(w);
  auto mean_step = [&](const RoutingModel& r, bool sampled, uint64_t seed) {
    const auto cm = make_cost_model("mixserve", model, cluster, profile, l, {.routing = r});
    ServingConfig cfg = serving_config_for(*cm, l, RuntimeLimits{}, w);
    cfg.sample_moe_load = sampled;
    cfg.moe_load_seed = seed;
    const SimResult res = simulate(*cm, cfg, stream);
    REQUIRE(res.metrics.completed == 400);
    return res.metrics;
  };
  RoutingModel zipf;
  zipf.kind = "zipf";
  zipf.skew = 1.0;
  const ServingMetrics us = mean_step({}, true, 1), ue = mean_step({}, false, 1);
  const ServingMetrics zs = mean_step(zipf, true, 1), ze = mean_step(zipf, false, 1);
  CHECK(us.mean_moe_max_over_mean > 1.0);
  CHECK(ue.mean_moe_max_over_mean == 0);  // not sampled
  CHECK(zs.mean_moe_max_over_mean > us.mean_moe_max_over_mean);
  // Same seed, same run; another seed, other loads.
  const ServingMetrics us2 = mean_step({}, true, 1), us3 = mean_step({}, true, 2);
  CHECK(us2.mean_step_time_ms == us.mean_step_time_ms);
  CHECK(us2.ttft.p90 == us.ttft.p90);
  CHECK(us3.mean_moe_max_over_mean != us.mean_moe_max_over_mean);
  // Sampled vs expected: the same mean step time within 3% for each routing (the sampler keeps
  // the ranks' correlation, which the expected formula drops: a few percent of the excess load,
  // under 1% of a step; the rest is the scheduler's feedback on different step times). Skew
  // lengthens steps with either. (The precise comparison of the skew's effect, sampled vs
  // expected, is at the step level in tests/sim/test_moe_sampler.cpp.)
  CAPTURE(us.mean_step_time_ms);
  CAPTURE(ue.mean_step_time_ms);
  CAPTURE(zs.mean_step_time_ms);
  CAPTURE(ze.mean_step_time_ms);
  CHECK(us.mean_step_time_ms == doctest::Approx(ue.mean_step_time_ms).epsilon(0.03));
  CHECK(zs.mean_step_time_ms == doctest::Approx(ze.mean_step_time_ms).epsilon(0.03));
  CHECK(zs.mean_step_time_ms > us.mean_step_time_ms);
  CHECK(ze.mean_step_time_ms > ue.mean_step_time_ms);
}
