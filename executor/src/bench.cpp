// Offline one-batch benchmark on one GPU with the simulator's prediction per step (bench.hpp).
#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/bench_mpi.hpp"

#include <cstdint>
#include <cstdlib>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <exception>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/json.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/graph.hpp"
#include "mixserve/gpu/distributed.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/kernels/attention.cuh"
#include "mixserve/kernels/kv_cache.cuh"
#include "mixserve/model/weights.hpp"

namespace mixserve::gpu {
namespace {

constexpr int kDecodeSummaryEvery = 16;  // one printed decode line per this many steps
// CUDA context, cuBLAS/cuBLASLt handles and heuristics, attention workspace, allocator slack:
// kept free on top of the estimate (the H200 context alone takes ~0.5 GiB).
constexpr double kReservedBytes = 1.5 * (1u << 30);
constexpr double kGiB = double(1u << 30);

// The architectures the GPU forward runs, from the weight module's one table.
std::string supported_models() {
  std::string s;
#define MIXSERVE_X(e, arch) s += (s.empty() ? "" : ", ") + std::string(arch);
  MIXSERVE_MODEL_FAMILIES(MIXSERVE_X)
#undef MIXSERVE_X
  std::string dims;
  for (int d : kernels::kAttentionHeadDims) dims += (dims.empty() ? "" : " or ") + std::to_string(d);
  return fmt::format("{} with bf16 weights, GQA/MHA attention and head_dim {}", s, dims);
}

// One sequence's share of a step: `n` new tokens from `position`.
struct SeqChunk {
  int seq = 0;
  int64_t position = 0;
  int64_t n = 0;
};
using StepShape = std::vector<SeqChunk>;

int64_t effective_chunk(const Plan& plan, const BenchConfig& cfg) {
  const RuntimeLimits& l = plan.chosen.limits;
  // Without chunked prefill a prompt is never split: its step takes the whole prompt.
  return l.chunked_prefill ? l.max_num_batched_tokens : std::max<int64_t>(l.max_num_batched_tokens, cfg.input_len);
}

// Prefill chunks (greedy, sequences in order, a long prompt split), then the decode steps.
std::vector<StepShape> step_shapes(const BenchConfig& cfg, int64_t chunk_tokens, int* num_prefill) {
  std::vector<StepShape> steps;
  StepShape cur;
  int64_t budget = chunk_tokens;
  for (int s = 0; s < cfg.batch; ++s) {
    int64_t done = 0;
    while (done < cfg.input_len) {
      const int64_t n = std::min<int64_t>(cfg.input_len - done, budget);
      cur.push_back({s, done, n});
      done += n;
      budget -= n;
      if (budget == 0) {
        steps.push_back(std::move(cur));
        cur.clear();
        budget = chunk_tokens;
      }
    }
  }
  if (!cur.empty()) steps.push_back(std::move(cur));
  *num_prefill = static_cast<int>(steps.size());
  for (int d = 0; d + 1 < cfg.output_len; ++d) {
    StepShape st;
    for (int s = 0; s < cfg.batch; ++s) st.push_back({s, int64_t(cfg.input_len) + d, 1});
    steps.push_back(std::move(st));
  }
  return steps;
}

// The cost model's view of a step (as simulator/serving.cpp forms it): a decode is one new token
// attending to its whole context, itself included; a prefill chunk attends causally.
sim::ReplicaBatch replica_batch(const StepShape& st, bool decode) {
  sim::ReplicaBatch b;
  for (const auto& c : st) {
    if (decode) {
      ++b.num_decode;
      b.decode_context += c.position + 1;
    } else {
      b.prefill_tokens += c.n;
      ++b.num_prefill_seqs;
      b.prefill_attn_pairs += double(c.n) * (double(c.position) + double(c.n + 1) / 2.0);
    }
  }
  return b;
}

int64_t blocks_per_seq(const BenchConfig& cfg) {
  return (int64_t(cfg.input_len) + cfg.output_len + cfg.block_size - 1) / cfg.block_size;
}

double median_of(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int32_t argmax_row(const float* row, int64_t vocab) {
  return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
}

// One pass of the benchmark: the prefill chunks then the decode steps, every step timed.
BenchRun run_once(GpuModel& g, const BenchConfig& cfg, const std::vector<StepShape>& shapes, int num_prefill,
                   const std::vector<std::vector<int32_t>>& prompts, bool decode_graph) {
  const int64_t vocab = g.spec().vocab_size;
  const int64_t nb = blocks_per_seq(cfg);
  cudaStream_t s = g.stream();
  BenchRun out;
  out.output_ids.assign(std::size_t(cfg.batch), {});
  Event start, stop;
  StepGraph graph;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool decode = int(i) >= num_prefill;
    std::vector<model::SequenceStep> batch;
    for (const auto& c : shapes[i]) {
      model::SequenceStep q;
      if (decode) {
        q.tokens = {out.output_ids[std::size_t(c.seq)].back()};
      } else {
        const auto& p = prompts[std::size_t(c.seq)];
        q.tokens.assign(p.begin() + c.position, p.begin() + c.position + c.n);
      }
      q.position = c.position;
      for (int64_t b = 0; b < nb; ++b) q.block_table.push_back(static_cast<int32_t>(c.seq * nb + b));
      batch.push_back(std::move(q));
    }
    g.prepare(batch, StepOptions{});
    const bool use_graph = decode && decode_graph;
    if (use_graph) {
      // The first capture follows an eager run of the same shape (cuBLASLt plans are made outside
      // the capture); rewriting the step's KV slots with the same values is harmless.
      if (!graph.ready()) {
        g.enqueue(s);
        MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
      }
      graph.capture(s, [&](cudaStream_t cs) { g.enqueue(cs); });
    }
    start.record(s);
    if (use_graph)
      graph.launch(s);
    else
      g.enqueue(s);
    stop.record(s);
    const GpuStepOutput res = g.collect(s);
    out.step_ms.push_back(double(Event::elapsed_ms(start, stop)));
    out.graph.push_back(use_graph);
    for (std::size_t k = 0; k < shapes[i].size(); ++k) {
      const SeqChunk& c = shapes[i][k];
      if (!decode && c.position + c.n < cfg.input_len) continue;  // prompt not finished in this chunk
      out.output_ids[std::size_t(c.seq)].push_back(argmax_row(&res.logits[k * std::size_t(vocab)], vocab));
    }
  }
  return out;
}

// The same pass over a multi-GPU plan's ranks emulated on one GPU: sequence s goes to attention-DP
// replica s % dp; a step is timed on the host from the first rank's enqueue to the last rank's
// completion (all ranks prepared before).
BenchRun run_once_ranks(EmulatedRanks& e, const BenchConfig& cfg, const std::vector<StepShape>& shapes,
                         int num_prefill, const std::vector<std::vector<int32_t>>& prompts, int64_t vocab) {
  const int64_t nb = blocks_per_seq(cfg);
  const int dp = e.layout().attn_dp;
  BenchRun out;
  out.output_ids.assign(std::size_t(cfg.batch), {});
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool decode = int(i) >= num_prefill;
    std::vector<std::vector<model::SequenceStep>> per(static_cast<std::size_t>(dp));
    std::vector<std::pair<int, int>> where;  // chunk -> (replica, row in its outputs)
    for (const auto& c : shapes[i]) {
      model::SequenceStep q;
      if (decode) {
        q.tokens = {out.output_ids[std::size_t(c.seq)].back()};
      } else {
        const auto& p = prompts[std::size_t(c.seq)];
        q.tokens.assign(p.begin() + c.position, p.begin() + c.position + c.n);
      }
      q.position = c.position;
      const int d = c.seq % dp, local = c.seq / dp;  // the replica's own block pool
      for (int64_t b = 0; b < nb; ++b) q.block_table.push_back(static_cast<int32_t>(local * nb + b));
      where.emplace_back(d, int(per[std::size_t(d)].size()));
      per[std::size_t(d)].push_back(std::move(q));
    }
    e.prepare(per, StepOptions{});
    const auto t0 = std::chrono::steady_clock::now();
    e.enqueue_and_wait();
    const auto t1 = std::chrono::steady_clock::now();
    const auto res = e.collect();
    out.step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    out.graph.push_back(false);
    for (std::size_t k = 0; k < shapes[i].size(); ++k) {
      const SeqChunk& c = shapes[i][k];
      if (!decode && c.position + c.n < cfg.input_len) continue;
      const auto [d, row] = where[k];
      out.output_ids[std::size_t(c.seq)].push_back(
          argmax_row(&res[std::size_t(d)].logits[std::size_t(row) * std::size_t(vocab)], vocab));
    }
  }
  return out;
}

// The cost model's replicas of a step: the chunks of each attention-DP replica (s % dp).
std::vector<sim::ReplicaBatch> replica_batches(const StepShape& st, bool decode, int dp) {
  std::vector<StepShape> per(static_cast<std::size_t>(dp));
  for (const auto& c : st) per[std::size_t(c.seq % dp)].push_back(c);
  std::vector<sim::ReplicaBatch> out;
  for (const auto& p : per) out.push_back(replica_batch(p, decode));
  return out;
}

}  // namespace

nlohmann::json device_info_json(const DeviceInfo& d) {
  nlohmann::json versions = nlohmann::json::object();
  for (const auto& [k, v] : d.versions) versions[k] = v;
  return {{"index", d.device},        {"name", d.name},
          {"sm_count", d.sm_count},   {"compute_capability", fmt::format("{}.{}", d.cc_major, d.cc_minor)},
          {"memory_GiB", d.memory_GiB}, {"l2_bytes", d.l2_bytes},
          {"sm_clock_MHz", d.sm_clock_MHz}, {"mem_clock_MHz", d.mem_clock_MHz},
          {"versions", versions}};
}

void check_single_gpu_plan(const Plan& plan, const std::string& origin, MultiGpuPlan multi) {
  const Layout& l = plan.chosen.layout;
  const int world = std::max(l.world_size(), plan.cluster.world_size());
  if (world != 1 && multi != MultiGpuPlan::allowed)
    throw InputError(fmt::format(
        "{}: the plan's layout '{}' on cluster {} ({} x {} {}) spans {} GPUs; give --emulate-ranks (its ranks as "
        "logical ranks on this one GPU) or --gpu-per-rank (a GPU per rank, NCCL), or run it under mpirun "
        "with --mpi (a process per GPU); or make a plan for a 1-GPU cluster, e.g. configs/clusters/h200-1x1.yaml",
        origin, l.name(), plan.cluster.name, plan.cluster.num_nodes, plan.cluster.gpus_per_node,
        plan.cluster.gpu_model, world));
  const ModelSpec& m = plan.model;
  auto unsupported = [&](const std::string& what) {
    throw InputError(fmt::format("{}: model '{}' ({}): {} is not supported by the GPU forward; supported: {}", origin,
                                 m.name, m.architecture, what, supported_models()));
  };
  try {
    (void)model::family_of(m);
  } catch (const InputError&) {
    unsupported(fmt::format("architecture '{}'", m.architecture));
  }
  const std::pair<const char*, DType> dtypes[] = {{"weight_dtype", m.weight_dtype},
                                                  {"expert_weight_dtype", m.expert_weight_dtype},
                                                  {"activation_dtype", m.activation_dtype},
                                                  {"kv_dtype", m.kv_dtype}};
  for (const auto& [k, d] : dtypes)
    if (d != DType::bf16) unsupported(fmt::format("{} {}", k, to_string(d)));
  if (m.attention.type == AttentionType::mla) unsupported("MLA attention");
  if (std::find(kernels::kAttentionHeadDims.begin(), kernels::kAttentionHeadDims.end(), m.attention.head_dim) ==
      kernels::kAttentionHeadDims.end())
    unsupported(fmt::format("head_dim {}", m.attention.head_dim));
}

void check_bench_plan(const Plan& plan, const BenchConfig& cfg, const std::string& origin) {
  check_single_gpu_plan(plan, origin,
                        cfg.emulate_ranks || cfg.gpu_per_rank || cfg.process_per_rank ? MultiGpuPlan::allowed
                                                                                      : MultiGpuPlan::needs_flag);
  if (int(cfg.emulate_ranks) + int(cfg.gpu_per_rank) + int(cfg.process_per_rank) > 1)
    throw InputError("--emulate-ranks, --gpu-per-rank and --mpi exclude each other");
  if (cfg.fused_decode_layer && (cfg.emulate_ranks || cfg.gpu_per_rank || cfg.process_per_rank))
    throw InputError("--fused-decode-layer: one-GPU plans only (the sharded forward does not run it)");
  if (cfg.process_per_rank && !cfg.weights_dir.empty())
    throw InputError("--weights with --mpi: not built (each process draws its shard's synthetic weights on the "
                     "device); use --emulate-ranks or --gpu-per-rank with --weights");
  const ModelSpec& m = plan.model;
  auto bad_arg = [&](const char* opt, int64_t v, const std::string& want) {
    throw InputError(fmt::format("{} {}: expected {}", opt, v, want));
  };
  if (cfg.batch < 1) bad_arg("--batch", cfg.batch, ">= 1");
  if (cfg.input_len < 1) bad_arg("--input-len", cfg.input_len, ">= 1");
  if (cfg.output_len < 1) bad_arg("--output-len", cfg.output_len, ">= 1");
  if (cfg.warmup < 0) bad_arg("--warmup", cfg.warmup, ">= 0");
  if (cfg.num_layers < 0 || cfg.num_layers > m.num_layers)
    bad_arg("--num-layers", cfg.num_layers, fmt::format("0 (all) to the model's {} layers", m.num_layers));
  if (std::find(kernels::kKvBlockTokens.begin(), kernels::kKvBlockTokens.end(), cfg.block_size) ==
      kernels::kKvBlockTokens.end())
    bad_arg("block size", cfg.block_size, "8, 16 or 32");
  const RuntimeLimits& lim = plan.chosen.limits;
  if (cfg.batch > lim.max_num_seqs)
    bad_arg("--batch", cfg.batch, fmt::format("<= the plan's limits.max_num_seqs {} ({})", lim.max_num_seqs, origin));
  if (lim.max_num_batched_tokens < 1)
    throw_input_error(origin, "limits.max_num_batched_tokens", ">= 1", std::to_string(lim.max_num_batched_tokens));
  if (cfg.batch > effective_chunk(plan, cfg))
    bad_arg("--batch", cfg.batch,
            fmt::format("<= the plan's limits.max_num_batched_tokens {} (one decode step of every sequence)",
                        lim.max_num_batched_tokens));
  const int64_t max_len = lim.max_model_len > 0 ? lim.max_model_len : m.max_position_embeddings;
  if (max_len > 0 && int64_t(cfg.input_len) + cfg.output_len > max_len)
    bad_arg("--input-len + --output-len", int64_t(cfg.input_len) + cfg.output_len,
            fmt::format("<= {} (the plan's max_model_len or the model's max_position_embeddings)", max_len));
}

void check_device_matches(const Plan& plan, const std::string& device_name, const std::string& origin) {
  const std::string want = plan.cluster.gpu_model;
  auto lower = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    return s;
  };
  // Whole-word match: "H200" in "NVIDIA H200", not "H20" in "NVIDIA H200".
  const std::string dev = " " + lower(device_name) + " ", key = lower(want);
  bool found = false;
  for (std::size_t p = dev.find(key); !key.empty() && p != std::string::npos; p = dev.find(key, p + 1)) {
    const char before = dev[p - 1], after = dev[p + key.size()];
    if (!std::isalnum(static_cast<unsigned char>(before)) && !std::isalnum(static_cast<unsigned char>(after)))
      found = true;
  }
  if (!found)
    throw InputError(fmt::format("{}: the plan is for GPU model '{}' (cluster {}), but the device is '{}'", origin,
                                 want, plan.cluster.name, device_name));
}

ModelSpec bench_model(const Plan& plan, const BenchConfig& cfg) {
  return cfg.num_layers > 0 ? model::with_num_layers(plan.model, cfg.num_layers) : plan.model;
}

BenchMemory estimate_bench_memory(const ModelSpec& m, const BenchConfig& cfg, int64_t chunk_tokens) {
  BenchMemory mem;
  mem.weights = weight_bytes(m);
  const double kvw = double(m.attention.num_kv_heads) * m.attention.head_dim;
  const double blocks = double(cfg.batch) * double(blocks_per_seq(cfg));
  mem.kv_cache = 2.0 * m.num_layers * blocks * cfg.block_size * kvw * 2.0;
  // The activation buffers of GpuModel::allocate for its max_tokens_per_step rows.
  const double T = double(std::max<int64_t>(std::min<int64_t>(chunk_tokens, int64_t(cfg.batch) * cfg.input_len),
                                            cfg.batch));
  const double H = m.hidden_size, QW = double(m.q_width()), K = std::max(m.moe.top_k, 1), E = m.moe.num_experts;
  const double I = m.moe.expert_intermediate_size, S = m.moe.shared_intermediate_size, D = m.dense_intermediate_size;
  const double rows = T * K;
  const double ffn = std::max({rows * 3 * I, T * 3 * S, T * 3 * D});  // gate|up and SwiGLU output
  const double bf16_elems = T * (5 * H + 2 * QW + 2 * kvw + m.vocab_size) + ffn + 2 * rows * H;
  const double f32_elems = T * E + rows + T;
  // Attention workspace: fp32 partial outputs of the split-K decode / prefill tiles, bounded by
  // the query rows times the q width, twice over.
  const double attn_ws = 2.0 * T * QW * 4;
  mem.activations = 2 * bf16_elems + 4 * f32_elems + 4 * rows * 4 + attn_ws + 2.0 * double(LtGemm::kWorkspaceBytes);
  mem.reserved = kReservedBytes;
  return mem;
}

BenchMemory emulated_ranks_memory(BenchMemory one, const ModelSpec& m, int ranks) {
  one.weights += double(ranks - 1) * 2.0 *
                 (2.0 * double(m.vocab_size) * m.hidden_size +
                  double(m.num_moe_layers()) * m.moe.num_experts * m.hidden_size);
  one.activations *= ranks;
  return one;
}

std::vector<sim::ReplicaBatch> bench_step_batches(const BenchConfig& cfg, int64_t chunk_tokens) {
  int num_prefill = 0;
  const auto shapes = step_shapes(cfg, chunk_tokens, &num_prefill);
  std::vector<sim::ReplicaBatch> out;
  for (std::size_t i = 0; i < shapes.size(); ++i) out.push_back(replica_batch(shapes[i], int(i) >= num_prefill));
  return out;
}

BenchResult run_bench(const std::string& plan_path, const BenchConfig& cfg) {
  BenchResult r = run_bench(load_plan(plan_path), plan_path, cfg);
  r.plan_sha256 = sha256_hex(read_text_file(plan_path));
  return r;
}

BenchResult run_bench(const Plan& plan, const std::string& plan_path, const BenchConfig& cfg) {
  BenchResult r = bench_check(plan, plan_path, cfg);
  const int ndev = device_count_or_zero();
  if (ndev == 0) throw RuntimeError("mixserve-run bench: no GPU (no CUDA device is visible)");
  bench_device_check(r, r.emulated ? r.ranks : 1);

  const GpuModelConfig gc = bench_gpu_config(r);
  std::unique_ptr<GpuModel> g;
  std::unique_ptr<EmulatedRanks> ranks;
  if (r.ranks > 1) {
    const Placement where = cfg.gpu_per_rank ? Placement::gpu_per_rank : Placement::one_gpu;
    if (cfg.weights_dir.empty()) {
      ranks = std::make_unique<EmulatedRanks>(r.model, cfg.seed, r.plan.cluster, r.plan.chosen.layout, gc, where);
    } else {
      const model::WeightSet w = model::load_weights(r.plan.model, cfg.weights_dir, cfg.num_layers);
      ranks = std::make_unique<EmulatedRanks>(w, r.plan.cluster, r.plan.chosen.layout, gc, where);
    }
  } else if (cfg.weights_dir.empty()) {
    g = std::make_unique<GpuModel>(r.model, cfg.seed, gc);
  } else {
    const model::WeightSet w = model::load_weights(r.plan.model, cfg.weights_dir, cfg.num_layers);
    g = std::make_unique<GpuModel>(w, gc);
  }
  // Decode steps go into a CUDA graph when the automatic expert path picks the device GEMV.
  const bool decode_graph = cfg.cuda_graph && decode_step_graphable(r.model, gc, cfg.batch);

  const auto prompts = bench_prompts(cfg, r.model.vocab_size);
  int num_prefill = 0;
  const auto shapes = step_shapes(cfg, r.prefill_chunk_tokens, &num_prefill);
  auto pass = [&] {
    return ranks ? run_once_ranks(*ranks, cfg, shapes, num_prefill, prompts, r.model.vocab_size)
                 : run_once(*g, cfg, shapes, num_prefill, prompts, decode_graph);
  };
  for (int w = 0; w < cfg.warmup; ++w) {
    (void)pass();
    if (ranks)
      ranks->reset_cache();
    else
      g->reset_cache();
  }
  const BenchRun measured = pass();
  if (g) r.fused_layers_run = g->fused_layers_run();
  bench_finish(r, measured);
  return r;
}

BenchResult bench_check(const Plan& plan, const std::string& plan_path, const BenchConfig& cfg,
                        const LaunchShape* launch) {
  BenchResult r;
  r.config = cfg;
  r.plan_path = plan_path;
  r.plan_sha256 = sha256_hex(plan_to_yaml(plan));
  r.plan = plan;
  validate_plan(r.plan, plan_path);
  check_bench_plan(r.plan, cfg, plan_path);
  r.model = bench_model(r.plan, cfg);
  r.prefill_chunk_tokens = effective_chunk(r.plan, cfg);
  r.ranks = r.plan.chosen.layout.world_size();
  r.emulated = r.ranks > 1 && cfg.emulate_ranks;
  // The executor's checks of a multi-GPU plan (or of any plan launched as processes).
  const LaunchShape here{r.ranks, cfg.gpu_per_rank ? r.ranks : 1, std::max(device_count_or_zero(), 1)};
  if (launch || r.ranks > 1) check_plan_for_run(r.plan, r.plan.model, launch ? *launch : here);
  r.cost_model = "mixserve";
  r.profile_name = cfg.profile.empty() ? r.plan.profile_name : cfg.profile;
  (void)load_profile(r.profile_name);  // a bad profile fails before the run
  return r;
}

void bench_device_check(BenchResult& r, int ranks_here) {
  const BenchConfig& cfg = r.config;
  int dev = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  const DeviceInfo info = query_device(dev);
  r.device_name = info.name;
  r.device = device_info_json(info);
  check_device_matches(r.plan, info.name, r.plan_path);
  r.memory = estimate_bench_memory(r.model, cfg, r.prefill_chunk_tokens);
  if (ranks_here > 1) r.memory = emulated_ranks_memory(r.memory, r.model, ranks_here);
  std::size_t free_b = 0, total_b = 0;
  MIXSERVE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  r.memory.free_device = double(free_b);
  if (r.memory.total() > r.memory.free_device)
    throw InputError(fmt::format(
        "{}: not enough device memory for {} ({} layers, batch {}, {} + {} tokens): need {:.2f} GiB (weights {:.2f}, "
        "KV cache {:.2f}, activations {:.2f}, reserve {:.2f}) but {} has {:.2f} GiB free; use --num-layers or a "
        "smaller --batch",
        r.plan_path, r.model.name, r.model.num_layers, cfg.batch, cfg.input_len, cfg.output_len,
        r.memory.total() / kGiB, r.memory.weights / kGiB, r.memory.kv_cache / kGiB, r.memory.activations / kGiB,
        r.memory.reserved / kGiB, info.name, r.memory.free_device / kGiB));
}

GpuModelConfig bench_gpu_config(const BenchResult& r) {
  const BenchConfig& cfg = r.config;
  GpuModelConfig gc;
  gc.block_size = cfg.block_size;
  gc.fused_decode_layer = cfg.fused_decode_layer;
  gc.max_seqs_per_step = cfg.batch;
  gc.max_blocks_per_seq = static_cast<int>(blocks_per_seq(cfg));
  gc.num_blocks = static_cast<int>(int64_t(cfg.batch) * blocks_per_seq(cfg));
  gc.max_tokens_per_step = static_cast<int>(
      std::max<int64_t>(std::min<int64_t>(r.prefill_chunk_tokens, int64_t(cfg.batch) * cfg.input_len), cfg.batch));
  if (r.ranks > 1) {  // every replica's block pool holds the sequences dealt to it
    const int dp = r.plan.chosen.layout.attn_dp;
    gc.num_blocks = static_cast<int>(int64_t((cfg.batch + dp - 1) / dp) * blocks_per_seq(cfg));
  }
  return gc;
}

std::vector<std::vector<int32_t>> bench_prompts(const BenchConfig& cfg, int64_t vocab) {
  std::mt19937_64 rng(cfg.seed);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> prompts(std::size_t(cfg.batch));
  for (auto& p : prompts)
    for (int i = 0; i < cfg.input_len; ++i) p.push_back(tok(rng));
  return prompts;
}

void bench_finish(BenchResult& r, const BenchRun& run) {
  const BenchConfig& cfg = r.config;
  // The prediction: the simulator's cost model for the plan's layout, the model that runs.
  const HardwareProfile profile = load_profile(r.profile_name);
  // Per step the model of how it ran: decode steps as CUDA graphs or eagerly (graph_launch saving).
  sim::CostModelOptions graphed, eager;
  eager.decode_graphs = false;
  // --fused-decode-layer: the fused layers from the profile's points of the model's layer shape.
  graphed.fused_decode_layer = eager.fused_decode_layer = cfg.fused_decode_layer;
  r.fused_predicted = r.cost_model == "mixserve" &&
                      sim::fused_layer_costed(r.model, r.plan.chosen.layout, profile, graphed);
  const auto cm = sim::make_cost_model(r.cost_model, r.model, r.plan.cluster, profile, r.plan.chosen.layout, graphed);
  const auto cm_eager =
      sim::make_cost_model(r.cost_model, r.model, r.plan.cluster, profile, r.plan.chosen.layout, eager);
  int num_prefill = 0;
  const auto shapes = step_shapes(cfg, r.prefill_chunk_tokens, &num_prefill);
  if (run.step_ms.size() != shapes.size() || run.graph.size() != shapes.size())
    throw RuntimeError(fmt::format("bench: {} step times for {} steps", run.step_ms.size(), shapes.size()));
  r.output_ids = run.output_ids;
  r.steps.clear();
  std::vector<double> decode_ms, prefill_err, decode_err;
  double prefill_s = 0, total_s = 0;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool decode = int(i) >= num_prefill;
    BenchStep st;
    st.kind = decode ? "decode" : "prefill";
    st.index = decode ? int(i) - num_prefill : int(i);
    st.num_seqs = static_cast<int>(shapes[i].size());
    for (const auto& c : shapes[i]) st.num_tokens += c.n;
    st.cuda_graph = run.graph[i];
    st.batch = replica_batch(shapes[i], decode);
    st.measured_ms = run.step_ms[i];
    st.replicas = replica_batches(shapes[i], decode, r.plan.chosen.layout.attn_dp);
    // The GPU part: the measurement is CUDA events around the forward, without the host's per-step
    // overhead that the cost model adds from the profile (host_overhead).
    const auto& model_of_step = st.cuda_graph ? *cm : *cm_eager;
    st.predicted_ms =
        (model_of_step.step(std::span<const sim::ReplicaBatch>(st.replicas), false).time_us -
         profile.host_overhead.step_us) /
        1e3;
    total_s += st.measured_ms / 1e3;
    if (decode) {
      decode_ms.push_back(st.measured_ms);
      decode_err.push_back(st.error_pct());
    } else {
      prefill_s += st.measured_ms / 1e3;
      prefill_err.push_back(st.error_pct());
    }
    r.steps.push_back(st);
  }
  r.prefill_latency = prefill_s;
  r.prefill_throughput = prefill_s > 0 ? double(cfg.batch) * cfg.input_len / prefill_s : 0;
  r.median_decode_latency = median_of(decode_ms) / 1e3;
  r.median_decode_throughput = r.median_decode_latency > 0 ? cfg.batch / r.median_decode_latency : 0;
  r.total_latency = total_s;
  r.overall_throughput = total_s > 0 ? double(cfg.batch) * (cfg.input_len + cfg.output_len) / total_s : 0;
  r.median_prefill_error_pct = median_of(prefill_err);
  r.median_decode_error_pct = median_of(decode_err);
}

void agree_before_collectives(ProcessGroup& pg, const std::function<void(const LaunchShape&)>& checks,
                              const std::function<void()>& device_checks) {
  int code = 0;
  std::exception_ptr failed;
  try {
    const int ndev = device_count_or_zero();
    checks(LaunchShape{pg.size(), 1, std::max(ndev, 1)});
    if (ndev == 0) throw RuntimeError("mixserve-run bench: no GPU (no CUDA device is visible)");
    const int device = ndev == 1 ? 0 : pg.local_rank();
    if (device >= ndev)
      throw InputError(fmt::format("rank {}: local rank {} on a node with {} visible GPUs: launch at most {} "
                                   "processes per node", pg.rank(), pg.local_rank(), ndev, ndev));
    MIXSERVE_CUDA_CHECK(cudaSetDevice(device));
    device_checks();
  } catch (const InputError&) {
    code = 2;
    failed = std::current_exception();
  } catch (...) {
    code = 1;
    failed = std::current_exception();
  }
  std::vector<int32_t> worst{code};
  pg.max_int32(worst);
  if (failed) std::rethrow_exception(failed);
  if (worst[0] == 2) throw InputError("another rank refused the run (its message says why)");
  if (worst[0] != 0) throw RuntimeError("another rank failed before the run (its message says why)");
}

int launcher_env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return (end && *end == '\0' && x >= 0 && x <= INT32_MAX) ? static_cast<int>(x) : -1;
}

int launcher_world_size() {
  for (const char* k : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (launcher_env_int(k) > 0) return launcher_env_int(k);
  if (std::getenv("PMIX_RANK") && launcher_env_int("SLURM_NTASKS") > 0) return launcher_env_int("SLURM_NTASKS");
  return 0;
}

#if MIXSERVE_HAVE_NCCL
namespace {

// One pass of the benchmark in this process's rank (ProcessRank): the rank steps its replica's
// sequences (s % dp, block tables of its own pool); every step is bracketed by barriers over the
// processes and timed on the host between them; the last stage's greedy ids reach every process
// (an element-wise max over the processes of per-sequence ids, -1 elsewhere), so the first stage
// feeds them next step and rank 0 holds every sequence's tokens.
BenchRun run_once_process(ProcessRank& pr, ProcessGroup& pg, const Layout& layout, const BenchConfig& cfg,
                          const std::vector<StepShape>& shapes, int num_prefill,
                          const std::vector<std::vector<int32_t>>& prompts, int64_t vocab) {
  const int64_t nb = blocks_per_seq(cfg);
  const int dp = layout.attn_dp, d = pr.replica();
  const bool last_stage = pr.rank() / layout.stage_size() == layout.pp - 1;
  GpuModel& g = pr.model();
  BenchRun out;
  out.output_ids.assign(std::size_t(cfg.batch), {});
  std::vector<int32_t> ids(std::size_t(cfg.batch));
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const bool decode = int(i) >= num_prefill;
    std::vector<model::SequenceStep> batch;
    std::vector<int> seq_of;  // row of this rank's batch -> sequence
    for (const auto& c : shapes[i]) {
      if (c.seq % dp != d) continue;
      model::SequenceStep q;
      if (decode) {
        q.tokens = {out.output_ids[std::size_t(c.seq)].back()};
      } else {
        const auto& p = prompts[std::size_t(c.seq)];
        q.tokens.assign(p.begin() + c.position, p.begin() + c.position + c.n);
      }
      q.position = c.position;
      for (int64_t b = 0; b < nb; ++b) q.block_table.push_back(static_cast<int32_t>((c.seq / dp) * nb + b));
      batch.push_back(std::move(q));
      seq_of.push_back(c.seq);
    }
    g.prepare(batch, StepOptions{});
    pg.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    g.enqueue(g.stream());
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
    pg.barrier();
    const auto t1 = std::chrono::steady_clock::now();
    const GpuStepOutput res = g.collect(g.stream());
    std::fill(ids.begin(), ids.end(), -1);
    if (last_stage)
      for (std::size_t k = 0; k < seq_of.size(); ++k)
        ids[std::size_t(seq_of[k])] = argmax_row(&res.logits[k * std::size_t(vocab)], vocab);
    pg.max_int32(ids);
    out.step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    out.graph.push_back(false);
    for (const auto& c : shapes[i]) {
      if (!decode && c.position + c.n < cfg.input_len) continue;  // prompt not finished in this chunk
      if (ids[std::size_t(c.seq)] < 0)
        throw RuntimeError(fmt::format("rank {}: no greedy id for sequence {} after step {}", pr.rank(), c.seq, i));
      out.output_ids[std::size_t(c.seq)].push_back(ids[std::size_t(c.seq)]);
    }
  }
  return out;
}

}  // namespace

BenchResult run_bench_process(const std::string& plan_path, const BenchConfig& config, ProcessGroup& pg,
                              const std::function<Comm(int device)>& make_world) {
  BenchConfig cfg = config;
  cfg.process_per_rank = true;
  // Every check before any collective; the processes agree on the outcome, so that all of them
  // stop (each with its own message) when one fails, and none waits in NCCL for a stopped peer.
  BenchResult r;
  agree_before_collectives(
      pg,
      [&](const LaunchShape& launch) {
        r = bench_check(load_plan(plan_path), plan_path, cfg, &launch);
        r.plan_sha256 = sha256_hex(read_text_file(plan_path));
      },
      [&] { bench_device_check(r, 1); });

  pg.collective = true;  // from here a failing rank leaves its peers waiting: the caller aborts
  int dev = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  const Comm world = make_world(dev);
  const Layout& layout = r.plan.chosen.layout;
  ProcessRank pr(world, r.model, cfg.seed, r.plan.cluster, layout, bench_gpu_config(r));
  const auto prompts = bench_prompts(cfg, r.model.vocab_size);
  int num_prefill = 0;
  const auto shapes = step_shapes(cfg, r.prefill_chunk_tokens, &num_prefill);
  for (int w = 0; w < cfg.warmup; ++w) {
    (void)run_once_process(pr, pg, layout, cfg, shapes, num_prefill, prompts, r.model.vocab_size);
    pr.model().reset_cache();
  }
  bench_finish(r, run_once_process(pr, pg, layout, cfg, shapes, num_prefill, prompts, r.model.vocab_size));
  return r;
}
#endif

nlohmann::json bench_json(const BenchResult& r) {
  const BenchConfig& c = r.config;
  nlohmann::json steps = nlohmann::json::array();
  std::vector<double> prefill_ms, decode_ms;
  auto batch_json = [](const sim::ReplicaBatch& b) {
    return nlohmann::json{{"prefill_tokens", b.prefill_tokens},
                          {"num_prefill_seqs", b.num_prefill_seqs},
                          {"prefill_attn_pairs", b.prefill_attn_pairs},
                          {"num_decode", b.num_decode},
                          {"decode_context", b.decode_context}};
  };
  for (const auto& s : r.steps) {
    (s.kind == "decode" ? decode_ms : prefill_ms).push_back(s.measured_ms);
    steps.push_back({{"kind", s.kind},
                     {"index", s.index},
                     {"num_seqs", s.num_seqs},
                     {"num_tokens", s.num_tokens},
                     {"cuda_graph", s.cuda_graph},
                     {"measured_ms", s.measured_ms},
                     {"predicted_ms", s.predicted_ms},
                     {"error_pct", s.error_pct()},
                     {"batch", batch_json(s.batch)}});
    // Several replicas: the cost model was given each replica's batch (validate re-predicts them).
    if (s.replicas.size() > 1) {
      nlohmann::json reps = nlohmann::json::array();
      for (const auto& b : s.replicas) reps.push_back(batch_json(b));
      steps.back()["replicas"] = std::move(reps);
    }
  }
  nlohmann::json versions = r.device.contains("versions") ? r.device["versions"] : nlohmann::json::object();
  versions["mixserve"] = kMixServeVersion;
  const Plan& p = r.plan;
  return {
      {"run_name", "mixserve-run bench"},
      {"mode", "offline"},
      {"ranks", r.ranks},
      {"emulated_ranks", r.emulated},
      // How the ranks ran: one GPU, emulated on one GPU, a thread per GPU, a process per GPU (MPI).
      {"launch", launch_name(c.process_per_rank, r.emulated, r.ranks)},
      // The MoE communication the forward ran: the plan's schedule ("ep", "fused", "rs-a2a-ag") or
      // "none" (the all-reduce / gather exchange; docs/distributed.md).
      {"moe_schedule", gpu::to_string(r.ranks > 1 ? moe_sched_for(r.plan.chosen.layout, r.model) : MoeSched::none)},
      {"batch_size", c.batch},
      {"input_len", c.input_len},
      {"output_len", c.output_len},
      {"prefill_latency", r.prefill_latency},
      {"prefill_throughput", r.prefill_throughput},
      {"median_decode_latency", r.median_decode_latency},
      {"median_decode_throughput", r.median_decode_throughput},
      {"total_latency", r.total_latency},
      {"overall_throughput", r.overall_throughput},
      {"prefill_latencies_ms", prefill_ms},
      {"decode_latencies_ms", decode_ms},
      {"median_prefill_error_pct", r.median_prefill_error_pct},
      {"median_decode_error_pct", r.median_decode_error_pct},
      {"steps", steps},
      {"output_ids", r.output_ids},
      {"model", {{"name", r.model.name}, {"architecture", r.model.architecture}, {"num_layers", r.model.num_layers},
                 {"full_num_layers", p.model.num_layers}}},
      {"weights", c.weights_dir.empty() ? nlohmann::json{{"kind", "synthetic"}, {"seed", c.seed}}
                                        : nlohmann::json{{"kind", "safetensors"}, {"path", c.weights_dir}}},
      {"args", {{"seed", c.seed}, {"warmup", c.warmup}, {"num_layers", c.num_layers}, {"cuda_graph", c.cuda_graph},
                {"fused_decode_layer", c.fused_decode_layer},
                {"block_size", c.block_size}, {"prefill_chunk_tokens", r.prefill_chunk_tokens}}},
      {"plan", {{"path", r.plan_path}, {"sha256", r.plan_sha256}, {"model", p.model.name}, {"layout", p.chosen.layout.name()}, {"cluster", p.cluster.name},
                {"gpu_model", p.cluster.gpu_model}, {"limits", to_json(p.chosen.limits)},
                {"provenance", {{"tool", p.provenance.tool}, {"created", p.provenance.created}}}}},
      {"prediction", {{"cost_model", r.cost_model}, {"profile", r.profile_name}, {"fused_decode_layer", r.fused_predicted}}},
      {"memory_estimate_bytes", {{"weights", r.memory.weights}, {"kv_cache", r.memory.kv_cache},
                                 {"activations", r.memory.activations}, {"reserved", r.memory.reserved},
                                 {"free_device", r.memory.free_device}}},
      {"device", r.device},
      {"versions", versions},
      {"date", now_iso8601_utc()},
  };
}

std::string format_bench_report(const BenchResult& r) {
  const BenchConfig& c = r.config;
  std::string o;
  auto line = [&](const std::string& s) { o += s + "\n"; };
  line(fmt::format("# mixserve-run bench {} | plan {} ({}, {})", kMixServeVersion, r.plan_path,
                   r.plan.chosen.layout.name(), r.plan.cluster.name));
  line(fmt::format("# model {} ({} of {} layers), weights {}, batch {}, input {}, output {}, warmup {}, seed {}",
                   r.model.name, r.model.num_layers, r.plan.model.num_layers,
                   c.weights_dir.empty() ? std::string("synthetic") : c.weights_dir, c.batch, c.input_len,
                   c.output_len, c.warmup, c.seed));
  line(fmt::format("# device {} | prefill chunk {} tokens | memory estimate {:.2f} GiB of {:.2f} GiB free",
                   r.device_name, r.prefill_chunk_tokens, r.memory.total() / kGiB, r.memory.free_device / kGiB));
  if (c.fused_decode_layer && c.batch != 1)
    line("# --fused-decode-layer: not used (it runs steps of one sequence; batch > 1)");
  else if (c.fused_decode_layer)
    line(fmt::format(
        "# --fused-decode-layer: the decode steps run the MoE layers it supports (no shared expert, no q/k/v bias) "
        "as the fused batch-1 layer ({} fused layer runs enqueued, warm-ups and graph captures included); {}",
        r.fused_layers_run,
        r.fused_predicted
            ? "the prediction takes their time from the profile's fused_decode_layer points (mixserve-profile "
              "fused-layer), interpolated in the context"
            : "the profile has no fused_decode_layer point of this layer shape, so the prediction is of the unfused "
              "kernels (expect those steps faster than predicted; mixserve-profile fused-layer measures the points)"));
  if (r.ranks > 1)
    line(fmt::format("# MoE communication: {} (plan moe_comm {})",
                     to_string(moe_sched_for(r.plan.chosen.layout, r.model)), to_string(r.plan.chosen.layout.moe_comm)));
  if (r.emulated)
    line(fmt::format("# {} ranks emulated on this one GPU (local transport: links are device copies; host-timed "
                     "steps): not the speed of {} GPUs",
                     r.ranks, r.ranks));
  else if (c.process_per_rank)
    line(fmt::format("# {} ranks, one process and GPU each (MPI), NCCL; every step timed on rank 0's host clock "
                     "between barriers over the processes", r.ranks));
  else if (r.ranks > 1)
    line(fmt::format("# {} ranks, a GPU each, NCCL (one process, a thread per rank; host-timed steps)", r.ranks));
  line(fmt::format("Prefill. latency: {:8.5f} s, throughput: {:11.2f} token/s", r.prefill_latency,
                   r.prefill_throughput));
  std::vector<const BenchStep*> dec;
  for (const auto& s : r.steps)
    if (s.kind == "decode") dec.push_back(&s);
  for (std::size_t b = 0; b < dec.size(); b += kDecodeSummaryEvery) {
    const std::size_t e = std::min(dec.size(), b + kDecodeSummaryEvery);
    std::vector<double> ms;
    for (std::size_t i = b; i < e; ++i) ms.push_back(dec[i]->measured_ms);
    const double med = median_of(ms) / 1e3;
    line(fmt::format("Decode {}-{}. Batch size: {}, median latency: {:8.5f} s, median throughput: {:11.2f} token/s",
                     b, e - 1, c.batch, med, med > 0 ? c.batch / med : 0.0));
  }
  line(fmt::format("Decode.  median latency: {:8.5f} s, median throughput: {:11.2f} token/s", r.median_decode_latency,
                   r.median_decode_throughput));
  line(fmt::format("Total. latency: {:8.3f} s, throughput: {:11.2f} token/s", r.total_latency, r.overall_throughput));
  line("");
  line(fmt::format("# predicted vs measured per step (cost model {}, profile {}); error = (predicted - measured) / "
                   "measured",
                   r.cost_model, r.profile_name));
  line(fmt::format("{:>5} {:>8} {:>6} {:>8} {:>6} {:>13} {:>13} {:>9}", "step", "kind", "seqs", "tokens", "graph",
                   "measured(ms)", "predicted(ms)", "error(%)"));
  for (std::size_t i = 0; i < r.steps.size(); ++i) {
    const BenchStep& s = r.steps[i];
    line(fmt::format("{:>5} {:>8} {:>6} {:>8} {:>6} {:>13.4f} {:>13.4f} {:>+9.1f}", i, s.kind, s.num_seqs,
                     s.num_tokens, s.cuda_graph ? "yes" : "no", s.measured_ms, s.predicted_ms, s.error_pct()));
  }
  line(fmt::format("# median error: prefill {:+.1f}%, decode {:+.1f}%", r.median_prefill_error_pct,
                   r.median_decode_error_pct));
  return o;
}

}  // namespace mixserve::gpu
