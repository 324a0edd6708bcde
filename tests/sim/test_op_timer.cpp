// Op timers (op_timer.hpp): log-space interpolation of profile tables, their fallback, and the
// alpha-beta collective formulas against hand-computed values.
#include <doctest/doctest.h>

#include <cmath>

#include "mixserve/sim/cost_constants.hpp"
#include "mixserve/sim/op_timer.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

TEST_CASE("interpolate_loglog: exact at points, power law between them, none outside") {
  const double xs[] = {16, 64, 256};
  const double ys[] = {10, 20, 80};
  double y = 0;
  bool exact = false;
  REQUIRE(interpolate_loglog(xs, ys, 3, 64, y, exact));
  CHECK(exact);
  CHECK(y == 20.0);
  REQUIRE(interpolate_loglog(xs, ys, 3, 32, y, exact));
  CHECK_FALSE(exact);
  // Halfway between 16 and 64 in log x: 10 * (20/10)^(1/2).
  CHECK(y == doctest::Approx(10 * std::sqrt(2.0)).epsilon(1e-12));
  REQUIRE(interpolate_loglog(xs, ys, 3, 128, y, exact));
  CHECK(y == doctest::Approx(20 * std::sqrt(4.0)).epsilon(1e-12));
  CHECK_FALSE(interpolate_loglog(xs, ys, 3, 8, y, exact));
  CHECK_FALSE(interpolate_loglog(xs, ys, 3, 300, y, exact));
}

TEST_CASE("profile timer: measured, interpolated, nearest family, fallback") {
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  for (auto [m, t] : {std::pair{16, 10.0}, {64, 20.0}, {256, 80.0}})
    p.gemm.push_back(GemmPoint{m, 4096, 4096, DType::bf16, t});
  p.collectives.push_back({CollOp::all_reduce, 8, 1, "1x8", 1 << 20, 50.0});
  p.collectives.push_back({CollOp::all_reduce, 8, 1, "1x8", 4 << 20, 100.0});
  const ClusterSpec c = test::h200_cluster(2);
  auto prof = make_profile_timer(p, c);
  auto roof = make_roofline_timer(p, c);

  OpTime o = prof->gemm(64, 4096, 4096, DType::bf16);
  CHECK(o.time_us == 20.0);
  CHECK(o.source == CostSource::measured);
  o = prof->gemm(32, 4096, 4096, DType::bf16);
  CHECK(o.time_us == doctest::Approx(10 * std::sqrt(2.0)).epsilon(1e-12));
  CHECK(o.source == CostSource::interpolated);
  // Outside the measured m range: the roofline, tagged as such.
  o = prof->gemm(1024, 4096, 4096, DType::bf16);
  CHECK(o.time_us == roof->gemm(1024, 4096, 4096, DType::bf16).time_us);
  CHECK(o.source == CostSource::roofline);
  // Another (n, k): the nearest family scaled by the roofline ratio of the two shapes.
  o = prof->gemm(64, 8192, 4096, DType::bf16);
  CHECK(o.source == CostSource::extrapolated);
  CHECK(o.time_us == doctest::Approx(20 * roof->gemm(64, 8192, 4096, DType::bf16).time_us /
                                     roof->gemm(64, 4096, 4096, DType::bf16).time_us)
                         .epsilon(1e-12));
  // Another compute class has no family: roofline.
  CHECK(prof->gemm(64, 4096, 4096, DType::fp8_e4m3).source == CostSource::roofline);

  o = prof->collective(CollOp::all_reduce, {8, 1}, 2 << 20);
  CHECK(o.source == CostSource::interpolated);
  CHECK(o.time_us == doctest::Approx(50 * std::sqrt(2.0)).epsilon(1e-12));
  o = prof->collective(CollOp::all_reduce, {8, 1}, 4 << 20);
  CHECK(o.source == CostSource::measured);
  CHECK(o.time_us == 100.0);
  o = prof->collective(CollOp::all_reduce, {8, 1}, 64 << 20);
  CHECK(o.source == CostSource::alpha_beta);
  CHECK(o.time_us == roof->collective(CollOp::all_reduce, {8, 1}, 64 << 20).time_us);
  CHECK(prof->collective(CollOp::all_reduce, {16, 2}, 2 << 20).source == CostSource::alpha_beta);
}

TEST_CASE("alpha-beta collectives: hand-computed values") {
  const HardwareProfile p = test::h200_datasheet();
  const ClusterSpec c = test::h200_cluster(4);
  auto t = make_roofline_timer(p, c);
  const CostConstants& K = kCostConstants;
  const double Bi = 450e3 * K.intra_link_efficiency;     // bytes/us per GPU, NVLink
  const double Bn = 50e3 * K.inter_link_efficiency;      // bytes/us per GPU: 8 NICs / 8 GPUs
  const double ai = 2.0, an = 5.0, L = K.collective_launch_us;
  const double n = 64.0 * 1024 * 1024;

  // Ring all-reduce in one node (too large for one-shot): 2(p-1)a + 2(p-1)/p n/B.
  CHECK(t->collective(CollOp::all_reduce, {8, 1}, n).time_us ==
        doctest::Approx(L + 2 * 7 * ai + 2 * 7.0 / 8 * n / Bi).epsilon(1e-12));
  // One-shot for a small buffer: a + (p-1) n / B.
  const double s = 64 * 1024;
  CHECK(t->collective(CollOp::all_reduce, {8, 1}, s).time_us ==
        doctest::Approx(L + ai + 7 * s / Bi).epsilon(1e-12));
  // Reduce-scatter over 4 nodes, one GPU each (a rail): (p-1)a + (p-1)/p n/B.
  CHECK(t->collective(CollOp::reduce_scatter, {4, 4}, n).time_us ==
        doctest::Approx(L + 3 * an + 0.75 * n / Bn).epsilon(1e-12));
  // Pairwise all-to-all over 2 nodes x 8: 7 in-node and 8 remote peers; the NIC carries
  // half the buffer, NVLink 7/16 of it, concurrently.
  const ClusterSpec c2 = test::h200_cluster(2);
  auto t2 = make_roofline_timer(p, c2);
  CHECK(t2->collective(CollOp::all_to_all, {16, 2}, n).time_us ==
        doctest::Approx(L + 7 * ai + 8 * an + std::max(n * 0.5 / Bn, n * 7 / 16 / Bi))
            .epsilon(1e-12));
  // Hierarchical all-reduce, 2 nodes x 8: RS in node + AR of n/8 on the rails + AG in node.
  const double rs = 7 * ai + 7.0 / 8 * n / Bi;
  const double rail_ring = 2 * 1 * an + 2 * 0.5 * (n / 8) / Bn;
  const double rail_tree = 2 * 1 * an + 2 * (n / 8) / Bn;
  CHECK(t2->collective(CollOp::all_reduce, {16, 2}, n).time_us ==
        doctest::Approx(L + 2 * rs + std::min(rail_ring, rail_tree)).epsilon(1e-12));
  // Send/recv across nodes.
  CHECK(t->collective(CollOp::send_recv, {2, 2}, n).time_us ==
        doctest::Approx(L + an + n / Bn).epsilon(1e-12));
  // One rank: nothing to do.
  CHECK(t->collective(CollOp::all_reduce, {1, 1}, n).time_us == 0.0);
}

TEST_CASE("roofline: memory-bound and compute-bound GEMMs, more bandwidth never slower") {
  const HardwareProfile p = test::h200_datasheet(0.0);
  auto t = make_roofline_timer(p, test::h200_cluster(1));
  // m = 1: weight bytes / (4.8 TB/s * 0.8).
  const double w = 7168.0 * 4096 * 2;
  const double bytes = w + 7168 * 2 + 4096 * 2;
  CHECK(t->gemm(1, 4096, 7168, DType::bf16).time_us ==
        doctest::Approx(bytes / (4800e3 * 0.8)).epsilon(1e-12));
  CHECK(t->gemm(1, 4096, 7168, DType::bf16).source == CostSource::datasheet);
  // m = 8192: 2mnk / (989 TFLOP/s * 0.7).
  CHECK(t->gemm(8192, 4096, 7168, DType::bf16).time_us ==
        doctest::Approx(2.0 * 8192 * 4096 * 7168 / (989e6 * 0.7)).epsilon(1e-12));

  for (int nodes : {1, 2, 4}) {
    ClusterSpec slow = test::h200_cluster(nodes), fast = slow;
    fast.intra.bandwidth_GBps *= 2;
    fast.inter.bandwidth_GBps *= 2;
    auto ts = make_roofline_timer(p, slow);
    auto tf = make_roofline_timer(p, fast);
    for (int op = 0; op < 5; ++op)
      for (CommGroup g : {CommGroup{8, 1}, CommGroup{nodes, nodes}, CommGroup{8 * nodes, nodes}})
        for (double b : {1e3, 1e5, 1e7, 1e9}) {
          CAPTURE(op);
          CAPTURE(b);
          CHECK(tf->collective(CollOp(op), g, b).time_us <=
                ts->collective(CollOp(op), g, b).time_us);
          CHECK(ts->collective(CollOp(op), g, 2 * b).time_us >=
                ts->collective(CollOp(op), g, b).time_us);
        }
  }
}

TEST_CASE("profile timer: expert, attention and elementwise tables") {
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  // Grouped expert GEMM, 32 local experts of [7168, 512] fp8: tokens 256 -> 100 us, 1024 -> 200.
  for (auto [tok, t] : {std::pair{256, 100.0}, {1024, 200.0}}) {
    ExpertGemmPoint e;
    e.num_experts = 32;
    e.tokens = tok;
    e.n = 512;
    e.k = 7168;
    e.dtype = DType::fp8_block;
    e.time_us = t;
    p.experts.push_back(e);
  }
  AttentionPoint a;  // decode, GQA 8 q heads / 1 KV head of 128: work = batch * kv_len
  a.kind = "decode";
  a.impl = "gqa";
  a.num_heads = 8;
  a.num_kv_heads = 1;
  a.head_dim = 128;
  a.batch = 16;
  a.q_len = 1;
  a.kv_len = 1024;
  a.time_us = 30;
  p.attention.push_back(a);
  a.kv_len = 4096;
  a.time_us = 60;
  p.attention.push_back(a);
  p.elementwise.push_back({1e6, 5.0});
  p.elementwise.push_back({1e8, 50.0});
  const ClusterSpec c = test::h200_cluster(1);
  auto prof = make_profile_timer(p, c);
  auto roof = make_roofline_timer(p, c);

  ExpertGemmShape s{32, 512, 20, 512, 7168, DType::fp8_block};
  OpTime o = prof->expert_gemm(s);
  CHECK(o.source == CostSource::interpolated);
  CHECK(o.time_us == doctest::Approx(100 * std::sqrt(2.0)).epsilon(1e-12));  // midway in log
  s.rows = 4096;
  CHECK(prof->expert_gemm(s).time_us == roof->expert_gemm(s).time_us);
  s.rows = 512;
  s.num_experts = 16;  // no table for 16 local experts
  CHECK(prof->expert_gemm(s).source == CostSource::roofline);

  AttentionShape q;
  q.decode = true;
  q.batch = 16;
  q.q_tokens = 16;
  q.context_tokens = 16 * 2048.0;
  q.pairs = q.context_tokens;
  q.heads = 8;
  q.kv_heads = 1;
  q.qk_dim = q.v_dim = 128;
  q.kv_bytes_per_token = 2 * 128 * 2;
  o = prof->attention(q);
  CHECK(o.source == CostSource::interpolated);
  CHECK(o.time_us == doctest::Approx(30 * std::sqrt(2.0)).epsilon(1e-12));
  q.context_tokens = 16 * 1024.0;
  CHECK(prof->attention(q).source == CostSource::measured);
  CHECK(prof->attention(q).time_us == 30.0);
  q.heads = 16;
  CHECK(prof->attention(q).time_us == roof->attention(q).time_us);

  o = prof->memory_op(1e7);
  CHECK(o.source == CostSource::interpolated);
  CHECK(o.time_us == doctest::Approx(5 * std::sqrt(10.0)).epsilon(1e-12));
  CHECK(prof->memory_op(1e9).time_us == roof->memory_op(1e9).time_us);
}

TEST_CASE("profile timer: attention over batch, expert implementations, launch-bound floor") {
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  // Decode GQA 32/4 x 128 at batch 1 and 4, kv_len 512 and 2048.
  for (int b : {1, 4})
    for (int64_t kv : {512, 2048}) {
      AttentionPoint a;
      a.kind = "decode";
      a.impl = "gqa";
      a.num_heads = 32;
      a.num_kv_heads = 4;
      a.head_dim = 128;
      a.batch = b;
      a.q_len = 1;
      a.kv_len = kv;
      a.time_us = 10.0 * b * (kv == 512 ? 1.0 : 2.0);
      p.attention.push_back(a);
    }
  // Experts E=128 [1536, 2048] bf16: graph cuBLASLt, gemv and eager points, 64 and 256 rows.
  for (auto [tag, scale] : {std::pair{"uniform", 1.0}, {"gemv:uniform", 2.0}, {"eager:uniform", 4.0}})
    for (int64_t r : {64, 256}) {
      ExpertGemmPoint e;
      e.num_experts = 128;
      e.tokens = r;
      e.n = 1536;
      e.k = 2048;
      e.distribution = tag;
      e.time_us = scale * (r == 64 ? 10.0 : 20.0);
      p.experts.push_back(e);
    }
  p.elementwise.push_back({1e4, 4.0});
  p.elementwise.push_back({1e6, 8.0});
  const ClusterSpec c = test::h200_cluster(1);
  auto prof = make_profile_timer(p, c);
  auto roof = make_roofline_timer(p, c);

  AttentionShape q;
  q.decode = true;
  q.heads = 32;
  q.kv_heads = 4;
  q.qk_dim = q.v_dim = 128;
  q.kv_bytes_per_token = 2 * 4 * 128 * 2;
  q.batch = 2;  // midway between batch 1 and 4 in log space, kv_len 512 each
  q.q_tokens = 2;
  q.context_tokens = 2 * 512.0;
  OpTime o = prof->attention(q);
  CHECK(o.source == CostSource::interpolated);
  CHECK(o.time_us == doctest::Approx(10.0 * std::sqrt(4.0)).epsilon(1e-12));
  q.batch = 4;
  q.context_tokens = 4 * 2048.0;  // exact point
  CHECK(prof->attention(q).source == CostSource::measured);
  CHECK(prof->attention(q).time_us == 80.0);
  q.batch = 8;  // beyond the measured batches: roofline
  q.context_tokens = 8 * 512.0;
  CHECK(prof->attention(q).time_us == roof->attention(q).time_us);

  ExpertGemmShape s{128, 64, 64, 1536, 2048, DType::bf16, true};
  CHECK(prof->expert_gemm(s).time_us == 20.0);   // gemv points
  s.device_gemv = false;
  CHECK(prof->expert_gemm(s).time_us == 40.0);   // eager points before graph points
  s.grouped_gemm = true;                         // no "grouped:" points: eager, marked extrapolated
  CHECK(prof->expert_gemm(s).time_us == 40.0);
  CHECK(prof->expert_gemm(s).source == CostSource::extrapolated);
  {
    HardwareProfile pg = p;
    for (int64_t r : {64, 256}) {
      ExpertGemmPoint e;
      e.num_experts = 128;
      e.tokens = r;
      e.n = 1536;
      e.k = 2048;
      e.distribution = "grouped:uniform";
      e.time_us = 8.0 * (r == 64 ? 10.0 : 20.0);
      pg.experts.push_back(e);
    }
    auto profg = make_profile_timer(pg, c);
    CHECK(profg->expert_gemm(s).time_us == 80.0);  // grouped points
    CHECK(profg->expert_gemm(s).source == CostSource::measured);
    s.grouped_gemm = false;
    CHECK(profg->expert_gemm(s).time_us == 40.0);  // the cuBLASLt path still takes the eager points
    s.device_gemv = true;
    CHECK(profg->expert_gemm(s).time_us == 20.0);
    s.device_gemv = false;
  }
  s.n = 3072;                                    // no family: roofline for either path
  CHECK(prof->expert_gemm(s).source == CostSource::roofline);

  // Below the smallest measured size: that size's time (launch-bound), tagged extrapolated.
  o = prof->memory_op(100);
  CHECK(o.source == CostSource::extrapolated);
  CHECK(o.time_us == 4.0);
  CHECK(prof->memory_op(0).time_us == 0.0);
}

TEST_CASE("profile timer: expert table rescaled to the step's distinct experts") {
  // The table's "uniform" points spread their rows evenly (active_experts = min(rows, E)); a step
  // routed at random touches fewer experts. The time above the launch cost scales with the bytes
  // read: active experts' weights plus the rows' activations.
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  p.kernel_launch_us = 6.0;
  for (auto [r, t] : {std::pair{64, 139.0}, {128, 257.0}}) {
    ExpertGemmPoint e;
    e.num_experts = 128;
    e.tokens = r;
    e.max_tokens = 1;
    e.active_experts = r;
    e.n = 1536;
    e.k = 2048;
    e.distribution = "gemv:uniform";
    e.time_us = t;
    p.experts.push_back(e);
  }
  const ClusterSpec c = test::h200_cluster(1);
  auto prof = make_profile_timer(p, c);
  ExpertGemmShape s{128, 128, 128, 1536, 2048, DType::bf16, true};
  CHECK(prof->expert_gemm(s).time_us == doctest::Approx(257.0));  // as many experts as the point
  CHECK(prof->expert_gemm(s).source == CostSource::measured);
  s.active_experts = 82;
  const double w = 1536.0 * 2048 * 2, act = 128.0 * (1536 + 2048) * 2;
  const double want = 6.0 + (257.0 - 6.0) * (82 * w + act) / (128 * w + act);
  CHECK(prof->expert_gemm(s).time_us == doctest::Approx(want).epsilon(1e-12));
  CHECK(prof->expert_gemm(s).source == CostSource::measured);
  // Points without active_experts (older profiles): the table's time as it is.
  for (auto& e : p.experts) e.active_experts = 0;
  CHECK(make_profile_timer(p, c)->expert_gemm(s).time_us == doctest::Approx(257.0));
}
