// mixserve-run: runs a plan from mixserve-plan on the GPU and measures it beside the simulator's
// prediction (DESIGN.md: plan.yaml -> mixserve-run -> results.json).
//   offline (SGLang bench_one_batch): one prefill of B x I tokens (chunked by the plan's
//     max_num_batched_tokens), O-1 decode steps, every step timed and predicted (bench.hpp):
//     mixserve-run bench --plan plan.yaml --batch 64 --input-len 512 --output-len 64
//                        [--num-layers N] [--weights DIR] [--seed S] [--warmup K] [--json FILE]
//   online (vLLM bench serve): requests of a workload arrive in wall-clock time, the simulator's
//     scheduler forms the steps (online.hpp); same metrics JSON as mixserve-plan simulate:
//     mixserve-run bench --plan plan.yaml --workload sharegpt-paper [--num-requests N]
//                        [--request-rate R] [--seed S] [--num-layers N] [--json FILE] ...
// A multi-GPU plan: --emulate-ranks (its ranks on this one GPU), --gpu-per-rank (a thread per GPU
// of this node), or --mpi (one process per rank: mpirun -np R mixserve-run bench --plan P --mpi ...;
// rank 0 prints and writes the results). Under a launcher with more than one
// process (OMPI_COMM_WORLD_SIZE, PMI_SIZE, ...) --mpi is implied.
// Exit codes: 0 ok, 1 runtime failure (no GPU, device errors), 2 bad input (plan for another GPU
// model or another launch, unsupported model, not enough memory, bad weights, bad arguments).
#include <cstdio>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/bench_mpi.hpp"
#include "mixserve/gpu/online.hpp"
#include "mixserve/sim/serving.hpp"

namespace {

using namespace mixserve;

struct Args {
  std::string plan_path, json_path;
  gpu::BenchConfig offline;
  gpu::OnlineConfig online;
  bool online_mode = false;  // --workload or --online
  bool mpi = false;          // --mpi: one process per rank
  int64_t seed = -1;         // offline: prompts and weights (default 0); online: the workload's seed
  bool offline_opts = false, online_opts = false;
  std::string host_overhead_to;  // online: profile YAML whose host_overhead the run sets
  std::string command;           // the command line, for the profile's provenance
};

void write_json(const std::string& path, const nlohmann::json& j) {
  if (path.empty()) return;
  write_file_atomic(path, j.dump(2) + "\n");
  std::printf("# results: %s\n", path.c_str());
}

int run_offline(Args& a) {
  if (a.seed >= 0) a.offline.seed = static_cast<uint64_t>(a.seed);
  const gpu::BenchResult r = gpu::run_bench(a.plan_path, a.offline);
  std::fputs(gpu::format_bench_report(r).c_str(), stdout);
  write_json(a.json_path, gpu::bench_json(r));
  return kExitOk;
}

void online_args(Args& a) {
  a.online.overrides.seed = a.seed;
  a.online.num_layers = a.offline.num_layers;
  a.online.weights_dir = a.offline.weights_dir;
  a.online.profile = a.offline.profile;
  a.online.cuda_graph = a.offline.cuda_graph;
  a.online.emulate_ranks = a.offline.emulate_ranks;
  a.online.gpu_per_rank = a.offline.gpu_per_rank;
}

void write_host_overhead(const Args& a, const gpu::OnlineResult& r) {
  if (a.host_overhead_to.empty()) return;
  const HardwareProfile p = gpu::with_host_overhead(load_profile(a.host_overhead_to), r, a.command);
  write_file_atomic(a.host_overhead_to, profile_to_yaml(p));
  std::printf("# host overhead %.1f us per step (median of %lld steps) written to %s (host_overhead)\n",
              p.host_overhead.step_us, static_cast<long long>(p.host_overhead.steps), a.host_overhead_to.c_str());
}

#if MIXSERVE_HAVE_MPI
// One process of an MPI launch: every rank runs its part; rank 0 prints and writes the results.
int run_online_mpi(Args& a, gpu::MpiSession& mpi) {
  online_args(a);
  const gpu::OnlineResult r = gpu::run_online_mpi(a.plan_path, a.online, mpi);
  if (mpi.rank() == 0) {
    std::fputs(gpu::format_online_report(r).c_str(), stdout);
    write_json(a.json_path, gpu::online_json(r));
    write_host_overhead(a, r);
  }
  return kExitOk;
}

int run_offline_mpi(Args& a, gpu::MpiSession& mpi) {
  if (a.seed >= 0) a.offline.seed = static_cast<uint64_t>(a.seed);
  const gpu::BenchResult r = gpu::run_bench_mpi(a.plan_path, a.offline, mpi);
  if (mpi.rank() == 0) {
    std::fputs(gpu::format_bench_report(r).c_str(), stdout);
    write_json(a.json_path, gpu::bench_json(r));
  }
  return kExitOk;
}
#endif

int run_online(Args& a) {
  online_args(a);
  const gpu::OnlineResult r = gpu::run_online(a.plan_path, a.online);
  std::fputs(gpu::format_online_report(r).c_str(), stdout);
  write_json(a.json_path, gpu::online_json(r));
  write_host_overhead(a, r);
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mixserve-run: run a mixserve-plan plan on the GPU, measured beside the simulator's prediction"};
  app.require_subcommand(1);
  Args a;
  for (int i = 0; i < argc; ++i) a.command += (i ? " " : "") + std::string(argv[i]);
  gpu::BenchConfig& cfg = a.offline;
  gpu::OnlineConfig& on = a.online;
  auto* bench = app.add_subcommand(
      "bench", "offline: one batch, per-step prefill and decode latencies; online (--workload): requests "
               "arriving in time, continuous batching, vLLM serving metrics");
  bench->add_option("--plan", a.plan_path, "plan.yaml from mixserve-plan (one GPU)")->required();
  bench->add_option("--num-layers", cfg.num_layers, "run the first N layers at full width (0: all)")
      ->capture_default_str();
  bench->add_option("--weights", cfg.weights_dir, "safetensors file or directory (default: seeded synthetic)");
  bench->add_option("--seed", a.seed,
                    "offline: seed of the prompts and synthetic weights (default 0); online: the workload's "
                    "seed (default: the workload's)");
  bench->add_option("--profile", cfg.profile, "hardware profile of the prediction (default: the plan's)");
  bench->add_option("--json", a.json_path, "write the results JSON here");
  // Offline.
  const char* off = "Offline (bench_one_batch)";
  bench->add_option("--batch", cfg.batch, "sequences")->capture_default_str()->group(off);
  bench->add_option("--input-len", cfg.input_len, "prompt tokens per sequence")->capture_default_str()->group(off);
  bench->add_option("--output-len", cfg.output_len, "generated tokens per sequence")
      ->capture_default_str()
      ->group(off);
  bench->add_option("--warmup", cfg.warmup, "untimed runs of the whole benchmark first")
      ->capture_default_str()
      ->group(off);
  bench->add_flag("!--no-cuda-graph", cfg.cuda_graph, "run decode steps eagerly (offline and online)");
  bench->add_flag("--fused-decode-layer", cfg.fused_decode_layer,
                  "offline, one GPU: decode steps of one sequence run each MoE layer as one fused launch "
                  "(predicted from the profile's fused_decode_layer points when it has the model's layer shape)")
      ->group(off);
  bench->add_flag("--emulate-ranks", cfg.emulate_ranks,
                  "a multi-GPU plan (offline and online): run its ranks as logical ranks on this one GPU "
                  "(docs/distributed.md)");
  bench->add_flag("--gpu-per-rank", cfg.gpu_per_rank,
                  "a multi-GPU plan on this node (offline and online): rank r on GPU r, NCCL, a thread per rank "
                  "(docs/distributed.md)");
  bench->add_flag("--mpi", a.mpi,
                  "one process per rank of the plan, launched by mpirun / srun (implied under a launcher of more "
                  "than one process); offline and online (docs/distributed.md)");
  // Online: the simulator CLI's names.
  const char* onl = "Online (serving, the simulator's scheduler)";
  bench->add_option("--workload", on.workload, "shipped workload name (configs/workloads) or YAML path: online mode")
      ->group(onl);
  bench->add_flag("--online", a.online_mode, "online mode with the plan's own workload")->group(onl);
  bench->add_option("--host-overhead-to", a.host_overhead_to,
                    "profile YAML (e.g. profiles/h200.yaml): write the run's median host time per step outside "
                    "the GPU's busy time into its host_overhead (the cost model adds it once per step)")
      ->group(onl);
  bench->add_option("--num-requests", on.overrides.num_requests, "number of requests (default: the workload's)")
      ->group(onl);
  bench->add_option("--request-rate,--rate", on.overrides.rate,
                    "request rate (req/s), overrides the workload's (poisson or gamma)")
      ->group(onl);
  bench->add_option("--policy", on.policy, "scheduling order (default: the plan's)")
      ->check(CLI::IsMember({sim::kDecodeFirst, sim::kPrefillFirst}))
      ->group(onl);
  bench->add_option("--max-num-seqs", on.max_num_seqs, "max running sequences (batch limit)")->group(onl);
  bench->add_option("--max-num-batched-tokens", on.max_num_batched_tokens, "token budget per step")->group(onl);
  bench->add_flag("--no-chunked-prefill", on.no_chunked_prefill, "prefill prompts in one step")->group(onl);
  bench->add_option("--kv-blocks", on.kv_blocks,
                    "KV cache blocks (default: the memory model's, capped at what max_num_seqs of the longest "
                    "request need, and at the device's free memory)")
      ->group(onl);
  bench->add_option("--weight-seed", on.weight_seed, "seed of the synthetic weights")->capture_default_str()->group(onl);
  bench->add_option("--slo-ttft", on.overrides.slo_ttft_ms, "TTFT SLO in ms for goodput")->group(onl);
  bench->add_option("--slo-tpot", on.overrides.slo_tpot_ms, "TPOT SLO in ms for goodput")->group(onl);
  bench->add_option("--slo-e2el", on.overrides.slo_e2el_ms, "E2E latency SLO in ms for goodput")->group(onl);
  bench->add_option("--progress-every", on.progress_every_s, "seconds between progress lines on stderr (0: none)")
      ->capture_default_str()
      ->group(onl);
  CLI11_PARSE(app, argc, argv);

#if MIXSERVE_HAVE_MPI
  std::unique_ptr<gpu::MpiSession> mpi;
#endif
  // Under MPI every message names its rank: each process prints its own.
  std::string who = "mixserve-run";
  try {
    const bool online = a.online_mode || !on.workload.empty();
    const int launched = gpu::launcher_world_size();
    if (launched > 1) a.mpi = true;
    if (a.mpi) {
#if MIXSERVE_HAVE_MPI
      mpi = std::make_unique<gpu::MpiSession>();
      who = fmt::format("mixserve-run (rank {} of {})", mpi->rank(), mpi->size());
#else
      throw InputError(fmt::format(
          "{}: this mixserve-run was built without MPI (MPI or NCCL not found at configure time), so it cannot run "
          "one process per rank", launched > 1 ? fmt::format("launched as {} MPI processes", launched) : "--mpi"));
#endif
    }
    if (online && bench->count("--fused-decode-layer") > 0)
      throw InputError("--fused-decode-layer is an offline option (give --batch 1; the online mode does not take it)");
    for (const char* opt : {"--batch", "--input-len", "--output-len", "--warmup"})
      if (online && bench->count(opt) > 0)
        throw InputError(fmt::format("{} is an offline option; online mode (--workload) takes the lengths from "
                                     "the workload", opt));
    for (const char* opt : {"--num-requests", "--request-rate", "--policy", "--max-num-seqs",
                            "--max-num-batched-tokens", "--no-chunked-prefill", "--kv-blocks", "--weight-seed",
                            "--slo-ttft", "--slo-tpot", "--slo-e2el", "--host-overhead-to"})
      if (!online && bench->count(opt) > 0)
        throw InputError(fmt::format("{} is an online option: give --workload W (or --online)", opt));
#if MIXSERVE_HAVE_MPI
    if (mpi) return online ? run_online_mpi(a, *mpi) : run_offline_mpi(a, *mpi);
#endif
    return online ? run_online(a) : run_offline(a);
  } catch (const InputError& e) {
    std::fprintf(stderr, "%s: %s\n", who.c_str(), e.what());
#if MIXSERVE_HAVE_MPI
    if (mpi && mpi->collective) mpi->abort(kExitInput);  // the peers wait in NCCL for this rank
#endif
    return kExitInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", who.c_str(), e.what());
#if MIXSERVE_HAVE_MPI
    if (mpi && mpi->collective) mpi->abort(kExitRuntime);
#endif
    return kExitRuntime;
  }
}
