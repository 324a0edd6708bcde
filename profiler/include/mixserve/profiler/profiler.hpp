// mixserve-profile's library side: measures GEMMs, grouped expert GEMMs, elementwise bandwidth,
// peaks and collectives on this machine and fills a HardwareProfile plus result rows (JSON).
// Tables go to the caller's stream in nccl-tests style; progress goes to the progress stream.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/gpu/timing.hpp"

namespace mixserve::profiler {

struct ProfileConfig {
  int device = 0;
  std::string name = "h200";
  std::vector<std::string> models;          // empty: every shipped model (configs/models)
  std::vector<int> tp = {1, 2, 4, 8};
  std::vector<int> ep = {8, 32};
  std::vector<int64_t> m_grid;              // GEMM token sweep; empty: powers of 2 from 1 to 16384
  std::vector<int64_t> generic_dims = {1024, 4096, 16384};
  std::vector<int64_t> expert_rows;         // routed rows sweep; empty: powers of 4 from 4 to 65536
  std::vector<std::string> distributions = {"uniform", "zipf:1.2", "empty:0.5"};
  gpu::TimingOptions timing;                // warm-up, flush; timed_iters is the maximum
  double target_ms_per_point = 25;          // fewer timed runs for long ops (at least min_iters)
  int min_iters = 8;
  // comm (nccl-tests -b -e -f), group sizes: powers of 2 up to the visible GPUs (or `gpus`)
  int64_t comm_min_bytes = 8, comm_max_bytes = int64_t(1) << 30, comm_factor = 2;
  int gpus = 0;
  int comm_iters = 20, comm_warmup = 5;
  bool dry_run = false;                     // list shapes and a roofline time estimate only
};

// cfg.models, or every shipped model when it is empty.
std::vector<std::string> effective_models(const ProfileConfig& cfg);

struct Output {
  std::ostream& table;     // nccl-tests style tables
  std::ostream& progress;  // progress lines
  nlohmann::json rows = nlohmann::json::array();
};

// Provenance fields of `p` from the device (name, SMs, memory, clocks, versions, date, host).
void describe_machine(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
// Peaks measured now: bf16 and fp8 cuBLASLt on 8192^3, fp32 cuBLAS SGEMM on 8192^3, device copy
// bandwidth (read + write) of a 2 GiB cudaMemcpy, and the event-timed duration of a minimal kernel.
void measure_peaks(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
void profile_gemm(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
void profile_experts(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
void profile_elementwise(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
// The executor's attention kernel (paged KV) over decode and prefill shapes of the shipped models'
// head configurations at each TP degree (attention.cpp).
void profile_attention(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
// The executor's expert paths: device grouped GEMV (tagged "gemv:") and eager cuBLASLt with the
// host count copy (tagged "eager:"), core/expert_path.hpp (expert_gemv.cpp).
void profile_expert_gemv(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
// The decode kernels (core/decode_path.hpp): launch_gemv at 1 .. 8 rows over the unsharded GQA
// models' projection shapes (tables.gemv) and launch_grouped_gemv_v2 at 1 .. 8 tokens (expert
// points tagged "gemv2:"), both inside a CUDA graph (gemv.cpp).
void profile_gemv(const ProfileConfig& cfg, HardwareProfile& p, Output& out);
// Collectives on 2, 4, ... GPUs of this node driven by one process (NCCL_NVLS_ENABLE=0).
// Returns the total number of wrong elements (0 expected).
int64_t profile_comm(const ProfileConfig& cfg, HardwareProfile& p, Output& out);

// The fused batch-1 decode layer (HardwareProfile::fused_decode_layer) of the model of a one-GPU
// plan, at each context: two graphed offline benchmarks (gpu/bench.hpp run_bench: batch 1, input
// = the context, `output_len` tokens, --fused-decode-layer, seeded synthetic weights) with the
// model's first layers[0] and layers[1] layers; the difference of their median decode steps over
// the difference of their layers is one layer (the step's embedding, final norm and LM head
// cancel). The added layers must all be MoE layers that ran fused. Replaces the profile's points of
// that layer shape (fused_layer.cpp). InputError for a plan, model or arguments it cannot take.
struct FusedLayerConfig {
  std::string plan;                        // a one-GPU plan (mixserve-plan search ... --cluster h200-1x1)
  std::vector<int64_t> contexts{256, 1024, 4096};
  std::vector<int> layers{2, 8};           // two layer counts, the second larger
  int output_len = 17;                     // 16 decode steps a run
  uint64_t seed = 0;
};
// The checks without a device (arguments, the plan: one GPU, a model the fused layer takes);
// returns the plan. InputError.
Plan check_fused_layer(const FusedLayerConfig& cfg);
void profile_fused_layer(const FusedLayerConfig& cfg, HardwareProfile& p, Output& out);

// The prediction check: times `count` GEMM and expert shapes that are not in the profile's grid
// and compares with the simulator's profile-table timer reading `p`. Returns the median relative
// error |pred - meas| / meas.
double check_predictions(const ProfileConfig& cfg, const HardwareProfile& p, int count, Output& out);

}  // namespace mixserve::profiler
