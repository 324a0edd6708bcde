// mixserve-plan validate --plan P --results R [--workload W] [--json out]: the simulator's
// prediction next to a GPU run's measurement (results of `mixserve-run bench`), with the error
// (predicted - measured) / measured of every metric and of every step.
//   online results: the serving simulator replays R's exact request list under R's engine config
//     (serving_config: limits, KV blocks, SLOs) with the plan's cost model for the model that ran
//     (R's num_layers) and R's profile; every numeric metric key of R is compared. Without a
//     request list in R, the requests are drawn again from W (or R's workload) with R's count,
//     rate and seed.
//   offline results: every step's batch is given to the cost model again; the per-step table and
//     the bench_one_batch metrics recomputed from the predicted steps.
// Both: per-step error summary (median, p90 of |error|, worst), all steps and by kind.
// Bad input (exit 2, one line naming the file and key): a missing or malformed results file, or
// one made for another plan (plan.sha256) or model (plan.model).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/planner/cli.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/replay.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/serving_report.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::planner {

namespace {

struct ValidateConfig {
  std::string plan, workload, results, json;
  bool breakdown = false;  // per-op prediction of the first step of each distinct shape
};

using nlohmann::json;

const json& key_of(const json& j, const std::string& key, const std::string& origin, const std::string& path) {
  const std::string where = path.empty() ? key : path + "." + key;
  if (!j.is_object() || !j.contains(key)) throw InputError(fmt::format("{}: key '{}': missing", origin, where));
  return j.at(key);
}

std::string str_of(const json& j, const std::string& key, const std::string& origin, const std::string& path = "") {
  const json& v = key_of(j, key, origin, path);
  if (!v.is_string())
    throw InputError(fmt::format("{}: key '{}': expected a string", origin, path.empty() ? key : path + "." + key));
  return v.get<std::string>();
}

double rel_err_pct(double predicted, double measured) {
  return measured != 0 ? 100.0 * (predicted - measured) / measured : 0.0;
}

sim::ReplicaBatch batch_json(const json& b, const std::string& origin, const std::string& p) {
  if (!b.is_object()) throw InputError(fmt::format("{}: key '{}': expected an object", origin, p));
  sim::ReplicaBatch r;
  r.prefill_tokens = sim::json_int(b, "prefill_tokens", origin, p);
  r.num_prefill_seqs = sim::json_int(b, "num_prefill_seqs", origin, p);
  r.prefill_attn_pairs = sim::json_number(b, "prefill_attn_pairs", origin, p);
  r.num_decode = sim::json_int(b, "num_decode", origin, p);
  r.decode_context = sim::json_number(b, "decode_context", origin, p);
  if (r.prefill_tokens < 0 || r.num_prefill_seqs < 0 || r.num_decode < 0)
    throw InputError(fmt::format("{}: key '{}': expected counts >= 0", origin, p));
  return r;
}

sim::ReplicaBatch batch_from(const json& j, const std::string& origin, const std::string& path) {
  const json& b = key_of(j, "batch", origin, path);
  const std::string p = path + ".batch";
  const sim::ReplicaBatch r = batch_json(b, origin, p);
  if (r.tokens() < 1)
    throw InputError(fmt::format("{}: key '{}': expected a batch of at least one token", origin, p));
  return r;
}

struct MetricRow {
  std::string key;
  double predicted = 0, measured = 0;
};

int run_validate(const ValidateConfig& o) {
  const std::string plan_text = read_text_file(o.plan);
  const Plan plan = load_plan(o.plan);
  const std::string& R = o.results;
  json res;
  try {
    res = json::parse(read_text_file(R));
  } catch (const json::parse_error& e) {
    throw InputError(fmt::format("{}: not a JSON results file ({})", R, e.what()));
  }
  if (!res.is_object()) throw InputError(fmt::format("{}: expected a JSON object (mixserve-run bench --json)", R));
  // The plan and model the results were measured for.
  const std::string sha = str_of(key_of(res, "plan", R, ""), "sha256", R, "plan");
  if (sha != sha256_hex(plan_text) && sha != sha256_hex(plan_to_yaml(plan)))
    throw InputError(fmt::format("{}: key 'plan.sha256': the results are for another plan ({}...), not {} ({}...)",
                                 R, sha.substr(0, 12), o.plan, sha256_hex(plan_text).substr(0, 12)));
  const std::string model_name = str_of(res["plan"], "model", R, "plan");
  if (model_name != plan.model.name)
    throw InputError(fmt::format("{}: key 'plan.model': the results are for model '{}', the plan {} is for '{}'", R,
                                 model_name, o.plan, plan.model.name));
  const std::string mode = str_of(res, "mode", R);
  if (mode != "online" && mode != "offline")
    throw InputError(fmt::format("{}: key 'mode': expected online or offline, got '{}'", R, mode));
  const int64_t layers = sim::json_int(key_of(res, "model", R, ""), "num_layers", R, "model");
  if (layers < 1 || layers > plan.model.num_layers)
    throw InputError(fmt::format("{}: key 'model.num_layers': expected 1 to {}, got {}", R, plan.model.num_layers,
                                 layers));
  const ModelSpec model =
      layers < plan.model.num_layers ? model::with_num_layers(plan.model, static_cast<int>(layers)) : plan.model;
  const json& pred = key_of(res, "prediction", R, "");
  const std::string cm_name = str_of(pred, "cost_model", R, "prediction");
  if (cm_name != "mixserve" && cm_name != "paper")
    throw InputError(fmt::format("{}: key 'prediction.cost_model': expected mixserve or paper, got '{}'", R, cm_name));
  const std::string profile_name = str_of(pred, "profile", R, "prediction");

  WorkloadSpec w = plan.workload;
  if (!o.workload.empty()) {
    w = load_workload(o.workload);
  } else if (res.contains("workload") && res["workload"].contains("name") && res["workload"]["name"].is_string() &&
             res["workload"]["name"].get<std::string>() != plan.workload.name) {
    w = load_workload(res["workload"]["name"].get<std::string>());
  }
  sim::CostModelOptions copt;
  copt.routing = sim::routing_from_workload(w);
  copt.device_greedy = mode == "online";  // the online engine's argmax runs on the device, inside its events
  // mixserve-run bench --fused-decode-layer, predicted from the profile's fused_decode_layer points
  // (results JSON prediction.fused_decode_layer; absent in older results: false).
  copt.fused_decode_layer = pred.contains("fused_decode_layer") && pred["fused_decode_layer"].is_boolean() &&
                            pred["fused_decode_layer"].get<bool>();
  const HardwareProfile prof = load_profile(profile_name);
  const auto cm = sim::make_cost_model(cm_name, model, plan.cluster, prof, plan.chosen.layout, copt);
  sim::CostModelOptions copt_eager = copt;
  copt_eager.decode_graphs = false;
  const auto cm_eager = sim::make_cost_model(cm_name, model, plan.cluster, prof, plan.chosen.layout, copt_eager);
  // Per step the GPU part: measured_ms is CUDA events around the forward, without the host
  // overhead per step that the cost model adds from the profile (host_overhead). A step that ran
  // as a CUDA graph (its `cuda_graph`) is predicted with the graph's launch saving.
  auto predict_ms = [&](std::span<const sim::ReplicaBatch> reps, bool graphed) {
    const auto& m = graphed ? *cm : *cm_eager;
    return (m.step(reps, false).time_us - prof.host_overhead.step_us) / 1e3;
  };
  // The cost model's input of a step: one batch per attention-DP replica. Results of a plan with
  // several replicas carry them (steps[i].replicas); their summed `batch` is not what ran on any
  // replica, so without them the step cannot be re-predicted.
  const int dp = plan.chosen.layout.attn_dp;
  auto replicas_of = [&](const json& step, const std::string& p) {
    std::vector<sim::ReplicaBatch> reps;
    if (!step.is_object() || !step.contains("replicas")) {
      if (dp > 1)
        throw InputError(fmt::format(
            "{}: key '{}.replicas': missing: the plan has {} attention-DP replicas and the step's summed batch "
            "cannot be re-predicted (results of a mixserve-run without per-replica batches)", R, p, dp));
      reps.push_back(batch_from(step, R, p));
      return reps;
    }
    const json& a = step.at("replicas");
    if (!a.is_array() || int(a.size()) != dp)
      throw InputError(fmt::format("{}: key '{}.replicas': expected an array of the plan's {} replica batches", R,
                                   p, dp));
    int64_t tokens = 0;
    for (size_t d = 0; d < a.size(); ++d) {
      reps.push_back(batch_json(a[d], R, fmt::format("{}.replicas[{}]", p, d)));
      tokens += reps.back().tokens();
    }
    if (tokens < 1) throw InputError(fmt::format("{}: key '{}.replicas': expected a step of at least one token", R, p));
    return reps;
  };

  // Per step.
  const json& steps = key_of(res, "steps", R, "");
  if (!steps.is_array()) throw InputError(fmt::format("{}: key 'steps': expected an array", R));
  struct StepRow {
    std::string kind;
    int64_t tokens = 0;
    double measured = 0, predicted = 0;
    bool graphed = false;
    std::vector<sim::ReplicaBatch> reps;
  };
  std::vector<StepRow> rows;
  bool any_graph = false;  // a step ran (or, without the key, is taken to have run) as a CUDA graph
  for (size_t i = 0; i < steps.size(); ++i) {
    const std::string p = fmt::format("steps[{}]", i);
    StepRow s;
    const std::vector<sim::ReplicaBatch> reps = replicas_of(steps[i], p);
    sim::ReplicaBatch b;
    for (const auto& x : reps) {
      b.num_prefill_seqs += x.num_prefill_seqs;
      b.num_decode += x.num_decode;
      b.prefill_tokens += x.prefill_tokens;
    }
    s.kind = b.num_prefill_seqs == 0 ? "decode" : b.num_decode == 0 ? "prefill" : "mixed";
    s.tokens = b.tokens();
    s.measured = sim::json_number(steps[i], "measured_ms", R, p);
    if (!(s.measured > 0)) throw InputError(fmt::format("{}: key '{}.measured_ms': expected > 0", R, p));
    const auto g = steps[i].find("cuda_graph");
    if (g != steps[i].end() && !g->is_boolean())
      throw InputError(fmt::format("{}: key '{}.cuda_graph': expected true or false", R, p));
    const bool graphed = g == steps[i].end() || g->get<bool>();
    any_graph = any_graph || graphed;
    s.predicted = predict_ms(reps, graphed);
    s.graphed = graphed;
    s.reps = reps;
    rows.push_back(s);
  }

  std::vector<MetricRow> metrics;
  std::string head;
  if (mode == "online") {
    sim::ServingConfig cfg = sim::serving_config_from_json(key_of(res, "serving_config", R, ""), R);
    if (cfg.num_replicas != dp || cfg.pp != 1)
      throw InputError(fmt::format("{}: key 'serving_config': expected the plan's {} attention-DP replicas and pp 1 "
                                   "(the online engine runs no pipeline), got {} and pp {}", R, dp, cfg.num_replicas,
                                   cfg.pp));
    cfg.moe_load_seed = w.seed;
    cfg.sample_moe_load = false;  // the expected MoE load every step, as the run's own per-step prediction
    sim::RequestStream stream;
    if (res.contains("requests")) {
      stream = sim::requests_from_json(res["requests"], R);
    } else {
      const json& wl = key_of(res, "workload", R, "");
      sim::WorkloadOverrides ov;
      ov.num_requests = static_cast<int>(sim::json_int(wl, "num_requests", R, "workload"));
      ov.seed = sim::json_int(wl, "seed", R, "workload");
      if (w.arrival == ArrivalKind::poisson || w.arrival == ArrivalKind::gamma)
        ov.rate = sim::json_number(wl, "rate", R, "workload");
      stream = sim::generate_requests(sim::apply_overrides(w, ov));
    }
    // A run whose steps all ran eagerly (multi-GPU plans, --no-cuda-graph) is replayed eagerly.
    const sim::SimResult sr = sim::simulate(any_graph ? *cm : *cm_eager, cfg, stream);
    const json pj = sim::metrics_to_json(sr.metrics, cfg);
    for (const auto& [k, v] : pj.items()) {
      if (!v.is_number() || !res.contains(k) || !res[k].is_number()) continue;
      metrics.push_back({k, v.get<double>(), res[k].get<double>()});
    }
    if (metrics.empty()) throw InputError(fmt::format("{}: no metric keys (completed, mean_ttft_ms, ...)", R));
    head = fmt::format("online results {}: {} requests replayed through the simulator ({}, {} layers, profile {}, "
                       "{} replica(s), KV blocks {} each, {}, decode {})", R, stream.requests.size(), cm_name,
                       model.num_layers, profile_name, cfg.num_replicas, cfg.limits.kv_blocks,
                       sim::policy_name(cfg.limits.decode_first), any_graph ? "as CUDA graphs" : "eager");
  } else {
    const int64_t B = sim::json_int(res, "batch_size", R), I = sim::json_int(res, "input_len", R),
                  O = sim::json_int(res, "output_len", R);
    double pre_p = 0, pre_m = 0, tot_p = 0, tot_m = 0;
    std::vector<double> dec_p, dec_m;
    for (const auto& s : rows) {
      tot_p += s.predicted / 1e3;
      tot_m += s.measured / 1e3;
      if (s.kind == "decode") {
        dec_p.push_back(s.predicted / 1e3);
        dec_m.push_back(s.measured / 1e3);
      } else {
        pre_p += s.predicted / 1e3;
        pre_m += s.measured / 1e3;
      }
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return sim::percentile(v, 50);
    };
    const double mdp = median(dec_p), mdm = median(dec_m);
    auto add = [&](const char* k, double p, double m) {
      if (res.contains(k) && res[k].is_number()) m = res[k].get<double>();
      metrics.push_back({k, p, m});
    };
    add("prefill_latency", pre_p, pre_m);
    add("prefill_throughput", pre_p > 0 ? double(B * I) / pre_p : 0, pre_m > 0 ? double(B * I) / pre_m : 0);
    add("median_decode_latency", mdp, mdm);
    add("median_decode_throughput", mdp > 0 ? double(B) / mdp : 0, mdm > 0 ? double(B) / mdm : 0);
    add("total_latency", tot_p, tot_m);
    add("overall_throughput", tot_p > 0 ? double(B * (I + O)) / tot_p : 0, tot_m > 0 ? double(B * (I + O)) / tot_m : 0);
    head = fmt::format("offline results {}: batch {}, input {}, output {}; every step's batch given to the cost "
                       "model again ({}, {} layers, profile {})", R, B, I, O, cm_name, model.num_layers, profile_name);
  }

  // Report.
  std::string out = fmt::format("# validate: plan {} | {}\n", o.plan, head);
  const int64_t ranks = res.contains("ranks") && res["ranks"].is_number_integer() ? res["ranks"].get<int64_t>() : 1;
  const bool emulated = res.contains("emulated_ranks") && res["emulated_ranks"].is_boolean() &&
                        res["emulated_ranks"].get<bool>();
  if (emulated)
    out += fmt::format("# measured with {} ranks emulated on one GPU: the measured times are not those of {} GPUs, "
                       "so the errors below say nothing about the prediction of a {}-GPU run\n", ranks, ranks, ranks);
  out += "# error = (predicted - measured) / measured\n";
  out += fmt::format("{:<34} {:>14} {:>14} {:>9}\n", "metric", "predicted", "measured", "error(%)");
  json jm = json::array();
  for (const auto& m : metrics) {
    const double e = rel_err_pct(m.predicted, m.measured);
    out += fmt::format("{:<34} {:>14.4f} {:>14.4f} {:>+9.1f}\n", m.key, m.predicted, m.measured, e);
    jm.push_back({{"key", m.key}, {"predicted", m.predicted}, {"measured", m.measured}, {"error_pct", e}});
  }
  json jsteps = json::array();
  if (mode == "offline") {
    out += fmt::format("\n{:>5} {:>8} {:>8} {:>13} {:>13} {:>9}\n", "step", "kind", "tokens", "measured(ms)",
                       "predicted(ms)", "error(%)");
    for (size_t i = 0; i < rows.size(); ++i)
      out += fmt::format("{:>5} {:>8} {:>8} {:>13.4f} {:>13.4f} {:>+9.1f}\n", i, rows[i].kind, rows[i].tokens,
                         rows[i].measured, rows[i].predicted, rel_err_pct(rows[i].predicted, rows[i].measured));
  }
  for (const auto& s : rows)
    jsteps.push_back({{"kind", s.kind}, {"tokens", s.tokens}, {"measured_ms", s.measured},
                      {"predicted_ms", s.predicted}, {"error_pct", rel_err_pct(s.predicted, s.measured)}});
  if (o.breakdown) {
    // The cost model's ops for the first step of each distinct (kind, tokens, graph) shape, so a
    // miss can be traced to the ops it predicts (times summed over the layers, as in plan files).
    std::vector<std::tuple<std::string, int64_t, bool>> seen;
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto key = std::make_tuple(rows[i].kind, rows[i].tokens, rows[i].graphed);
      if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
      seen.push_back(key);
      const auto& m = rows[i].graphed ? *cm : *cm_eager;
      const sim::StepCost c = m.step(rows[i].reps, true);
      out += fmt::format("\n# predicted ops of step {} ({}, {} tokens, {}): {:.4f} ms with the host overhead, "
                         "{:.4f} ms measured\n", i, rows[i].kind, rows[i].tokens,
                         rows[i].graphed ? "CUDA graph" : "eager", c.time_us / 1e3, rows[i].measured);
      for (const auto& op : c.ops)
        out += fmt::format("  {:<24} {:<8} {:>11.1f} us  {}\n", op.op, op.phase, op.time_us, to_string(op.source));
    }
  }
  out += "\n# per-step error (predicted - measured) / measured\n";
  json jsum = json::object();
  for (const char* kind : {"all", "prefill", "decode", "mixed"}) {
    std::vector<double> e;
    for (const auto& s : rows)
      if (std::string(kind) == "all" || s.kind == kind) e.push_back(rel_err_pct(s.predicted, s.measured));
    const sim::ErrorSummary es = sim::error_summary(e);
    jsum[kind] = {{"steps", es.n}, {"median", es.median}, {"p90_abs", es.p90_abs}, {"worst", es.worst}};
    if (es.n > 0)
      out += fmt::format("{:<8} {:>6} steps: median {:+.1f}%, p90 |error| {:.1f}%, worst {:+.1f}%\n", kind, es.n,
                         es.median, es.p90_abs, es.worst);
  }
  if (!o.json.empty()) {
    const json doc{{"plan", o.plan},      {"results", R},         {"mode", mode}, {"ranks", ranks},
                   {"emulated_ranks", emulated},
                   {"cost_model", cm_name}, {"profile", profile_name}, {"num_layers", model.num_layers},
                   {"metrics", jm},       {"step_error_pct", jsum}, {"steps", jsteps}};
    write_file_atomic(o.json, doc.dump(2) + "\n");
  }
  std::fputs(out.c_str(), stdout);
  return kExitOk;
}

}  // namespace

CommandRunner register_validate(CLI::App& app) {
  auto o = std::make_shared<ValidateConfig>();
  CLI::App* sub = app.add_subcommand(
      "validate", "predicted vs measured: replay a mixserve-run bench results file through the simulator");
  sub->add_option("--plan", o->plan, "the plan the results were measured for")->required();
  sub->add_option("--results", o->results, "results JSON of mixserve-run bench --json")->required();
  sub->add_option("--workload", o->workload,
                  "workload (routing; the requests when the results hold none); default: the results' or the plan's");
  sub->add_option("--output-json,--json", o->json, "write predicted vs measured as JSON here (atomically)");
  sub->add_flag("--breakdown", o->breakdown,
                "also print the predicted per-op times of the first step of each distinct step shape");
  return [o] { return run_validate(*o); };
}

}  // namespace mixserve::planner
