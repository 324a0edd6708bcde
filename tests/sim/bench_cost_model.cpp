// Cost-model speed benchmark (label perf): builds the "mixserve" cost model for every layout of
// DeepSeek-R1 on 8 x 8 H200 and times step() over batch-limit candidates, nccl-tests style.
// Target (planners-and-simulators.md §5): >= 10,000 evaluations in < 1 s on one core.
// Usage: bench_cost_model [json_out]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mixserve/core/io.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(8);
  const HardwareProfile p = test::h200_datasheet();
  const std::vector<Layout> layouts = test::all_layouts(m, c.world_size());
  const int seqs[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  const int64_t budgets[] = {1024, 2048, 4096, 8192, 16384, 32768};
  const int64_t contexts[] = {512, 2048, 8192};

  std::printf("# bench_cost_model (mixserve %s)\n", kMixServeVersion);
  std::printf("# model %s on %d x %d %s, %zu layouts, %zu decode + %zu prefill shapes each\n",
              m.name.c_str(), c.num_nodes, c.gpus_per_node, c.gpu_model.c_str(), layouts.size(),
              std::size(seqs) * std::size(contexts), std::size(budgets));
  std::printf("# %-10s %12s %12s %12s %14s\n", "phase", "count", "time(ms)", "us/each", "per_second");

  double sink = 0;
  const auto t0 = Clock::now();
  std::vector<std::unique_ptr<StepCostModel>> models;
  for (const Layout& l : layouts) models.push_back(make_cost_model("mixserve", m, c, p, l, {}));
  const auto t1 = Clock::now();
  CostModelOptions zipf;
  zipf.routing.kind = "zipf";
  zipf.routing.skew = 1.01;  // AIConfigurator's DeepSeek value (planners-and-simulators.md §2.1)
  for (const Layout& l : layouts) sink += make_cost_model("mixserve", m, c, p, l, zipf)->name().size();
  const auto t1z = Clock::now();
  long evals = 0;
  for (size_t i = 0; i < layouts.size(); ++i) {
    const Layout& l = layouts[i];
    std::vector<ReplicaBatch> batch(size_t(l.attn_dp));
    for (int s : seqs)
      for (int64_t ctx : contexts) {
        for (ReplicaBatch& b : batch) b = ReplicaBatch{0, 0, 0, s, s * ctx};
        sink += models[i]->step(batch, false).time_us;
        ++evals;
      }
    for (int64_t tok : budgets) {
      for (ReplicaBatch& b : batch) b = ReplicaBatch{tok, 1, double(tok) * (tok + 1) / 2, 0, 0};
      sink += models[i]->step(batch, false).time_us;
      ++evals;
    }
  }
  // Repeat the sweep until the count reaches the target of 10,000 evaluations.
  const long per_sweep = evals;
  while (evals < 10000) {
    for (size_t i = 0; i < layouts.size() && evals < 10000; ++i) {
      std::vector<ReplicaBatch> batch(size_t(layouts[i].attn_dp), ReplicaBatch{0, 0, 0, 64, 64 * 4096 + evals % 7});
      sink += models[i]->step(batch, false).time_us;
      ++evals;
    }
  }
  const auto t2 = Clock::now();
  long metrics = 0;
  RuntimeLimits lim;
  WorkloadSpec w;
  w.arrival = ArrivalKind::burst;
  w.input.value = 1024;
  w.output.value = 256;
  for (size_t i = 0; i < layouts.size(); ++i)
    for (int s : {64, 256})
      for (int64_t tok : {4096, 16384}) {
        lim.max_num_seqs = s;
        lim.max_num_batched_tokens = tok;
        sink += analytic_metrics(*models[i], layouts[i], w, lim).itl_ms;
        ++metrics;
      }
  const auto t3 = Clock::now();
  auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const double build_ms = ms(t0, t1), zipf_ms = ms(t1, t1z), step_ms = ms(t1z, t2),
               metric_ms = ms(t2, t3);
  auto row = [](const char* name, long n, double t_ms) {
    std::printf("  %-10s %12ld %12.3f %12.3f %14.0f\n", name, n, t_ms, 1e3 * t_ms / n, n / (t_ms / 1e3));
  };
  row("build", long(layouts.size()), build_ms);
  row("build-zipf", long(layouts.size()), zipf_ms);
  row("step", evals, step_ms);
  row("metrics", metrics, metric_ms);
  const double search_ms = build_ms + step_ms;
  const bool ok = evals >= 10000 && search_ms < 1000.0 && sink > 0;
  std::printf("# one sweep = %ld step() calls; build + %ld steps = %.1f ms (target < 1000 ms)\n",
              per_sweep, evals, search_ms);
  std::printf("# verdict: %s\n", ok ? "PASS" : "FAIL");

  if (argc > 1) {
    nlohmann::json j;
    j["benchmark"] = "bench_cost_model";
    j["version"] = kMixServeVersion;
    j["created"] = now_iso8601_utc();
    j["model"] = m.name;
    j["cluster"] = fmt::format("{}x{} {}", c.num_nodes, c.gpus_per_node, c.gpu_model);
    j["layouts"] = layouts.size();
    j["step_evaluations"] = evals;
    j["build_ms"] = build_ms;
    j["build_zipf_ms"] = zipf_ms;
    j["step_ms"] = step_ms;
    j["steps_per_second"] = evals / (step_ms / 1e3);
    j["metrics_evaluations"] = metrics;
    j["metrics_ms"] = metric_ms;
    j["verdict"] = ok ? "PASS" : "FAIL";
    write_file_atomic(argv[1], j.dump(2) + "\n");
  }
  return ok ? 0 : 1;
}
