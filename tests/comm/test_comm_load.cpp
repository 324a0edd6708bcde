// The exact fused schedule against the cost model's expectation: the rows that cross a rail
// per (source, destination) group, averaged over many seeded uniform routings, must match
// sim::expected_rows_to_group (moe_load.hpp) and the closed form derived here independently,
// and the per-round volumes the step-cost model uses (sim::fused_round_bytes).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>

#include "comm_test_util.hpp"
#include "mixserve/sim/comm_schedule.hpp"
#include "mixserve/sim/cost_moe_comm.hpp"
#include "mixserve/sim/moe_load.hpp"

namespace {
// P(a token has at least one of its k distinct uniform experts among g of E)
//   = 1 - C(E-g, k) / C(E, k) = 1 - prod_{j<k} (E-g-j) / (E-j).
double hit_probability(int E, int k, int g) {
  double miss = 1;
  for (int j = 0; j < k; ++j) miss *= std::max(0.0, static_cast<double>(E - g - j)) / (E - j);
  return 1 - miss;
}
}  // namespace

TEST_CASE("per-round inter-node bytes of the fused schedule match the MoE load model (2%)") {
  using namespace mixserve;
  // Tolerance: the rows of one (source, destination) block are a binomial count of n tokens
  // with hit probability p >= 1/8 here, relative SD sqrt((1 - p) / (n p)) <= 0.083 at
  // n = 1024; each round averages >= 500 independent blocks (N per sample; the G ranks of a
  // group send the same rows), so the relative standard error is <= 0.37% and 2% is > 5 SE.
  for (auto [N, G] : {std::pair{2, 2}, {2, 4}, {4, 2}, {4, 8}, {8, 8}})
    for (int E : {8, 64, 256})
      for (int k : {1, 2, 8}) {
        if (k > E) continue;
        const int n = 1024, h = 2 * G, samples = 500 / N + 1;
        CAPTURE(N);
        CAPTURE(G);
        CAPTURE(E);
        CAPTURE(k);
        std::mt19937_64 rng(7 + 1009ull * (N * 100 + G * 10 + k) + E);
        const sim::CommGeometry g = test::hybrid_geometry(N, G, E, k, h);
        std::vector<double> round_bytes(N, 0.0), dispatch_intra(N, 0.0), combine_intra(N, 0.0);
        int64_t asymmetric = 0;
        for (int it = 0; it < samples; ++it) {
          std::vector<sim::ReplicaRouting> routing;
          for (int q = 0; q < N; ++q)
            routing.push_back(test::make_routing(test::RoutingKind::uniform, q, n, E, k, rng));
          const sim::FusedSchedule s = sim::build_fused_schedule(g, routing);
          for (int r = 0; r < N * G; ++r)
            for (int i = 1; i < N; ++i) {
              round_bytes[i] += s.steps[r][i].dispatch_bytes.inter_bytes;
              dispatch_intra[i] += s.steps[r][i].dispatch_bytes.intra_bytes;
              combine_intra[i] += s.steps[r][i].combine_bytes.intra_bytes;
              // Combine sends the same rows back: what (q+i) sent q in its dispatch round N-i.
              asymmetric += s.steps[r][i].combine_bytes.inter_bytes !=
                            s.steps[s.steps[r][i].send_group * G + r % G][N - i]
                                .dispatch_bytes.inter_bytes;
            }
        }
        CHECK(asymmetric == 0);
        const double slice_bytes = (h / G) * g.elem_bytes;
        const double model = sim::expected_rows_to_group(n, E, k, E / N) * slice_bytes;
        const double closed = n * hit_probability(E, k, E / N) * slice_bytes;
        CHECK(model == doctest::Approx(closed).epsilon(1e-9));
        // The step-cost model's per-round volumes (cost_moe_comm.hpp): rail bytes per rank and
        // the intra-group all-gather / reduce-scatter size, of which a rank sends (G-1)/G.
        const sim::FusedRoundBytes fr =
            sim::fused_round_bytes(n, h, g.elem_bytes, E, k, G, N, /*dedup=*/true);
        CHECK(fr.p2p_bytes == doctest::Approx(model).epsilon(1e-9));
        const double coll_sent = fr.gather_bytes * (G - 1) / G;
        const double per_round = samples * N * G;
        for (int i = 1; i < N; ++i) {
          CAPTURE(i);
          CHECK(round_bytes[i] / per_round == doctest::Approx(model).epsilon(0.02));
          if (G > 1) {
            CHECK(dispatch_intra[i] / per_round == doctest::Approx(coll_sent).epsilon(0.02));
            CHECK(combine_intra[i] / per_round == doctest::Approx(coll_sent).epsilon(0.02));
          }
        }
      }
}

TEST_CASE("EP schedule (a2a, moe_tp 1, 2, G, with and without a shared expert) moves what the cost model costs") {
  using namespace mixserve;
  // Per rank, averaged over ranks and seeded uniform routings, the EP schedule's bytes against
  // sim::ep_a2a_bytes, the volumes the step-cost model hands the op timer for MoeComm::nccl_a2a
  // (a collective over T ranks sends (T-1)/T of its buffer):
  //   all-to-all to other EP peers: (Q-1)/Q of a2a_bytes (uniform routing: the destination EP
  //     index of a row is uniform, send = receive in the mean; 2%, the rows of a rank are >= 700
  //     binomial draws with p = (Q-1)/Q >= 1/2 per sample, relative SE < 0.5% over the samples);
  //   the moe-TP all-gather and reduce-scatter, the final all-gather: exact in the mean (every
  //     (token, slot) row is in one EP index; the token counts divide attn_tp).
  // Attention TP G (moe-TP groups inside a replica) and 1 (groups across replicas: the shared
  // expert's tokens cross in the all-gather).
  for (auto [N, G] : {std::pair{1, 2}, {2, 2}, {2, 4}, {4, 2}})
    for (int A : {G, 1})
    for (int tp : {1, 2, G})
      for (bool shared : {false, true})
        for (int k : {1, 2, 8}) {
          const int E = 64, n = 96 * G, h = 2 * G, samples = 40;
          sim::CommGeometry g = test::ep_tp_geometry(N, G, tp, E, k, h);
          g.attn_tp = A;
          g.attn_dp = N * G / A;
          g.shared_expert = shared;
          const int P = N * G, Q = g.moe_ep, R = g.attn_dp;
          CAPTURE(N);
          CAPTURE(A);
          CAPTURE(G);
          CAPTURE(tp);
          CAPTURE(shared);
          CAPTURE(k);
          std::mt19937_64 rng(11 + 131ull * (N * 10000 + G * 1000 + A * 100 + tp * 10 + k) + shared);
          double a2a = 0, ag = 0, rs = 0, back = 0, final_ag = 0;
          for (int it = 0; it < samples; ++it) {
            std::vector<sim::ReplicaRouting> routing;
            for (int q = 0; q < R; ++q)
              routing.push_back(test::make_routing(test::RoutingKind::uniform, q, n, E, k, rng));
            const sim::EpSchedule s = sim::build_ep_schedule(g, routing);
            const double row = h * g.elem_bytes;
            for (int r = 0; r < P; ++r) {
              const sim::EpRankPlan& rp = s.ranks[r];
              double sent = 0, returned = 0;
              for (int d = 0; d < P; ++d)
                if (d != r) sent += (rp.send_offset[d + 1] - rp.send_offset[d]) * row;
              for (int src = 0; src < P; ++src)
                if (src != r)
                  for (int e = 0; e < g.experts_per_ep_rank(); ++e)
                    returned += rp.recv_counts[size_t(src) * g.experts_per_ep_rank() + e] * row;
              const double fin = (A - 1) * double(rp.token_end - rp.token_begin) * row;
              const double combine = rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes;
              a2a += sent;
              back += returned;
              ag += rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes - sent;
              rs += combine - returned - fin;
              final_ag += fin;
            }
          }
          const double per = double(samples) * P;
          // The cost model's arguments: a group's tokens (Tg = n * tp / A), a replica's tokens,
          // the mean rows of an EP index (every token of every replica, k rows, over Q).
          const double Tg = double(n) * tp / A, ep_rows = double(n) * R * k / Q;
          const sim::EpA2aBytes m =
              sim::ep_a2a_bytes(Tg, n, ep_rows, h, g.elem_bytes, k, tp, A, shared);
          CHECK(a2a / per == doctest::Approx(m.a2a_bytes * (Q - 1) / Q).epsilon(0.02));
          CHECK(back / per == doctest::Approx(m.a2a_bytes * (Q - 1) / Q).epsilon(0.02));
          CHECK(ag / per == doctest::Approx(m.tp_ag_bytes * (tp - 1) / tp).epsilon(1e-9));
          CHECK(rs / per == doctest::Approx(m.tp_rs_bytes * (tp - 1) / tp).epsilon(1e-9));
          CHECK(final_ag / per == doctest::Approx(m.final_ag_bytes * (A - 1) / A).epsilon(1e-9));
        }
}

TEST_CASE("fused schedule with a shared expert: round 0 reduce-scatters every token of the group") {
  using namespace mixserve;
  // The cost model's local (round-0) reduce-scatter with a shared expert is Tg rows (cost_model.cpp);
  // the schedule's round-0 combine bytes per rank are (T-1)/T of the replica's tokens.
  for (auto [N, G] : {std::pair{2, 2}, {2, 4}, {4, 2}}) {
    sim::CommGeometry g = test::hybrid_geometry(N, G, 64, 2, 2 * G);
    g.shared_expert = true;
    std::mt19937_64 rng(5 + N * G);
    std::vector<sim::ReplicaRouting> routing;
    for (int q = 0; q < N; ++q) routing.push_back(test::make_routing(test::RoutingKind::skewed, q, 37 + q, 64, 2, rng));
    const sim::FusedSchedule s = sim::build_fused_schedule(g, routing);
    for (int r = 0; r < N * G; ++r) {
      const int q = r / G;
      CHECK(s.route_rows(q, q).size() == size_t(routing[q].num_tokens));
      const double want = double(G - 1) / G * routing[q].num_tokens * g.hidden * g.elem_bytes;
      CHECK(s.steps[r][0].combine_bytes.intra_bytes == doctest::Approx(want).epsilon(1e-12));
    }
  }
}
