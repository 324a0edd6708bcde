// `mixserve-plan simulate` end to end: a plan from `search -o`, then simulate with every output,
// and the exit codes of bad input (2).
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "mixserve/core/io.hpp"

namespace fs = std::filesystem;

namespace {

struct Run {
  int code = -1;
  std::string out;
};

Run run(const std::string& args) {
  const std::string cmd = std::string(MIXSERVE_PLAN_EXE) + " " + args + " 2>/dev/null";
  Run r;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

fs::path scratch() {
  const fs::path d = fs::temp_directory_path() / ("mixserve_simulate_cli_" + std::to_string(getpid()));
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("simulate runs a searched plan and writes every output") {
  const fs::path dir = scratch();
  const fs::path plan = dir / "plan.yaml";
  const Run s = run("search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-like -o " +
                    plan.string());
  REQUIRE(s.code == 0);
  REQUIRE(fs::exists(plan));

  const fs::path json = dir / "r.json", csv = dir / "r.csv", trace = dir / "t.json",
                 svg = dir / "p.svg";
  const Run r = run("simulate --plan " + plan.string() + " --workload tiny-trace --json --quiet" +
                    " --slo-ttft 5000 --output-json " + json.string() + " --output-csv " +
                    csv.string() + " --trace " + trace.string());
  REQUIRE(r.code == 0);
  const auto j = nlohmann::json::parse(r.out);
  CHECK(j["completed"] == 8);  // tiny-trace.csv has 8 rows
  CHECK(j["total_input_tokens"] == 128 + 512 + 64 + 2048 + 300 + 1000 + 96 + 96);
  CHECK(j["total_output_tokens"] == 64 + 32 + 256 + 16 + 300 + 100 + 512 + 512);
  CHECK(j["request_goodput"].is_number());
  for (const char* key : {"mean_ttft_ms", "p99_itl_ms", "median_e2el_ms", "p90_tpot_ms"})
    CHECK(j.contains(key));
  CHECK(nlohmann::json::parse(mixserve::read_text_file(json)) == j);
  const std::string rows = mixserve::read_text_file(csv);
  CHECK(std::count(rows.begin(), rows.end(), '\n') == 9);
  CHECK(nlohmann::json::parse(mixserve::read_text_file(trace))["traceEvents"].size() > 0);

  const Run sweep = run("simulate --plan " + plan.string() + " --workload sharegpt-like " +
                        "--num-requests 100 --rates 1,2 --quiet --json --plot " + svg.string());
  REQUIRE(sweep.code == 0);
  CHECK(nlohmann::json::parse(sweep.out)["runs"].size() == 2);
  CHECK(mixserve::read_text_file(svg).rfind("<svg", 0) == 0);

  // --moe-load: sampled per step by default (when the layout has EP > 1), or expected; an EP8
  // plan and a TP8 one (EP 1: nothing to sample).
  const fs::path ep_plan = dir / "ep-plan.yaml", tp_plan = dir / "tp-plan.yaml";
  REQUIRE(run("search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-like "
              "--layout 'attn TP8xDP1 | moe TP8xEP1 | PP1 | allreduce' -o " + tp_plan.string())
              .code == 0);
  REQUIRE(run("search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-like "
              "--layout 'attn TP1xDP8 | moe TP1xEP8 | PP1 | a2a' -o " + ep_plan.string())
              .code == 0);
  for (const std::string mode : {"", "sampled", "expected", "ep1"}) {
    CAPTURE(mode);
    const std::string p = mode == "ep1" ? tp_plan.string() : ep_plan.string();
    const bool ep = mixserve::load_plan(p).chosen.layout.moe_ep > 1;
    CHECK(ep == (mode != "ep1"));
    const Run m = run("simulate --plan " + p + " --num-requests 50 --quiet --json" +
                      (mode.empty() || mode == "ep1" ? std::string() : " --moe-load " + mode));
    REQUIRE(m.code == 0);
    const auto mj = nlohmann::json::parse(m.out);
    const bool sampled = ep && mode != "expected";
    CHECK(mj["mixserve_moe_load"] == (sampled ? "sampled" : "expected"));
    CHECK((mj["mixserve_mean_moe_max_over_mean"].get<double>() > 1.0) == sampled);
  }
  CHECK(run("simulate --plan " + plan.string() + " --moe-load random").code == 2);
  fs::remove_all(dir);
}

TEST_CASE("simulate rejects bad input with exit code 2") {
  CHECK(run("simulate --plan /nonexistent/plan.yaml").code == 2);
  const fs::path dir = scratch();
  const fs::path plan = dir / "plan.yaml";
  REQUIRE(run("search --model deepseek-v2-lite --cluster h200-1x8 --workload sharegpt-like -o " +
              plan.string()).code == 0);
  CHECK(run("simulate --plan " + plan.string() + " --workload no-such-workload").code == 2);
  CHECK(run("simulate --plan " + plan.string() + " --router random").code == 2);
  // The capacity search varies the rate: a trace has none.
  CHECK(run("simulate --plan " + plan.string() +
            " --workload tiny-trace --capacity --slo-ttft 100").code == 2);
  fs::remove_all(dir);
}
