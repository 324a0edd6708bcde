// Runs the built mixserve-plan binary: every bad input gives exit 2 and one line naming the file
// and key, creates no plan file and leaves an existing one untouched; --json documents parse.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "mixserve/core/io.hpp"
#include "plan_cli_run.hpp"

namespace fs = std::filesystem;

namespace {

using Run = mixserve::test::CliRun;
using mixserve::test::slurp;
using mixserve::test::spit;

fs::path scratch() { return mixserve::test::cli_scratch("mixserve-plan-cli"); }

Run run(const std::string& args) { return mixserve::test::run_cli(MIXSERVE_PLAN_EXE, args, scratch()); }

std::string shipped(const std::string& rel) {
  return slurp(fs::path(MIXSERVE_SOURCE_DIR) / rel);
}

// Replace the first line that starts (after indentation) with `key:`.
std::string replace_line(const std::string& text, const std::string& key, const std::string& line) {
  std::istringstream in(text);
  std::string out, l;
  bool done = false;
  while (std::getline(in, l)) {
    const size_t s = l.find_first_not_of(' ');
    if (!done && s != std::string::npos && l.compare(s, key.size() + 1, key + ":") == 0) {
      if (!line.empty()) out += l.substr(0, s) + line + "\n";
      done = true;
      continue;
    }
    out += l + "\n";
  }
  REQUIRE_MESSAGE(done, key);
  return out;
}

const char* kSearch = "search --model qwen3-235b-a22b --cluster h20-2x8 --workload sharegpt-paper";

}  // namespace

TEST_CASE("bad inputs: exit 2, one line naming file and key, no plan file, existing file kept") {
  const std::string model = shipped("configs/models/qwen3-235b-a22b.yaml");
  const std::string cluster = shipped("configs/clusters/h20-2x8.yaml");
  const fs::path m = scratch() / "model.yaml", c = scratch() / "cluster.yaml";
  const fs::path hf = scratch() / "config.json";

  struct Case {
    const char* what;
    std::string setup_file;   // written to `file` before the run ("" = none)
    fs::path file;
    std::string args;         // after the output option
    std::string expect;       // substrings of the error line
    std::string expect_key;
  };
  const std::string model_args = "--cluster h20-2x8 --workload sharegpt-paper --model ";
  const Case cases[] = {
      {"malformed model YAML", "hidden_size: [4096\nnum_layers: 94\n", m,
       "search " + model_args + m.string(), m.string(), ""},
      {"truncated model YAML", model.substr(0, model.size() / 2), m,
       "search " + model_args + m.string(), m.string(), ""},
      {"missing key", replace_line(model, "hidden_size", ""), m,
       "search " + model_args + m.string(), m.string(), "hidden_size"},
      {"negative size", replace_line(model, "hidden_size", "hidden_size: -4096"), m,
       "search " + model_args + m.string(), m.string(), "hidden_size"},
      {"zero size", replace_line(model, "num_experts", "num_experts: 0"), m,
       "search " + model_args + m.string(), m.string(), "num_experts"},
      {"non-power-of-two cluster", replace_line(cluster, "nodes", "nodes: 3"), c,
       "search --model qwen3-235b-a22b --workload sharegpt-paper --cluster " + c.string(),
       c.string(), "nodes"},
      {"unsupported architecture",
       R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32})",
       hf, "search " + model_args + hf.string(), hf.string(), "architectures"},
      {"malformed config.json", R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": )",
       hf, "search " + model_args + hf.string(), hf.string(), ""},
      {"cluster too small", replace_line(replace_line(cluster, "nodes", "nodes: 1"),
                                         "gpus_per_node", "gpus_per_node: 1"),
       c, "search --model deepseek-r1 --workload sharegpt-paper --cluster " + c.string(),
       c.string(), "num_nodes"},
      {"unknown option", "", "", std::string(kSearch) + " --frobnicate 3", "--frobnicate", ""},
      {"bad objective", "", "", std::string(kSearch) + " --objective fastest", "fastest", ""},
      {"bad routing", "", "", std::string(kSearch) + " --routing zipf:x", "--routing", "routing"},
      {"missing model file", "", "", "search " + model_args + "/nonexistent/m.yaml",
       "/nonexistent/m.yaml", ""},
      {"unknown shipped model", "", "", "search " + model_args + "no-such-model", "no-such-model",
       ""},
      {"bad baseline", "", "", std::string(kSearch) + " --baseline sglang", "sglang", ""},
      {"zero batch limit", "", "", std::string(kSearch) + " --max-batch 0", "--max-batch",
       "expected a number > 0"},
      {"negative rate", "", "", std::string(kSearch) + " --rate -4", "--rate",
       "expected a number > 0"},
  };
  const fs::path plan = scratch() / "plan.yaml";
  for (const Case& k : cases) {
    CAPTURE(k.what);
    if (!k.setup_file.empty()) spit(k.file, k.setup_file);
    for (bool existing : {false, true}) {
      CAPTURE(existing);
      fs::remove(plan);
      if (existing) spit(plan, "sentinel: untouched\n");
      const Run r = run(k.args + " -o " + plan.string());
      CAPTURE(r.err);
      CHECK(r.code == 2);
      // One line on stderr.
      CHECK(!r.err.empty());
      CHECK(r.err.find('\n') == r.err.size() - 1);
      if (!k.expect.empty()) CHECK(r.err.find(k.expect) != std::string::npos);
      if (!k.expect_key.empty()) CHECK(r.err.find(k.expect_key) != std::string::npos);
      if (existing)
        CHECK(slurp(plan) == "sentinel: untouched\n");
      else
        CHECK_FALSE(fs::exists(plan));
    }
  }
  // No temporary files left beside the output.
  for (const auto& e : fs::directory_iterator(scratch()))
    CHECK_MESSAGE(e.path().filename().string().find("plan.yaml.") == std::string::npos,
                  e.path().string());
}

TEST_CASE("--json documents parse and carry the promised fields") {
  Run d = run("describe --model deepseek-r1 --json");
  REQUIRE(d.code == 0);
  const auto dj = nlohmann::json::parse(d.out);
  // Published: 671B total, 37B active (paper.md §7.3; serving-and-models.md A.2).
  CHECK(dj.at("total_params").get<double>() == doctest::Approx(671e9).epsilon(0.01));
  CHECK(dj.at("active_params").get<double>() == doctest::Approx(37.5e9).epsilon(0.02));
  CHECK(dj.at("kv_bytes_per_token").get<double>() > 0);

  const fs::path plan = scratch() / "json-plan.yaml";
  fs::remove(plan);
  Run s = run(std::string(kSearch) + " --top 5 --json -o " + plan.string());
  CAPTURE(s.err);
  REQUIRE(s.code == 0);
  const auto sj = nlohmann::json::parse(s.out);
  REQUIRE(sj.at("ranked").is_array());
  CHECK(sj.at("ranked").size() == 5);
  for (const auto& c : sj.at("ranked")) {
    CHECK(c.at("layout").contains("attn_tp"));
    CHECK(c.at("layout").contains("moe_comm"));
    CHECK(c.at("ttft_ms").get<double>() > 0);
    CHECK(c.at("itl_ms").get<double>() > 0);
    CHECK(c.at("throughput_tok_s").get<double>() > 0);
    CHECK(c.at("memory_per_gpu_bytes").get<double>() > 0);
  }
  // Ranked by throughput, best first.
  for (size_t i = 1; i < sj.at("ranked").size(); ++i)
    CHECK(sj["ranked"][i - 1]["throughput_tok_s"].get<double>() >=
          sj["ranked"][i]["throughput_tok_s"].get<double>());
  REQUIRE(sj.at("baselines").size() == 5);
  for (const auto& b : sj.at("baselines")) {
    CAPTURE(b.dump());
    CHECK(b.contains("name"));
    if (b.at("legal").get<bool>()) {
      // A saturated baseline (queue never drains at this rate) has TTFT null in JSON.
      if (!b.at("saturated").get<bool>()) CHECK(b.at("ttft_ms").get<double>() > 0);
      CHECK(b.at("itl_ms").get<double>() > 0);
      CHECK(b.contains("ratios"));
    }
  }
  CHECK(sj.at("datasheet_estimates").get<bool>());
  CHECK(sj.at("multi_gpu_unvalidated").get<bool>() == (sj.at("world_size").get<int>() > 1));
  CHECK(sj.at("evaluations").get<int64_t>() > 0);

  // The written plan passes check, in text and JSON.
  REQUIRE(fs::exists(plan));
  Run c = run("check " + plan.string());
  CAPTURE(c.err);
  CHECK(c.code == 0);
  CHECK(c.out.rfind("OK ", 0) == 0);
  Run cj = run("check --json " + plan.string());
  CHECK(cj.code == 0);
  CHECK(nlohmann::json::parse(cj.out).at("ok").get<bool>());

  // A tampered plan fails check with exit 2 and the key.
  std::string text = slurp(plan);
  const size_t pos = text.find("moe_tp_rank: ", text.find("{rank: 1,"));
  REQUIRE(pos != std::string::npos);
  text.replace(pos, 14, "moe_tp_rank: 7");
  const fs::path bad = scratch() / "bad-plan.yaml";
  spit(bad, text);
  Run cb = run("check " + bad.string());
  CHECK(cb.code == 2);
  CHECK(cb.err.find("rank_map[1].moe_tp_rank") != std::string::npos);

  // An error under --json is still one JSON document on stdout.
  Run e = run(std::string(kSearch) + " --objective fastest --json");
  CHECK(e.code == 2);
  CHECK_FALSE(nlohmann::json::parse(e.out).at("ok").get<bool>());
}

TEST_CASE("the datasheet note is printed for datasheet profiles") {
  Run s = run(std::string(kSearch) + " --top 3");
  CAPTURE(s.err);
  REQUIRE(s.code == 0);
  CHECK(s.out.find("costs: datasheet estimates (profile ") != std::string::npos);
  // A multi-GPU cluster: the search says its predictions are not yet checked against runs.
  CHECK(s.out.find("fidelity: multi-GPU predictions are not yet checked") != std::string::npos);
  CHECK(s.out.find("vllm-tp-pp") != std::string::npos);
  CHECK(s.out.find("fits_memory") != std::string::npos);
  Run x = run(std::string(kSearch) + " --top 3 --explain 1");
  REQUIRE(x.code == 0);
  CHECK(x.out.find("per-op breakdown") != std::string::npos);
}

TEST_CASE("the multi-GPU fidelity note: printed and flagged for clusters of several GPUs only") {
  Run one = run("search --model qwen3-30b-a3b --cluster h200-1x1 --workload sharegpt-like --top 1 --json");
  CAPTURE(one.err);
  REQUIRE(one.code == 0);
  const auto oj = nlohmann::json::parse(one.out);
  CHECK(oj.at("world_size").get<int>() == 1);
  CHECK_FALSE(oj.at("multi_gpu_unvalidated").get<bool>());
  Run onet = run("search --model qwen3-30b-a3b --cluster h200-1x1 --workload sharegpt-like --top 1");
  REQUIRE(onet.code == 0);
  CHECK(onet.out.find("fidelity: multi-GPU") == std::string::npos);
  Run eight = run("search --model qwen3-30b-a3b --cluster h200-1x8 --workload sharegpt-like --top 1 --json");
  REQUIRE(eight.code == 0);
  CHECK(nlohmann::json::parse(eight.out).at("multi_gpu_unvalidated").get<bool>());
}

TEST_CASE("the shipped example plans pass check") {
  int plans = 0;
  for (const auto& e : fs::directory_iterator(fs::path(MIXSERVE_SOURCE_DIR) / "configs/plans")) {
    if (e.path().extension() != ".yaml") continue;
    ++plans;
    const Run r = run("check " + e.path().string());
    CAPTURE(e.path().string());
    CAPTURE(r.err);
    CHECK(r.code == 0);
  }
  CHECK(plans >= 1);
}

TEST_CASE("--layout pins the search to one layout (a baseline's plan for simulate)") {
  const fs::path plan = scratch() / "pinned.yaml";
  fs::remove(plan);
  Run r = run(std::string(kSearch) + " --layout tutel-tp-ep-tp8 --json -o " + plan.string());
  CAPTURE(r.err);
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  // paper.md §7.5: Tutel TP+EP on H20 = attn TP8 + DP2, MoE TP8 + EP2.
  CHECK(j.at("chosen").at("layout").at("name") == "attn TP8xDP2 | moe TP8xEP2 | PP1 | rs-a2a-ag");
  CHECK(j.at("layouts") == 1);
  CHECK(run("check " + plan.string()).code == 0);
  fs::remove(plan);
  // Not in the search space (fused needs attn_tp == moe_tp): exit 2, names --layout, no file.
  Run bad = run(std::string(kSearch) + " --layout 'attn TP4xDP4 | moe TP8xEP2 | PP1 | fused' -o " +
                plan.string());
  CHECK(bad.code == 2);
  CHECK(bad.err.find("--layout") != std::string::npos);
  CHECK_FALSE(fs::exists(plan));
}

TEST_CASE("--objective goodput: re-scored by the simulator, ranked by max request rate per GPU") {
  const std::string base =
      "search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-paper "
      "--objective goodput --rescore-top 4 --trial-seconds 20";
  const fs::path plan = scratch() / "goodput-plan.yaml", svg = scratch() / "pareto.svg",
                 svg_itl = scratch() / "pareto.itl.svg";
  for (const auto& p : {plan, svg, svg_itl}) fs::remove(p);
  Run s = run(base + " --slo-ttft 2000 --slo-tpot 100 --json --progress -o " + plan.string() +
              " --pareto-svg " + svg.string());
  CAPTURE(s.err);
  REQUIRE(s.code == 0);
  const auto j = nlohmann::json::parse(s.out);  // progress went to stderr, not stdout
  CHECK(s.err.find("goodput [1/") != std::string::npos);
  CHECK(j.at("objective") == "goodput");
  const auto& g = j.at("goodput");
  CHECK(g.at("slo_ttft_ms").get<double>() == 2000);
  CHECK(g.at("slo_tpot_ms").get<double>() == 100);
  CHECK(g.at("slo_percentile").get<double>() == 90);
  CHECK(g.at("rescored").get<int>() == 4);
  const auto& ranked = j.at("ranked");
  REQUIRE(ranked.size() >= 5);
  const double gpus = j.at("world_size").get<double>();
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    const auto& c = ranked[i];
    REQUIRE(c.contains("max_rate_req_s"));
    const double rate = c.at("max_rate_req_s").get<double>();
    CHECK(rate > 0);
    CHECK(c.at("max_rate_per_gpu").get<double>() == doctest::Approx(rate / gpus));
    // The predicted metrics are the simulation's at that rate; the SLOs hold at p90.
    CHECK(c.at("goodput").at("p90_ttft_ms").get<double>() <= 2000);
    CHECK(c.at("goodput").at("p90_tpot_ms").get<double>() <= 100);
    CHECK(c.at("goodput").at("slo_attainment").get<double>() >= 0.9);
    if (i > 0)
      CHECK(ranked[i - 1].at("max_rate_per_gpu").get<double>() >=
            c.at("max_rate_per_gpu").get<double>());
  }
  CHECK_FALSE(ranked[4].contains("max_rate_req_s"));  // beyond --rescore-top: analytic only
  CHECK(j.at("chosen").at("max_rate_per_gpu") == ranked[0].at("max_rate_per_gpu"));
  int scored_baselines = 0;
  for (const auto& b : j.at("baselines")) {
    if (!b.at("legal").get<bool>()) continue;
    ++scored_baselines;
    CAPTURE(b.dump());
    REQUIRE(b.contains("max_rate_per_gpu"));  // the same capacity search as the candidates
    if (b.at("max_rate_per_gpu").get<double>() > 0)
      CHECK(b.at("ratios").at("goodput_x").get<double>() ==
            doctest::Approx(ranked[0].at("max_rate_per_gpu").get<double>() /
                            b.at("max_rate_per_gpu").get<double>()));
  }
  CHECK(scored_baselines > 0);
  // The plan records the objective, the SLOs and the metrics at the chosen rate.
  REQUIRE(fs::exists(plan));
  const mixserve::Plan p = mixserve::load_plan(plan.string());
  CHECK(p.objective == "goodput");
  CHECK(p.workload.slo_ttft_ms == 2000);
  CHECK(p.chosen.metrics.request_rate ==
        doctest::Approx(ranked[0].at("max_rate_req_s").get<double>()));
  CHECK(run("check " + plan.string()).code == 0);
  // Both plots, written whole.
  for (const auto& f : {svg, svg_itl}) {
    CAPTURE(f.string());
    REQUIRE(fs::exists(f));
    const std::string text = slurp(f);
    CHECK(text.find("<svg") != std::string::npos);
    CHECK(text.find("</svg>") != std::string::npos);
  }
}

TEST_CASE("--objective goodput: bad SLO options exit 2 naming the option") {
  const std::string base =
      "search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-paper";
  struct Case {
    std::string args, needle;
  };
  for (const Case& c : {Case{" --objective goodput --slo-ttft 0", "--slo-ttft"},
                        Case{" --objective goodput --slo-ttft -5", "--slo-ttft"},
                        Case{" --objective goodput --slo-tpot 0", "--slo-tpot"},
                        Case{" --objective goodput --slo-tpot -1", "--slo-tpot"},
                        Case{" --objective goodput --slo-ttft 1000 --slo-percentile 150",
                             "--slo-percentile"},
                        Case{" --objective goodput --slo-ttft 1000 --slo-percentile 0",
                             "--slo-percentile"},
                        Case{" --objective goodput --slo-ttft 1000 --rescore-top 0",
                             "--rescore-top"},
                        Case{" --objective goodput", "--slo-ttft"},  // no SLO anywhere
                        Case{" --objective throughput --slo-ttft 1000", "--slo-ttft"},
                        Case{" --pareto-svg x.svg", "--pareto-svg"}}) {
    CAPTURE(c.args);
    Run r = run(base + c.args);
    CAPTURE(r.err);
    CHECK(r.code == 2);
    CHECK(r.err.find(c.needle) != std::string::npos);
    CHECK(r.out.empty());
  }
  // A workload whose rate cannot be varied: the capacity search says so (exit 2).
  Run cl = run("search --model deepseek-v2-lite --cluster h200-1x8 --workload closed-loop-64 "
               "--objective goodput --slo-ttft 1000");
  CAPTURE(cl.err);
  CHECK(cl.code == 2);
  CHECK(cl.err.find("poisson or gamma") != std::string::npos);
}
