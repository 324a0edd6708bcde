// Online serving benchmark on one GPU: the simulator's scheduler on the real clock (online.hpp).
#include "mixserve/gpu/online.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
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
#include "mixserve/gpu/graph.hpp"
#include "mixserve/gpu/model_forward.hpp"
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
  check_single_gpu_plan(plan, origin);
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
  s.serving.sample_moe_load = false;  // one GPU: no EP load to sample
  s.requests = sim::generate_requests(s.workload);
  if (s.requests.requests.empty()) throw InputError(fmt::format("workload '{}': no requests", s.workload.name));

  const RuntimeLimits& L = s.serving.limits;
  const int64_t max_len_model =
      L.max_model_len > 0 ? L.max_model_len : int64_t(s.model.max_position_embeddings);
  int64_t longest = 0;
  for (const auto& r : s.requests.requests) {
    if (r.replica > 0)
      throw InputError(fmt::format("request {}: replica {} not in the plan (one replica)", r.id, r.replica));
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

OnlineResult run_online(const std::string& plan_path, const OnlineConfig& cfg) {
  OnlineResult r = run_online(load_plan(plan_path), plan_path, cfg);
  return r;
}

OnlineResult run_online(const Plan& plan, const std::string& origin, const OnlineConfig& cfg) {
  using clk = std::chrono::steady_clock;
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
  OnlineSetup& S = r.setup;

  const int ndev = device_count_or_zero();
  if (ndev == 0) throw RuntimeError("mixserve-run bench: no GPU (no CUDA device is visible)");
  int dev = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  const DeviceInfo info = query_device(dev);
  r.device_name = info.name;
  r.device = device_info_json(info);
  check_device_matches(r.plan, info.name, origin);

  RuntimeLimits& L = S.serving.limits;
  const int bs = L.kv_block_tokens;
  // Memory: weights, activations for max_num_batched_tokens rows, the reserve, then the KV cache.
  BenchConfig act_cfg;
  act_cfg.batch = L.max_num_seqs;
  act_cfg.input_len = static_cast<int>(std::min<int64_t>(L.max_num_batched_tokens, 1 << 30));
  act_cfg.output_len = 1;
  act_cfg.block_size = bs;
  BenchMemory mem = estimate_bench_memory(S.model, act_cfg, L.max_num_batched_tokens);
  std::size_t free_b = 0, total_b = 0;
  MIXSERVE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const double per_block = kv_bytes_per_block(S.model, bs);
  const double room = double(free_b) - mem.weights - mem.activations - mem.reserved;
  const auto fit = static_cast<int64_t>(std::max(0.0, 0.9 * room / per_block));
  if (L.kv_blocks > fit) {
    if (cfg.kv_blocks > 0 || fit < S.max_blocks_per_seq)
      throw InputError(fmt::format(
          "{}: not enough device memory for {} ({} layers): weights {:.2f} GiB, activations {:.2f} GiB, reserve "
          "{:.2f} GiB and {} KV blocks ({:.2f} GiB) but {} has {:.2f} GiB free; use --num-layers or --kv-blocks",
          origin, S.model.name, S.model.num_layers, mem.weights / kGiB, mem.activations / kGiB,
          mem.reserved / kGiB, L.kv_blocks, L.kv_blocks * per_block / kGiB, info.name, double(free_b) / kGiB));
    std::fprintf(stderr, "mixserve-run: KV blocks lowered from %lld to %lld (device memory)\n",
                 static_cast<long long>(L.kv_blocks), static_cast<long long>(fit));
    L.kv_blocks = fit;
  }

  r.cost_model = cost_model_name(r.plan);
  r.profile_name = cfg.profile.empty() ? r.plan.profile_name : cfg.profile;
  const auto cm = make_cm(r.plan, S.model, S.workload, r.profile_name);
  const auto cm_eager = make_cm(r.plan, S.model, S.workload, r.profile_name, false);
  r.profile_host_overhead_ms = load_profile(r.profile_name).host_overhead.step_us / 1e3;

  GpuModelConfig gc;
  gc.block_size = bs;
  gc.num_blocks = static_cast<int>(L.kv_blocks);
  gc.max_tokens_per_step = static_cast<int>(std::max<int64_t>(L.max_num_batched_tokens, L.max_num_seqs));
  gc.max_seqs_per_step = L.max_num_seqs;
  gc.max_blocks_per_seq = S.max_blocks_per_seq;
  std::unique_ptr<GpuModel> g;
  if (cfg.weights_dir.empty()) {
    g = std::make_unique<GpuModel>(S.model, cfg.weight_seed, gc);
  } else {
    const model::WeightSet w = model::load_weights(r.plan.model, cfg.weights_dir, cfg.num_layers);
    g = std::make_unique<GpuModel>(w, gc);
  }
  const int64_t vocab = g->spec().vocab_size;
  cudaStream_t stream = g->stream();

  // Prompts: seeded by the workload's seed, request by request.
  const auto& reqs = S.requests.requests;
  const size_t n = reqs.size();
  std::vector<std::vector<int32_t>> tokens(n);
  {
    std::mt19937_64 rng(S.workload.seed ^ 0x6d69787365727665ull);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
    for (size_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < reqs[i].input_tokens; ++k) tokens[i].push_back(tok(rng));
  }

  // Warm-up, untimed: one prefill of up to a step's budget and one decode (cuBLASLt plans,
  // kernels' first launches); the cache is reset after.
  {
    const int64_t cap = std::min<int64_t>(int64_t(S.max_blocks_per_seq), L.kv_blocks) * bs;
    const int64_t nw = std::max<int64_t>(1, std::min<int64_t>(L.max_num_batched_tokens, cap - 1));
    model::SequenceStep q;
    q.tokens.assign(static_cast<size_t>(nw), 0);
    q.position = 0;
    for (int64_t b = 0; b < sim::blocks_for(nw + 1, bs); ++b) q.block_table.push_back(static_cast<int32_t>(b));
    (void)g->step({q}, greedy_options());
    if (nw + 1 <= cap) {
      model::SequenceStep d = q;
      d.tokens = {0};
      d.position = nw;
      (void)g->step({d}, greedy_options());
    }
    g->reset_cache();
  }

  // The engine: one replica, the simulator's scheduler, real clock.
  std::vector<sim::SchedSeq> seqs(n);
  for (size_t i = 0; i < n; ++i) {
    seqs[i].input = reqs[i].input_tokens;
    seqs[i].output = reqs[i].output_tokens;
  }
  sim::BatchScheduler sched(L, L.kv_blocks, seqs);
  sim::SimResult& res = r.result;
  res.requests.resize(n);
  for (size_t i = 0; i < n; ++i) {
    auto& q = res.requests[i];
    q.id = reqs[i].id;
    q.arrival_s = reqs[i].arrival_s;
    q.input_tokens = reqs[i].input_tokens;
    q.output_tokens = reqs[i].output_tokens;
  }
  std::vector<int32_t> free_ids;
  for (int64_t b = L.kv_blocks - 1; b >= 0; --b) free_ids.push_back(static_cast<int32_t>(b));
  std::vector<std::vector<int32_t>> held(n);
  std::vector<int32_t> holding;  // sequences holding blocks
  auto release_extra = [&](int32_t si) {
    auto& h = held[static_cast<size_t>(si)];
    while (int64_t(h.size()) > seqs[static_cast<size_t>(si)].blocks) {
      free_ids.push_back(h.back());
      h.pop_back();
    }
  };
  std::vector<double> last_token_s(n, 0.0);
  std::vector<int64_t> tokens_per_second;
  std::vector<sim::Scheduled> list;
  std::vector<model::SequenceStep> batch;
  Event start, stop;
  StepGraph graph;
  std::set<int64_t> eager_decode_tokens;  // decode token counts run eagerly once (plans made)
  size_t next = 0;
  int64_t finished = 0, step_id = 0, tokens_sum = 0;
  double wall_sum_ms = 0;
  const auto t0 = clk::now();
  auto now_s = [&] { return std::chrono::duration<double>(clk::now() - t0).count(); };
  double next_progress = cfg.progress_every_s;
  const StepOptions step_opt = greedy_options();
  while (finished < int64_t(n)) {
    double t = now_s();
    while (next < n && reqs[next].arrival_s <= t) sched.enqueue(static_cast<int32_t>(next++));
    if (!sched.has_work()) {
      if (next >= n) throw RuntimeError("online engine: requests left unfinished with nothing to run");
      const double wait = reqs[next].arrival_s - t;
      if (wait > 2e-4) std::this_thread::sleep_for(std::chrono::duration<double>(wait - 1e-4));
      continue;
    }
    sched.schedule(step_id, list);
    if (list.empty()) throw RuntimeError("online engine: a step with queued work formed an empty batch");
    // Blocks of preempted sequences go back; scheduled sequences get the blocks they now hold.
    for (int32_t si : holding) release_extra(si);
    std::erase_if(holding, [&](int32_t si) { return held[static_cast<size_t>(si)].empty(); });
    batch.clear();
    OnlineStep st;
    st.start_s = t;
    st.batch = sim::batch_of(list, seqs);
    st.num_prefill_seqs = static_cast<int>(st.batch.num_prefill_seqs);
    st.num_decode = static_cast<int>(st.batch.num_decode);
    for (const auto& [si, k] : list) {
      const sim::SchedSeq& s = seqs[static_cast<size_t>(si)];
      auto& h = held[static_cast<size_t>(si)];
      if (h.empty() && s.blocks > 0) holding.push_back(si);
      while (int64_t(h.size()) < s.blocks) {
        if (free_ids.empty()) throw RuntimeError("online engine: KV block ids out of step with the scheduler");
        h.push_back(free_ids.back());
        free_ids.pop_back();
      }
      const auto& toks = tokens[static_cast<size_t>(si)];
      model::SequenceStep q;
      q.tokens.assign(toks.begin() + s.computed, toks.begin() + s.computed + k);
      q.position = s.computed;
      q.block_table = h;
      batch.push_back(std::move(q));
      st.num_tokens += k;
    }
    const double t_sched = now_s();
    g->prepare(batch, step_opt);
    const double t_prep = now_s();
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
    const double t_enq = now_s();
    const GpuStepOutput out = g->collect(stream);
    const double t_wait = now_s();
    st.measured_ms = double(Event::elapsed_ms(start, stop));
    if (out.token_ids.size() != list.size())
      throw RuntimeError(fmt::format("online engine: {} sampled ids for {} sequences", out.token_ids.size(),
                                     list.size()));
    // Sample the sequences whose whole length is now computed, then advance the scheduler.
    for (size_t k = 0; k < list.size(); ++k) {
      const auto& [si, m] = list[k];
      const sim::SchedSeq& s = seqs[static_cast<size_t>(si)];
      if (s.computed + m == s.len()) tokens[static_cast<size_t>(si)].push_back(out.token_ids[k]);
    }
    const double t_end = now_s();
    st.wall_ms = (t_end - t) * 1e3;
    st.host.schedule_ms = (t_sched - t) * 1e3;
    st.host.prepare_ms = (t_prep - t_sched) * 1e3;
    st.host.enqueue_ms = (t_enq - t_prep) * 1e3;
    st.host.wait_ms = (t_wait - t_enq) * 1e3;
    st.host.sample_ms = (t_end - t_wait) * 1e3;
    sched.complete(list, [&](int32_t si) {
      const sim::SchedSeq& q = seqs[static_cast<size_t>(si)];
      auto& rr = res.requests[static_cast<size_t>(si)];
      if (q.generated == 1)
        rr.first_token_s = t_end;
      else
        res.itls_ms.push_back((t_end - last_token_s[static_cast<size_t>(si)]) * 1e3);
      last_token_s[static_cast<size_t>(si)] = t_end;
      const auto bucket = static_cast<size_t>(t_end);
      if (bucket >= tokens_per_second.size()) tokens_per_second.resize(bucket + 1, 0);
      ++tokens_per_second[bucket];
      if (q.done) {
        rr.finish_s = t_end;
        ++finished;
      }
    });
    for (int32_t si : holding) release_extra(si);
    std::erase_if(holding, [&](int32_t si) { return held[static_cast<size_t>(si)].empty(); });
    wall_sum_ms += st.wall_ms;
    tokens_sum += st.num_tokens;
    r.steps.push_back(std::move(st));
    ++step_id;
    r.steps.back().host.bookkeep_ms = (now_s() - t_end) * 1e3;  // the prediction is made after the run
    if (cfg.progress_every_s > 0 && t_end >= next_progress) {
      std::fprintf(stderr, "online: t = %.1f s, %lld / %zu requests done, %lld steps, %zu waiting, %zu running\n",
                   t_end, static_cast<long long>(finished), n, static_cast<long long>(step_id),
                   sched.waiting().size(), sched.running().size());
      next_progress = t_end + cfg.progress_every_s;
    }
  }

  // The cost model's prediction per step, outside the timed loop.
  for (auto& st : r.steps) {
    const sim::ReplicaBatch one[] = {st.batch};
    // The GPU part (the measurement is CUDA events around the forward).
    const auto& model_of_step = st.cuda_graph ? *cm : *cm_eager;
    st.predicted_ms = model_of_step.step(std::span<const sim::ReplicaBatch>(one), false).time_us / 1e3 -
                      r.profile_host_overhead_ms;
  }
  for (size_t i = 0; i < n; ++i) res.requests[i].preemptions = seqs[i].preemptions;
  res.metrics = sim::compute_metrics(res, S.serving);
  auto& m = res.metrics;
  m.num_steps = step_id;
  m.num_preemptions = sched.preemptions();
  m.mean_step_time_ms = step_id > 0 ? wall_sum_ms / double(step_id) : 0;
  m.mean_tokens_per_step = step_id > 0 ? double(tokens_sum) / double(step_id) : 0;
  m.busy_fraction = m.duration_s > 0 ? wall_sum_ms * 1e-3 / m.duration_s : 0;
  for (int64_t c : tokens_per_second) m.max_output_tokens_per_s = std::max(m.max_output_tokens_per_s, double(c));
  m.kv_blocks_per_replica = L.kv_blocks;

  r.output_ids.resize(n);
  for (size_t i = 0; i < n; ++i)
    r.output_ids[i].assign(tokens[i].begin() + reqs[i].input_tokens, tokens[i].end());
  return r;
}

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
  j["num_gpus"] = 1;
  j["run_name"] = "mixserve-run bench";
  j["mode"] = "online";
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
  }
  j["requests"] = reqs;
  nlohmann::json steps = nlohmann::json::array();
  std::vector<double> errs;
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
                     {"batch",
                      {{"prefill_tokens", s.batch.prefill_tokens},
                       {"num_prefill_seqs", s.batch.num_prefill_seqs},
                       {"prefill_attn_pairs", s.batch.prefill_attn_pairs},
                       {"num_decode", s.batch.num_decode},
                       {"decode_context", s.batch.decode_context}}}});
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
                   "measured, measured by CUDA events)\n", r.cost_model, r.profile_name);
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
