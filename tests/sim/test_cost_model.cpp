// Step-cost models (cost_model.hpp, cost_moe_comm.hpp, paper_model.hpp): properties, volumes
// against hand computation, and a memory-bound decode step against bytes / bandwidth.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/queueing.hpp"
#include "mixserve/sim/cost_moe_comm.hpp"
#include "mixserve/sim/paper_model.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

std::vector<ReplicaBatch> decode_batch(int replicas, int seqs, int64_t ctx) {
  ReplicaBatch b;
  b.num_decode = seqs;
  b.decode_context = seqs * ctx;
  return std::vector<ReplicaBatch>(size_t(replicas), b);
}

std::vector<ReplicaBatch> prefill_batch(int replicas, int64_t tokens) {
  ReplicaBatch b;
  b.prefill_tokens = tokens;
  b.num_prefill_seqs = 1;
  b.prefill_attn_pairs = double(tokens) * (tokens + 1) / 2;
  return std::vector<ReplicaBatch>(size_t(replicas), b);
}

std::vector<Layout> sample_layouts(int nodes) {
  const int P = 8 * nodes;
  std::vector<Layout> ls = {
      test::layout(8, nodes, 8, nodes, 1, MoeComm::fused),
      test::layout(8, nodes, 8, nodes, 1, MoeComm::rs_a2a_ag),
      test::layout(8, nodes, 1, P, 1, MoeComm::nccl_a2a),
      test::layout(4, 2 * nodes, 8, nodes, 1, MoeComm::fused),
      test::layout(8, nodes, 4, 2 * nodes, 1, MoeComm::fused),
      test::layout(8, 1, 8, 1, nodes, MoeComm::tp_allreduce),
  };
  if (nodes == 2) ls.push_back(test::layout(16, 1, 16, 1, 1, MoeComm::tp_allreduce));
  return ls;
}

}  // namespace

TEST_CASE("more tokens never cheaper; more bandwidth never slower") {
  const ModelSpec m = test::deepseek_r1();
  const HardwareProfile p = test::h200_datasheet();
  for (int nodes : {2, 4}) {
    ClusterSpec slow = test::h200_cluster(nodes), fast = slow;
    fast.intra.bandwidth_GBps *= 2;
    fast.inter.bandwidth_GBps *= 2;
    for (const Layout& l : sample_layouts(nodes)) {
      CAPTURE(l.name());
      for (const char* name : {"mixserve", "paper"}) {
        CAPTURE(name);
        auto cs = make_cost_model(name, m, slow, p, l, {});
        auto cf = make_cost_model(name, m, fast, p, l, {});
        double prev = 0;
        for (int seqs = 1; seqs <= 1024; seqs *= 2) {
          const auto b = decode_batch(l.attn_dp, seqs, 2048);
          const StepCost s = cs->step(b, false);
          CHECK(s.time_us >= prev);
          CHECK(cf->step(b, false).time_us <= s.time_us);
          CHECK(s.stage_time_us <= s.time_us);
          prev = s.time_us;
        }
        prev = 0;
        for (int64_t tok = 64; tok <= 32768; tok *= 2) {
          const auto b = prefill_batch(l.attn_dp, tok);
          const double t = cs->step(b, false).time_us;
          CHECK(t >= prev);
          CHECK(cf->step(b, false).time_us <= t);
          prev = t;
        }
      }
    }
  }
}

TEST_CASE("fused dispatch/combine is never slower than RS, A2A, AG issued one after another") {
  const ModelSpec m = test::deepseek_r1();
  const HardwareProfile p = test::h200_datasheet();
  for (int nodes : {2, 4, 8}) {
    const ClusterSpec c = test::h200_cluster(nodes);
    auto fused = make_cost_model("mixserve", m, c, p, test::layout(8, nodes, 8, nodes, 1, MoeComm::fused), {});
    auto serial = make_cost_model("mixserve", m, c, p, test::layout(8, nodes, 8, nodes, 1, MoeComm::rs_a2a_ag), {});
    for (int64_t tok : {1, 16, 256, 4096, 16384}) {
      CAPTURE(nodes);
      CAPTURE(tok);
      const auto b = prefill_batch(nodes, tok);
      const StepCost f = fused->step(b, true), s = serial->step(b, true);
      CHECK(f.time_us <= s.time_us);
      double fd = 0, sd = 0;
      for (const OpCost& o : f.ops) fd += o.op == "moe.dispatch" || o.op == "moe.combine" ? o.time_us : 0;
      for (const OpCost& o : s.ops) sd += o.op == "moe.dispatch" || o.op == "moe.combine" ? o.time_us : 0;
      CHECK(fd <= sd);
      if (nodes > 2 && tok >= 4096) CHECK(fd < sd);  // more than one rail round: real overlap
    }
  }
}

TEST_CASE("two-stream recurrences: the digest's closed forms for equal rounds") {
  // paper.md §13.4: dispatch T = P + (n-2) max(P, A) + A over n-1 rail rounds.
  for (auto [P, A] : {std::pair{3.0, 5.0}, {5.0, 3.0}, {4.0, 4.0}}) {
    const int n = 6;
    std::vector<double> p(n - 1, P), a(n - 1, A);
    CHECK(fused_dispatch_time_us(p, a, 0) == doctest::Approx(P + (n - 2) * std::max(P, A) + A));
    // Combine (RS-first): n-1 remote RS rounds of R each and a local one, sends of P:
    // T = R + (n-2) max(R, P) + P when sends lag, n R when the reduce-scatters dominate.
    const double R = A;
    std::vector<double> r(n - 1, R);
    const double expect = std::max(n * R, R + (n - 2) * std::max(R, P) + P);
    CHECK(fused_combine_time_us(r, p, R) == doctest::Approx(expect));
  }
  // No rounds (one EP group): only the local gather.
  CHECK(fused_dispatch_time_us({}, {}, 2.5) == 2.5);
}

TEST_CASE("fused rail bytes are 1/moe_tp of unfused EP bytes (paper Eq. 13)") {
  // 4 nodes x 8 GPUs, 1024 tokens per node, h = 7168, bf16, E = 256, k = 8, no dedup:
  // rows per destination node = 1024 * 8 / 4 = 2048; unfused EP sends them with full h from
  // every rank: 2048 * 7168 * 2 B = 29,360,128 B per round; fused sends the h/8 slice.
  const FusedRoundBytes f = fused_round_bytes(1024, 7168, 2.0, 256, 8, 8, 4, false);
  CHECK(f.rows == doctest::Approx(2048.0));
  CHECK(f.gather_bytes == doctest::Approx(29360128.0));
  CHECK(f.p2p_bytes == doctest::Approx(29360128.0 / 8));
  CHECK(3 * f.p2p_bytes == doctest::Approx(3 * 29360128.0 / 8));  // N-1 = 3 rail rounds
  // With dedup a token crosses once per node: 1024 * (1 - C(192,8)/C(256,8)) rows.
  double miss = 1;
  for (int i = 0; i < 8; ++i) miss *= (192.0 - i) / (256.0 - i);
  const FusedRoundBytes d = fused_round_bytes(1024, 7168, 2.0, 256, 8, 8, 4, true);
  CHECK(d.rows == doctest::Approx(1024 * (1 - miss)).epsilon(1e-12));
  CHECK(d.rows < f.rows);

  // The paper's own volumes: Eq. 12 A2A(bshk, n_node) vs Eq. 13 A2A(bshk/n_proc, n_node) plus
  // AG(bshk/n_proc, n_proc); b*s = 1024, h = 7168, 2 B, k = 8, n_proc = 8.
  const PaperMoeVolumes e12 = paper_eq12_volumes(1024, 7168, 2.0, 8);
  const PaperMoeVolumes e13 = paper_eq13_volumes(1024, 7168, 2.0, 8, 8);
  CHECK(e12.ar_bytes == doctest::Approx(14680064.0));
  CHECK(e12.a2a_bytes == doctest::Approx(117440512.0));
  CHECK(e12.ag_bytes == 0.0);
  CHECK(e13.ar_bytes == doctest::Approx(14680064.0));
  CHECK(e13.a2a_bytes == doctest::Approx(14680064.0));
  CHECK(e13.ag_bytes == doctest::Approx(14680064.0));
}

TEST_CASE("memory-bound decode step = bytes read / HBM bandwidth (hand computation)") {
  // A small GQA MoE model on one GPU: one decode token with a 1-token context reads every
  // weight it uses once; launch latency 0, no collectives, so the roofline time is the bytes
  // over the bandwidth. Hand count, bf16 (2 B):
  //   per layer: qkv 2048 x (16 + 2*4) * 128, o 2048 x 2048, router 2048 x 8,
  //              2 active experts (= top_k for one token) x 3 x 2048 x 1024;
  //   LM head 32000 x 2048.
  ModelSpec m;
  m.name = "tiny-moe";
  m.hidden_size = 2048;
  m.num_layers = 4;
  m.vocab_size = 32000;
  m.attention.type = AttentionType::gqa;
  m.attention.num_heads = 16;
  m.attention.num_kv_heads = 4;
  m.attention.head_dim = 128;
  m.moe.num_experts = 8;
  m.moe.top_k = 2;
  m.moe.expert_intermediate_size = 1024;
  m.layers.assign(4, LayerSpec{});
  HardwareProfile p = test::h200_datasheet(0.0);
  p.mem_efficiency = 1.0;
  const ClusterSpec c = test::h200_cluster(1, 1);
  auto cm = make_cost_model("mixserve", m, c, p, test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce), {});
  const double h = 2048;
  const double per_layer = h * 24 * 128 + h * h + h * 8 + 2 * 3 * h * 1024;
  const double weight_bytes = 2 * (4 * per_layer + 32000 * h);
  const double expect_us = weight_bytes / 4800e3;
  const double t = cm->step(decode_batch(1, 1, 1), false).time_us;
  // Activations, norms and the 1-token KV read add ~0.5% of bytes (hand: ~30 [1, h] passes
  // per layer of 4 KiB vs 46 MiB of weights per layer); 2% bounds them.
  CHECK(t == doctest::Approx(expect_us).epsilon(0.02));
  CHECK(t >= expect_us);
}

TEST_CASE("DP replicas: the slowest replica sets the pace; breakdown adds up") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(2);
  auto cm = make_cost_model("mixserve", m, c, test::h200_datasheet(),
                            test::layout(8, 2, 8, 2, 1, MoeComm::fused), {});
  const auto small = decode_batch(2, 8, 1024), big = decode_batch(2, 64, 1024);
  std::vector<ReplicaBatch> mixed = {big[0], small[1]};
  const double ts = cm->step(small, false).time_us, tb = cm->step(big, false).time_us;
  const StepCost tm = cm->step(mixed, true);
  CHECK(tm.time_us > ts);
  CHECK(tm.time_us <= tb);
  double sum = 0;
  for (const OpCost& o : tm.ops) {
    sum += o.time_us;
    CHECK(o.phase == "decode");
    CHECK((o.source == CostSource::datasheet || o.source == CostSource::alpha_beta));
  }
  CHECK(sum == doctest::Approx(tm.time_us).epsilon(1e-9));
  CHECK_THROWS_AS(cm->step(decode_batch(1, 8, 10), false), InputError);
  CHECK(cm->step(decode_batch(2, 0, 0), false).time_us == 0.0);
}

TEST_CASE("skewed routing costs more than uniform; bad names and layouts are rejected") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(4);
  const Layout l = test::layout(8, 4, 1, 32, 1, MoeComm::nccl_a2a);
  CostModelOptions zipf;
  zipf.routing.kind = "zipf";
  zipf.routing.skew = 1.01;
  auto u = make_cost_model("mixserve", m, c, test::h200_datasheet(), l, {});
  auto z = make_cost_model("mixserve", m, c, test::h200_datasheet(), l, zipf);
  const auto b = prefill_batch(4, 4096);
  CHECK(z->step(b, false).time_us > u->step(b, false).time_us);

  CHECK_THROWS_AS(make_cost_model("vidur", m, c, test::h200_datasheet(), l, {}), InputError);
  CHECK_THROWS_AS(make_cost_model("mixserve", m, c, test::h200_datasheet(),
                                  test::layout(8, 4, 8, 4, 1, MoeComm::tp_allreduce), {}),
                  InputError);
  CHECK_THROWS_AS(make_cost_model("mixserve", m, c, test::h200_datasheet(),
                                  test::layout(8, 2, 8, 2, 1, MoeComm::fused), {}),
                  InputError);  // 16 GPUs on a 32-GPU cluster
  CHECK_THROWS_AS(make_cost_model("mixserve", m, c, test::h200_datasheet(),
                                  test::layout(3, 1, 1, 3, 1, MoeComm::nccl_a2a), {}),
                  InputError);
}

TEST_CASE("a measured profile point shows up as the source of its op") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(2);
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  // attention all-reduce of 8 decode tokens over TP8: 8 * 7168 * 2 B.
  p.collectives.push_back({CollOp::all_reduce, 8, 1, "1x8", 8 * 7168 * 2.0, 9.0});
  auto cm = make_cost_model("mixserve", m, c, p, test::layout(8, 2, 8, 2, 1, MoeComm::fused), {});
  const StepCost s = cm->step(decode_batch(2, 8, 100), true);
  bool found = false;
  for (const OpCost& o : s.ops)
    if (o.op == "attn.allreduce") {
      found = true;
      CHECK(o.source == CostSource::measured);
      CHECK(o.time_us == doctest::Approx(9.0 * 61));  // 61 layers on the critical path
    }
  CHECK(found);
}

TEST_CASE("analytic metrics: queueing, saturation and the offered-load cap") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(2);
  const Layout l = test::layout(8, 2, 8, 2, 1, MoeComm::fused);
  RuntimeLimits lim;
  lim.max_num_seqs = 64;
  lim.max_num_batched_tokens = 4096;
  lim.max_model_len = 8192;
  WorkloadSpec w;
  w.input.kind = LengthKind::fixed;
  w.input.value = 1000;
  w.output.kind = LengthKind::fixed;
  w.output.value = 200;
  for (const char* name : {"mixserve", "paper"}) {
    CAPTURE(name);
    auto cm = make_cost_model(name, m, c, test::h200_datasheet(), l, {});
    w.arrival = ArrivalKind::burst;
    std::vector<OpCost> ops;
    const PredictedMetrics sat = analytic_metrics(*cm, l, w, lim, &ops);
    CHECK(sat.ttft_ms > 0);
    CHECK(sat.itl_ms > 0);
    CHECK(sat.throughput_tok_s > 0);
    CHECK(sat.output_tok_s == doctest::Approx(sat.throughput_tok_s * 200 / 1200));
    CHECK_FALSE(ops.empty());
    const double cap_req_s = sat.throughput_tok_s / 1200;
    w.arrival = ArrivalKind::poisson;
    w.rate = 0.5 * cap_req_s;
    const PredictedMetrics half = analytic_metrics(*cm, l, w, lim);
    CHECK(half.throughput_tok_s == doctest::Approx(w.rate * 1200));
    const double mu = cap_req_s / 2;  // each of the 2 replicas: its saturated request rate
    if (std::string(name) == "paper") {
      // Waiting time on top of the same prefill: each replica serves rate/2, rho = 0.5.
      // M/M/1 (Eq. 7): W = rho / (mu (1 - rho)) = 1/mu.
      CHECK(half.ttft_ms - sat.ttft_ms == doctest::Approx(1e3 / mu).epsilon(1e-9));
    } else {
      // M/G/n over the 64 sequence slots (the KV cache holds them all: checked first).
      REQUIRE(cm->memory(lim).kv_tokens >= 64 * 1200);
      // On a busy engine the prefill rides in mixed steps: at least 1.5 decode steps.
      CHECK(half.ttft_ms >= 1.5 * half.itl_ms);
      // At a vanishing rate the engine is idle: TTFT -> the prefill alone (sat's service part).
      w.rate = 1e-9 * cap_req_s;
      CHECK(analytic_metrics(*cm, l, w, lim).ttft_ms == doctest::Approx(sat.ttft_ms).epsilon(1e-6));
      // Allen-Cunneen: the wait scales with (1 + cv^2) / 2 of the output lengths and nothing
      // else changes with cv^2 at equal means: fixed 200 (cv^2 0) vs uniform [100, 300]
      // (cv^2 = 200^2 / 12 / 200^2 = 1/12) differ by W(M/M/n) / 24.
      w.rate = 0.95 * cap_req_s;
      const double ttft_fixed = analytic_metrics(*cm, l, w, lim).ttft_ms;
      WorkloadSpec wu = w;
      wu.output.kind = LengthKind::uniform;
      wu.output.min = 100;
      wu.output.max = 300;
      const double ttft_uniform = analytic_metrics(*cm, l, wu, lim).ttft_ms;
      const double slot_rate = mu / 64, lambda = w.rate / 2;
      const double w_mmn_ms = 1e3 * mgn_mean_wait(64, lambda, slot_rate, 1.0);
      CHECK(w_mmn_ms > 0);
      CHECK(ttft_uniform - ttft_fixed == doctest::Approx(w_mmn_ms / 24).epsilon(1e-6));
      w.rate = 0.5 * cap_req_s;
    }
    w.rate = 0.9 * cap_req_s;
    CHECK(analytic_metrics(*cm, l, w, lim).ttft_ms > half.ttft_ms);
    w.rate = 2 * cap_req_s;
    CHECK(std::isinf(analytic_metrics(*cm, l, w, lim).ttft_ms));
  }
}

TEST_CASE("graphed decode steps: each launch costs the profile's graph saving less, only where the executor graphs") {
  // Qwen3-235B-like (top-8), one GPU: the executor graphs decode-only steps of at most
  // kDeviceGemvMaxRows routed rows (core/decode_path.hpp decode_step_graphed).
  const ModelSpec m = test::qwen3_235b();
  HardwareProfile p = test::h200_datasheet(3.0);
  const ClusterSpec c1 = test::h200_cluster(1, 1);
  const Layout one = test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce);
  auto plain = make_cost_model("mixserve", m, c1, p, one, {});  // no graph_launch in the profile
  p.graph_launch = {4.0, 5.0, 1.5, 64, 0, 0, "test"};           // saving 2.5 us per launch
  auto graphed = make_cost_model("mixserve", m, c1, p, one, {});
  CostModelOptions eager_opt;
  eager_opt.decode_graphs = false;
  auto eager = make_cost_model("mixserve", m, c1, p, one, eager_opt);

  const auto d1 = decode_batch(1, 1, 512);
  const StepCost a = plain->step(d1, false), g = graphed->step(d1, true);
  REQUIRE(a.launches > 0);
  CHECK(g.launches == a.launches);
  // The saving is taken from each op's own launches, n x 2.5 us, at most the op's time (an op
  // cheaper than that, like the roofline's 1-token attention here, goes to 0): per op the cut is
  // a whole number of launches or the whole op; the cuts add up to the step's saving.
  const StepCost ab = plain->step(d1, true);
  double cuts = 0, sum = 0;
  for (const OpCost& x : ab.ops) {
    double gt = 0;
    for (const OpCost& o : g.ops)
      if (o.op == x.op) gt = o.time_us;
    const double cut = x.time_us - gt, n = cut / 2.5;
    CHECK(cut >= 0);
    if (gt > 0) CHECK(n == doctest::Approx(std::round(n)));
    cuts += cut;
  }
  for (const OpCost& o : g.ops) sum += o.time_us;
  CHECK(cuts > 0);
  CHECK(cuts <= 2.5 * a.launches + 1e-6);
  CHECK(g.time_us == doctest::Approx(a.time_us - cuts));
  CHECK(sum == doctest::Approx(g.time_us).epsilon(1e-9));
  // --no-cuda-graph, a prefill step, and a decode step above the GEMV's rows (65 x 8 > 512) run
  // eagerly: the tables' times as they are.
  CHECK(eager->step(d1, false).time_us == doctest::Approx(a.time_us));
  const auto pf = prefill_batch(1, 256);
  CHECK(graphed->step(pf, false).time_us == doctest::Approx(plain->step(pf, false).time_us));
  const auto d65 = decode_batch(1, 65, 512), d64 = decode_batch(1, 64, 512);
  CHECK(graphed->step(d65, false).time_us == doctest::Approx(plain->step(d65, false).time_us));
  CHECK(graphed->step(d64, false).time_us < plain->step(d64, false).time_us);
  // A sharded layout's decode runs eagerly (multi-rank decode steps are not graphed).
  const ClusterSpec c2 = test::h200_cluster(1, 2);
  const Layout tp2 = test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce);
  HardwareProfile none = p;
  none.graph_launch = {};
  CHECK(make_cost_model("mixserve", m, c2, p, tp2, {})->step(d1, false).time_us ==
        doctest::Approx(make_cost_model("mixserve", m, c2, none, tp2, {})->step(d1, false).time_us));
}

TEST_CASE("graphed decode steps: launches without programmatic dependent launch save no_pdl_extra_us less") {
  const ModelSpec m = test::qwen3_235b();
  HardwareProfile p = test::h200_datasheet(3.0);
  const ClusterSpec c1 = test::h200_cluster(1, 1);
  const Layout one = test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce);
  p.graph_launch = {4.0, 5.0, 1.5, 64, 0, 0, "test"};  // saving 2.5 us per launch
  const HardwareProfile p_base = p;
  auto base = make_cost_model("mixserve", m, c1, p, one, {});
  p.graph_launch.no_pdl_extra_us = 1.0;  // 1.5 us per launch made without PDL
  p.graph_launch.no_pdl_measured_with = "test";
  CHECK(p.graph_launch.saving_no_pdl_us() == doctest::Approx(1.5));
  auto extra = make_cost_model("mixserve", m, c1, p, one, {});
  auto op_time = [](const StepCost& s, const std::string& op) {
    for (const OpCost& o : s.ops)
      if (o.op == op) return o.time_us;
    return 0.0;
  };
  // One token: a PDL step. The LM head's three launches (row gather, final norm, cuBLASLt GEMM)
  // take no PDL: 3 x 1 us more; the experts (device GEMV, permute, router, combine: all PDL) and
  // q|k|v (GEMV + fused QK-norm/RoPE/KV write) the same.
  const auto d1 = decode_batch(1, 1, 512);
  const StepCost b1 = base->step(d1, true), e1 = extra->step(d1, true);
  CHECK(op_time(e1, "lm_head") - op_time(b1, "lm_head") == doctest::Approx(3.0));
  CHECK(op_time(e1, "moe.experts") == doctest::Approx(op_time(b1, "moe.experts")));
  CHECK(op_time(e1, "attn.qkv_proj") == doctest::Approx(op_time(b1, "attn.qkv_proj")));
  CHECK(e1.time_us > b1.time_us);
  // 16 tokens: above kDecodeGemvMaxTokens no launch takes PDL: every launch whose op is not cut
  // to zero saves 1 us less, so the experts' slot (n launches, each far above 2.5 us) grows by n.
  const auto d16 = decode_batch(1, 16, 512);
  const StepCost b16 = base->step(d16, true), e16 = extra->step(d16, true);
  const double grow = op_time(e16, "moe.experts") - op_time(b16, "moe.experts");
  CHECK(grow > 0);
  CHECK(grow == doctest::Approx(std::round(grow)));  // whole launches
  CHECK(e16.time_us - b16.time_us <= 1.0 * b16.launches + 1e-6);
  // Eager steps are not affected.
  CostModelOptions eager_opt;
  eager_opt.decode_graphs = false;
  CHECK(make_cost_model("mixserve", m, c1, p, one, eager_opt)->step(d1, false).time_us ==
        doctest::Approx(make_cost_model("mixserve", m, c1, p_base, one, eager_opt)->step(d1, false).time_us));
  // The profile round-trips the measurement (and an older profile without it reads as 0).
  const HardwareProfile back = parse_profile_yaml(profile_to_yaml(p), "round-trip");
  CHECK(back.graph_launch.no_pdl_extra_us == doctest::Approx(1.0));
  CHECK(back.graph_launch.no_pdl_measured_with == "test");
  CHECK(parse_profile_yaml(profile_to_yaml(p_base), "round-trip").graph_launch.no_pdl_extra_us == 0.0);
}

TEST_CASE("fused batch-1 decode layer: the profile's per-layer points replace the MoE layers of a 1-sequence decode step") {
  const ModelSpec m = test::qwen3_235b();  // 94 MoE layers, no dense layer
  HardwareProfile p = test::h200_datasheet(3.0);
  const ClusterSpec c1 = test::h200_cluster(1, 1);
  const Layout one = test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce);
  CostModelOptions on;
  on.fused_decode_layer = true;
  const auto d1 = decode_batch(1, 1, 512);
  auto base = make_cost_model("mixserve", m, c1, p, one, {});
  // No point of the model's layer shape: the unfused kernels, as without the option.
  CHECK(make_cost_model("mixserve", m, c1, p, one, on)->step(d1, false).time_us ==
        doctest::Approx(base->step(d1, false).time_us));
  FusedLayerPoint a = fused_layer_shape(m), b = a, c = a, other = a;
  CHECK(a.hidden == 4096);
  CHECK(a.top_k == 8);
  CHECK(a.inter == 1536);
  a.context = 256, a.time_us = 40;
  b.context = 1024, b.time_us = 44;
  c.context = 4096, c.time_us = 50;
  other.hidden = 2048, other.context = 512, other.time_us = 1;  // another shape: never used here
  p.fused_decode_layer = {{c, a, other, b}, "test"};
  // fused_layer_time: linear in the context between points, flat below, rising beyond.
  CHECK(fused_layer_time(p, a, 256)->time_us == 40);
  CHECK(fused_layer_time(p, a, 256)->source == CostSource::measured);
  CHECK(fused_layer_time(p, a, 640)->time_us == doctest::Approx(42));
  CHECK(fused_layer_time(p, a, 640)->source == CostSource::interpolated);
  CHECK(fused_layer_time(p, a, 2560)->time_us == doctest::Approx(47));
  CHECK(fused_layer_time(p, a, 100)->time_us == 40);
  CHECK(fused_layer_time(p, a, 100)->source == CostSource::extrapolated);
  CHECK(fused_layer_time(p, a, 8192)->time_us == doctest::Approx(58));
  CHECK(fused_layer_time(p, a, 8192)->source == CostSource::extrapolated);
  FusedLayerPoint none = a;
  none.top_k = 4;
  CHECK_FALSE(fused_layer_time(p, none, 512).has_value());

  CHECK(fused_layer_costed(m, one, p, on));
  CHECK_FALSE(fused_layer_costed(m, one, p, {}));  // option off
  CostModelOptions on_plain = on;
  on_plain.decode_kernels = false;  // the fused layer runs with the decode kernels only
  CHECK_FALSE(fused_layer_costed(m, one, p, on_plain));
  CHECK_FALSE(fused_layer_costed(m, test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce), p, on));
  auto fused = make_cost_model("mixserve", m, c1, p, one, on);
  auto unfused = make_cost_model("mixserve", m, c1, p, one, {});  // the same profile, option off
  const StepCost f = fused->step(d1, true), u = unfused->step(d1, true);
  double fused_op = -1, lm_f = -1, lm_u = -1;
  bool attn_or_moe = false;
  for (const OpCost& o : f.ops) {
    if (o.op == "fused.decode_layer") fused_op = o.time_us;
    if (o.op == "lm_head") lm_f = o.time_us;
    if (o.op.rfind("attn.qkv", 0) == 0 || o.op.rfind("attn.core", 0) == 0 || o.op.rfind("moe.", 0) == 0) attn_or_moe = true;
  }
  for (const OpCost& o : u.ops)
    if (o.op == "lm_head") lm_u = o.time_us;
  CHECK(fused_op == doctest::Approx(94 * (40 + 4.0 / 768 * 256)));
  CHECK_FALSE(attn_or_moe);
  CHECK(lm_f == doctest::Approx(lm_u));  // the step's other launches as before
  CHECK(f.time_us < u.time_us);
  // Only steps of one sequence and one token: two sequences, a prefill, a sharded layout run unfused.
  const auto d2 = decode_batch(1, 2, 512);
  CHECK(fused->step(d2, false).time_us == doctest::Approx(unfused->step(d2, false).time_us));
  const auto pf = prefill_batch(1, 1);
  CHECK(fused->step(pf, false).time_us == doctest::Approx(unfused->step(pf, false).time_us));
  const ClusterSpec c2 = test::h200_cluster(1, 2);
  const Layout tp2 = test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce);
  CHECK(make_cost_model("mixserve", m, c2, p, tp2, on)->step(d1, false).time_us ==
        doctest::Approx(make_cost_model("mixserve", m, c2, p, tp2, {})->step(d1, false).time_us));
  // Models whose layers the executor does not fuse.
  CHECK(fused_layer_model_ok(m));
  auto not_ok = [&](auto change) {
    ModelSpec x = m;
    change(x);
    return !fused_layer_model_ok(x);
  };
  CHECK(not_ok([](ModelSpec& x) { x.moe.num_shared_experts = 1, x.moe.shared_intermediate_size = 512; }));
  CHECK(not_ok([](ModelSpec& x) { x.attention.qkv_bias = true; }));
  CHECK(not_ok([](ModelSpec& x) { x.attention.sliding_window = 4096; }));
  CHECK(not_ok([](ModelSpec& x) { x.moe.top_k = 9, x.moe.num_experts = 16; }));
  CHECK(not_ok([](ModelSpec& x) { x.attention.head_dim = 96; }));
  CHECK(not_ok([](ModelSpec& x) { x.architecture = "OlmoeForCausalLM"; }));  // q/k norm over the projection
  CHECK(not_ok([](ModelSpec& x) { x.moe.scoring = Scoring::sigmoid; }));
  CHECK_FALSE(fused_layer_model_ok(test::deepseek_r1()));  // MLA
  // A model that is not fused keeps the unfused cost even with a point of its shape.
  ModelSpec biased = m;
  biased.attention.qkv_bias = true;
  CHECK(make_cost_model("mixserve", biased, c1, p, one, on)->step(d1, false).time_us ==
        doctest::Approx(make_cost_model("mixserve", biased, c1, p, one, {})->step(d1, false).time_us));
}
