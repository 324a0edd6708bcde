// The exact fused schedule against the cost model's expectation: the rows that cross a rail
// per (source, destination) group, averaged over many seeded uniform routings, must match
// sim::expected_rows_to_group (moe_load.hpp) and the closed form derived here independently,
// and the per-round volumes the step-cost model uses (sim::fused_round_bytes).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>

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
