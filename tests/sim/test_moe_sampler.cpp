// Per-step MoE load sampling (moe_load.hpp MoeLoadSampler) and the "mixserve" cost model's
// per-step load (cost_model.hpp step(..., MoeStepLoad)): the sampled maximum against exact
// token-level Monte Carlo, determinism per seed, per-layer histogram rows, and the step times
// a sampled load gives against the expected-maximum step times.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/moe_load.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

MoeLoadShape shape_of(int E, int k, int ep, int layers, RoutingModel r = {}) {
  MoeLoadShape s;
  s.num_experts = E;
  s.top_k = k;
  s.ep = ep;
  s.num_moe_layers = layers;
  for (int i = 0; i < layers; ++i) s.moe_layer_ids.push_back(i);
  s.routing = std::move(r);
  return s;
}

// Exact reference, written independently of the sampler (std::mt19937_64 and <random>):
// mean over trials of the most loaded EP rank's rows. uniform: k distinct experts per token;
// otherwise tokens * k independent rows from the expert shares.
double mc_max_rows(int T, int E, int k, int ep, const RoutingModel& r, int trials, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int g = E / ep;
  const bool uniform = r.kind == "uniform";
  const std::vector<double> share = expert_shares(E, r);
  std::discrete_distribution<int> pick(share.begin(), share.end());
  std::vector<int> pool(static_cast<size_t>(E));
  double sum = 0;
  for (int t = 0; t < trials; ++t) {
    std::vector<int> rows(size_t(ep), 0);
    if (uniform) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int i = 0; i < T; ++i)
        for (int j = 0; j < k; ++j) {  // k distinct experts: a partial shuffle
          std::uniform_int_distribution<int> d(j, E - 1);
          std::swap(pool[size_t(j)], pool[size_t(d(rng))]);
          rows[size_t(pool[size_t(j)] / g)]++;
        }
    } else {
      for (int i = 0; i < T * k; ++i) rows[size_t(pick(rng) / g)]++;
    }
    sum += *std::max_element(rows.begin(), rows.end());
  }
  return sum / trials;
}

// Mean of the sampled max rows: `draws` steps of a many-layer shape (layers are independent).
template <class Draw>
double sampled_max_rows(MoeLoadSampler& s, int T, int k, int ep, int draws, Draw draw) {
  MoeStepLoad load;
  double sum = 0;
  int64_t n = 0;
  for (int d = 0; d < draws; ++d) {
    draw(s, T, load);
    for (double x : load.max_over_mean) sum += x, ++n;
  }
  return sum / double(n) * double(T) * k / ep;
}

RoutingModel zipf(double skew) {
  RoutingModel r;
  r.kind = "zipf";
  r.skew = skew;
  return r;
}

}  // namespace

TEST_CASE("sampled max rows vs exact Monte Carlo: uniform top-k") {
  // Tolerance on the max rows: 1% relative, and 6% on its excess over the mean (the part the
  // sampler models). Sampling error: 4000 sampled layers and 600-1500 exact trials put the
  // standard error of either mean below 0.3% of the excess; the normal approximation's bias
  // (the rank counts' skewness ~ 1/sqrt(mean rows)) stays below 3% of the excess at >= 64
  // mean rows per rank.
  struct Case { int T, E, k, ep, trials; };
  for (const Case c : {Case{128, 256, 8, 16, 1500}, Case{1024, 256, 8, 16, 600},
                       Case{256, 64, 6, 8, 1500}, Case{512, 64, 6, 2, 1500},
                       Case{300, 160, 6, 32, 1000}}) {
    CAPTURE(c.T);
    CAPTURE(c.E);
    CAPTURE(c.k);
    CAPTURE(c.ep);
    const double mean = double(c.T) * c.k / c.ep;
    const double exact = mc_max_rows(c.T, c.E, c.k, c.ep, RoutingModel{}, c.trials, 11);
    MoeLoadSampler s(shape_of(c.E, c.k, c.ep, 100), 7);
    const double approx = sampled_max_rows(
        s, c.T, c.k, c.ep, 40,
        [](MoeLoadSampler& x, int T, MoeStepLoad& l) { x.sample_normal(T, l); });
    CAPTURE(exact);
    CAPTURE(approx);
    CHECK(std::abs(approx - exact) / exact < 0.01);
    CHECK(std::abs((approx - mean) - (exact - mean)) / (exact - mean) < 0.06);
    // The sampler's exact path is the reference's algorithm with another generator: 8% of the
    // excess (at ep = 2 the excess is ~20 rows and either mean's standard error ~0.4 rows).
    MoeLoadSampler s2(shape_of(c.E, c.k, c.ep, 100), 8);
    const double exact2 = sampled_max_rows(
        s2, c.T, c.k, c.ep, 20,
        [](MoeLoadSampler& x, int T, MoeStepLoad& l) { x.sample_exact(T, l); });
    CAPTURE(exact2);
    CHECK(std::abs((exact2 - mean) - (exact - mean)) / (exact - mean) < 0.08);
  }
}

TEST_CASE("sampled max rows vs exact Monte Carlo: zipf skew") {
  // Same tolerances and reasons as the uniform case.
  for (double skew : {0.5, 1.0}) {
    CAPTURE(skew);
    const int T = 512, E = 256, k = 8, ep = 16;
    const double mean = double(T) * k / ep;
    const double exact = mc_max_rows(T, E, k, ep, zipf(skew), 800, 12);
    MoeLoadSampler s(shape_of(E, k, ep, 100, zipf(skew)), 9);
    const double approx = sampled_max_rows(
        s, T, k, ep, 40, [](MoeLoadSampler& x, int t, MoeStepLoad& l) { x.sample_normal(t, l); });
    CAPTURE(exact);
    CAPTURE(approx);
    CHECK(approx > mean * 1.05);  // skew raises the hot rank well above the mean
    CHECK(std::abs(approx - exact) / exact < 0.01);
    CHECK(std::abs((approx - mean) - (exact - mean)) / (exact - mean) < 0.06);
    // The sampler's exact path (rows by inverse CDF over the ranks), 6% of the excess.
    MoeLoadSampler s2(shape_of(E, k, ep, 100, zipf(skew)), 10);
    const double exact2 = sampled_max_rows(
        s2, T, k, ep, 10, [](MoeLoadSampler& x, int t, MoeStepLoad& l) { x.sample_exact(t, l); });
    CAPTURE(exact2);
    CHECK(std::abs((exact2 - mean) - (exact - mean)) / (exact - mean) < 0.06);
  }
}

TEST_CASE("sampled loads agree with expected_ep_load on average") {
  // expected_ep_load ignores the ranks' negative correlation (the fixed total), which the
  // sampler keeps: for ep ranks that lowers the expected excess by about sqrt((ep-1)/ep),
  // 3% at ep = 16 (moe_load.cpp). Tolerance 6% of the excess.
  const int T = 2048, E = 256, k = 8, ep = 16;
  for (const RoutingModel& r : {RoutingModel{}, zipf(0.8)}) {
    CAPTURE(r.kind);
    const EpLoad e = expected_ep_load(T, E, k, ep, r);
    MoeLoadSampler s(shape_of(E, k, ep, 100, r), 3);
    const double sampled = sampled_max_rows(
        s, T, k, ep, 40, [](MoeLoadSampler& x, int t, MoeStepLoad& l) { x.sample(t, l); });
    CAPTURE(e.max_rows);
    CAPTURE(sampled);
    CHECK(std::abs((sampled - e.mean_rows) - (e.max_rows - e.mean_rows)) /
              (e.max_rows - e.mean_rows) < 0.06);
  }
}

TEST_CASE("the sampler is deterministic per seed, exact below the threshold, bounded") {
  const MoeLoadShape sh = shape_of(256, 8, 16, 58, zipf(0.6));
  MoeLoadSampler a(sh, 42), b(sh, 42), c(sh, 43);
  MoeStepLoad la, lb, lc;
  bool any_diff = false;
  for (int T : {1, 3, 40, 700, 5000}) {
    a.sample(T, la);
    b.sample(T, lb);
    c.sample(T, lc);
    CHECK(la.max_over_mean == lb.max_over_mean);
    any_diff = any_diff || la.max_over_mean != lc.max_over_mean;
    REQUIRE(la.max_over_mean.size() == 58);
    const double mean = double(T) * 8 / 16;
    for (double x : la.max_over_mean) {
      CHECK(x >= 1.0);
      CHECK(x <= 16.0 * std::min(8, 16) / 8 + 1e-12);  // every row of every token on one rank
      // Below kExactMeanRows mean rows per rank the draw is exact: whole rows.
      if (mean < MoeLoadSampler::kExactMeanRows)
        CHECK(std::abs(x * mean - std::round(x * mean)) < 1e-9);
    }
  }
  CHECK(any_diff);
  MoeLoadSampler one(shape_of(256, 8, 1, 4), 1);  // EP 1: nothing to balance
  one.sample(100, la);
  CHECK(la.max_over_mean == std::vector<double>(4, 1.0));
  CHECK_THROWS_AS(MoeLoadSampler(shape_of(256, 8, 3, 4), 1), InputError);   // ep must divide E
  CHECK_THROWS_AS(MoeLoadSampler(shape_of(256, 300, 16, 4), 1), InputError);
}

TEST_CASE("per-layer histogram rows: each MoE layer draws from its own row") {
  RoutingModel r;
  r.kind = "histogram";
  const int E = 16, k = 2, ep = 4;
  std::vector<double> hot(E, 0.0), flat(E, 1.0);
  for (int e = 0; e < 4; ++e) hot[size_t(e)] = 1.0;  // every row to rank 0
  r.layer_expert_share = {hot, flat, std::vector<double>(E, 0.0)};
  r.expert_share = flat;
  MoeLoadSampler s(shape_of(E, k, ep, 3, r), 5);
  MoeStepLoad l;
  s.sample(400, l);
  REQUIRE(l.max_over_mean.size() == 3);
  CHECK(l.max_over_mean[0] == doctest::Approx(4.0));  // the whole load on one of 4 ranks
  CHECK(l.max_over_mean[1] < 1.3);
  CHECK(l.max_over_mean[2] < 1.3);  // an all-zero row (dense layer) falls back to the pooled shares
  // One row per model layer: MoE layer i reads row moe_layer_ids[i].
  MoeLoadShape sh = shape_of(E, k, ep, 1, r);
  sh.moe_layer_ids = {1};
  MoeLoadSampler s2(sh, 5);
  s2.sample(400, l);
  CHECK(l.max_over_mean[0] < 1.3);
}

TEST_CASE("cost model: a sampled load moves the step time as the expected load does") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(2);
  const HardwareProfile p = test::h200_datasheet();
  const Layout l = test::layout(1, 16, 1, 16, 1, MoeComm::nccl_a2a);
  ReplicaBatch b;
  b.num_decode = 48;
  b.decode_context = 48 * 600;
  const std::vector<ReplicaBatch> batch(16, b);
  const double T = 16 * 48;

  for (const RoutingModel& r : {RoutingModel{}, zipf(0.8)}) {
    CAPTURE(r.kind);
    const auto cm = make_cost_model("mixserve", m, c, p, l, {.routing = r});
    const MoeLoadShape sh = cm->moe_load_shape();
    REQUIRE(sh.num_moe_layers == 58);
    CHECK(sh.ep == 16);
    CHECK(sh.moe_layer_ids.front() == 3);
    const double expected = cm->step(batch, false).time_us;
    // Empty load = expected; a higher single load = a longer step.
    CHECK(cm->step(batch, false, MoeStepLoad{}).time_us == expected);
    const double t1 = cm->step(batch, false, MoeStepLoad{{1.0}}).time_us;
    const double t2 = cm->step(batch, false, MoeStepLoad{{1.5}}).time_us;
    CHECK(t1 < expected);
    CHECK(t2 > t1);
    if (r.kind == "uniform") {  // the expected ratio given as a load is the expected step
      const double ratio = expected_ep_load(T, 256, 8, 16, r).max_over_mean();
      CHECK(cm->step(batch, false, MoeStepLoad{{ratio}}).time_us == doctest::Approx(expected).epsilon(1e-9));
    }
    // Per-layer loads: interpolated between the step's smallest and largest load; against the
    // mean of the single-load steps at every layer's value (exact per-layer costing) within
    // 0.5% (the MoE block is close to linear in the rows over a 1.0-1.4 range).
    MoeStepLoad per_layer;
    double mean_single = 0;
    for (int i = 0; i < 58; ++i) {
      const double x = 1.0 + 0.4 * ((i * 37) % 58) / 57.0;
      per_layer.max_over_mean.push_back(x);
      mean_single += cm->step(batch, false, MoeStepLoad{{x}}).time_us / 58;
    }
    CHECK(cm->step(batch, false, per_layer).time_us == doctest::Approx(mean_single).epsilon(0.005));
    CHECK_THROWS_AS(cm->step(batch, false, MoeStepLoad{{1.0, 1.1}}), InputError);
  }

  // Skewed routing lengthens the step over uniform by about what the expected maxima give:
  // the mean over 300 sampled steps, per routing, vs the expected-load step times. Tolerance
  // 5% of the lengthening (~19% of a step here): the sampler's correlated ranks raise the
  // excess load by ~3% (see above), plus Jensen's gap of a convex-ish step time in the load.
  const auto cu = make_cost_model("mixserve", m, c, p, l, {.routing = RoutingModel{}});
  const auto cz = make_cost_model("mixserve", m, c, p, l, {.routing = zipf(0.8)});
  MoeLoadSampler su(cu->moe_load_shape(), 1), sz(cz->moe_load_shape(), 1);
  MoeStepLoad lu, lz;
  double mu = 0, mz = 0;
  for (int i = 0; i < 300; ++i) {
    su.sample(int64_t(T), lu);
    sz.sample(int64_t(T), lz);
    mu += cu->step(batch, false, lu).time_us / 300;
    mz += cz->step(batch, false, lz).time_us / 300;
  }
  const double expected_ratio = cz->step(batch, false).time_us / cu->step(batch, false).time_us;
  CAPTURE(expected_ratio);
  CAPTURE(mz / mu);
  CHECK(expected_ratio > 1.1);
  CHECK(std::abs((mz / mu - 1) - (expected_ratio - 1)) < 0.05 * (expected_ratio - 1));

  // The paper model has no imbalance term: nothing to sample, and a load changes nothing.
  const auto paper = make_cost_model("paper", m, c, p, l, {.routing = zipf(0.8)});
  CHECK(paper->moe_load_shape().num_experts == 0);
  CHECK(paper->step(batch, false, MoeStepLoad{{3.0}}).time_us == paper->step(batch, false).time_us);
}
