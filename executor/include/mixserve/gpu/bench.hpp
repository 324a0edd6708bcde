// Offline benchmark of one batch on one GPU (`mixserve-run bench`, like SGLang's bench_one_batch):
// B sequences of I random tokens are prefilled (chunked by the plan's max_num_batched_tokens),
// then O-1 decode steps generate greedily; every step is timed with CUDA events. Beside each
// measured step stands the simulator's prediction for exactly that step (cost_model.hpp, the
// plan's layout and cluster, the hardware profile), built from the batch the executor ran.
//
// The plan is untrusted input (STYLE.md §5): check_bench_plan() rejects, before any device work,
// a plan of more than one GPU without --emulate-ranks / --gpu-per-rank / --mpi, a plan for another GPU model
// than the device, a model outside the GPU forward's family, a batch the plan's limits do not
// allow; estimate_bench_memory() is compared with the device's free memory before allocating.
//
// Errors: InputError for the plan, the model, the arguments and the weights (load_weights names
// the file and tensor); RuntimeError "no GPU" without a CUDA device, and for device failures.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/core/plan.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/sim/cost_model.hpp"
#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#endif

namespace mixserve::gpu {

struct BenchConfig {
  int batch = 1;            // sequences
  int input_len = 512;      // prompt tokens per sequence
  int output_len = 16;      // generated tokens per sequence (the prefill gives the first)
  int num_layers = 0;       // > 0: the first N layers at full width (model::with_num_layers)
  std::string weights_dir;  // safetensors file or directory; empty: device-drawn seeded weights
  uint64_t seed = 0;        // input tokens and synthetic weights
  int warmup = 1;           // untimed runs of the whole benchmark first
  std::string profile;      // hardware profile for the prediction; empty: the plan's
  bool cuda_graph = true;   // capture decode steps when the expert path is the device GEMV
  int block_size = 16;      // KV block tokens (8, 16, 32)
  // A multi-GPU plan's R ranks as logical ranks on this one GPU (distributed.hpp: shards,
  // LocalTransport, a thread per rank). Steps are timed on the host over every rank; the links
  // are device copies, so the times are not those of R GPUs. Requests go to the attention-DP
  // replicas round-robin. Decode steps run eagerly (no CUDA graph).
  bool emulate_ranks = false;
  // A multi-GPU plan on this node's GPUs: one process, a thread per rank, rank r on device r,
  // NCCL between them (distributed.hpp, Placement::gpu_per_rank). Host-timed steps.
  bool gpu_per_rank = false;
  // One process per rank (run_bench_process: mpirun mixserve-run bench --mpi); set by it.
  bool process_per_rank = false;
  // Decode steps of one sequence run every supported MoE layer as the fused batch-1 layer
  // (GpuModelConfig::fused_decode_layer, gpu/decode_layer.hpp; needs every SM of the GPU). One-GPU
  // plans only. The prediction costs those layers from the profile's fused_decode_layer points of
  // the model's layer shape (mixserve-profile fused-layer), else the unfused kernels, and says which.
  bool fused_decode_layer = false;
};

// The results' `launch` key: "mpi" (a process per rank), "emulated" (R ranks on one GPU),
// "gpu-per-rank" (one process, a thread per GPU) or "one-gpu"; shared by the offline and online
// benchmarks.
inline const char* launch_name(bool process_per_rank, bool emulated, int ranks) {
  return process_per_rank ? "mpi" : emulated ? "emulated" : ranks > 1 ? "gpu-per-rank" : "one-gpu";
}

// One timed forward step, with the simulator's prediction of the same batch.
struct BenchStep {
  std::string kind;         // "prefill" | "decode"
  int index = 0;            // within its kind
  int num_seqs = 0;
  int64_t num_tokens = 0;   // new tokens of the step
  bool cuda_graph = false;
  sim::ReplicaBatch batch;  // the step's batch, summed over the attention-DP replicas
  std::vector<sim::ReplicaBatch> replicas;  // per replica: what the cost model was given
  double measured_ms = 0;
  double predicted_ms = 0;  // the cost model's step less the profile's host_overhead (GPU time)
  double error_pct() const { return measured_ms > 0 ? 100.0 * (predicted_ms - measured_ms) / measured_ms : 0.0; }
};

struct BenchMemory {  // bytes, estimated before allocating
  double weights = 0, kv_cache = 0, activations = 0, reserved = 0;
  double free_device = 0;  // cudaMemGetInfo at the check
  double total() const { return weights + kv_cache + activations + reserved; }
};

struct BenchResult {
  BenchConfig config;
  std::string plan_path;
  std::string plan_sha256;     // of the plan file's text (of plan_to_yaml for an in-memory plan)
  Plan plan;                   // as loaded
  ModelSpec model;             // what ran (truncated with num_layers)
  int ranks = 1;               // the plan's world size
  bool emulated = false;       // ranks > 1 on one GPU (else a GPU per rank)
  std::string device_name;
  nlohmann::json device;       // query_device() fields and library versions
  std::string cost_model;      // "mixserve"
  std::string profile_name;
  BenchMemory memory;
  int64_t prefill_chunk_tokens = 0;
  std::vector<BenchStep> steps;                 // prefill chunks then decode steps, in order
  std::vector<std::vector<int32_t>> output_ids; // [batch][output_len] greedy tokens
  // bench_one_batch's numbers (seconds, tokens/s).
  double prefill_latency = 0, prefill_throughput = 0;
  double median_decode_latency = 0, median_decode_throughput = 0;
  double total_latency = 0, overall_throughput = 0;
  double median_prefill_error_pct = 0, median_decode_error_pct = 0;
  // --fused-decode-layer: MoE layers the executor ran fused (one GPU; every pass, warm-ups
  // included), and whether the prediction costed them from the profile's points (else unfused).
  int64_t fused_layers_run = 0;
  bool fused_predicted = false;
};

// How check_single_gpu_plan treats a plan of several GPUs: refused naming --emulate-ranks /
// --gpu-per-rank (no launch flag given), or allowed.
enum class MultiGpuPlan { needs_flag, allowed };
// The checks of the plan alone, shared with the online mode (online.hpp): world size 1 (unless
// `multi` allows more), a model the GPU forward supports (InputError naming what is not).
void check_single_gpu_plan(const Plan& plan, const std::string& origin, MultiGpuPlan multi);
// query_device() fields and library versions, as the results JSON holds them.
nlohmann::json device_info_json(const DeviceInfo& d);
// Validation without a device. InputError with the reason:
//   world size != 1 without emulate_ranks, a model outside the family the GPU
//   forward supports (the list), batch/lengths outside [1, ...] or the plan's limits.
void check_bench_plan(const Plan& plan, const BenchConfig& cfg, const std::string& origin);
// The plan's cluster GPU model ("H200") must occur in the device name ("NVIDIA H200").
void check_device_matches(const Plan& plan, const std::string& device_name, const std::string& origin);
// The model spec that runs: the plan's model, truncated to cfg.num_layers when > 0.
ModelSpec bench_model(const Plan& plan, const BenchConfig& cfg);
// Weights + KV cache + activations for the benchmark (free_device left 0).
BenchMemory estimate_bench_memory(const ModelSpec& m, const BenchConfig& cfg, int64_t chunk_tokens);

// The estimate for a plan's R ranks emulated on one GPU, from the one-model estimate: the sharded
// weights sum to about one model, every further rank adds its replicated embedding, LM head and
// routers, and every rank its own activations.
BenchMemory emulated_ranks_memory(BenchMemory one, const ModelSpec& m, int ranks);

// The step batches the benchmark runs, as the cost model sees them: prefill chunks of at most
// chunk_tokens new tokens (sequences in order, a sequence split across chunks when longer),
// then output_len - 1 decode steps of every sequence.
std::vector<sim::ReplicaBatch> bench_step_batches(const BenchConfig& cfg, int64_t chunk_tokens);

// What one pass measured: per step its time and whether it ran as a CUDA graph, per sequence its
// greedy ids.
struct BenchRun {
  std::vector<double> step_ms;
  std::vector<bool> graph;
  std::vector<std::vector<int32_t>> output_ids;
};
// The pieces of run_bench, shared with the per-process run below.
// Checks without a device: validate_plan, check_bench_plan, the profile, and check_plan_for_run for
// a multi-GPU plan (with `launch`, or the ranks this process drives) or any plan with `launch`.
// Returns the result's plan, model, chunk, ranks and prediction settings. InputError.
BenchResult bench_check(const Plan& plan, const std::string& origin, const BenchConfig& cfg,
                        const LaunchShape* launch = nullptr);
// On the current device: its name and GPU model against the plan, and the memory estimate of
// `ranks_here` ranks on it against its free memory. InputError.
void bench_device_check(BenchResult& r, int ranks_here);
// The GpuModel limits of the benchmark (per attention-DP replica for a multi-GPU plan).
GpuModelConfig bench_gpu_config(const BenchResult& r);
// The prompts: cfg.batch sequences of cfg.input_len ids, seeded by cfg.seed.
std::vector<std::vector<int32_t>> bench_prompts(const BenchConfig& cfg, int64_t vocab);
// The steps of a pass with their predictions (the cost model's step of the per-replica batches)
// and the bench_one_batch metrics.
void bench_finish(BenchResult& r, const BenchRun& run);

// The host side of one process per rank (MPI: bench_mpi.hpp), for the per-process bench.
class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;        // in the world of processes
  virtual int size() const = 0;
  virtual int local_rank() const = 0;  // on this node: the GPU it takes (of several visible)
  virtual void barrier() = 0;
  virtual void max_int32(std::span<int32_t> v) = 0;  // element-wise max over the processes, in place
  virtual double broadcast(double v) = 0;            // rank 0's v, in every process
  // Set once the processes entered NCCL communication: a process that fails after that leaves its
  // peers waiting, so the caller aborts the whole job (MPI_Abort) instead of returning.
  bool collective = false;
};

// The checks of a process of a one-process-per-rank run, before any collective: `checks(launch)`
// with the launch this process is part of (pg.size() processes, one rank each, the GPUs it sees),
// then the GPU of its local rank (or the only one visible) made current, then `device_checks()`.
// The processes then agree on the outcome (pg.max_int32 of their exit codes): a process that
// failed rethrows its own error, the others throw "another rank refused / failed", so all of them
// stop and none waits in NCCL for a stopped peer.
struct LaunchShape;
void agree_before_collectives(ProcessGroup& pg, const std::function<void(const LaunchShape&)>& checks,
                              const std::function<void()>& device_checks);

#if MIXSERVE_HAVE_NCCL
// The offline benchmark with one process per rank of the plan (ProcessRank, distributed.hpp):
// every process loads and checks the plan before any device work (world size against pg.size(),
// the GPUs it sees, the model, the rank map: check_plan_for_run), takes the GPU of its local rank
// (or the only one visible), and checks the device; the processes agree on the outcome, so all
// stop when one refuses (InputError; a peer's refusal is named as such). Then make_world(device)
// gives the NCCL world (init_mpi_world), and each process steps its replica's sequences
// (s % attn_dp) with seeded synthetic weights; every step is timed on the host between barriers
// over the processes; the last stage's greedy ids reach every process (pg.max_int32). Every
// process returns the same steps and ids; rank 0's times are the run's. Decode runs eagerly.
// --weights is refused (ProcessRank draws its shard on the device).
BenchResult run_bench_process(const std::string& plan_path, const BenchConfig& cfg, ProcessGroup& pg,
                              const std::function<Comm(int device)>& make_world);
#endif

// Loads and checks the plan, runs the benchmark on the current device. RuntimeError "no GPU"
// without one.
BenchResult run_bench(const std::string& plan_path, const BenchConfig& cfg);
// The same for a plan already in memory; `origin` names it in messages.
BenchResult run_bench(const Plan& plan, const std::string& origin, const BenchConfig& cfg);

// bench_one_batch keys, per-step latencies with predictions, plan, device, versions.
nlohmann::json bench_json(const BenchResult& r);
// The printed report: prefill line, a decode summary every 16 steps, medians, totals, then the
// predicted-vs-measured table (step kind, measured ms, predicted ms, error %) and median errors.
std::string format_bench_report(const BenchResult& r);

}  // namespace mixserve::gpu
