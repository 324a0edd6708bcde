#include "cli_common.hpp"

#include <vector>
#include <cmath>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

namespace mixserve::planner {

void add_input_options(CLI::App& sub, InputOptions& o) {
  sub.add_option("--model", o.model, "shipped model name, model YAML, or HF config.json")
      ->required();
  sub.add_option("--cluster", o.cluster, "shipped cluster name or cluster YAML")->required();
  sub.add_option("--profile", o.profile, "hardware profile name or YAML (default: the cluster's)");
  sub.add_option("--workload", o.workload,
                 "shipped workload name or workload YAML (or give --input-len and --output-len)");
  sub.add_option("--input-len", o.input_len, "fixed input tokens per request (overrides)")
      ->check(positive());
  sub.add_option("--output-len", o.output_len, "fixed output tokens per request (overrides)")
      ->check(positive());
  sub.add_option("--rate", o.rate, "request rate, req/s (overrides)")->check(positive());
  sub.add_option("--max-batch", o.max_batch,
                 "batch limit: max_num_seqs candidates are powers of two up to it "
                 "(default: the workload's, else 256)")
      ->check(positive());
  sub.add_option("--max-model-len", o.max_model_len,
                 "max tokens per sequence (default: the workload's max_seq_len, else the model's)")
      ->check(positive());
  sub.add_option("--routing", o.routing, "MoE routing: uniform | zipf:<s> (default: the workload's)");
}

sim::RoutingModel parse_routing(const std::string& s, const std::string& key) {
  sim::RoutingModel r;
  if (s == "uniform") return r;
  if (s.rfind("zipf:", 0) == 0) {
    char* end = nullptr;
    const std::string num = s.substr(5);
    const double v = std::strtod(num.c_str(), &end);
    if (!num.empty() && end && *end == '\0' && std::isfinite(v) && v >= 0) {
      r.kind = "zipf";
      r.skew = v;
      return r;
    }
  }
  throw_input_error(key, "routing", "uniform or zipf:<exponent >= 0>", s);
}

LoadedInputs load_inputs(const InputOptions& o) {
  LoadedInputs out;
  SearchInputs& in = out.in;
  in.model = load_model(o.model);
  in.cluster = load_cluster(o.cluster);
  in.cluster_origin = o.cluster;
  const std::string profile = o.profile.empty() ? in.cluster.profile : o.profile;
  if (profile.empty())
    throw_input_error(o.cluster, "profile", "a hardware profile name (or pass --profile)");
  in.profile = load_profile(profile);
  if (!o.workload.empty()) {
    in.workload = load_workload(o.workload);
  } else if (o.input_len > 0 && o.output_len > 0) {
    in.workload.name = "cli";
    in.workload.arrival = ArrivalKind::poisson;
  } else {
    throw_input_error("--workload", "workload",
                      "a shipped workload name or YAML file, or both --input-len and --output-len");
  }
  WorkloadSpec& w = in.workload;
  if (o.input_len > 0) {
    w.input = LengthDist{};
    w.input.kind = LengthKind::fixed;
    w.input.value = static_cast<double>(o.input_len);
  }
  if (o.output_len > 0) {
    w.output = LengthDist{};
    w.output.kind = LengthKind::fixed;
    w.output.value = static_cast<double>(o.output_len);
  }
  if (o.rate > 0) w.rate = o.rate;
  if (o.max_batch > 0) w.max_num_seqs = o.max_batch;
  if (o.max_model_len > 0) w.max_seq_len = o.max_model_len;
  if (!o.routing.empty()) {
    const auto r = parse_routing(o.routing, "--routing");
    w.routing = r.kind;
    w.routing_skew = r.skew;
  }
  out.texts = {{"model:" + o.model, model_to_yaml(in.model)},
               {"cluster:" + o.cluster, cluster_to_yaml(in.cluster)},
               {"profile:" + profile, profile_to_yaml(in.profile)},
               {"workload:" + (o.workload.empty() ? std::string("cli") : o.workload),
                workload_to_yaml(in.workload)}};
  return out;
}

std::string datasheet_note(const HardwareProfile& p) {
  if (p.is_datasheet())
    return fmt::format("costs: datasheet estimates (profile {}: source {})", p.name, p.source);
  // A measured profile: say which op families come from its tables and which are estimated.
  std::vector<std::string> measured, estimated;
  const auto put = [&](bool has, const char* what) { (has ? measured : estimated).push_back(what); };
  put(!p.gemm.empty(), "GEMM");
  put(!p.experts.empty(), "expert GEMM");
  put(!p.elementwise.empty(), "elementwise");
  put(!p.attention.empty(), "attention");
  put(!p.collectives.empty(), "collectives");
  const auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s.empty() ? std::string("none") : s;
  };
  return fmt::format(
      "costs: profile {} ({}{}): measured tables for {} (interpolated; roofline or alpha-beta "
      "outside them); estimated: {} (roofline with the profile's measured ceilings; collectives "
      "alpha-beta from the cluster's links)",
      p.name, p.source, p.measured_on.empty() ? "" : ", " + p.measured_on, join(measured),
      join(estimated));
}

const CLI::Validator& positive() {
  static const CLI::Validator v(
      [](std::string& s) -> std::string {
        char* end = nullptr;
        const double x = std::strtod(s.c_str(), &end);
        if (!s.empty() && end && *end == '\0' && std::isfinite(x) && x > 0) return "";
        return "expected a number > 0, got '" + s + "'";
      },
      "> 0", "positive");
  return v;
}

double to_gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

}  // namespace mixserve::planner
