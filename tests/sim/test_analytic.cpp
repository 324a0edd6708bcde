// analytic_metrics and the paper model's equations against hand computations on stand-ins
// whose step times are known in closed form.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "mixserve/sim/cost_constants.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

// step = a + b * (tokens of the busiest replica) per stage; pp stages; fixed KV capacity.
class LinearModel final : public StepCostModel {
 public:
  LinearModel(double a, double b, int pp, int64_t kv) : a_(a), b_(b), pp_(pp), kv_(kv) {}
  std::string name() const override { return "linear"; }
  StepCost step(std::span<const ReplicaBatch> r, bool) const override {
    double t = 0;
    for (const ReplicaBatch& x : r) t = std::max(t, double(x.tokens()));
    StepCost s;
    s.stage_time_us = t > 0 ? a_ + b_ * t : 0;
    s.time_us = pp_ * s.stage_time_us;
    return s;
  }
  MemoryBreakdown memory(const RuntimeLimits&) const override {
    MemoryBreakdown m;
    m.kv_tokens = kv_;
    m.fits = true;
    return m;
  }

 private:
  double a_, b_;
  int pp_;
  int64_t kv_;
};

WorkloadSpec fixed_workload(double in, double out) {
  WorkloadSpec w;
  w.arrival = ArrivalKind::burst;
  w.input.kind = LengthKind::fixed;
  w.input.value = in;
  w.output.kind = LengthKind::fixed;
  w.output.value = out;
  return w;
}

}  // namespace

TEST_CASE("analytic_metrics: TTFT, ITL and throughput of a linear stand-in, by hand") {
  // a = 1000 us, b = 10 us/token, 2 DP replicas, 1 stage. Input 3000, output 100, budget 2048.
  const LinearModel cm(1000, 10, 1, 1'000'000);
  const Layout l = test::layout(4, 2, 4, 2, 1, MoeComm::fused);
  RuntimeLimits lim;
  lim.max_num_seqs = 32;
  lim.max_num_batched_tokens = 2048;
  const PredictedMetrics m = analytic_metrics(cm, l, fixed_workload(3000, 100), lim);
  // TTFT: chunks of 2048 and 952 tokens alone: (1000 + 20480) + (1000 + 9520) us.
  CHECK(m.ttft_ms == doctest::Approx(32.0));
  // ITL: 32 decodes per replica: 1000 + 320 us.
  CHECK(m.itl_ms == doctest::Approx(1.32));
  // Marginal prefill in mixed batches of 32 decodes + chunks of 2016 and 984 tokens:
  // 10 us per prefill token = 30,000 us. Per request: 100 * 1320 / 32 + 30000 = 34,125 us.
  const double req_s = 2 * 1e6 / 34125.0;
  CHECK(m.throughput_tok_s == doctest::Approx(req_s * 3100));
  CHECK(m.output_tok_s == doctest::Approx(req_s * 100));
  CHECK(m.request_rate == 0.0);

  // KV-limited batch: above, 1,000,000 tokens / 3100 per sequence = 322 > 32 seqs; with
  // 50,000 tokens only 16 sequences fit: ITL = 1000 + 160 us.
  const LinearModel small_kv(1000, 10, 1, 50'000);
  CHECK(analytic_metrics(small_kv, l, fixed_workload(3000, 100), lim).itl_ms ==
        doctest::Approx(1.16));

  // Pipeline of 4 stages: each of the 4 micro-batches has its own max_num_seqs = 32 (128
  // sequences in flight; the KV cache holds 322); ITL is one micro-batch through all stages,
  // 4 * (1000 + 320) us; the pipeline advances at one stage per step.
  const LinearModel pp(1000, 10, 4, 1'000'000);
  const Layout lpp = test::layout(4, 1, 4, 1, 4, MoeComm::tp_allreduce);
  const PredictedMetrics mp = analytic_metrics(pp, lpp, fixed_workload(3000, 100), lim);
  CHECK(mp.itl_ms == doctest::Approx(5.28));
  // Marginal: chunks of 2016 and 984 tokens, 10 us each per stage; per request
  // 100 * 1320 / 32 + 30,000 us, one replica.
  CHECK(mp.throughput_tok_s == doctest::Approx(1e6 / (100 * 1320 / 32.0 + 30000) * 3100));
  // With KV for only 100 sequences: 25 per micro-batch, ITL 4 * (1000 + 250) us.
  const LinearModel pp_kv(1000, 10, 4, 310'000);
  CHECK(analytic_metrics(pp_kv, lpp, fixed_workload(3000, 100), lim).itl_ms == doctest::Approx(5.0));
}

TEST_CASE("paper model: Eq. 4 compute and Eqs. 1-2 all-reduce by hand") {
  // Two layers of a GQA MoE model: per layer Psi = attention 2048*(16+2*4)*128 + o 2048^2 +
  // norms 2*2048 + router 2048*8 + 8 experts * 3 * 2048 * 1024 elements.
  ModelSpec m;
  m.name = "tiny-moe";
  m.hidden_size = 2048;
  m.num_layers = 2;
  m.vocab_size = 1000;
  m.attention.type = AttentionType::gqa;
  m.attention.num_heads = 16;
  m.attention.num_kv_heads = 4;
  m.attention.head_dim = 128;
  m.moe.num_experts = 8;
  m.moe.top_k = 2;
  m.moe.expert_intermediate_size = 1024;
  m.layers.assign(2, LayerSpec{});
  const HardwareProfile p = test::h200_datasheet();
  const double F = 989e6 * 0.7;  // bf16 flops per us
  const double h = 2048;
  const double psi = h * 24 * 128 + h * h + 2 * h + h * 8 + 8 * 3 * h * 1024;
  std::vector<ReplicaBatch> b(1);
  b[0].prefill_tokens = 100;
  b[0].num_prefill_seqs = 1;
  {
    auto cm = make_cost_model("paper", m, test::h200_cluster(1, 1), p,
                              test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce), {});
    CHECK(cm->step(b, false).time_us == doctest::Approx(2 * 2 * psi * 100 / F).epsilon(1e-12));
  }
  {
    // TP2 in one node: Psi / 2 per rank, and per layer 2 x AR(100 h 2 B, 2) where
    // AR(s, 2) = RS(s/2, 2) + AG(s/2, 2) = 2 (alpha + (s/2) / (2 B)).
    auto cm = make_cost_model("paper", m, test::h200_cluster(1, 2), p,
                              test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce), {});
    const double B = 450e3 * kCostConstants.intra_link_efficiency;
    const double s = 100 * h * 2;
    const double ar = 2 * (2.0 + (s / 2) / (2 * B));
    // Replicated norms and router (per rank in full) make Psi_rank slightly above Psi / 2.
    const double psi_rank = (psi - 2 * h - h * 8) / 2 + 2 * h + h * 8;
    CHECK(cm->step(b, false).time_us ==
          doctest::Approx(2 * (2 * psi_rank * 100 / F + 2 * ar)).epsilon(1e-12));
  }
}
