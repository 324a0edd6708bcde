// mixserve-run: runs a plan from mixserve-plan on the GPU and measures it beside the simulator's
// prediction (DESIGN.md: plan.yaml -> mixserve-run -> results.json).
//   mixserve-run bench --plan plan.yaml --batch 64 --input-len 512 --output-len 64
//                      [--num-layers N] [--weights DIR] [--seed S] [--warmup K] [--json FILE]
// Offline mode (SGLang bench_one_batch): one prefill of B x I tokens (chunked by the plan's
// max_num_batched_tokens), O-1 decode steps, every step timed and predicted. One GPU only.
// Exit codes: 0 ok, 1 runtime failure (no GPU, device errors), 2 bad input (plan for another GPU
// model or more GPUs, unsupported model, not enough memory, bad weights, bad arguments).
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/bench.hpp"

int main(int argc, char** argv) {
  using namespace mixserve;
  CLI::App app{"mixserve-run: run a mixserve-plan plan on the GPU, measured beside the simulator's prediction"};
  app.require_subcommand(1);
  gpu::BenchConfig cfg;
  std::string plan_path, json_path;
  auto* bench = app.add_subcommand("bench", "offline: one batch, per-step prefill and decode latencies");
  bench->add_option("--plan", plan_path, "plan.yaml from mixserve-plan (one GPU)")->required();
  bench->add_option("--batch", cfg.batch, "sequences")->capture_default_str();
  bench->add_option("--input-len", cfg.input_len, "prompt tokens per sequence")->capture_default_str();
  bench->add_option("--output-len", cfg.output_len, "generated tokens per sequence")->capture_default_str();
  bench->add_option("--num-layers", cfg.num_layers, "run the first N layers at full width (0: all)")
      ->capture_default_str();
  bench->add_option("--weights", cfg.weights_dir, "safetensors file or directory (default: seeded synthetic)");
  bench->add_option("--seed", cfg.seed, "seed of the prompts and synthetic weights")->capture_default_str();
  bench->add_option("--warmup", cfg.warmup, "untimed runs of the whole benchmark first")->capture_default_str();
  bench->add_option("--profile", cfg.profile, "hardware profile of the prediction (default: the plan's)");
  bench->add_option("--json", json_path, "write the results JSON here");
  bench->add_flag("!--no-cuda-graph", cfg.cuda_graph, "run decode steps eagerly");
  CLI11_PARSE(app, argc, argv);

  try {
    const gpu::BenchResult r = gpu::run_bench(plan_path, cfg);
    std::fputs(gpu::format_bench_report(r).c_str(), stdout);
    if (!json_path.empty()) {
      write_file_atomic(json_path, gpu::bench_json(r).dump(2) + "\n");
      std::printf("# results: %s\n", json_path.c_str());
    }
    return kExitOk;
  } catch (const InputError& e) {
    std::fprintf(stderr, "mixserve-run: %s\n", e.what());
    return kExitInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mixserve-run: %s\n", e.what());
    return kExitRuntime;
  }
}
