// Structure and byte counts of the schedules: the worked 2 x 2 example of
// docs/comm-schedules.md derived by hand, the one-node case, input validation, and the
// paper's Eq. 13 claim (fused inter-node bytes per rank = 1/G of plain EP's).
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "comm_test_util.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/sim/comm_schedule.hpp"

namespace {
using namespace mixserve;
using namespace mixserve::sim;

// docs/comm-schedules.md: 2 nodes x 2 GPUs, 4 experts (node 0 owns 0,1; node 1 owns 2,3),
// top-2, hidden 4 (slices of 2 elements), 2 bytes per element.
std::vector<ReplicaRouting> worked_routing() {
  ReplicaRouting r0{3, {0, 2, /**/ 2, 3, /**/ 0, 1}, {1, 0.5, /**/ 0.25, 2, /**/ 1, 1}};
  ReplicaRouting r1{2, {1, 3, /**/ 3, 2}, {0.5, 0.5, /**/ 1, 0.25}};
  return {r0, r1};
}
}  // namespace

TEST_CASE("worked example 2x2: routes, expert side, peers and bytes derived by hand") {
  const CommGeometry g = test::hybrid_geometry(2, 2, 4, 2, 4);
  const auto routing = worked_routing();
  const FusedSchedule s = build_fused_schedule(g, routing);

  // Distinct tokens per (source, destination): token 1 of replica 0 has both experts on node 1
  // and crosses once.
  CHECK(s.route_rows(0, 0) == std::vector<int32_t>{0, 2});
  CHECK(s.route_rows(0, 1) == std::vector<int32_t>{0, 1});
  CHECK(s.route_rows(1, 0) == std::vector<int32_t>{0});
  CHECK(s.route_rows(1, 1) == std::vector<int32_t>{0, 1});

  // Expert side of node 0: block 0 = own tokens {0, 2}, block 1 = replica 1's token 0.
  const ExpertSide& x0 = s.expert_side[0];
  CHECK(x0.block_row_offset == std::vector<int64_t>{0, 2, 3});
  CHECK(x0.row_src_token == std::vector<int32_t>{0, 2, 0});
  // Local expert 0 (global 0): rows 0, 1; local expert 1 (global 1): rows 1, 2.
  CHECK(x0.expert_pair_offset == std::vector<int64_t>{0, 2, 4});
  CHECK(x0.pair_row == std::vector<int64_t>{0, 1, 1, 2});
  CHECK(x0.pair_weight == std::vector<double>{1, 1, 1, 0.5});
  // Row 1 (replica 0 token 2) folds pairs 1 (expert 0) and 2 (expert 1).
  CHECK(x0.row_pair_offset == std::vector<int64_t>{0, 1, 3, 4});
  CHECK(x0.row_pairs == std::vector<int64_t>{0, 1, 2, 3});

  // Rank 0 = node 0, local 0; round 1 peers are rank 2 both ways.
  const FusedStep& a = s.steps[0][1];
  CHECK(a.send_peer == 2);
  CHECK(a.recv_peer == 2);
  CHECK(a.send_inter_node);
  CHECK(a.dispatch_send_rows == 2);
  CHECK(a.dispatch_recv_rows == 1);
  CHECK(a.combine_send_block == 1);
  CHECK(a.combine_rs_rows == 1);
  CHECK(a.combine_recv_rows == 2);
  // Dispatch round 1: 2 rows x 2 elements x 2 B over the rail; all-gather of 1 full row over
  // 2 ranks sends half of 4 x 2 B.
  CHECK(a.dispatch_bytes.inter_bytes == 8);
  CHECK(a.dispatch_bytes.intra_bytes == 4);
  // Combine round 0: reduce-scatter of 2 rows (8 B); round 1: RS of 1 row (4 B), rail 1 row x
  // 2 elements x 2 B; final all-gather of 3 home tokens (12 B). Round 1 is issued first.
  CHECK(s.combine_order == std::vector<int>{1, 0});
  CHECK(s.steps[0][0].combine_bytes.intra_bytes == 8);
  CHECK(s.steps[0][0].combine_bytes.inter_bytes == 0);
  CHECK(a.combine_bytes.intra_bytes == 4);
  CHECK(a.combine_bytes.inter_bytes == 4);
  CHECK(s.final_ag_bytes[0].intra_bytes == 12);
  CHECK(s.final_ag_bytes[0].inter_bytes == 0);
  // Rank 2 (node 1): sends 1 row, receives 2; combine round 1 sends 2 reduced rows back.
  const FusedStep& b = s.steps[2][1];
  CHECK(b.send_peer == 0);
  CHECK(b.dispatch_bytes.inter_bytes == 4);
  CHECK(b.dispatch_bytes.intra_bytes == 8);
  CHECK(b.combine_bytes.inter_bytes == 8);
  CHECK(b.combine_bytes.intra_bytes == 8);
  CHECK(s.final_ag_bytes[2].intra_bytes == 8);  // 2 home tokens
  // Summary of dispatch round 1 over the 4 ranks: inter 8, 8, 4, 4.
  CHECK(s.dispatch_rounds[1].inter_bytes_max == 8);
  CHECK(s.dispatch_rounds[1].inter_bytes_mean == 6);
  CHECK(s.dispatch_rounds[0].inter_bytes_max == 0);

  // Plain EP, replicated source: rank 0 sends every (token, expert) row of replica 0 to other
  // ranks: t0->e2 (rank 2), t1->e2, t1->e3 (rank 3) = 3 inter rows of 4 x 2 B.
  const CommGeometry eg = test::ep_geometry(2, 2, 4, 2, 4);
  const EpSchedule ep = build_ep_schedule(eg, routing, EpSource::replicated);
  CHECK(ep.ranks[0].dispatch_bytes.inter_bytes == 24);
  CHECK(ep.ranks[0].dispatch_bytes.intra_bytes == 8);  // t2->e1 on rank 1
  CHECK(ep.ranks[0].send_offset == std::vector<int64_t>{0, 2, 3, 5, 6});
  // Split source: rank 0 dispatches tokens [0, 1) of replica 0, rank 1 tokens [1, 3).
  const EpSchedule eps = build_ep_schedule(eg, routing, EpSource::split);
  CHECK(eps.ranks[0].token_end == 1);
  CHECK(eps.ranks[1].token_begin == 1);
  CHECK(eps.ranks[2].recv_counts == std::vector<int64_t>{1, 1, 0, 1});
}

TEST_CASE("one node: no rail rounds, the combine is an all-reduce in the node") {
  std::mt19937_64 rng(11);
  for (int G : {2, 8}) {
    const int n = 9, h = 2 * G;
    const CommGeometry g = test::hybrid_geometry(1, G, 8, 2, h);
    const std::vector<ReplicaRouting> routing{
        test::make_routing(test::RoutingKind::uniform, 0, n, 8, 2, rng)};
    const FusedSchedule s = build_fused_schedule(g, routing);
    REQUIRE(s.steps.size() == static_cast<size_t>(G));
    for (const auto& rank_steps : s.steps) {
      REQUIRE(rank_steps.size() == 1);
      CHECK(rank_steps[0].send_peer == -1);
      CHECK(rank_steps[0].dispatch_bytes.intra_bytes == 0);
      CHECK(rank_steps[0].dispatch_bytes.inter_bytes == 0);
      CHECK(rank_steps[0].combine_bytes.inter_bytes == 0);
    }
    for (int r = 0; r < G; ++r) {
      // Reduce-scatter + all-gather = ring all-reduce of n x h elements: each rank sends
      // 2 (G-1)/G of the buffer. Relative 1e-12: the two terms are computed separately.
      const double sent = s.steps[r][0].combine_bytes.intra_bytes + s.final_ag_bytes[r].intra_bytes;
      CHECK(sent == doctest::Approx(2.0 * (G - 1) / G * n * h * g.elem_bytes).epsilon(1e-12));
    }
  }
}

TEST_CASE("Eq. 13: fused inter-node bytes per rank are 1/G of plain EP's (top-1, no dedup)") {
  std::mt19937_64 rng(2026);
  for (auto [N, G] : {std::pair{2, 2}, {2, 4}, {4, 2}, {4, 8}, {8, 8}}) {
    for (int k : {1, 2, 8}) {
      const int E = 256, h = 4 * G, n = 40;
      CAPTURE(N);
      CAPTURE(G);
      CAPTURE(k);
      std::vector<ReplicaRouting> routing;
      for (int q = 0; q < N; ++q)
        routing.push_back(test::make_routing(test::RoutingKind::uniform, q, n, E, k, rng));
      const FusedSchedule fs = build_fused_schedule(test::hybrid_geometry(N, G, E, k, h), routing);
      const CommGeometry eg = test::ep_geometry(N, G, E, k, h);
      const EpSchedule rep = build_ep_schedule(eg, routing, EpSource::replicated);
      const EpSchedule split = build_ep_schedule(eg, routing, EpSource::split);
      for (int r = 0; r < N * G; ++r) {
        double fused = 0;
        for (const auto& st : fs.steps[r]) fused += st.dispatch_bytes.inter_bytes;
        const double ep = rep.ranks[r].dispatch_bytes.inter_bytes;
        if (k == 1) {
          CHECK(fused * G == ep);
        } else {
          CHECK(fused * G <= ep);  // dedup per destination node can only remove rows
        }
      }
      // Against the token-split EP (each TP rank dispatches 1/G of the tokens) the node sends
      // the same inter-node bytes as the fused schedule when there is nothing to dedup.
      if (k == 1)
        for (int node = 0; node < N; ++node) {
          double fused = 0, ep = 0;
          for (int r = node * G; r < (node + 1) * G; ++r) {
            for (const auto& st : fs.steps[r]) fused += st.dispatch_bytes.inter_bytes;
            ep += split.ranks[r].dispatch_bytes.inter_bytes;
          }
          CHECK(fused == ep);
        }
    }
  }
}

TEST_CASE("capacity bound covers every routing") {
  std::mt19937_64 rng(3);
  const CommGeometry g = test::hybrid_geometry(4, 2, 8, 2, 4);
  std::vector<ReplicaRouting> routing;
  for (int q = 0; q < 4; ++q)
    routing.push_back(test::make_routing(test::RoutingKind::one_expert, q, 6, 8, 2, rng));
  const FusedSchedule s = build_fused_schedule(g, routing);
  // Everything goes to expert 0 on group 0: it receives every token of every replica.
  CHECK(s.expert_side[0].num_rows() == 24);
  CHECK(s.expert_side[0].num_rows() <= fused_capacity_rows(g, 6));
  CHECK(s.expert_side[1].num_rows() == 0);
}

TEST_CASE("EP capacity bound is reached when every token goes to rank 0's experts") {
  std::mt19937_64 rng(4);
  // 2 nodes x 2 GPUs, 16 experts: rank 0 owns experts 0..3; top-2 -> experts 0, 1 for all.
  const CommGeometry g = test::ep_geometry(2, 2, 16, 2, 4);
  std::vector<ReplicaRouting> routing;
  for (int q = 0; q < 2; ++q)
    routing.push_back(test::make_routing(test::RoutingKind::same_experts, q, 5, 16, 2, rng));
  for (EpSource src : {EpSource::split, EpSource::replicated}) {
    const EpSchedule s = build_ep_schedule(g, routing, src);
    // 2 replicas x 5 tokens x 2 rows, twice over when both TP ranks dispatch every token.
    const int64_t expect = 2 * 5 * 2 * (src == EpSource::replicated ? 2 : 1);
    CHECK(s.ranks[0].recv_rows() == expect);
    CHECK(ep_capacity_rows(g, 5, src) == expect);
    for (int r = 1; r < 4; ++r) CHECK(s.ranks[r].recv_rows() == 0);
  }
}

TEST_CASE("EP capacity bound with moe_tp 2 and a shared expert covers the gathered rows") {
  std::mt19937_64 rng(6);
  // 2 nodes x 2 GPUs, moe TP 2 x EP 2, 16 experts (8 per EP index); every token to experts 0, 1.
  CommGeometry g = test::ep_tp_geometry(2, 2, 2, 16, 2, 4);
  std::vector<ReplicaRouting> routing;
  for (int q = 0; q < 2; ++q)
    routing.push_back(test::make_routing(test::RoutingKind::same_experts, q, 5, 16, 2, rng));
  for (bool shared : {false, true}) {
    g.shared_expert = shared;
    for (EpSource src : {EpSource::split, EpSource::replicated}) {
      CAPTURE(shared);
      const EpSchedule s = build_ep_schedule(g, routing, src);
      // EP index 0 (ranks 0, 1) gathers every row: 2 replicas x 5 tokens x 2 (x 2 replicated),
      // plus its members' source tokens with a shared expert.
      const int64_t routed = 2 * 5 * 2 * (src == EpSource::replicated ? 2 : 1);
      const int64_t own = shared ? (src == EpSource::replicated ? 2 * 5 : 5) : 0;
      CHECK(s.ranks[0].gather_rows == routed + own);
      CHECK(s.ranks[0].gather_rows <= ep_capacity_rows(g, 5, src));
      CHECK(s.ranks[2].gather_rows == (shared ? s.ranks[2].shared_total : 0));
    }
  }
}

TEST_CASE("geometry of a layout: one pipeline stage, activation bytes, legality") {
  ClusterSpec c;
  c.num_nodes = 4;
  c.gpus_per_node = 8;
  ModelSpec m;
  m.hidden_size = 7168;
  m.moe.num_experts = 256;
  m.moe.top_k = 8;
  m.activation_dtype = DType::bf16;
  Layout l;
  l.attn_tp = l.moe_tp = 8;
  l.attn_dp = l.moe_ep = 2;
  l.pp = 2;
  l.moe_comm = MoeComm::fused;
  const CommGeometry g = make_comm_geometry(c, m, l);
  CHECK(g.num_ranks == 16);  // one stage of 2 nodes
  CHECK(g.gpus_per_node == 8);
  CHECK(g.hidden == 7168);
  CHECK(g.elem_bytes == 2);
  CHECK(g.experts_per_ep_rank() == 128);
  CHECK_FALSE(g.shared_expert);
  m.moe.num_shared_experts = 1;
  m.moe.shared_intermediate_size = 2048;
  CHECK(make_comm_geometry(c, m, l).shared_expert);
  l.moe_ep = 4;  // 8 x 4 != 8 x 2
  CHECK_THROWS_AS(make_comm_geometry(c, m, l), InputError);
}

TEST_CASE("bad geometry and routing are rejected with InputError") {
  std::mt19937_64 rng(1);
  std::vector<ReplicaRouting> two{
      test::make_routing(test::RoutingKind::uniform, 0, 4, 8, 2, rng),
      test::make_routing(test::RoutingKind::uniform, 1, 4, 8, 2, rng)};
  const CommGeometry ok = test::hybrid_geometry(2, 2, 8, 2, 4);
  CHECK_NOTHROW(build_fused_schedule(ok, two));

  CommGeometry g = ok;
  g.attn_tp = 1;
  g.attn_dp = 4;  // attention DP 4 with EP 2: not the fused layout
  CHECK_THROWS_AS(build_fused_schedule(g, two), InputError);
  g = ok;
  g.hidden = 5;
  CHECK_THROWS_AS(build_fused_schedule(g, two), InputError);
  g = ok;
  g.num_experts = 7;
  CHECK_THROWS_AS(build_fused_schedule(g, two), InputError);
  CHECK_THROWS_AS(build_fused_schedule(ok, std::span(two).first(1)), InputError);
  auto bad = two;
  bad[1].topk_ids[3] = 8;
  CHECK_THROWS_WITH_AS(build_fused_schedule(ok, bad), doctest::Contains("routing[1].topk_ids[3]"),
                       InputError);
  bad = two;
  bad[0].topk_weights.pop_back();
  CHECK_THROWS_AS(build_fused_schedule(ok, bad), InputError);
  CHECK_NOTHROW(build_ep_schedule(ok, two));  // EP with TP 2 inside the experts
  CHECK_THROWS_AS(build_ep_schedule(ok, std::span(two).first(1)), InputError);
  g = ok;
  g.moe_ep = 1;  // 2 x 1 != 4 ranks
  CHECK_THROWS_AS(build_ep_schedule(g, two), InputError);
}

TEST_CASE("EP with moe_tp 2 on 2 nodes x 2 GPUs: peers, gathered rows and bytes by hand") {
  // attn TP2 x DP2 | moe TP2 x EP2: ranks 0, 1 = EP index 0 (experts 0, 1), ranks 2, 3 = EP
  // index 1 (experts 2, 3); rank r sends to d * 2 + r % 2. Replica 0 (ranks 0, 1), split:
  // rank 0 tokens [0, 1), rank 1 [1, 3); replica 1 (ranks 2, 3): rank 2 [0, 1), rank 3 [1, 2).
  std::vector<ReplicaRouting> routing(2);
  routing[0].num_tokens = 3;
  routing[0].topk_ids = {0, 2, 2, 3, 0, 1};
  routing[0].topk_weights = {1, 0.5, 0.25, 2, 1, 1};
  routing[1].num_tokens = 2;
  routing[1].topk_ids = {1, 3, 3, 2};
  routing[1].topk_weights = {0.5, 0.5, 1, 0.25};
  CommGeometry g = test::hybrid_geometry(2, 2, 4, 2, 4);  // h = 4, 2 bytes per element
  g.moe_tp = 2;
  g.moe_ep = 2;
  const EpSchedule s = build_ep_schedule(g, routing, EpSource::split);
  // Rank 0 (token 0 of replica 0: experts 0, 2) -> rank 0 (expert 0), rank 2 (expert 2).
  CHECK(s.ranks[0].send_offset == std::vector<int64_t>{0, 1, 1, 2, 2});
  // Rank 1 (tokens 1: 2, 3; 2: 0, 1) -> rank 1 (experts 0, 1), rank 3 (experts 2, 3).
  CHECK(s.ranks[1].send_offset == std::vector<int64_t>{0, 0, 2, 2, 4});
  CHECK(s.ranks[1].send_token == std::vector<int32_t>{2, 2, 1, 1});
  // Rank 2 (replica 1 token 0: experts 1, 3) -> rank 0 (expert 1), rank 2 (expert 3).
  CHECK(s.ranks[2].send_offset == std::vector<int64_t>{0, 1, 1, 2, 2});
  // Rank 3 (replica 1 token 1: experts 3, 2) -> rank 3 (experts 2 then 3).
  CHECK(s.ranks[3].send_offset == std::vector<int64_t>{0, 0, 0, 0, 2});
  // Received: rank 0 from 0 (expert 0) and 2 (expert 1): 2 rows; rank 1 from 1: 2 rows;
  // rank 2 from 0 and 2: 2 rows; rank 3 from 1 (2 rows) and 3 (2 rows): 4 rows.
  const int64_t recv[] = {2, 2, 2, 4}, begin[] = {0, 2, 0, 2}, rows[] = {4, 4, 6, 6};
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    CHECK(s.ranks[r].recv_rows() == recv[r]);
    CHECK(s.ranks[r].gather_begin == begin[r]);
    CHECK(s.ranks[r].gather_rows == rows[r]);
  }
  // Bytes (row = 8 B; ranks 0, 1 on node 0, 2, 3 on node 1). Rank 3 dispatch: nothing to
  // others (its 2 rows stay), all-gather 4 rows to rank 2 (same node): 32 B intra. Combine:
  // reduce-scatter of rank 2's 2 rows to rank 2 (16 B intra), rows back: 2 to rank 1 (16 B
  // inter), final all-gather of its 1 token to rank 2 (8 B intra).
  CHECK(s.ranks[3].dispatch_bytes.inter_bytes == 0);
  CHECK(s.ranks[3].dispatch_bytes.intra_bytes == 32);
  CHECK(s.ranks[3].combine_bytes.inter_bytes == 16);
  CHECK(s.ranks[3].combine_bytes.intra_bytes == 16 + 8);
  // Rank 0 dispatch: 1 row to rank 2 (8 B inter), all-gather 2 rows to rank 1 (16 B intra).
  CHECK(s.ranks[0].dispatch_bytes.inter_bytes == 8);
  CHECK(s.ranks[0].dispatch_bytes.intra_bytes == 16);
}
