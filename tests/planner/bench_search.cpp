// bench_search (label perf, not a unit test): wall time and evaluations per second of the full
// layout search for DeepSeek-R1 on 8 nodes x 8 H200, every layout and batch-limit candidate,
// pinned to one core. nccl-tests style: '#' header, a table, a footer; also writes
// bench_search.json (args, version, host, timestamp, results) in the working directory.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/planner/search.hpp"

using namespace mixserve;

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const int max_batch = 1024;
  try {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu() >= 0 ? sched_getcpu() : 0, &one);
    const bool pinned = sched_setaffinity(0, sizeof(one), &one) == 0;

    planner::SearchInputs in;
    in.model = load_model("deepseek-r1");
    in.cluster = load_cluster("h200-8x8");
    in.cluster_origin = "h200-8x8";
    in.profile = load_profile(in.cluster.profile);
    in.workload = load_workload("sharegpt-paper");
    planner::SearchOptions opt;
    opt.objective = planner::Objective::throughput;
    opt.max_batch = max_batch;
    opt.max_model_len = in.workload.max_seq_len;
    opt.top = 10;

    std::printf("# bench_search: mixserve %s\n", kMixServeVersion);
    std::printf("# model %s, cluster %s (%d x %d %s), profile %s [%s], workload %s\n",
                in.model.name.c_str(), in.cluster.name.c_str(), in.cluster.num_nodes,
                in.cluster.gpus_per_node, in.cluster.gpu_model.c_str(), in.profile.name.c_str(),
                in.profile.source.c_str(), in.workload.name.c_str());
    std::printf("# objective throughput, max_batch %d, token budgets %zu, reps %d, pinned to one "
                "core: %s\n",
                max_batch, opt.batched_tokens.size(), reps, pinned ? "yes" : "no");
    std::printf("#\n# %6s %8s %12s %12s %12s %14s\n", "rep", "layouts", "candidates",
                "evaluations", "wall(ms)", "eval/s");
    std::vector<double> walls;
    planner::SearchResult last;
    for (int i = 0; i < reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      last = planner::search(in, opt);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      walls.push_back(s);
      const int64_t candidates = last.rejections.back().checked;
      std::printf("  %6d %8lld %12lld %12lld %12.1f %14.0f\n", i, static_cast<long long>(last.layouts),
                  static_cast<long long>(candidates), static_cast<long long>(last.evaluations),
                  s * 1e3, static_cast<double>(last.evaluations) / s);
    }
    std::sort(walls.begin(), walls.end());
    const double median = walls[walls.size() / 2];
    const double rate = static_cast<double>(last.evaluations) / median;
    const bool ok = last.evaluations >= 10000 && median < 1.0;
    std::printf("# median wall %.1f ms, %.0f evaluations/s (min %.1f ms, max %.1f ms)\n",
                median * 1e3, rate, walls.front() * 1e3, walls.back() * 1e3);
    std::printf("# chosen: %s\n", last.ranked.front().layout.name().c_str());
    std::printf("# goal: >= 10000 evaluations in < 1 s on one core: %s\n", ok ? "met" : "NOT met");

    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    const nlohmann::json doc{{"bench", "bench_search"},
                             {"version", kMixServeVersion},
                             {"host", host},
                             {"created", now_iso8601_utc()},
                             {"args", {{"model", in.model.name}, {"cluster", in.cluster.name},
                                       {"max_batch", max_batch}, {"reps", reps},
                                       {"pinned_one_core", pinned}}},
                             {"layouts", last.layouts},
                             {"evaluations", last.evaluations},
                             {"median_wall_s", median},
                             {"evaluations_per_s", rate},
                             {"goal_met", ok}};
    write_file_atomic("bench_search.json", doc.dump(2) + "\n");
    return ok ? 0 : 1;
  } catch (const InputError& e) {
    std::fprintf(stderr, "bench_search: %s\n", e.what());
    return kExitInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_search: %s\n", e.what());
    return kExitRuntime;
  }
}
