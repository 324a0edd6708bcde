// Request streams from a WorkloadSpec: arrival times and (input, output) token counts, drawn
// from seeded generators of our own (not <random>'s distributions, whose algorithms differ
// between standard libraries), so a seed gives the same requests with any standard library
// (up to the last-bit accuracy of the platform's log/exp).
// Arrival times and lengths use separate streams: changing the rate keeps the lengths.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mixserve/core/workload.hpp"
#include "mixserve/sim/cost_model.hpp"

namespace mixserve::sim {

struct Request {
  int64_t id = 0;
  double arrival_s = 0;       // open loop; closed loop: ignored (the simulator issues them)
  int64_t input_tokens = 1;   // >= 1
  int64_t output_tokens = 1;  // >= 1 (the prefill produces the first)
  int replica = -1;           // DP replica to pin to (trace files may say), -1 = the router picks
};

struct RequestStream {
  std::vector<Request> requests;  // sorted by arrival_s for open loop
  int closed_loop_users = 0;      // > 0: that many users, each sends its next request on completion
};

// Deterministic for the spec's seed. Throws InputError on an unreadable or malformed trace.
RequestStream generate_requests(const WorkloadSpec& w);

// Trace files: CSV with a header naming the columns arrival_s (or timestamp_s), input_tokens,
// output_tokens and optionally replica; or JSONL with the same keys, one object per line.
// Rows are sorted by arrival. max_rows 0 = all.
std::vector<Request> read_trace(const std::string& path, int64_t max_rows = 0);

// Seeded generator (xoshiro256**, seeded through splitmix64) with the samplers the workloads
// need; exposed for tests.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();            // [0, 1)
  double exponential(double rate);
  double normal();             // standard normal
  double gamma(double shape);  // scale 1
 private:
  uint64_t s_[4];
  bool have_spare_ = false;
  double spare_ = 0;
};
// One length: rounded to an integer and clamped to [max(1, min), max] (max 0 = no upper clamp).
int64_t sample_length(const LengthDist& d, Rng& rng);

// Routing model the cost model should assume for this workload (reads routing_file: CSV or
// whitespace rows, one row per layer, one column per expert: token counts).
RoutingModel routing_from_workload(const WorkloadSpec& w);

}  // namespace mixserve::sim
