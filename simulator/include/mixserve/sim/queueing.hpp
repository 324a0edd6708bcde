// Closed-form queueing delays used by the analytic ranking (analytic_metrics).
//
// A continuously batching engine replica with n sequence slots behaves like a multi-server queue:
// a request holds one slot from admission to its last token, and waits only when all n slots are
// busy. With Poisson arrivals this is M/G/n; its mean wait is approximated by Allen-Cunneen:
//   W_q(M/G/n) ~= W_q(M/M/n) * (1 + cv_s^2) / 2,
// where W_q(M/M/n) = ErlangC(n, a) / (n * mu - lambda), a = lambda / mu the offered load in
// erlangs, mu the service rate of one slot and cv_s the coefficient of variation of the service
// time (for one request: mostly its output length). The formula is exact for n = 1 with
// exponential (cv 1) and deterministic (cv 0) service.
#pragma once

namespace mixserve::sim {

// Erlang C: probability that an arrival waits, for `servers` servers and `offered_erlangs` = a.
// Requires a < servers (else returns 1). Computed through the Erlang B recursion, stable for
// thousands of servers.
double erlang_c(double servers, double offered_erlangs);

// Mean waiting time (same unit as 1/service_rate) in an M/G/n queue by Allen-Cunneen.
// Returns +inf when the queue does not drain (arrival_rate >= servers * service_rate).
double mgn_mean_wait(double servers, double arrival_rate, double service_rate,
                     double service_cv2);

}  // namespace mixserve::sim
