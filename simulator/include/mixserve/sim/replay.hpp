// What a serving run on the GPU (`mixserve-run bench --workload`) and its check
// (`mixserve-plan validate`) share with `mixserve-plan simulate`: the workload overrides with the
// simulator CLI's names (--num-requests, --request-rate/--rate, --seed), the engine config the
// scheduler ran with, and the exact request list, written to and read back from a results file so
// that the simulator replays the same requests under the same limits.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::sim {

struct WorkloadOverrides {
  int num_requests = 0;   // 0 = the workload's
  double rate = 0;        // 0 = the workload's; else poisson or gamma arrivals only (InputError)
  int64_t seed = -1;      // -1 = the workload's
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;  // 0 = the workload's
};
// As `mixserve-plan simulate` applies them. `option` names the rate option in the message.
WorkloadSpec apply_overrides(WorkloadSpec w, const WorkloadOverrides& o,
                             const std::string& option = "--request-rate");

// {max_num_seqs, max_num_batched_tokens, chunked_prefill, decode_first, kv_block_tokens,
//  kv_blocks, max_model_len, slo_ttft_ms, slo_tpot_ms, slo_e2el_ms, num_replicas, pp}
nlohmann::json serving_config_json(const ServingConfig& c);
// The inverse; InputError "<origin>: key '<key>': ..." on a missing or mistyped key.
ServingConfig serving_config_from_json(const nlohmann::json& j, const std::string& origin);

// [{id, arrival_s, input_tokens, output_tokens}, ...]
nlohmann::json requests_json(const RequestStream& s);
// The inverse (open loop, sorted by arrival); InputError naming origin, the index and the key.
RequestStream requests_from_json(const nlohmann::json& j, const std::string& origin);

// A JSON value's key as a number / integer; InputError "<origin>: key '<path>': expected ..." when
// missing or of another type.
double json_number(const nlohmann::json& j, const std::string& key, const std::string& origin,
                   const std::string& path = "");
int64_t json_int(const nlohmann::json& j, const std::string& key, const std::string& origin,
                 const std::string& path = "");

// vLLM's printed result block ("============ Serving Benchmark Result (<kind>) ===...") with
// our MixServe section, as `mixserve-plan simulate` prints it; rate <= 0 leaves out the rate line.
std::string format_serving_block(const ServingMetrics& m, const ServingConfig& cfg, double rate,
                                 const std::string& title, const std::string& kind);

// Per-step error summary over (predicted - measured) / measured values in %: median (signed),
// p90 of |error|, worst (the signed value of the largest |error|). All 0 for none.
struct ErrorSummary {
  double median = 0, p90_abs = 0, worst = 0;
  int64_t n = 0;
};
ErrorSummary error_summary(const std::vector<double>& error_pct);

}  // namespace mixserve::sim
