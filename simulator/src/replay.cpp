// Workload overrides, engine config and request list of a results file (replay.hpp).
#include "mixserve/sim/replay.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {

WorkloadSpec apply_overrides(WorkloadSpec w, const WorkloadOverrides& o, const std::string& option) {
  if (o.rate > 0) {
    if (w.arrival != ArrivalKind::poisson && w.arrival != ArrivalKind::gamma)
      throw_input_error(option, "rate", "a workload with poisson or gamma arrivals",
                        std::string(to_string(w.arrival)));
    w.rate = o.rate;
  }
  if (o.num_requests > 0) w.num_requests = o.num_requests;
  if (o.seed >= 0) w.seed = static_cast<uint64_t>(o.seed);
  if (o.slo_ttft_ms > 0) w.slo_ttft_ms = o.slo_ttft_ms;
  if (o.slo_tpot_ms > 0) w.slo_tpot_ms = o.slo_tpot_ms;
  if (o.slo_e2el_ms > 0) w.slo_e2el_ms = o.slo_e2el_ms;
  return w;
}

double json_number(const nlohmann::json& j, const std::string& key, const std::string& origin,
                   const std::string& path) {
  const std::string where = path.empty() ? key : path + "." + key;
  if (!j.is_object() || !j.contains(key))
    throw InputError(fmt::format("{}: key '{}': missing", origin, where));
  const auto& v = j.at(key);
  if (!v.is_number())
    throw InputError(fmt::format("{}: key '{}': expected a number, got {}", origin, where,
                                 v.dump().substr(0, 40)));
  return v.get<double>();
}

int64_t json_int(const nlohmann::json& j, const std::string& key, const std::string& origin,
                 const std::string& path) {
  const std::string where = path.empty() ? key : path + "." + key;
  if (!j.is_object() || !j.contains(key))
    throw InputError(fmt::format("{}: key '{}': missing", origin, where));
  const auto& v = j.at(key);
  if (!v.is_number_integer())
    throw InputError(fmt::format("{}: key '{}': expected an integer, got {}", origin, where,
                                 v.dump().substr(0, 40)));
  return v.get<int64_t>();
}

namespace {
bool json_bool(const nlohmann::json& j, const std::string& key, const std::string& origin,
               const std::string& path) {
  if (!j.contains(key) || !j.at(key).is_boolean())
    throw InputError(fmt::format("{}: key '{}.{}': expected true or false", origin, path, key));
  return j.at(key).get<bool>();
}
}  // namespace

nlohmann::json serving_config_json(const ServingConfig& c) {
  const RuntimeLimits& L = c.limits;
  return {{"num_replicas", c.num_replicas},
          {"pp", c.pp},
          {"max_num_seqs", L.max_num_seqs},
          {"max_num_batched_tokens", L.max_num_batched_tokens},
          {"chunked_prefill", L.chunked_prefill},
          {"decode_first", L.decode_first},
          {"kv_block_tokens", L.kv_block_tokens},
          {"kv_blocks", L.kv_blocks},
          {"max_model_len", L.max_model_len},
          {"slo_ttft_ms", c.slo_ttft_ms},
          {"slo_tpot_ms", c.slo_tpot_ms},
          {"slo_e2el_ms", c.slo_e2el_ms}};
}

ServingConfig serving_config_from_json(const nlohmann::json& j, const std::string& origin) {
  const std::string p = "serving_config";
  if (!j.is_object()) throw InputError(fmt::format("{}: key '{}': expected an object", origin, p));
  ServingConfig c;
  c.num_replicas = static_cast<int>(json_int(j, "num_replicas", origin, p));
  c.pp = static_cast<int>(json_int(j, "pp", origin, p));
  c.limits.max_num_seqs = static_cast<int>(json_int(j, "max_num_seqs", origin, p));
  c.limits.max_num_batched_tokens = json_int(j, "max_num_batched_tokens", origin, p);
  c.limits.chunked_prefill = json_bool(j, "chunked_prefill", origin, p);
  c.limits.decode_first = json_bool(j, "decode_first", origin, p);
  c.limits.kv_block_tokens = static_cast<int>(json_int(j, "kv_block_tokens", origin, p));
  c.limits.kv_blocks = json_int(j, "kv_blocks", origin, p);
  c.limits.max_model_len = json_int(j, "max_model_len", origin, p);
  c.slo_ttft_ms = json_number(j, "slo_ttft_ms", origin, p);
  c.slo_tpot_ms = json_number(j, "slo_tpot_ms", origin, p);
  c.slo_e2el_ms = json_number(j, "slo_e2el_ms", origin, p);
  if (c.num_replicas < 1 || c.pp < 1 || c.limits.max_num_seqs < 1 ||
      c.limits.max_num_batched_tokens < 1 || c.limits.kv_block_tokens < 1 || c.limits.kv_blocks < 1)
    throw InputError(fmt::format("{}: key '{}': num_replicas, pp, max_num_seqs, "
                                 "max_num_batched_tokens, kv_block_tokens and kv_blocks must be >= 1",
                                 origin, p));
  return c;
}

nlohmann::json requests_json(const RequestStream& s) {
  nlohmann::json a = nlohmann::json::array();
  for (const Request& r : s.requests)
    a.push_back({{"id", r.id}, {"arrival_s", r.arrival_s}, {"input_tokens", r.input_tokens},
                 {"output_tokens", r.output_tokens}});
  return a;
}

RequestStream requests_from_json(const nlohmann::json& j, const std::string& origin) {
  if (!j.is_array() || j.empty())
    throw InputError(fmt::format("{}: key 'requests': expected a non-empty array", origin));
  RequestStream s;
  for (size_t i = 0; i < j.size(); ++i) {
    const std::string p = fmt::format("requests[{}]", i);
    Request r;
    r.id = json_int(j[i], "id", origin, p);
    r.arrival_s = json_number(j[i], "arrival_s", origin, p);
    r.input_tokens = json_int(j[i], "input_tokens", origin, p);
    r.output_tokens = json_int(j[i], "output_tokens", origin, p);
    if (r.input_tokens < 1 || r.output_tokens < 1 || !(r.arrival_s >= 0))
      throw InputError(fmt::format("{}: key '{}': expected input_tokens, output_tokens >= 1 and "
                                   "arrival_s >= 0", origin, p));
    if (!s.requests.empty() && r.arrival_s < s.requests.back().arrival_s)
      throw InputError(fmt::format("{}: key '{}.arrival_s': arrivals must be sorted by time",
                                   origin, p));
    s.requests.push_back(r);
  }
  return s;
}

std::string format_serving_block(const ServingMetrics& m, const ServingConfig& cfg, double rate,
                                 const std::string& title, const std::string& kind) {
  std::string o = fmt::format("============ Serving Benchmark Result ({}) ============\n", kind);
  o += fmt::format("{:<40}{}\n", "Layout:", title);
  o += fmt::format("{:<40}{}\n", "Successful requests:", m.completed);
  if (rate > 0) o += fmt::format("{:<40}{:.2f}\n", "Request rate configured (RPS):", rate);
  o += fmt::format("{:<40}{:.2f}\n", "Benchmark duration (s):", m.duration_s);
  o += fmt::format("{:<40}{}\n", "Total input tokens:", m.total_input_tokens);
  o += fmt::format("{:<40}{}\n", "Total generated tokens:", m.total_output_tokens);
  o += fmt::format("{:<40}{:.2f}\n", "Request throughput (req/s):", m.request_throughput);
  if (cfg.slo_ttft_ms > 0 || cfg.slo_tpot_ms > 0 || cfg.slo_e2el_ms > 0)
    o += fmt::format("{:<40}{:.2f}\n", "Request goodput (req/s):", m.request_goodput);
  o += fmt::format("{:<40}{:.2f}\n", "Output token throughput (tok/s):", m.output_throughput);
  o += fmt::format("{:<40}{:.2f}\n", "Peak output token throughput (tok/s):",
                   m.max_output_tokens_per_s);
  o += fmt::format("{:<40}{}\n", "Peak concurrent requests:", m.max_concurrent_requests);
  o += fmt::format("{:<40}{:.2f}\n", "Total token throughput (tok/s):", m.total_token_throughput);
  auto section = [&](const char* name, const char* key, const LatencyStats& s) {
    o += fmt::format("{:-^60}\n", std::string(" ") + name + " ");
    o += fmt::format("{:<40}{:.2f}\n", fmt::format("Mean {} (ms):", key), s.mean);
    o += fmt::format("{:<40}{:.2f}\n", fmt::format("Median {} (ms):", key), s.median);
    o += fmt::format("{:<40}{:.2f}\n", fmt::format("P90 {} (ms):", key), s.p90);
    o += fmt::format("{:<40}{:.2f}\n", fmt::format("P99 {} (ms):", key), s.p99);
  };
  section("Time to First Token", "TTFT", m.ttft);
  section("Time per Output Token (excl. 1st token)", "TPOT", m.tpot);
  section("Inter-token Latency", "ITL", m.itl);
  section("End-to-end Latency", "E2EL", m.e2el);
  o += fmt::format("{:-^60}\n", " MixServe ");
  o += fmt::format("{:<40}{}\n", "Steps:", m.num_steps);
  o += fmt::format("{:<40}{:.3f}\n", "Mean step time (ms):", m.mean_step_time_ms);
  o += fmt::format("{:<40}{:.1f}\n", "Mean tokens per step:", m.mean_tokens_per_step);
  o += fmt::format("{:<40}{}\n", "Preemptions:", m.num_preemptions);
  o += fmt::format("{:<40}{}\n", "Empty replica-steps (DP idle):", m.num_empty_replica_steps);
  o += fmt::format("{:<40}{}\n", "KV blocks per replica:", m.kv_blocks_per_replica);
  if (m.mean_moe_max_over_mean > 0)
    o += fmt::format("{:<40}{:.3f}\n", "MoE load, max/mean EP rank (sampled):",
                     m.mean_moe_max_over_mean);
  o += std::string(60, '=') + "\n";
  return o;
}

ErrorSummary error_summary(const std::vector<double>& error_pct) {
  ErrorSummary e;
  e.n = static_cast<int64_t>(error_pct.size());
  if (error_pct.empty()) return e;
  std::vector<double> v = error_pct;
  std::sort(v.begin(), v.end());
  e.median = percentile(v, 50);
  std::vector<double> a;
  for (double x : error_pct) a.push_back(std::fabs(x));
  std::sort(a.begin(), a.end());
  e.p90_abs = percentile(a, 90);
  e.worst = error_pct[0];
  for (double x : error_pct)
    if (std::fabs(x) > std::fabs(e.worst)) e.worst = x;
  return e;
}

}  // namespace mixserve::sim
