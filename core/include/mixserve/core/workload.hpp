// Workload: arrivals, request lengths, SLOs. The same file drives the simulator and the executor.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mixserve {

#define MIXSERVE_ARRIVALS(X) \
  X(burst, "burst")          /* all requests at t = 0 (vLLM --request-rate inf) */ \
  X(poisson, "poisson")      \
  X(gamma, "gamma")          /* burstiness: shape; scale = 1/(rate*burstiness) */ \
  X(closed_loop, "closed_loop") /* `concurrency` users, next request on completion */ \
  X(trace, "trace")          /* CSV or JSONL: arrival_s, input_tokens, output_tokens */
enum class ArrivalKind {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_ARRIVALS(MIXSERVE_X)
#undef MIXSERVE_X
};

#define MIXSERVE_LENGTH_DISTS(X) \
  X(fixed, "fixed") X(uniform, "uniform") X(normal, "normal") X(lognormal, "lognormal") \
  X(histogram, "histogram") X(sharegpt, "sharegpt")
enum class LengthKind {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_LENGTH_DISTS(MIXSERVE_X)
#undef MIXSERVE_X
};

struct LengthDist {
  LengthKind kind = LengthKind::fixed;
  double value = 0;          // fixed
  double min = 1, max = 0;   // uniform bounds; clamps for normal/lognormal (max 0 = none)
  double mean = 0, stddev = 0;  // normal; lognormal uses mean/stddev of the lengths themselves
  std::vector<std::pair<int64_t, double>> histogram;  // (length, weight)
  std::string file;          // histogram file, if read from one
  double expected() const;   // mean length (closed form or from the histogram)
};

struct WorkloadSpec {
  std::string name;
  ArrivalKind arrival = ArrivalKind::poisson;
  double rate = 1.0;         // requests/s (poisson, gamma)
  double burstiness = 1.0;   // gamma shape (1 = poisson)
  int concurrency = 0;       // closed loop
  std::string trace_file;
  LengthDist input, output;
  int num_requests = 1000;
  uint64_t seed = 0;
  double slo_ttft_ms = 0;    // 0 = no SLO
  double slo_tpot_ms = 0;
  bool approximate = false;  // true for built-in approximations (sharegpt-like)
  std::string notes;
  // Engine limits the workload asks for (0 = take the plan's). The paper's setting: 16, 4096.
  int max_num_seqs = 0;      // max batch (sequences per DP replica)
  int64_t max_seq_len = 0;   // input + output tokens per request; longer requests are clamped
  // MoE routing the simulator's cost model assumes: "uniform" | "zipf" (power law, exponent
  // routing_skew) | "histogram" (routing_file: per-layer expert token counts, CSV rows = layers).
  std::string routing = "uniform";
  double routing_skew = 0;
  std::string routing_file;
  double slo_e2el_ms = 0;    // 0 = no SLO
};

std::string_view to_string(ArrivalKind k);
std::string_view to_string(LengthKind k);

// Engine limits the plan fixes and the executor and simulator obey (vLLM names).
struct RuntimeLimits {
  int max_num_seqs = 256;               // per DP replica
  int64_t max_num_batched_tokens = 8192;// per DP replica per step
  bool chunked_prefill = true;
  bool decode_first = true;             // vLLM V1: decodes are scheduled before new prefills
  int kv_block_tokens = 16;
  int64_t kv_blocks = 0;                // per DP replica; filled in by the memory model
  double gpu_memory_utilization = 0.9;
  int64_t max_model_len = 0;            // 0 = model max
};

}  // namespace mixserve
