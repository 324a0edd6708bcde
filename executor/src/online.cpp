// Online serving benchmark on one GPU: the simulator's scheduler on the real clock (online.hpp).
#include "mixserve/gpu/online.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <thread>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/json.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/distributed.hpp"
#include "mixserve/gpu/graph.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/online_engine.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/kernels/kv_cache.cuh"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/scheduler.hpp"
#include "mixserve/sim/serving_report.hpp"

namespace mixserve::gpu {
namespace {

constexpr double kGiB = double(1u << 30);
constexpr double kReservedBytes = 1.5 * (1u << 30);  // as bench.cpp: context, handles, slack

std::string cost_model_name(const Plan& plan) {
  return plan.cost_model.empty() ? std::string("mixserve") : plan.cost_model;
}

// graphs: whether the step runs as a CUDA graph (the per-step prediction takes the step's own
// flag; the engine's setup the executor's default, graphs on).
std::unique_ptr<sim::StepCostModel> make_cm(const Plan& plan, const ModelSpec& model,
                                            const WorkloadSpec& w, const std::string& profile,
                                            bool graphs = true) {
  sim::CostModelOptions copt;
  copt.routing = sim::routing_from_workload(w);
  copt.device_greedy = true;  // the engine samples on the device (argmax inside the measured events)
  copt.decode_graphs = graphs;
  return sim::make_cost_model(cost_model_name(plan), model, plan.cluster,
                              load_profile(profile.empty() ? plan.profile_name : profile),
                              plan.chosen.layout, copt);
}

double kv_bytes_per_block(const ModelSpec& m, int block) {
  return 2.0 * m.num_layers * block * double(m.attention.num_kv_heads) * m.attention.head_dim * 2.0;
}

// Greedy ids on the device, no logits back (model_forward.hpp StepOptions).
StepOptions greedy_options() {
  StepOptions o;
  o.greedy = true;
  o.copy_logits = false;
  return o;
}

struct Stats {
  double mean = 0, median = 0, p90 = 0;
};
Stats stats_of(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  const std::size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  s.p90 = v[std::min(n - 1, static_cast<std::size_t>(std::ceil(0.9 * double(n))) - 1)];
  return s;
}

std::vector<std::vector<double>> phase_columns(const std::vector<HostPhases>& ph, const std::vector<double>& gpu_ms) {
  if (gpu_ms.size() != ph.size())
    throw InputError(fmt::format("host phases: {} steps but {} GPU times", ph.size(), gpu_ms.size()));
  std::vector<std::vector<double>> c(8);  // six phases, total, overhead
  for (std::size_t i = 0; i < ph.size(); ++i) {
    const HostPhases& h = ph[i];
    const double v[] = {h.schedule_ms, h.prepare_ms, h.enqueue_ms, h.wait_ms, h.sample_ms, h.bookkeep_ms};
    for (int k = 0; k < 6; ++k) c[std::size_t(k)].push_back(v[k]);
    c[6].push_back(h.total());
    c[7].push_back(h.total() - gpu_ms[i]);
  }
  return c;
}

}  // namespace

OnlineSetup online_setup(const Plan& plan, const std::string& origin, const OnlineConfig& cfg) {
  check_single_gpu_plan(plan, origin,
                        cfg.emulate_ranks || cfg.gpu_per_rank || cfg.process_per_rank ? MultiGpuPlan::allowed
                                                                                      : MultiGpuPlan::needs_flag);
  if (int(cfg.emulate_ranks) + int(cfg.gpu_per_rank) + int(cfg.process_per_rank) > 1)
    throw InputError("--emulate-ranks, --gpu-per-rank and --mpi exclude each other");
  if (cfg.process_per_rank && !cfg.weights_dir.empty())
    throw InputError("--weights with --mpi: not built (each process draws its shard's synthetic weights on the "
                     "device); use --emulate-ranks or --gpu-per-rank with --weights");
  const Layout& layout = plan.chosen.layout;
  if (layout.pp > 1)
    throw InputError(fmt::format(
        "{}: the plan's layout '{}' is pipeline-parallel (PP{}): the online mode does not run it (the simulator "
        "keeps {} micro-batches in flight; the executor's step runs one batch through every stage); the offline "
        "bench runs it", origin, layout.name(), layout.pp, layout.pp));
  OnlineSetup s;
  const WorkloadSpec base = cfg.workload.empty() ? plan.workload : load_workload(cfg.workload);
  s.workload = sim::apply_overrides(base, cfg.overrides, "--request-rate");
  if (s.workload.arrival == ArrivalKind::closed_loop)
    throw InputError(fmt::format("workload '{}': closed-loop arrivals are not supported by the online "
                                 "benchmark (use poisson, gamma, burst or trace)", s.workload.name));
  if (cfg.num_layers < 0 || cfg.num_layers > plan.model.num_layers)
    throw InputError(fmt::format("--num-layers {}: expected 0 (all) to the model's {} layers", cfg.num_layers,
                                 plan.model.num_layers));
  s.model = cfg.num_layers > 0 ? model::with_num_layers(plan.model, cfg.num_layers) : plan.model;
  const auto cm = make_cm(plan, s.model, s.workload, cfg.profile);

  RuntimeLimits limits = plan.chosen.limits;
  if (cfg.max_num_seqs > 0) limits.max_num_seqs = cfg.max_num_seqs;
  if (cfg.max_num_batched_tokens > 0) limits.max_num_batched_tokens = cfg.max_num_batched_tokens;
  if (cfg.no_chunked_prefill) limits.chunked_prefill = false;
  if (!cfg.policy.empty()) {
    if (cfg.policy != sim::kDecodeFirst && cfg.policy != sim::kPrefillFirst)
      throw InputError(fmt::format("--policy {}: expected {} or {}", cfg.policy, sim::kDecodeFirst,
                                   sim::kPrefillFirst));
    limits.decode_first = cfg.policy == sim::kDecodeFirst;
  }
  const auto& bts = kernels::kKvBlockTokens;
  if (std::find(bts.begin(), bts.end(), limits.kv_block_tokens) == bts.end())
    throw InputError(fmt::format("{}: limits.kv_block_tokens {}: the GPU KV cache takes 8, 16 or 32", origin,
                                 limits.kv_block_tokens));
  s.serving = sim::serving_config_for(*cm, plan.chosen.layout, limits, s.workload);
  if (cfg.max_num_seqs > 0) s.serving.limits.max_num_seqs = cfg.max_num_seqs;  // the option wins
  // The expected MoE load every step, as the per-step prediction of the run (no sampled loads).
  s.serving.sample_moe_load = false;
  s.requests = sim::generate_requests(s.workload);
  if (s.requests.requests.empty()) throw InputError(fmt::format("workload '{}': no requests", s.workload.name));

  const RuntimeLimits& L = s.serving.limits;
  const int64_t max_len_model =
      L.max_model_len > 0 ? L.max_model_len : int64_t(s.model.max_position_embeddings);
  int64_t longest = 0;
  for (const auto& r : s.requests.requests) {
    if (r.replica >= s.serving.num_replicas)
      throw InputError(fmt::format("request {}: replica {} not in the plan ({} attention-DP replicas)", r.id,
                                   r.replica, s.serving.num_replicas));
    if (max_len_model > 0 && r.input_tokens + r.output_tokens > max_len_model)
      throw InputError(fmt::format("request {} ({} + {} tokens) is longer than max_model_len ({}): cap the "
                                   "workload's limits.max_seq_len", r.id, r.input_tokens, r.output_tokens,
                                   max_len_model));
    if (!L.chunked_prefill && r.input_tokens + r.output_tokens - 1 > L.max_num_batched_tokens)
      throw InputError(fmt::format("request {}: a prefill of up to {} tokens exceeds max_num_batched_tokens ({}) "
                                   "and chunked prefill is off", r.id, r.input_tokens + r.output_tokens - 1,
                                   L.max_num_batched_tokens));
    longest = std::max(longest, r.input_tokens + r.output_tokens);
  }
  s.max_blocks_per_seq = static_cast<int>(sim::blocks_for(longest, L.kv_block_tokens));
  // Enough for max_num_seqs sequences of the longest request: more blocks never change a schedule.
  const int64_t enough = int64_t(L.max_num_seqs) * s.max_blocks_per_seq;
  s.serving.limits.kv_blocks = cfg.kv_blocks > 0 ? cfg.kv_blocks : std::min(s.serving.limits.kv_blocks, enough);
  for (const auto& r : s.requests.requests) {
    const int64_t need = sim::blocks_for(r.input_tokens + r.output_tokens - 1, L.kv_block_tokens);
    if (need > s.serving.limits.kv_blocks)
      throw InputError(fmt::format("request {} ({} + {} tokens) needs {} KV blocks; the cache holds {} "
                                   "(--kv-blocks or the memory model)", r.id, r.input_tokens, r.output_tokens,
                                   need, s.serving.limits.kv_blocks));
  }
  return s;
}

std::vector<std::vector<int32_t>> online_prompts(const OnlineSetup& s) {
  const auto& reqs = s.requests.requests;
  std::vector<std::vector<int32_t>> prompts(reqs.size());
  std::mt19937_64 rng(s.workload.seed ^ 0x6d69787365727665ull);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(s.model.vocab_size - 1));
  for (size_t i = 0; i < reqs.size(); ++i)
    for (int64_t k = 0; k < reqs[i].input_tokens; ++k) prompts[i].push_back(tok(rng));
  return prompts;
}

OnlineResult run_online(const std::string& plan_path, const OnlineConfig& cfg) {
  OnlineResult r = run_online(load_plan(plan_path), plan_path, cfg);
  return r;
}

namespace {

// The checks before any device work: the plan, the setup, and the launch (check_plan_for_run for
// a multi-GPU plan with the ranks this process drives, or for any plan with `launch`).
OnlineResult online_check(const Plan& plan, const std::string& origin, const OnlineConfig& cfg,
                          const LaunchShape* launch) {
  OnlineResult r;
  r.config = cfg;
  r.plan_path = origin;
  r.plan = plan;
  validate_plan(r.plan, origin);
  // The hash of the file when there is one (what validate compares), else of the plan's YAML.
  try {
    r.plan_sha256 = sha256_hex(read_text_file(origin));
  } catch (const InputError&) {
    r.plan_sha256 = sha256_hex(plan_to_yaml(plan));
  }
  r.setup = online_setup(r.plan, origin, cfg);
  r.ranks = r.plan.chosen.layout.world_size();
  r.emulated = r.ranks > 1 && cfg.emulate_ranks;
  const LaunchShape here{r.ranks, cfg.gpu_per_rank ? r.ranks : 1, std::max(device_count_or_zero(), 1)};
  if (launch || r.ranks > 1) check_plan_for_run(r.plan, r.plan.model, launch ? *launch : here);
  r.cost_model = cost_model_name(r.plan);
  r.profile_name = cfg.profile.empty() ? r.plan.profile_name : cfg.profile;
  r.profile_host_overhead_ms = load_profile(r.profile_name).host_overhead.step_us / 1e3;
  return r;
}

// The current device: its name and GPU model against the plan; the memory of `ranks_here` ranks
// of the plan on it (weights, activations for max_num_batched_tokens rows, the reserve, then the
// KV cache: per replica, every rank holding its KV heads of its replica's pool); the KV blocks
// lowered to what fits (InputError when --kv-blocks or a request does not fit).
void online_device_check(OnlineResult& r, int ranks_here) {
  OnlineSetup& S = r.setup;
  const OnlineConfig& cfg = r.config;
  const Layout& layout = r.plan.chosen.layout;
  int dev = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  const DeviceInfo info = query_device(dev);
  r.device_name = info.name;
  r.device = device_info_json(info);
  check_device_matches(r.plan, info.name, r.plan_path);

  RuntimeLimits& L = S.serving.limits;
  const int bs = L.kv_block_tokens;
  BenchConfig act_cfg;
  act_cfg.batch = L.max_num_seqs;
  act_cfg.input_len = static_cast<int>(std::min<int64_t>(L.max_num_batched_tokens, 1 << 30));
  act_cfg.output_len = 1;
  act_cfg.block_size = bs;
  BenchMemory mem = estimate_bench_memory(S.model, act_cfg, L.max_num_batched_tokens);
  if (ranks_here > 1) mem = emulated_ranks_memory(mem, S.model, ranks_here);
  std::size_t free_b = 0, total_b = 0;
  MIXSERVE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  double per_block = kv_bytes_per_block(S.model, bs);
  if (r.ranks > 1) {
    const int kv = S.model.attention.num_kv_heads;
    const int kv_rank = kv % layout.attn_tp == 0 ? kv / layout.attn_tp : 1;  // replicated below one head
    per_block = per_block * kv_rank / kv * ranks_here;
  }
  const double room = double(free_b) - mem.weights - mem.activations - mem.reserved;
  const auto fit = static_cast<int64_t>(std::max(0.0, 0.9 * room / per_block));
  if (L.kv_blocks > fit) {
    if (cfg.kv_blocks > 0 || fit < S.max_blocks_per_seq)
      throw InputError(fmt::format(
          "{}: not enough device memory for {} ({} layers{}): weights {:.2f} GiB, activations {:.2f} GiB, reserve "
          "{:.2f} GiB and {} KV blocks ({:.2f} GiB) but {} has {:.2f} GiB free; use --num-layers or --kv-blocks",
          r.plan_path, S.model.name, S.model.num_layers,
          ranks_here > 1 ? fmt::format(", {} ranks", ranks_here) : std::string(), mem.weights / kGiB,
          mem.activations / kGiB, mem.reserved / kGiB, L.kv_blocks, L.kv_blocks * per_block / kGiB, info.name,
          double(free_b) / kGiB));
    std::fprintf(stderr, "mixserve-run: KV blocks lowered from %lld to %lld (device memory)\n",
                 static_cast<long long>(L.kv_blocks), static_cast<long long>(fit));
    L.kv_blocks = fit;
  }
}

// Per replica (every rank of a replica: the same limits and its own pool of kv_blocks blocks).
GpuModelConfig online_gpu_config(const OnlineResult& r) {
  const RuntimeLimits& L = r.setup.serving.limits;
  GpuModelConfig gc;
  gc.block_size = L.kv_block_tokens;
  gc.num_blocks = static_cast<int>(L.kv_blocks);
  gc.max_tokens_per_step = static_cast<int>(std::max<int64_t>(L.max_num_batched_tokens, L.max_num_seqs));
  gc.max_seqs_per_step = L.max_num_seqs;
  gc.max_blocks_per_seq = r.setup.max_blocks_per_seq;
  return gc;
}

// The untimed warm-up steps: one prefill of up to a step's budget, then one decode when it fits
// (cuBLASLt plans, kernels' first launches); the caches are reset after.
std::vector<model::SequenceStep> warmup_steps(const OnlineResult& r) {
  const RuntimeLimits& L = r.setup.serving.limits;
  const int bs = L.kv_block_tokens;
  const int64_t cap = std::min<int64_t>(int64_t(r.setup.max_blocks_per_seq), L.kv_blocks) * bs;
  const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(L.max_num_batched_tokens, cap - 1));
  model::SequenceStep q;
  q.tokens.assign(static_cast<size_t>(nw), 0);
  q.position = 0;
  for (int64_t b = 0; b < sim::blocks_for(nw + 1, bs); ++b) q.block_table.push_back(static_cast<int32_t>(b));
  std::vector<model::SequenceStep> out{q};
  if (nw + 1 <= cap) {
    model::SequenceStep d = q;
    d.tokens = {0};
    d.position = nw;
    out.push_back(d);
  }
  return out;
}

// The step record of a scheduled step (times filled by the caller).
OnlineStep step_record(const OnlineEngine::Step& es, double t) {
  OnlineStep st;
  st.start_s = t;
  st.batch = es.total;
  st.replicas = es.replicas;
  st.num_prefill_seqs = static_cast<int>(st.batch.num_prefill_seqs);
  st.num_decode = static_cast<int>(st.batch.num_decode);
  st.num_tokens = es.num_tokens;
  return st;
}

void progress_line(const OnlineEngine& eng, double t_end) {
  std::fprintf(stderr, "online: t = %.1f s, %lld / %zu requests done, %lld steps, %lld waiting, %lld running\n", t_end,
               static_cast<long long>(eng.finished()), eng.num_requests(),
               static_cast<long long>(eng.num_steps()), static_cast<long long>(eng.waiting()),
               static_cast<long long>(eng.running()));
}

// After the run: the cost model's prediction per step (outside the timed loop: every replica's
// batch; the GPU part, less the profile's host overhead per step), the metrics, the ids.
void online_finish(OnlineResult& r, const OnlineEngine& eng, double wall_sum_ms) {
  // Per step the model of how it ran: decode steps as CUDA graphs or eagerly (graph_launch saving).
  const auto cm = make_cm(r.plan, r.setup.model, r.setup.workload, r.profile_name);
  const auto cm_eager = make_cm(r.plan, r.setup.model, r.setup.workload, r.profile_name, false);
  for (auto& st : r.steps) {
    const auto& model_of_step = st.cuda_graph ? *cm : *cm_eager;
    st.predicted_ms = model_of_step.step(std::span<const sim::ReplicaBatch>(st.replicas), false).time_us / 1e3 -
                      r.profile_host_overhead_ms;
  }
  r.result = eng.result(wall_sum_ms);
  r.output_ids = eng.output_ids();
}

}  // namespace

OnlineResult run_online(const Plan& plan, const std::string& origin, const OnlineConfig& cfg) {
  using clk = std::chrono::steady_clock;
  OnlineResult r = online_check(plan, origin, cfg, nullptr);
  const int ndev = device_count_or_zero();
  if (ndev == 0) throw RuntimeError("mixserve-run bench: no GPU (no CUDA device is visible)");
  online_device_check(r, r.emulated ? r.ranks : 1);
  OnlineSetup& S = r.setup;
  const Layout& layout = r.plan.chosen.layout;
  const GpuModelConfig gc = online_gpu_config(r);
  std::unique_ptr<GpuModel> g;
  std::unique_ptr<EmulatedRanks> ranks;
  if (r.ranks > 1) {
    const Placement where = cfg.gpu_per_rank ? Placement::gpu_per_rank : Placement::one_gpu;
    if (cfg.weights_dir.empty()) {
      ranks = std::make_unique<EmulatedRanks>(S.model, cfg.weight_seed, r.plan.cluster, layout, gc, where);
    } else {
      const model::WeightSet w = model::load_weights(r.plan.model, cfg.weights_dir, cfg.num_layers);
      ranks = std::make_unique<EmulatedRanks>(w, r.plan.cluster, layout, gc, where);
    }
  } else if (cfg.weights_dir.empty()) {
    g = std::make_unique<GpuModel>(S.model, cfg.weight_seed, gc);
  } else {
    const model::WeightSet w = model::load_weights(r.plan.model, cfg.weights_dir, cfg.num_layers);
    g = std::make_unique<GpuModel>(w, gc);
  }
  const int dp = layout.attn_dp;
  const StepOptions step_opt = greedy_options();

  // Warm-up, untimed, on every replica; the caches are reset after.
  for (const model::SequenceStep& s : warmup_steps(r)) {
    if (ranks)
      (void)ranks->step(std::vector<std::vector<model::SequenceStep>>(size_t(dp), {s}), step_opt);
    else
      (void)g->step({s}, step_opt);
  }
  if (ranks)
    ranks->reset_cache();
  else
    g->reset_cache();

  // The engine: the replicas' schedulers (online_engine.hpp) on the real clock.
  OnlineEngine eng(S.serving, S.requests, online_prompts(S));
  Event start, stop;
  StepGraph graph;
  std::set<int64_t> eager_decode_tokens;  // decode token counts run eagerly once (plans made)
  std::vector<std::vector<int32_t>> ids(static_cast<size_t>(dp));
  double wall_sum_ms = 0;
  const auto t0 = clk::now();
  auto now_s = [&] { return std::chrono::duration<double>(clk::now() - t0).count(); };
  double next_progress = cfg.progress_every_s;
  while (!eng.done()) {
    const double t = now_s();
    eng.admit_until(t);
    if (!eng.has_work()) {
      const double next_arrival = eng.next_arrival_s();
      if (!std::isfinite(next_arrival))
        throw RuntimeError("online engine: requests left unfinished with nothing to run");
      const double wait = next_arrival - t;
      if (wait > 2e-4) std::this_thread::sleep_for(std::chrono::duration<double>(wait - 1e-4));
      continue;
    }
    const OnlineEngine::Step& es = eng.schedule();
    OnlineStep st = step_record(es, t);
    const double t_sched = now_s();
    double t_prep = 0, t_enq = 0, t_wait = 0;
    if (ranks) {
      // Every rank prepares, then enqueues and completes; host-timed (several streams, threads).
      ranks->prepare(es.batches, step_opt);
      t_prep = now_s();
      const auto e0 = clk::now();
      ranks->enqueue_and_wait();
      st.measured_ms = std::chrono::duration<double, std::milli>(clk::now() - e0).count();
      t_enq = now_s();
      const std::vector<GpuStepOutput> outs = ranks->collect();
      t_wait = now_s();
      for (int d = 0; d < dp; ++d) ids[size_t(d)] = outs[size_t(d)].token_ids;
    } else {
      cudaStream_t stream = g->stream();
      g->prepare(es.batches[0], step_opt);
      t_prep = now_s();
      // Decode-only steps as a CUDA graph once their token count has run eagerly (plans made).
      const bool graphable = cfg.cuda_graph && st.num_prefill_seqs == 0 &&
                             decode_step_graphable(S.model, gc, st.num_tokens);
      st.cuda_graph = graphable && eager_decode_tokens.count(st.num_tokens) > 0;
      if (st.cuda_graph) graph.capture(stream, [&](cudaStream_t cs) { g->enqueue(cs); });
      start.record(stream);
      if (st.cuda_graph)
        graph.launch(stream);
      else
        g->enqueue(stream);
      stop.record(stream);
      if (graphable) eager_decode_tokens.insert(st.num_tokens);
      t_enq = now_s();
      GpuStepOutput out = g->collect(stream);
      t_wait = now_s();
      st.measured_ms = double(Event::elapsed_ms(start, stop));
      ids[0] = std::move(out.token_ids);
    }
    // The sequences whose whole length is now computed take their sampled ids.
    eng.take_tokens(ids);
    const double t_end = now_s();
    st.wall_ms = (t_end - t) * 1e3;
    st.host.schedule_ms = (t_sched - t) * 1e3;
    st.host.prepare_ms = (t_prep - t_sched) * 1e3;
    st.host.enqueue_ms = (t_enq - t_prep) * 1e3;
    st.host.wait_ms = (t_wait - t_enq) * 1e3;
    st.host.sample_ms = (t_end - t_wait) * 1e3;
    eng.complete(t_end);
    wall_sum_ms += st.wall_ms;
    r.steps.push_back(std::move(st));
    r.steps.back().host.bookkeep_ms = (now_s() - t_end) * 1e3;  // the prediction is made after the run
    if (cfg.progress_every_s > 0 && t_end >= next_progress) {
      progress_line(eng, t_end);
      next_progress = t_end + cfg.progress_every_s;
    }
  }
  online_finish(r, eng, wall_sum_ms);
  return r;
}

#if MIXSERVE_HAVE_NCCL
OnlineResult run_online_process(const std::string& plan_path, const OnlineConfig& config, ProcessGroup& pg,
                                const std::function<Comm(int device)>& make_world) {
  using clk = std::chrono::steady_clock;
  OnlineConfig cfg = config;
  cfg.process_per_rank = true;
  // Every check before any collective; the processes agree on the outcome (as run_bench_process).
  OnlineResult r;
  agree_before_collectives(
      pg, [&](const LaunchShape& launch) { r = online_check(load_plan(plan_path), plan_path, cfg, &launch); },
      [&] { online_device_check(r, 1); });
  // Every process's schedulers must form the same steps: the same KV pool per replica everywhere
  // (the smallest that fits on every device).
  RuntimeLimits& L = r.setup.serving.limits;
  std::vector<int32_t> neg_blocks{-static_cast<int32_t>(std::min<int64_t>(L.kv_blocks, INT32_MAX))};
  pg.max_int32(neg_blocks);
  L.kv_blocks = -int64_t(neg_blocks[0]);
  // Each process checked that its own pool holds the longest request; the agreed one is one of
  // them. Every process computes the same value, so all refuse together (no collective yet).
  if (L.kv_blocks < r.setup.max_blocks_per_seq)
    throw InputError(fmt::format("{}: the KV pool every process can hold ({} blocks) is smaller than the longest "
                                 "request ({} blocks)", r.plan_path, L.kv_blocks, r.setup.max_blocks_per_seq));

  pg.collective = true;  // from here a failing rank leaves its peers waiting: the caller aborts
  OnlineSetup& S = r.setup;
  const Layout& layout = r.plan.chosen.layout;
  int dev = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  const Comm world = make_world(dev);
  ProcessRank pr(world, S.model, cfg.weight_seed, r.plan.cluster, layout, online_gpu_config(r));
  GpuModel& g = pr.model();
  const int dp = layout.attn_dp, replica = pr.replica();
  // Always true today (online refuses pp > 1, online_setup); kept so the id exchange below stays
  // right when pipeline stages come.
  const bool last_stage = pr.rank() / layout.stage_size() == layout.pp - 1;
  const StepOptions step_opt = greedy_options();
  for (const model::SequenceStep& s : warmup_steps(r)) (void)g.step({s}, step_opt);
  g.reset_cache();

  // The engine in every process; admissions on rank 0's clock (broadcast each step), so every
  // process's schedulers form the same steps; each process runs its replica's batch.
  OnlineEngine eng(S.serving, S.requests, online_prompts(S));
  std::vector<std::vector<int32_t>> ids(static_cast<size_t>(dp));
  std::vector<int32_t> flat;
  double wall_sum_ms = 0;
  pg.barrier();
  const auto t0 = clk::now();
  auto now_s = [&] { return std::chrono::duration<double>(clk::now() - t0).count(); };
  double next_progress = cfg.progress_every_s;
  while (!eng.done()) {
    const double t = pg.broadcast(now_s());
    eng.admit_until(t);
    if (!eng.has_work()) {  // the same in every process: rank 0 waits, the others in the broadcast
      const double next_arrival = eng.next_arrival_s();
      if (!std::isfinite(next_arrival))
        throw RuntimeError("online engine: requests left unfinished with nothing to run");
      const double wait = next_arrival - t;
      if (pg.rank() == 0 && wait > 2e-4) std::this_thread::sleep_for(std::chrono::duration<double>(wait - 1e-4));
      continue;
    }
    const OnlineEngine::Step& es = eng.schedule();
    OnlineStep st = step_record(es, t);
    const double t_sched = now_s();
    g.prepare(es.batches[size_t(replica)], step_opt);
    const double t_prep = now_s();
    pg.barrier();
    const auto e0 = clk::now();
    g.enqueue(g.stream());
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
    pg.barrier();
    st.measured_ms = std::chrono::duration<double, std::milli>(clk::now() - e0).count();
    const double t_enq = now_s();
    const GpuStepOutput out = g.collect(g.stream());
    const double t_wait = now_s();
    // Every replica's ids to every process: the last stage's ranks fill their replica's slice.
    std::vector<size_t> offset(size_t(dp) + 1, 0);
    for (int d = 0; d < dp; ++d) offset[size_t(d) + 1] = offset[size_t(d)] + es.lists[size_t(d)].size();
    flat.assign(offset.back(), -1);
    if (last_stage) {
      if (out.token_ids.size() != es.lists[size_t(replica)].size())
        throw RuntimeError(fmt::format("rank {}: {} sampled ids for {} sequences", pr.rank(), out.token_ids.size(),
                                       es.lists[size_t(replica)].size()));
      std::copy(out.token_ids.begin(), out.token_ids.end(), flat.begin() + std::ptrdiff_t(offset[size_t(replica)]));
    }
    pg.max_int32(flat);
    for (int d = 0; d < dp; ++d)
      ids[size_t(d)].assign(flat.begin() + std::ptrdiff_t(offset[size_t(d)]),
                            flat.begin() + std::ptrdiff_t(offset[size_t(d) + 1]));
    eng.take_tokens(ids);
    const double t_end = now_s();
    st.wall_ms = (t_end - t) * 1e3;
    st.host.schedule_ms = (t_sched - t) * 1e3;
    st.host.prepare_ms = (t_prep - t_sched) * 1e3;
    st.host.enqueue_ms = (t_enq - t_prep) * 1e3;
    st.host.wait_ms = (t_wait - t_enq) * 1e3;
    st.host.sample_ms = (t_end - t_wait) * 1e3;
    eng.complete(t_end);
    wall_sum_ms += st.wall_ms;
    r.steps.push_back(std::move(st));
    r.steps.back().host.bookkeep_ms = (now_s() - t_end) * 1e3;
    if (pg.rank() == 0 && cfg.progress_every_s > 0 && t_end >= next_progress) {
      progress_line(eng, t_end);
      next_progress = t_end + cfg.progress_every_s;
    }
  }
  online_finish(r, eng, wall_sum_ms);
  return r;
}
#endif

nlohmann::json online_json(const OnlineResult& r) {
  const OnlineSetup& S = r.setup;
  const WorkloadSpec& w = S.workload;
  nlohmann::json j = sim::metrics_to_json(r.result.metrics, S.serving);
  const bool has_rate = w.arrival == ArrivalKind::poisson || w.arrival == ArrivalKind::gamma;
  j["request_rate"] = has_rate ? nlohmann::json(w.rate) : nlohmann::json("inf");
  j["mixserve_layout"] = r.plan.chosen.layout.name();
  j["mixserve_cost_model"] = r.cost_model;
  j["mixserve_workload"] = w.name;
  j["mixserve_workload_approximate"] = w.approximate;
  j["num_gpus"] = r.ranks;
  j["run_name"] = "mixserve-run bench";
  j["mode"] = "online";
  j["ranks"] = r.ranks;
  // Emulated: the plan's ranks shared one GPU; the times are not those of r.ranks GPUs.
  j["emulated_ranks"] = r.emulated;
  j["launch"] = launch_name(r.config.process_per_rank, r.emulated, r.ranks);
  // The MoE communication the forward ran: the plan's schedule ("ep", "fused", "rs-a2a-ag") or
  // "none" (the all-reduce / gather exchange; docs/distributed.md).
  j["moe_schedule"] = gpu::to_string(r.ranks > 1 ? moe_sched_for(r.plan.chosen.layout, S.model) : MoeSched::none);
  const Plan& p = r.plan;
  j["plan"] = {{"path", r.plan_path}, {"sha256", r.plan_sha256}, {"model", p.model.name},
               {"layout", p.chosen.layout.name()}, {"cluster", p.cluster.name},
               {"gpu_model", p.cluster.gpu_model}, {"limits", to_json(p.chosen.limits)},
               {"provenance", {{"tool", p.provenance.tool}, {"created", p.provenance.created}}}};
  j["model"] = {{"name", S.model.name}, {"architecture", S.model.architecture},
                {"num_layers", S.model.num_layers}, {"full_num_layers", p.model.num_layers}};
  j["weights"] = r.config.weights_dir.empty()
                     ? nlohmann::json{{"kind", "synthetic"}, {"seed", r.config.weight_seed}}
                     : nlohmann::json{{"kind", "safetensors"}, {"path", r.config.weights_dir}};
  j["workload"] = {{"name", w.name}, {"arrival", std::string(to_string(w.arrival))}, {"rate", w.rate},
                   {"burstiness", w.burstiness}, {"num_requests", w.num_requests}, {"seed", w.seed}};
  j["serving_config"] = sim::serving_config_json(S.serving);
  nlohmann::json reqs = sim::requests_json(S.requests);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& q = r.result.requests[i];
    reqs[i]["first_token_s"] = q.first_token_s;
    reqs[i]["finish_s"] = q.finish_s;
    reqs[i]["ttft_ms"] = q.ttft_ms();
    reqs[i]["tpot_ms"] = q.tpot_ms();
    reqs[i]["e2el_ms"] = q.e2el_ms();
    reqs[i]["preemptions"] = q.preemptions;
    reqs[i]["replica"] = q.replica;
  }
  j["requests"] = reqs;
  nlohmann::json steps = nlohmann::json::array();
  std::vector<double> errs;
  auto batch_json = [](const sim::ReplicaBatch& b) {
    return nlohmann::json{{"prefill_tokens", b.prefill_tokens},
                          {"num_prefill_seqs", b.num_prefill_seqs},
                          {"prefill_attn_pairs", b.prefill_attn_pairs},
                          {"num_decode", b.num_decode},
                          {"decode_context", b.decode_context}};
  };
  for (const auto& s : r.steps) {
    errs.push_back(s.error_pct());
    steps.push_back({{"start_s", s.start_s},
                     {"num_prefill_seqs", s.num_prefill_seqs},
                     {"num_decode", s.num_decode},
                     {"num_tokens", s.num_tokens},
                     {"measured_ms", s.measured_ms},
                     {"wall_ms", s.wall_ms},
                     {"cuda_graph", s.cuda_graph},
                     {"host_ms",
                      {{"schedule", s.host.schedule_ms},
                       {"prepare", s.host.prepare_ms},
                       {"enqueue", s.host.enqueue_ms},
                       {"wait", s.host.wait_ms},
                       {"sample", s.host.sample_ms},
                       {"bookkeep", s.host.bookkeep_ms}}},
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
  j["steps"] = steps;
  const sim::ErrorSummary e = sim::error_summary(errs);
  j["step_error_pct"] = {{"median", e.median}, {"p90_abs", e.p90_abs}, {"worst", e.worst}, {"steps", e.n}};
  std::vector<HostPhases> ph;
  std::vector<double> gpu;
  for (const auto& s : r.steps) {
    ph.push_back(s.host);
    gpu.push_back(s.measured_ms);
  }
  j["host_phases_ms"] = host_phases_json(ph, gpu);
  j["output_ids"] = r.output_ids;
  // predicted_ms of the steps is the GPU part: the cost model's step less the profile's host
  // overhead per step (null: the profile has none, nothing added).
  j["prediction"] = {{"cost_model", r.cost_model},
                     {"profile", r.profile_name},
                     {"host_overhead_ms", r.profile_host_overhead_ms > 0 ? nlohmann::json(r.profile_host_overhead_ms)
                                                                         : nlohmann::json(nullptr)}};
  nlohmann::json versions = r.device.contains("versions") ? r.device["versions"] : nlohmann::json::object();
  versions["mixserve"] = kMixServeVersion;
  j["device"] = r.device;
  j["versions"] = versions;
  j["date"] = now_iso8601_utc();
  return j;
}

std::string format_online_report(const OnlineResult& r) {
  const OnlineSetup& S = r.setup;
  const WorkloadSpec& w = S.workload;
  std::string o = fmt::format("# mixserve-run bench (online) {} | plan {} ({}, {}) | device {}\n", kMixServeVersion,
                              r.plan_path, r.plan.chosen.layout.name(), r.plan.cluster.name, r.device_name);
  const RuntimeLimits& L = S.serving.limits;
  o += fmt::format("# model {} ({} of {} layers) | workload {} ({}, {} requests, seed {}) | {} | max_num_seqs {}, "
                   "max_num_batched_tokens {}, chunked prefill {}, KV blocks {} x {}\n",
                   S.model.name, S.model.num_layers, r.plan.model.num_layers, w.name, to_string(w.arrival),
                   S.requests.requests.size(), w.seed, sim::policy_name(L.decode_first), L.max_num_seqs,
                   L.max_num_batched_tokens, L.chunked_prefill ? "on" : "off", L.kv_blocks, L.kv_block_tokens);
  if (r.emulated)
    o += fmt::format("# {} ranks emulated on this one GPU (local transport: links are device copies; host-timed "
                     "steps): not the speed of {} GPUs\n", r.ranks, r.ranks);
  else if (r.config.process_per_rank)
    o += fmt::format("# {} ranks, one process and GPU each (MPI), NCCL; every step timed on rank 0's host clock "
                     "between barriers over the processes\n", r.ranks);
  else if (r.ranks > 1)
    o += fmt::format("# {} ranks, a GPU each, NCCL (one process, a thread per rank; host-timed steps)\n", r.ranks);
  if (r.ranks > 1)
    o += fmt::format("# {} attention-DP replicas, each with its own scheduler and {} KV blocks; MoE communication: "
                     "{}; {} replica-steps ran an empty batch\n", S.serving.num_replicas, L.kv_blocks,
                     to_string(moe_sched_for(r.plan.chosen.layout, S.model)),
                     r.result.metrics.num_empty_replica_steps);
  const bool has_rate = w.arrival == ArrivalKind::poisson || w.arrival == ArrivalKind::gamma;
  o += sim::format_serving_block(r.result.metrics, S.serving, has_rate ? w.rate : 0.0,
                                 r.plan.chosen.layout.name(), "measured");
  std::vector<double> errs, pre, dec, mixed;
  for (const auto& s : r.steps) {
    errs.push_back(s.error_pct());
    (s.num_prefill_seqs == 0 ? dec : s.num_decode == 0 ? pre : mixed).push_back(s.error_pct());
  }
  auto line = [&](const char* what, const std::vector<double>& v) {
    const sim::ErrorSummary e = sim::error_summary(v);
    if (e.n == 0) return;
    o += fmt::format("# step error {:<8} {:>6} steps: median {:+.1f}%, p90 |error| {:.1f}%, worst {:+.1f}%\n", what,
                     e.n, e.median, e.p90_abs, e.worst);
  };
  o += fmt::format("# predicted vs measured per step (cost model {}, profile {}; error = (predicted - measured) / "
                   "measured, measured by {})\n", r.cost_model, r.profile_name,
                   r.ranks > 1 ? "the host clock around every rank's enqueue and completion" : "CUDA events");
  line("all", errs);
  line("prefill", pre);
  line("decode", dec);
  line("mixed", mixed);
  std::vector<HostPhases> ph;
  std::vector<double> gpu;
  int64_t graphs = 0;
  for (const auto& s : r.steps) {
    ph.push_back(s.host);
    gpu.push_back(s.measured_ms);
    graphs += s.cuda_graph ? 1 : 0;
  }
  o += fmt::format("# host time per step ({} steps, {} as CUDA graphs):\n", r.steps.size(), graphs);
  o += format_host_phases(ph, gpu);
  o += r.profile_host_overhead_ms > 0
           ? fmt::format("# the prediction adds the profile's host overhead, {:.3f} ms per step (step errors "
                         "compare the GPU part)\n", r.profile_host_overhead_ms)
           : std::string("# the profile has no host_overhead: the prediction adds none (0 ms per step)\n");
  return o;
}

HardwareProfile with_host_overhead(HardwareProfile p, const std::vector<HostPhases>& phases,
                                   const std::vector<double>& gpu_ms, const std::string& measured_with) {
  if (phases.empty()) throw InputError("host overhead: the run has no steps");
  const auto c = phase_columns(phases, gpu_ms);
  p.host_overhead.step_us = std::max(0.0, stats_of(c[7]).median * 1e3);
  p.host_overhead.steps = static_cast<int64_t>(phases.size());
  p.host_overhead.measured_with = measured_with;
  return p;
}

HardwareProfile with_host_overhead(HardwareProfile p, const OnlineResult& r, const std::string& command) {
  std::vector<HostPhases> ph;
  std::vector<double> gpu;
  for (const auto& s : r.steps) {
    ph.push_back(s.host);
    gpu.push_back(s.measured_ms);
  }
  return with_host_overhead(std::move(p), ph, gpu,
                            fmt::format("{} | {} | {} steps, median of host cycle - GPU time | {}", command,
                                        r.device_name, ph.size(), now_iso8601_utc()));
}

nlohmann::json host_phases_json(const std::vector<HostPhases>& phases, const std::vector<double>& gpu_ms) {
  const auto c = phase_columns(phases, gpu_ms);
  nlohmann::json j = nlohmann::json::object();
  auto put = [&](const char* key, const std::vector<double>& v) {
    const Stats s = stats_of(v);
    j[key] = {{"mean", s.mean}, {"median", s.median}, {"p90", s.p90}};
  };
  for (int k = 0; k < 6; ++k) put(kHostPhaseNames[k], c[std::size_t(k)]);
  put("total", c[6]);
  put("overhead", c[7]);
  j["steps"] = phases.size();
  return j;
}

std::string format_host_phases(const std::vector<HostPhases>& phases, const std::vector<double>& gpu_ms) {
  const auto c = phase_columns(phases, gpu_ms);
  if (phases.empty()) return "#   no steps\n";
  const Stats tot = stats_of(c[6]);
  std::string o;
  for (int k = 0; k < 6; ++k) {
    const Stats s = stats_of(c[std::size_t(k)]);
    o += fmt::format("#   {:<9} mean {:8.3f} ms  median {:8.3f} ms  ({:5.1f}% of the host cycle)\n", kHostPhaseNames[k],
                     s.mean, s.median, tot.mean > 0 ? 100.0 * s.mean / tot.mean : 0.0);
  }
  const Stats ov = stats_of(c[7]);
  o += fmt::format("#   {:<9} mean {:8.3f} ms  median {:8.3f} ms\n", "total", tot.mean, tot.median);
  o += fmt::format("#   host overhead (total - GPU time by CUDA events): mean {:.3f} ms, median {:.3f} ms, p90 "
                   "{:.3f} ms\n", ov.mean, ov.median, ov.p90);
  return o;
}

}  // namespace mixserve::gpu
