#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>
#include <algorithm>

#include "mixserve/sim/queueing.hpp"

using namespace mixserve::sim;

// Textbook closed forms: M/M/1 W_q = rho / (mu (1 - rho)); M/M/2 with lambda = mu = 1:
// P_wait = a^2/(2(1-rho)) / (1 + a + a^2/(2(1-rho))) with a = 1, rho = 1/2 -> 1/3, W_q = 1/3.
TEST_CASE("erlang C and M/G/n wait match closed forms") {
  CHECK(erlang_c(1, 0.7) == doctest::Approx(0.7).epsilon(1e-12));  // M/M/1: P_wait = rho
  CHECK(erlang_c(2, 1.0) == doctest::Approx(1.0 / 3.0).epsilon(1e-12));
  const double mu = 2.0, lambda = 1.5, rho = lambda / mu;
  CHECK(mgn_mean_wait(1, lambda, mu, 1.0) == doctest::Approx(rho / (mu * (1 - rho))).epsilon(1e-12));
  // M/D/1 (Pollaczek-Khinchine): W_q = rho / (2 mu (1 - rho)).
  CHECK(mgn_mean_wait(1, lambda, mu, 0.0) == doctest::Approx(rho / (2 * mu * (1 - rho))).epsilon(1e-12));
  CHECK(mgn_mean_wait(2, 1.0, 1.0, 1.0) == doctest::Approx(1.0 / 3.0).epsilon(1e-12));
  CHECK(std::isinf(mgn_mean_wait(4, 4.0, 1.0, 1.0)));
  CHECK(mgn_mean_wait(4, 0.0, 1.0, 1.0) == 0.0);
  // Many servers stay finite and small at moderate load (the recursion does not overflow).
  const double w = mgn_mean_wait(4096, 2000.0, 1.0, 1.0);
  CHECK(std::isfinite(w));
  CHECK(w < 1e-6);
}

// Monte-Carlo M/M/n (seeded): the formula is exact for exponential service.
TEST_CASE("M/M/n wait matches a seeded simulation within 5%") {
  const int n = 8;
  const double mu = 1.0, lambda = 7.0;  // rho = 0.875: a real queue forms
  std::mt19937_64 rng(12345);
  std::exponential_distribution<double> inter(lambda), serv(mu);
  std::vector<double> free_at(n, 0.0);
  double t = 0, wait_sum = 0;
  const int warm = 20000, count = 400000;
  for (int i = 0; i < warm + count; ++i) {
    t += inter(rng);
    auto it = std::min_element(free_at.begin(), free_at.end());
    const double start = std::max(t, *it);
    if (i >= warm) wait_sum += start - t;
    *it = start + serv(rng);
  }
  const double sim = wait_sum / count;
  const double model = mgn_mean_wait(n, lambda, mu, 1.0);
  CAPTURE(sim);
  CAPTURE(model);
  CHECK(std::abs(sim - model) / model < 0.05);
}
