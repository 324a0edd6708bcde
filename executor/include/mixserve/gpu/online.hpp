// Online serving benchmark on one GPU (`mixserve-run bench --plan P --workload W`, like vLLM's
// `bench serve`): requests arrive in wall-clock time per the workload (the simulator's seeded
// generator, so the request list is the one `mixserve-plan simulate` draws for the same workload,
// rate, count and seed); the simulator's own scheduler (sim::BatchScheduler: continuous batching,
// chunked prefill, decode-first / prefill-first, max_num_seqs, max_num_batched_tokens, KV blocks,
// preemption by recompute) forms every step, GpuModel runs it, and the request timestamps come
// from the host clock. Every step is timed (CUDA events around the forward, and host wall time)
// beside the cost model's prediction for exactly that batch. The metrics are the simulator's
// (vLLM benchmark_serving keys); the results file holds the exact request list and the engine
// config, so `mixserve-plan validate` replays them through the simulator.
//
// A multi-GPU plan runs with emulate_ranks (its R ranks as logical ranks on this one GPU) or
// gpu_per_rank (a GPU per rank, NCCL, a thread per rank): distributed.hpp EmulatedRanks. Its
// attention-DP replicas each run their own scheduler and block pool, requests are routed to them
// as the simulator routes them, and every engine step steps all replicas at once (an idle one
// with an empty batch): online_engine.hpp. Such steps run eagerly and are timed on the host
// (enqueue on every rank to the last rank's completion); the prediction is the cost model's step
// for the per-replica batches. Pipeline-parallel plans are refused (the simulator keeps pp
// micro-batches in flight; the executor's step runs one batch through every stage).
// Open-loop arrivals (poisson, gamma, burst, trace); closed-loop workloads give InputError.
// Greedy sampling runs on the device (only the token ids come back); single-GPU decode-only steps
// run as CUDA graphs (graph.hpp, as the offline bench) once their token count has run eagerly;
// every step's host time is split into phases (HostPhases).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/sim/replay.hpp"
#include "mixserve/sim/serving.hpp"

namespace mixserve::gpu {

struct OnlineConfig {
  std::string workload;          // shipped name or YAML path; empty: the plan's
  sim::WorkloadOverrides overrides;  // --num-requests, --request-rate, --seed, --slo-*
  // Engine knobs, as `mixserve-plan simulate` (0 / empty = the plan's or workload's).
  std::string policy;            // "decode-first" | "prefill-first"
  int max_num_seqs = 0;
  int64_t max_num_batched_tokens = 0;
  bool no_chunked_prefill = false;
  int64_t kv_blocks = 0;         // 0: min(memory model, what fits on the device, enough for all)
  int num_layers = 0;            // > 0: the first N layers at full width
  std::string weights_dir;       // empty: device-drawn weights (weight_seed)
  uint64_t weight_seed = 0;
  std::string profile;           // hardware profile of the prediction; empty: the plan's
  int block_size = 16;           // KV block tokens (8, 16, 32)
  // Progress line on stderr about every progress_every_s seconds of wall time (0: none).
  double progress_every_s = 5;
  bool cuda_graph = true;        // decode-only steps as CUDA graphs (--no-cuda-graph: eager)
  bool emulate_ranks = false;    // a multi-GPU plan's ranks as logical ranks on this one GPU
  bool gpu_per_rank = false;     // a multi-GPU plan on this node's GPUs, rank r on device r
  bool process_per_rank = false; // one process per rank (run_online_process, --mpi); set by it
};

// Host time of one engine step by phase (std::chrono, ms), in loop order:
//   schedule  arrivals, the scheduler's step, KV block ids, the batch's SequenceSteps
//   prepare   GpuModel::prepare (checks, metadata upload)
//   enqueue   the forward's launches, or the graph's capture and launch (several ranks: every
//             rank's launches and its completion, EmulatedRanks::enqueue_and_wait)
//   wait      GpuModel::collect: waiting for the GPU, the token ids back
//   sample    the sampled ids appended to their sequences
//   bookkeep  the scheduler's completion, request times, block release
// total() is the step's host cycle (start to the next step's start, idle waits for arrivals
// excluded); total() - the GPU time is the host overhead the cost model does not see.
struct HostPhases {
  double schedule_ms = 0, prepare_ms = 0, enqueue_ms = 0, wait_ms = 0, sample_ms = 0, bookkeep_ms = 0;
  double total() const { return schedule_ms + prepare_ms + enqueue_ms + wait_ms + sample_ms + bookkeep_ms; }
};
// Phase names in HostPhases order, the JSON keys of host_phases_json.
inline constexpr const char* kHostPhaseNames[] = {"schedule", "prepare", "enqueue", "wait", "sample", "bookkeep"};

// {"<phase>": {"mean", "median", "p90"}, ... , "total": {...}, "overhead": {...}, "steps": n}
// over the steps (ms); overhead is total - gpu_ms per step (gpu_ms[i] for phases[i]; the GPU time
// by CUDA events), i.e. the host time outside the GPU's busy time.
nlohmann::json host_phases_json(const std::vector<HostPhases>& phases, const std::vector<double>& gpu_ms);
// One line per phase (mean and median ms, share of the host cycle) and the overhead line.
std::string format_host_phases(const std::vector<HostPhases>& phases, const std::vector<double>& gpu_ms);

// The engine setup without a device: workload with overrides, the request list, the engine config
// (limits from the plan, the workload and the options; kv_blocks from the memory model, capped at
// what max_num_seqs sequences of the longest request can hold; per attention-DP replica). A
// multi-GPU plan needs cfg.emulate_ranks or cfg.gpu_per_rank and pp 1. InputError naming the
// option, file or request at fault.
struct OnlineSetup {
  WorkloadSpec workload;
  sim::RequestStream requests;
  sim::ServingConfig serving;
  ModelSpec model;               // what runs (truncated with num_layers)
  int max_blocks_per_seq = 0;    // blocks of the longest request (input + output)
};
OnlineSetup online_setup(const Plan& plan, const std::string& origin, const OnlineConfig& cfg);

// The requests' prompt ids: input_tokens each, uniform over the vocabulary, drawn in request
// order from the workload's seed (the same ids for the same setup, whatever runs them).
std::vector<std::vector<int32_t>> online_prompts(const OnlineSetup& s);

struct OnlineStep {
  double start_s = 0;            // host clock since the benchmark started
  int num_prefill_seqs = 0, num_decode = 0;
  int64_t num_tokens = 0;
  sim::ReplicaBatch batch;       // the step's batch, summed over the replicas
  std::vector<sim::ReplicaBatch> replicas;  // per attention-DP replica: what the cost model was given
  double measured_ms = 0;        // CUDA events around the forward (several ranks: host-timed)
  double wall_ms = 0;            // host: schedule, prepare, forward, ids back, sampling (to the tokens' time)
  bool cuda_graph = false;       // the forward ran as a CUDA graph
  HostPhases host;
  double predicted_ms = 0;        // the cost model's step less the profile's host overhead (GPU time)
  double error_pct() const {
    return measured_ms > 0 ? 100.0 * (predicted_ms - measured_ms) / measured_ms : 0.0;
  }
};

struct OnlineResult {
  OnlineConfig config;
  std::string plan_path, plan_sha256;
  Plan plan;
  OnlineSetup setup;
  std::string device_name;
  nlohmann::json device;
  int ranks = 1;                 // the plan's world size
  bool emulated = false;         // ranks > 1 on this one GPU (else a GPU per rank)
  std::string cost_model, profile_name;
  sim::SimResult result;         // requests (times on the host clock), ITLs, metrics
  std::vector<OnlineStep> steps;
  std::vector<std::vector<int32_t>> output_ids;  // per request, its greedy tokens
  double median_step_error_pct = 0, p90_abs_step_error_pct = 0, worst_step_error_pct = 0;
  double profile_host_overhead_ms = 0;  // the profile's host_overhead.step_us / 1e3 (0: absent)
};

// The profile with host_overhead set from an online run: step_us = the median over its steps of
// (host cycle - CUDA-event GPU time) (host_phases_json "overhead"), steps, and `measured_with`
// (the command, the device, the date). InputError when the run has no steps.
HardwareProfile with_host_overhead(HardwareProfile p, const std::vector<HostPhases>& phases,
                                   const std::vector<double>& gpu_ms, const std::string& measured_with);
HardwareProfile with_host_overhead(HardwareProfile p, const OnlineResult& r, const std::string& command);

OnlineResult run_online(const std::string& plan_path, const OnlineConfig& cfg);
OnlineResult run_online(const Plan& plan, const std::string& origin, const OnlineConfig& cfg);
#if MIXSERVE_HAVE_NCCL
// The online benchmark with one process per rank (mpirun ... --mpi; bench.hpp ProcessGroup): the
// checks of run_bench_process before any device work and the processes' agreement on them, the
// KV blocks per replica agreed (the smallest that fits on every device); then every process runs
// the same engine (online_engine.hpp) with admissions on rank 0's clock, broadcast each step, so
// all form the same steps; each steps its replica's batch (ProcessRank, seeded synthetic weights,
// eager), steps are timed on the host between barriers over the processes, every replica's ids
// reach every process (pg.max_int32). Rank 0's result is the run's.
OnlineResult run_online_process(const std::string& plan_path, const OnlineConfig& cfg, ProcessGroup& pg,
                                const std::function<Comm(int device)>& make_world);
#endif

// The simulator's result keys (sim::metrics_to_json, plus request_rate and mixserve_*), then
// mode "online", ranks, emulated_ranks, moe_schedule, plan {path, sha256, model, ...}, model, workload, serving_config, requests (the
// exact list, with each one's replica and measured ttft/tpot/e2el), steps (each with its host
// phases, and with several replicas its per-replica batches `replicas`),
// step error summary, host_phases_ms (host_phases_json), output_ids, prediction, device,
// versions, date.
nlohmann::json online_json(const OnlineResult& r);
// vLLM's printed block ("Serving Benchmark Result"), then the step error summary and the host
// phases.
std::string format_online_report(const OnlineResult& r);

}  // namespace mixserve::gpu
