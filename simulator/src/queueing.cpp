#include "mixserve/sim/queueing.hpp"

#include <cmath>
#include <limits>

namespace mixserve::sim {

double erlang_c(double servers, double a) {
  if (a <= 0) return 0.0;
  if (a >= servers) return 1.0;
  // Erlang B by recursion over integer server counts: B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)).
  // A fractional server count (n / pp micro-batches) is rounded down: fewer servers, longer wait.
  const long n = long(std::floor(servers));
  if (n < 1) return 1.0;
  double b = 1.0;
  for (long k = 1; k <= n; ++k) b = a * b / (double(k) + a * b);
  const double rho = a / double(n);
  if (rho >= 1.0) return 1.0;
  return b / (1.0 - rho * (1.0 - b));
}

double mgn_mean_wait(double servers, double lambda, double mu, double cv2) {
  if (lambda <= 0) return 0.0;
  const double n = std::floor(servers);
  if (n < 1 || mu <= 0 || lambda >= n * mu) return std::numeric_limits<double>::infinity();
  const double wq_mmn = erlang_c(n, lambda / mu) / (n * mu - lambda);
  return wq_mmn * (1.0 + cv2) / 2.0;
}

}  // namespace mixserve::sim
