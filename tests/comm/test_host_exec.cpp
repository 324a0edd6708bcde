// The schedules executed with ranks as threads on exact-valued data, against the single-device
// reference: every rank's output rows must equal the reference exactly (0 wrong elements).
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>

#include "comm_test_util.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/sim/host_exec.hpp"

namespace {
using namespace mixserve;
using namespace mixserve::sim;
using test::RoutingKind;

struct Case {
  int N, G, E, k;
  RoutingKind kind;
  std::string str() const {
    return "N=" + std::to_string(N) + " G=" + std::to_string(G) + " E=" + std::to_string(E) +
           " k=" + std::to_string(k) + " routing=" + test::to_string(kind);
  }
};

struct Problem {
  std::vector<ReplicaRouting> routing;
  std::vector<std::vector<double>> inputs;
  std::vector<std::vector<double>> reference;  // per replica
};

// Tokens per replica: a different, small count per replica (awkward sizes: 1, primes).
int tokens_for(int replica, int num_replicas) {
  static constexpr int kCounts[] = {7, 1, 13, 5, 11, 3, 17, 2};
  return num_replicas <= 2 ? 12 + 7 * replica : kCounts[replica % 8];
}

// shared: the reference adds the shared expert (toy expert E, as the executors do when
// geo.shared_expert).
Problem make_problem(const Case& c, int replicas, int hidden, uint64_t seed, bool shared = false) {
  std::mt19937_64 rng(seed);
  Problem p;
  for (int q = 0; q < replicas; ++q) {
    p.routing.push_back(test::make_routing(c.kind, q, tokens_for(q, replicas), c.E, c.k, rng));
    p.inputs.push_back(test::make_input(q, p.routing.back().num_tokens, hidden));
    p.reference.push_back(reference_moe(p.routing.back(), c.k, hidden, p.inputs.back(), shared ? c.E : -1));
  }
  return p;
}

// Wrong elements over every rank's copy of its replica's output (NaN = never written = wrong).
int64_t count_wrong(const HostExecResult& res, const Problem& p, int ranks_per_replica) {
  int64_t wrong = 0;
  for (size_t r = 0; r < res.rank_output.size(); ++r) {
    const auto& ref = p.reference[r / ranks_per_replica];
    const auto& got = res.rank_output[r];
    if (got.size() != ref.size()) return static_cast<int64_t>(ref.size()) + 1;
    for (size_t i = 0; i < ref.size(); ++i) wrong += !(got[i] == ref[i]);
  }
  return wrong;
}

// The bytes the executor sent, per rank and round, equal the schedule's (exact: both count
// elements times elem_bytes).
int64_t count_byte_mismatches(const FusedSchedule& s, const HostExecResult& res) {
  int64_t bad = 0;
  for (int r = 0; r < s.geo.num_ranks; ++r)
    for (int i = 0; i < s.num_groups; ++i) {
      const auto& st = s.steps[r][i];
      bad += res.dispatch_bytes[r][i].inter_bytes != st.dispatch_bytes.inter_bytes;
      bad += res.dispatch_bytes[r][i].intra_bytes != st.dispatch_bytes.intra_bytes;
      bad += res.combine_bytes[r][i].inter_bytes != st.combine_bytes.inter_bytes;
      bad += res.combine_bytes[r][i].intra_bytes != st.combine_bytes.intra_bytes;
    }
  for (int r = 0; r < s.geo.num_ranks; ++r) {
    bad += res.final_ag_bytes[r].inter_bytes != s.final_ag_bytes[r].inter_bytes;
    bad += res.final_ag_bytes[r].intra_bytes != s.final_ag_bytes[r].intra_bytes;
  }
  return bad;
}

int64_t count_byte_mismatches(const EpSchedule& s, const HostExecResult& res) {
  int64_t bad = 0;
  for (int r = 0; r < s.geo.num_ranks; ++r) {
    bad += res.dispatch_bytes[r][0].inter_bytes != s.ranks[r].dispatch_bytes.inter_bytes;
    bad += res.dispatch_bytes[r][0].intra_bytes != s.ranks[r].dispatch_bytes.intra_bytes;
    bad += res.combine_bytes[r][0].inter_bytes != s.ranks[r].combine_bytes.inter_bytes;
    bad += res.combine_bytes[r][0].intra_bytes != s.ranks[r].combine_bytes.intra_bytes;
  }
  return bad;
}

constexpr int kShapes[][2] = {{1, 2}, {2, 2}, {2, 4}, {4, 2}, {4, 8}, {8, 8}};
constexpr int kExperts[] = {8, 64, 256};
constexpr int kTopK[] = {1, 2, 8};

}  // namespace

TEST_CASE("fused and plain EP schedules match the single-device reference (full matrix)") {
  int cases = 0, ep_cases = 0;
  for (const auto& shape : kShapes)
    for (int E : kExperts)
      for (int k : kTopK)
        for (RoutingKind kind : test::kAllRoutings) {
          const Case c{shape[0], shape[1], E, k, kind};
          const int hidden = 3 * c.G;  // slices of 3 elements: not a power of two
          const uint64_t seed = 1000003ull * (cases + 1);
          CAPTURE(c.str());
          const Problem p = make_problem(c, c.N, hidden, seed);

          const CommGeometry hg = test::hybrid_geometry(c.N, c.G, E, k, hidden);
          const FusedSchedule fs = build_fused_schedule(hg, p.routing);
          const HostExecResult fr = run_fused_on_host(fs, p.routing, p.inputs);
          CHECK_MESSAGE(count_wrong(fr, p, c.G) == 0, "fused: ", c.str());
          CHECK_MESSAGE(count_byte_mismatches(fs, fr) == 0, "fused bytes: ", c.str());
          ++cases;

          if (E % (c.N * c.G) != 0) continue;  // plain EP needs an expert group per rank
          const CommGeometry eg = test::ep_geometry(c.N, c.G, E, k, hidden);
          for (EpSource src : {EpSource::split, EpSource::replicated}) {
            const EpSchedule es = build_ep_schedule(eg, p.routing, src);
            const HostExecResult er = run_ep_on_host(es, p.routing, p.inputs);
            CHECK_MESSAGE(count_wrong(er, p, c.G) == 0, "ep: ", c.str(),
                          src == EpSource::split ? " split" : " replicated");
            CHECK_MESSAGE(count_byte_mismatches(es, er) == 0, "ep bytes: ", c.str());
          }
          ++ep_cases;
        }
  MESSAGE("fused cases: ", cases, ", plain EP cases: ", ep_cases);
  CHECK(cases == 6 * 3 * 3 * 5);
}

TEST_CASE("EP by all-to-all with TP inside the experts (moe_tp 2 and G) matches the reference") {
  // attention TP G x DP N as in the fused cases; moe TP tp x EP N*G/tp: the EP peers of a rank
  // are the ranks with its moe-TP index, the members of an EP index all-gather the rows they
  // received and reduce-scatter the partial sums.
  int cases = 0;
  for (const auto& shape : kShapes) {
    const int N = shape[0], G = shape[1];
    const std::vector<int> tps = G == 2 ? std::vector<int>{2} : std::vector<int>{2, G};
    for (int tp : tps)
      for (int E : kExperts)
        for (int k : kTopK)
          for (RoutingKind kind : test::kAllRoutings) {
            const Case c{N, G, E, k, kind};
            const int hidden = 3 * G;
            if (E % (N * G / tp) != 0) continue;  // an expert group per EP index
            const CommGeometry g = test::ep_tp_geometry(N, G, tp, E, k, hidden);
            CAPTURE(c.str());
            CAPTURE(tp);
            const Problem p = make_problem(c, N, hidden, 4000037ull * (cases + 1));
            for (EpSource src : {EpSource::split, EpSource::replicated}) {
              const EpSchedule es = build_ep_schedule(g, p.routing, src);
              const HostExecResult er = run_ep_on_host(es, p.routing, p.inputs);
              CHECK_MESSAGE(count_wrong(er, p, G) == 0, "ep tp=", tp, ": ", c.str(),
                            src == EpSource::split ? " split" : " replicated");
              CHECK_MESSAGE(count_byte_mismatches(es, er) == 0, "ep tp=", tp, " bytes: ", c.str());
            }
            ++cases;
          }
  }
  MESSAGE("EP x TP cases: ", cases);
  // (shape, moe_tp, E) with E a multiple of moe_ep: 3 + 3 + 6 + 3 + 5 + 5 (E = 8 has no expert
  // per EP index at 4x8 and 8x8 with moe_tp 2), x 3 top-k x 5 routings.
  CHECK(cases == 25 * 3 * 5);
}

TEST_CASE("shared expert: fused, EP (moe_tp 1, 2, G) and EP x TP with attention TP < moe_tp match the reference") {
  // The shared expert (toy expert E, TP-sliced like the routed ones) runs in the group that owns
  // the tokens and is summed by the schedule's own reduce-scatter: fused, block 0 holds every
  // token of the replica; EP, the gathered rows start with the members' source tokens.
  int fused_cases = 0, ep_cases = 0;
  for (const auto& shape : kShapes)
    for (int E : kExperts)
      for (int k : kTopK)
        for (RoutingKind kind : test::kAllRoutings) {
          const int N = shape[0], G = shape[1];
          const Case c{N, G, E, k, kind};
          const int hidden = 3 * G;
          CAPTURE(c.str());
          const Problem p = make_problem(c, N, hidden, 7000003ull * (fused_cases + 1), true);
          CommGeometry hg = test::hybrid_geometry(N, G, E, k, hidden);
          hg.shared_expert = true;
          const FusedSchedule fs = build_fused_schedule(hg, p.routing);
          const HostExecResult fr = run_fused_on_host(fs, p.routing, p.inputs);
          CHECK_MESSAGE(count_wrong(fr, p, G) == 0, "fused shared: ", c.str());
          CHECK_MESSAGE(count_byte_mismatches(fs, fr) == 0, "fused shared bytes: ", c.str());
          ++fused_cases;
          for (int tp : {1, 2, G}) {
            CommGeometry g = test::ep_tp_geometry(N, G, tp, E, k, hidden);
            g.shared_expert = true;
            if (E % g.moe_ep != 0) continue;
            for (EpSource src : {EpSource::split, EpSource::replicated}) {
              const EpSchedule es = build_ep_schedule(g, p.routing, src);
              const HostExecResult er = run_ep_on_host(es, p.routing, p.inputs);
              CHECK_MESSAGE(count_wrong(er, p, G) == 0, "ep shared tp=", tp, ": ", c.str());
              CHECK_MESSAGE(count_byte_mismatches(es, er) == 0, "ep shared tp=", tp, " bytes: ", c.str());
            }
            ++ep_cases;
          }
        }
  // Attention TP 1 x DP N*G with moe TP 2 and 4 x EP: a moe-TP group spans replicas, so the
  // members' source tokens cross in the all-gather.
  int cross = 0;
  for (auto [N, G] : {std::pair{1, 4}, {2, 4}})
    for (int tp : {2, 4})
      for (int k : {1, 2}) {
        const Case c{N, G, 16, k, RoutingKind::uniform};
        CommGeometry g = test::ep_tp_geometry(N, G, tp, 16, k, 2 * tp);
        g.attn_tp = 1;
        g.attn_dp = N * G;
        g.shared_expert = true;
        CAPTURE(c.str());
        CAPTURE(tp);
        const Problem p = make_problem(c, N * G, g.hidden, 9100 + cross, true);
        const EpSchedule es = build_ep_schedule(g, p.routing);
        CHECK(es.ranks[0].dispatch_bytes.intra_bytes + es.ranks[0].dispatch_bytes.inter_bytes > 0);
        const HostExecResult er = run_ep_on_host(es, p.routing, p.inputs);
        CHECK(count_wrong(er, p, 1) == 0);
        CHECK(count_byte_mismatches(es, er) == 0);
        ++cross;
      }
  MESSAGE("shared expert: fused cases ", fused_cases, ", EP cases ", ep_cases, ", cross-replica ", cross);
  CHECK(fused_cases == 6 * 3 * 3 * 5);
  // (shape, moe_tp in {1, 2, G} (G = 2 twice), E) with E a multiple of moe_ep: 9 + 9 + 9 + 9 + 7 + 7
  // (E = 8 has no expert per EP index at 4x8 and 8x8 for moe_tp 1 and 2), x 3 top-k x 5 routings.
  CHECK(ep_cases == 50 * 3 * 5);
}

TEST_CASE("shared expert: without it in the executors the reference differs (the check can fail)") {
  const Case c{2, 4, 64, 2, RoutingKind::uniform};
  const Problem p = make_problem(c, 2, 12, 21, true);
  const CommGeometry plain = test::hybrid_geometry(2, 4, 64, 2, 12);  // shared_expert = false
  CHECK(count_wrong(run_fused_on_host(build_fused_schedule(plain, p.routing), p.routing, p.inputs), p, 4) > 0);
  CHECK(count_wrong(run_ep_on_host(build_ep_schedule(test::ep_tp_geometry(2, 4, 2, 64, 2, 12), p.routing),
                                   p.routing, p.inputs),
                    p, 4) > 0);
}

TEST_CASE("EP x TP: the check can fail (a corrupted gather layout, a wrong weight at home)") {
  const Case c{2, 4, 64, 2, RoutingKind::uniform};
  const int hidden = 12;
  const Problem p = make_problem(c, 2, hidden, 9);
  const CommGeometry g = test::ep_tp_geometry(2, 4, 4, 64, 2, hidden);
  SUBCASE("two members' pieces swapped in the gathered rows") {
    EpSchedule s = build_ep_schedule(g, p.routing);
    REQUIRE(s.ranks[0].recv_rows() > 0);
    REQUIRE(s.ranks[1].recv_rows() > 0);
    std::swap(s.ranks[0].gather_begin, s.ranks[1].gather_begin);
    bool failed = false;
    try {
      failed = count_wrong(run_ep_on_host(s, p.routing, p.inputs, 2.0), p, c.G) > 0;
    } catch (const RuntimeError&) {
      failed = true;
    }
    CHECK(failed);
  }
  SUBCASE("a row combined with its token's other top-2 weight") {
    EpSchedule s = build_ep_schedule(g, p.routing);
    bool corrupted = false;
    for (auto& rp : s.ranks) {
      const auto& w = p.routing[rp.replica].topk_weights;
      for (int64_t k = 0; k < rp.send_offset.back() && !corrupted; ++k) {
        const size_t tok = size_t(rp.send_token[k]);
        const int other = 1 - rp.send_slot[k];
        if (w[tok * 2 + other] == w[tok * 2 + rp.send_slot[k]]) continue;
        rp.send_slot[k] = other;
        corrupted = true;
      }
    }
    REQUIRE(corrupted);
    CHECK(count_wrong(run_ep_on_host(s, p.routing, p.inputs, 2.0), p, c.G) > 0);
  }
}

TEST_CASE("general moe_tp | G: TP groups of 2 inside 4-GPU nodes, rails partly intra-node") {
  // 2 nodes x 4 GPUs, moe_tp = attn_tp = 2, moe_ep = attn_dp = 4: groups 0,1 on node 0.
  for (int k : kTopK) {
    CommGeometry g = test::hybrid_geometry(2, 4, 64, k, 10);
    g.attn_tp = g.moe_tp = 2;
    g.attn_dp = g.moe_ep = 4;
    const Case c{2, 4, 64, k, RoutingKind::uniform};
    CAPTURE(c.str());
    const Problem p = make_problem(c, 4, g.hidden, 77 + k);
    const FusedSchedule s = build_fused_schedule(g, p.routing);
    const HostExecResult res = run_fused_on_host(s, p.routing, p.inputs);
    CHECK(count_wrong(res, p, 2) == 0);
    CHECK(count_byte_mismatches(s, res) == 0);
    // Rank 0 (group 0, node 0): round 1 talks to group 1 (node 0), round 2 to group 2 (node 1).
    CHECK_FALSE(s.steps[0][1].send_inter_node);
    CHECK(s.steps[0][2].send_inter_node);
  }
}

TEST_CASE("toy expert: TP partials sum to the full expert for every TP degree") {
  const int h = 24;
  std::vector<double> x(h), full(h);
  for (int c = 0; c < h; ++c) x[c] = (c * 7) % 11 - 5;
  for (int e : {0, 3, 255}) {
    toy_expert_full(e, x, full);
    bool nonzero = false;
    for (double v : full) nonzero |= v != 0;
    CHECK(nonzero);
    for (int T : {1, 2, 4, 8}) {
      std::vector<double> sum(h, 0.0);
      for (int t = 0; t < T; ++t) toy_expert_partial_add(e, t, T, x, 1.0, sum);
      CHECK_MESSAGE(sum == full, "expert ", e, " T=", T);
      // A single partial is not the full output when T > 1: the reduction is needed.
      if (T > 1) {
        std::vector<double> one(h, 0.0);
        toy_expert_partial_add(e, 0, T, x, 1.0, one);
        CHECK(one != full);
      }
    }
  }
}

TEST_CASE("the check can fail: a corrupted schedule gives wrong elements or an error") {
  const Case c{2, 4, 64, 2, RoutingKind::uniform};
  const int hidden = 12;
  const Problem p = make_problem(c, 2, hidden, 5);
  const CommGeometry g = test::hybrid_geometry(2, 4, 64, 2, hidden);

  SUBCASE("wrong weight on one expert-side pair") {
    FusedSchedule s = build_fused_schedule(g, p.routing);
    REQUIRE(s.expert_side[1].num_pairs() > 0);
    s.expert_side[1].pair_weight[0] *= 2;
    CHECK(count_wrong(run_fused_on_host(s, p.routing, p.inputs), p, c.G) > 0);
  }
  SUBCASE("combine returns the wrong block") {
    FusedSchedule s = build_fused_schedule(g, p.routing);
    for (auto& rank_steps : s.steps) std::swap(rank_steps[0].combine_send_block,
                                                rank_steps[1].combine_send_block);
    bool failed = false;
    try {
      failed = count_wrong(run_fused_on_host(s, p.routing, p.inputs, 2.0), p, c.G) > 0;
    } catch (const RuntimeError&) {
      failed = true;  // a size mismatch is detected before any value is compared
    }
    CHECK(failed);
  }
  SUBCASE("a rail send to the wrong peer is reported, not a hang") {
    FusedSchedule s = build_fused_schedule(g, p.routing);
    s.steps[1][1].send_peer = 2;  // rank 1 sends its round-1 slice inside its own node
    CHECK_THROWS_AS(run_fused_on_host(s, p.routing, p.inputs, 0.5), RuntimeError);
  }
}

TEST_CASE("a step with no tokens anywhere moves nothing and finishes") {
  for (auto [N, G] : {std::pair{1, 2}, {2, 4}}) {
    CAPTURE(N);
    CAPTURE(G);
    const int hidden = 2 * G;
    std::vector<ReplicaRouting> routing(N);
    std::vector<std::vector<double>> inputs(N);
    const CommGeometry hg = test::hybrid_geometry(N, G, 8, 2, hidden);
    const FusedSchedule fs = build_fused_schedule(hg, routing);
    const HostExecResult fr = run_fused_on_host(fs, routing, inputs);
    for (const auto& y : fr.rank_output) CHECK(y.empty());
    CHECK(count_byte_mismatches(fs, fr) == 0);
    const EpSchedule es = build_ep_schedule(test::ep_geometry(N, G, 8, 2, hidden), routing);
    const HostExecResult er = run_ep_on_host(es, routing, inputs);
    for (const auto& y : er.rank_output) CHECK(y.empty());
    CHECK(count_byte_mismatches(es, er) == 0);
  }
}
