// mixserve-plan validate on small synthetic results files (no GPU): the predicted values are
// computed here from the library (the cost model, the serving simulator) and the measured values
// are set to known multiples of them, so every error of the report is known in advance; bad
// results files give exit 2 with one line naming the file and key, and write no output file.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "mixserve/core/io.hpp"
#include "plan_cli_run.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/replay.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/serving_report.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace mixserve;

namespace {

using Run = mixserve::test::CliRun;
using mixserve::test::slurp;
using mixserve::test::spit;

fs::path scratch() { return mixserve::test::cli_scratch("mixserve-validate"); }

Run run(const std::string& args) { return mixserve::test::run_cli(MIXSERVE_PLAN_EXE, args, scratch()); }

// A one-GPU plan (Qwen3-30B-A3B on one H200), written once.
const fs::path& plan_path() {
  static const fs::path p = [] {
    const fs::path f = scratch() / "plan.yaml";
    const Run r = run("search --model qwen3-30b-a3b --cluster " +
                      (fs::path(MIXSERVE_SOURCE_DIR) / "configs/clusters/h200-1x1.yaml").string() +
                      " --workload sharegpt-paper --layout vllm-tp-pp -o " + f.string());
    REQUIRE_MESSAGE(r.code == 0, r.err);
    return f;
  }();
  return p;
}

// A plan of 8 GPUs with two attention-DP replicas (attention TP4 x DP2, MoE TP4 x EP2, a2a).
const fs::path& dp2_plan_path() {
  static const fs::path p = [] {
    const fs::path f = scratch() / "plan-dp2.yaml";
    const Run r = run("search --model qwen3-30b-a3b --cluster " +
                      (fs::path(MIXSERVE_SOURCE_DIR) / "configs/clusters/h200-1x8.yaml").string() +
                      " --workload sharegpt-paper --layout 'attn TP4xDP2 | moe TP4xEP2 | PP1 | a2a' -o " + f.string());
    REQUIRE_MESSAGE(r.code == 0, r.err);
    return f;
  }();
  return p;
}

constexpr int kLayers = 4;

// online: the engine samples on the device, so validate costs the argmax launch (device_greedy).
std::unique_ptr<sim::StepCostModel> cost_model(const Plan& plan, bool online) {
  sim::CostModelOptions copt;
  copt.routing = sim::routing_from_workload(plan.workload);
  copt.device_greedy = online;
  return sim::make_cost_model("mixserve", model::with_num_layers(plan.model, kLayers), plan.cluster,
                              load_profile(plan.profile_name), plan.chosen.layout, copt);
}

// The GPU part of a step, as validate compares it with CUDA-event times: the cost model's step
// minus the profile's per-step host overhead (the shipped profile has a measured one).
double predict_ms(const sim::StepCostModel& cm, const sim::ReplicaBatch& b) {
  static const double overhead_us =
      load_profile(load_plan(plan_path().string()).profile_name).host_overhead.step_us;
  const sim::ReplicaBatch one[] = {b};
  return (cm.step(std::span<const sim::ReplicaBatch>(one), false).time_us - overhead_us) / 1e3;
}

json batch_json(const sim::ReplicaBatch& b) {
  return {{"prefill_tokens", b.prefill_tokens}, {"num_prefill_seqs", b.num_prefill_seqs},
          {"prefill_attn_pairs", b.prefill_attn_pairs}, {"num_decode", b.num_decode},
          {"decode_context", b.decode_context}};
}

json common(const Plan& plan, const std::string& mode) {
  return {{"mode", mode},
          {"plan", {{"sha256", sha256_hex(slurp(plan_path()))}, {"model", plan.model.name}}},
          {"model", {{"name", plan.model.name}, {"num_layers", kLayers}}},
          {"prediction", {{"cost_model", "mixserve"}, {"profile", plan.profile_name}}}};
}

sim::ServingConfig serving_cfg() {
  sim::ServingConfig c;
  c.limits.max_num_seqs = 4;
  c.limits.max_num_batched_tokens = 256;
  c.limits.kv_block_tokens = 16;
  c.limits.kv_blocks = 200;
  c.limits.max_model_len = 4096;
  return c;
}

sim::RequestStream requests() {
  sim::RequestStream s;
  const int64_t in[] = {100, 300, 20, 64, 7}, out[] = {5, 2, 9, 1, 3};
  for (int i = 0; i < 5; ++i) s.requests.push_back({i, 0.01 * i, in[i], out[i], -1});
  return s;
}

// An online results file whose measured metrics are 1.25 x the simulator's and whose measured
// steps are 2 x the cost model's.
json online_results(const Plan& plan, json* predicted_metrics) {
  const auto cm = cost_model(plan, true);
  const sim::ServingConfig cfg = serving_cfg();
  const sim::SimResult sr = sim::simulate(*cm, cfg, requests());
  const json pm = sim::metrics_to_json(sr.metrics, cfg);
  *predicted_metrics = pm;
  json r = common(plan, "online");
  for (const auto& [k, v] : pm.items()) r[k] = v.is_number() ? json(v.get<double>() * 1.25) : v;
  r["serving_config"] = sim::serving_config_json(cfg);
  r["requests"] = sim::requests_json(requests());
  sim::ReplicaBatch pre;
  pre.prefill_tokens = 100;
  pre.num_prefill_seqs = 1;
  pre.prefill_attn_pairs = 100 * 50.5;
  sim::ReplicaBatch dec;
  dec.num_decode = 3;
  dec.decode_context = 3 * 120;
  r["steps"] = json::array({{{"batch", batch_json(pre)}, {"measured_ms", 2 * predict_ms(*cm, pre)}},
                            {{"batch", batch_json(dec)}, {"measured_ms", 2 * predict_ms(*cm, dec)}}});
  return r;
}

}  // namespace

TEST_CASE("validate: online results, every metric and step error as constructed") {
  const Plan plan = load_plan(plan_path().string());
  json predicted;
  const json r = online_results(plan, &predicted);
  const fs::path rf = scratch() / "online.json", out = scratch() / "online-validate.json";
  spit(rf, r.dump(2));
  const Run v = run("validate --plan " + plan_path().string() + " --results " + rf.string() + " --output-json " +
                    out.string());
  REQUIRE_MESSAGE(v.code == 0, v.err);
  CHECK(v.out.find("mean_ttft_ms") != std::string::npos);
  CHECK(v.out.find("p99_itl_ms") != std::string::npos);
  CHECK(v.out.find("request_throughput") != std::string::npos);
  const json doc = json::parse(slurp(out));
  int numeric = 0, compared = 0;
  for (const auto& [k, val] : predicted.items()) numeric += val.is_number() ? 1 : 0;
  CHECK(doc["metrics"].size() == static_cast<size_t>(numeric));
  for (const auto& m : doc["metrics"]) {
    const std::string k = m["key"];
    CHECK(m["predicted"].get<double>() == doctest::Approx(predicted[k].get<double>()));
    if (predicted[k].get<double>() != 0) {
      CHECK_MESSAGE(m["error_pct"].get<double>() == doctest::Approx(-20.0), k);
      ++compared;
    }
  }
  CHECK(compared > 20);
  CHECK(doc["step_error_pct"]["all"]["steps"] == 2);
  CHECK(doc["step_error_pct"]["all"]["median"].get<double>() == doctest::Approx(-50.0));
  CHECK(doc["step_error_pct"]["all"]["worst"].get<double>() == doctest::Approx(-50.0));
  CHECK(doc["step_error_pct"]["prefill"]["steps"] == 1);
  CHECK(doc["step_error_pct"]["decode"]["steps"] == 1);

  // Without a request list the requests are drawn again from the workload with R's count, rate and
  // seed: the same as the simulator's own draw.
  json r2 = r;
  r2.erase("requests");
  r2["workload"] = {{"name", "sharegpt-paper"}, {"num_requests", 12}, {"rate", 50.0}, {"seed", 3}};
  spit(rf, r2.dump(2));
  const Run v2 = run("validate --plan " + plan_path().string() + " --results " + rf.string() + " --output-json " +
                     out.string());
  REQUIRE_MESSAGE(v2.code == 0, v2.err);
  WorkloadSpec w = plan.workload;
  w.num_requests = 12;
  w.rate = 50;
  w.seed = 3;
  const sim::SimResult sr = sim::simulate(*cost_model(plan, true), serving_cfg(), sim::generate_requests(w));
  const json doc2 = json::parse(slurp(out));
  bool seen = false;
  for (const auto& m : doc2["metrics"])
    if (m["key"] == "total_input_tokens") {
      seen = true;
      CHECK(m["predicted"].get<double>() == double(sr.metrics.total_input_tokens));
    }
  CHECK(seen);
}

TEST_CASE("validate: offline results, per-step table and bench_one_batch metrics") {
  const Plan plan = load_plan(plan_path().string());
  const auto cm = cost_model(plan, false);
  json r = common(plan, "offline");
  r["batch_size"] = 2;
  r["input_len"] = 64;
  r["output_len"] = 3;
  sim::ReplicaBatch pre;
  pre.prefill_tokens = 128;
  pre.num_prefill_seqs = 2;
  pre.prefill_attn_pairs = 2 * 64 * 32.5;
  sim::ReplicaBatch d1, d2;
  d1.num_decode = d2.num_decode = 2;
  d1.decode_context = 2 * 65;
  d2.decode_context = 2 * 66;
  const double p0 = predict_ms(*cm, pre), p1 = predict_ms(*cm, d1), p2 = predict_ms(*cm, d2);
  r["steps"] = json::array({{{"kind", "prefill"}, {"batch", batch_json(pre)}, {"measured_ms", p0 / 2}},
                            {{"kind", "decode"}, {"batch", batch_json(d1)}, {"measured_ms", p1 / 2}},
                            {{"kind", "decode"}, {"batch", batch_json(d2)}, {"measured_ms", p2 / 2}}});
  r["prefill_latency"] = p0 / 2 / 1e3;
  r["total_latency"] = (p0 + p1 + p2) / 2 / 1e3;
  const fs::path rf = scratch() / "offline.json", out = scratch() / "offline-validate.json";
  spit(rf, r.dump(2));
  const Run v = run("validate --plan " + plan_path().string() + " --results " + rf.string() + " --json " +
                    out.string());
  REQUIRE_MESSAGE(v.code == 0, v.err);
  CHECK(v.out.find("predicted(ms)") != std::string::npos);
  const json doc = json::parse(slurp(out));
  CHECK(doc["steps"].size() == 3);
  for (const auto& s : doc["steps"]) CHECK(s["error_pct"].get<double>() == doctest::Approx(100.0));
  bool seen_prefill = false, seen_total = false;
  for (const auto& m : doc["metrics"]) {
    CHECK(m["error_pct"].get<double>() == doctest::Approx(m["key"].get<std::string>().find("throughput") !=
                                                                  std::string::npos
                                                              ? -50.0
                                                              : 100.0));
    if (m["key"] == "prefill_latency") {
      seen_prefill = true;
      CHECK(m["predicted"].get<double>() == doctest::Approx(p0 / 1e3));
    }
    if (m["key"] == "total_latency") {
      seen_total = true;
      CHECK(m["predicted"].get<double>() == doctest::Approx((p0 + p1 + p2) / 1e3));
    }
  }
  CHECK(seen_prefill);
  CHECK(seen_total);
}

TEST_CASE("validate: bad results files give exit 2 naming file and key, and no output file") {
  const Plan plan = load_plan(plan_path().string());
  json predicted;
  const json good = online_results(plan, &predicted);
  const fs::path rf = scratch() / "bad.json", out = scratch() / "bad-validate.json";
  struct Case {
    const char* what;
    std::string text;  // "" = no file
    std::string key;
  };
  json no_cfg = good;
  no_cfg.erase("serving_config");
  json other_plan = good;
  other_plan["plan"]["sha256"] = std::string(64, 'a');
  json other_model = good;
  other_model["plan"]["model"] = "deepseek-r1";
  json bad_step = good;
  bad_step["steps"][1]["measured_ms"] = "fast";
  json bad_req = good;
  bad_req["requests"][2].erase("output_tokens");
  json bad_mode = good;
  bad_mode["mode"] = "sideways";
  json too_many_layers = good;
  too_many_layers["model"]["num_layers"] = 1000;
  const Case cases[] = {
      {"missing file", "", ""},
      {"not JSON", "{\"mode\": \"online\", ", ""},
      {"no serving_config", no_cfg.dump(), "serving_config"},
      {"another plan", other_plan.dump(), "plan.sha256"},
      {"another model", other_model.dump(), "plan.model"},
      {"mistyped step", bad_step.dump(), "steps[1].measured_ms"},
      {"request without output", bad_req.dump(), "requests[2].output_tokens"},
      {"unknown mode", bad_mode.dump(), "mode"},
      {"layers", too_many_layers.dump(), "model.num_layers"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    fs::remove(rf);
    fs::remove(out);
    if (!c.text.empty()) spit(rf, c.text);
    const Run v = run("validate --plan " + plan_path().string() + " --results " + rf.string() + " --output-json " +
                      out.string());
    CHECK(v.code == 2);
    CHECK(v.err.find(rf.string()) != std::string::npos);
    if (!c.key.empty()) CHECK_MESSAGE(v.err.find(c.key) != std::string::npos, v.err);
    CHECK(std::count(v.err.begin(), v.err.end(), '\n') == 1);
    CHECK(!fs::exists(out));
  }
  // A missing plan file names the plan.
  spit(rf, good.dump());
  const Run v = run("validate --plan " + (scratch() / "nope.yaml").string() + " --results " + rf.string());
  CHECK(v.code == 2);
  CHECK(v.err.find("nope.yaml") != std::string::npos);
}

TEST_CASE("validate: online results of two attention-DP replicas (emulated ranks), per-replica step batches") {
  const Plan plan = load_plan(dp2_plan_path().string());
  REQUIRE(plan.chosen.layout.attn_dp == 2);
  const auto cm = cost_model(plan, true);
  sim::ServingConfig cfg = serving_cfg();
  cfg.num_replicas = 2;
  cfg.sample_moe_load = false;  // as the run's own prediction
  const sim::SimResult sr = sim::simulate(*cm, cfg, requests());
  const json pm = sim::metrics_to_json(sr.metrics, cfg);
  json r = common(plan, "online");
  r["plan"]["sha256"] = sha256_hex(slurp(dp2_plan_path()));
  r["ranks"] = 8;
  r["emulated_ranks"] = true;
  for (const auto& [k, v] : pm.items()) r[k] = v.is_number() ? json(v.get<double>() * 1.25) : v;
  r["serving_config"] = sim::serving_config_json(cfg);
  r["requests"] = sim::requests_json(requests());
  // A step of a prefill on replica 0 and decodes on replica 1, and a step with replica 1 idle.
  sim::ReplicaBatch pre, dec, idle;
  pre.prefill_tokens = 100;
  pre.num_prefill_seqs = 1;
  pre.prefill_attn_pairs = 100 * 50.5;
  dec.num_decode = 3;
  dec.decode_context = 3 * 120;
  const double overhead_us = load_profile(plan.profile_name).host_overhead.step_us;
  auto step_ms = [&](std::vector<sim::ReplicaBatch> reps) {
    return (cm->step(std::span<const sim::ReplicaBatch>(reps), false).time_us - overhead_us) / 1e3;
  };
  sim::ReplicaBatch sum = pre;
  sum.num_decode = dec.num_decode;
  sum.decode_context = dec.decode_context;
  const double p0 = step_ms({pre, dec}), p1 = step_ms({dec, idle});
  // The summed batch on one replica costs otherwise: the per-replica batches are what is compared.
  CHECK(step_ms({sum, idle}) != doctest::Approx(p0));
  r["steps"] = json::array({{{"batch", batch_json(sum)}, {"replicas", {batch_json(pre), batch_json(dec)}},
                             {"measured_ms", 2 * p0}},
                            {{"batch", batch_json(dec)}, {"replicas", {batch_json(dec), batch_json(idle)}},
                             {"measured_ms", 2 * p1}}});
  const fs::path rf = scratch() / "online-dp2.json", out = scratch() / "online-dp2-validate.json";
  spit(rf, r.dump(2));
  const std::string args = "validate --plan " + dp2_plan_path().string() + " --results " + rf.string() +
                           " --output-json " + out.string();
  const Run v = run(args);
  REQUIRE_MESSAGE(v.code == 0, v.err);
  CHECK(v.out.find("8 ranks emulated on one GPU") != std::string::npos);
  const json doc = json::parse(slurp(out));
  CHECK(doc["emulated_ranks"] == true);
  int compared = 0;
  for (const auto& m : doc["metrics"]) {
    const std::string k = m["key"];
    CHECK_MESSAGE(m["predicted"].get<double>() == doctest::Approx(pm[k].get<double>()), k);
    if (pm[k].get<double>() != 0) {
      CHECK_MESSAGE(m["error_pct"].get<double>() == doctest::Approx(-20.0), k);
      ++compared;
    }
  }
  CHECK(compared > 20);
  REQUIRE(doc["steps"].size() == 2);
  for (const auto& s : doc["steps"]) CHECK(s["error_pct"].get<double>() == doctest::Approx(-50.0));
  CHECK(doc["steps"][0]["kind"] == "mixed");

  // Without the per-replica batches, or with another replica count, nothing is predicted.
  json no_reps = r;
  no_reps["steps"][0].erase("replicas");
  json one_replica = r;
  one_replica["serving_config"]["num_replicas"] = 1;
  for (const auto& [bad, key] : {std::pair{no_reps, std::string("steps[0].replicas")},
                                 std::pair{one_replica, std::string("serving_config")}}) {
    fs::remove(out);
    spit(rf, bad.dump());
    const Run b = run(args);
    CHECK(b.code == 2);
    CHECK_MESSAGE(b.err.find(key) != std::string::npos, b.err);
    CHECK(!fs::exists(out));
  }
}

TEST_CASE("validate: offline results of --fused-decode-layer are predicted from the profile's fused-layer points") {
  const Plan plan = load_plan(plan_path().string());
  const ModelSpec m = model::with_num_layers(plan.model, kLayers);
  const HardwareProfile prof = load_profile(plan.profile_name);
  // The shipped H200 profile holds measured points of Qwen3-30B-A3B's layer (docs/profile-h200.md).
  REQUIRE(sim::fused_layer_time(prof, sim::fused_layer_shape(m), 600).has_value());
  sim::CostModelOptions fo;
  fo.routing = sim::routing_from_workload(plan.workload);
  fo.fused_decode_layer = true;
  const auto fused = sim::make_cost_model("mixserve", m, plan.cluster, prof, plan.chosen.layout, fo);
  const auto plain = cost_model(plan, false);
  sim::ReplicaBatch d;
  d.num_decode = 1;
  d.decode_context = 600;
  const double pf = predict_ms(*fused, d), pu = predict_ms(*plain, d);
  CHECK(pf < pu);  // 4 layers of ~44 us against the unfused kernels' ~13 launches a layer
  auto results = [&](bool flag) {
    json r = common(plan, "offline");
    if (flag) r["prediction"]["fused_decode_layer"] = true;
    r["batch_size"] = 1;
    r["input_len"] = 599;
    r["output_len"] = 2;
    r["steps"] = json::array({{{"kind", "decode"}, {"batch", batch_json(d)}, {"measured_ms", pf}}});
    r["total_latency"] = pf / 1e3;
    return r;
  };
  for (bool flag : {true, false}) {
    CAPTURE(flag);
    const fs::path rf = scratch() / "fused.json", out = scratch() / "fused-validate.json";
    spit(rf, results(flag).dump(2));
    const Run v = run("validate --plan " + plan_path().string() + " --results " + rf.string() + " --json " +
                      out.string());
    REQUIRE_MESSAGE(v.code == 0, v.err);
    const json doc = json::parse(slurp(out));
    REQUIRE(doc["steps"].size() == 1);
    // With the key: the fused prediction, which the "measurement" equals; without: the unfused one.
    CHECK(doc["steps"][0]["error_pct"].get<double>() == doctest::Approx(flag ? 0.0 : 100.0 * (pu - pf) / pf));
  }
}
