// Discrete-event serving simulator: see serving.hpp for the engine model.
#include "mixserve/sim/serving.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <queue>

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/sim/moe_load.hpp"
#include "mixserve/sim/scheduler.hpp"

namespace mixserve::sim {

namespace {

// Per-sequence engine state beside the scheduler's (SchedSeq).
struct SeqInfo {
  double last_token_s = 0;
  bool bad = false;  // missed an SLO
  int slot = 0, replica = 0;
};

class Engine {
 public:
  Engine(const StepCostModel& cm, const ServingConfig& cfg, const RequestStream& stream)
      : cm_(cm), cfg_(cfg), stream_(stream) {
    const auto& L = cfg.limits;
    if (cfg.num_replicas < 1 || cfg.pp < 1)
      throw InputError(fmt::format("serving config: num_replicas ({}) and pp ({}) must be >= 1",
                                   cfg.num_replicas, cfg.pp));
    if (L.max_num_seqs < 1 || L.max_num_batched_tokens < 1 || L.kv_block_tokens < 1)
      throw InputError("serving config: limits max_num_seqs, max_num_batched_tokens and "
                       "kv_block_tokens must be >= 1");
    if (L.kv_blocks < cfg.pp)
      throw InputError(fmt::format("serving config: limits.kv_blocks = {}: expected at least one "
                                   "block per pipeline micro-batch slot ({})", L.kv_blocks, cfg.pp));
    block_tokens_ = L.kv_block_tokens;
    blocks_per_unit_ = L.kv_blocks / cfg.pp;
    const size_t n = stream.requests.size();
    seqs_.resize(n);
    info_.resize(n);
    units_.reserve(static_cast<size_t>(cfg.pp * cfg.num_replicas));
    for (int k = 0; k < cfg.pp * cfg.num_replicas; ++k) units_.emplace_back(L, blocks_per_unit_, seqs_);
    res_.requests.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const Request& r = stream.requests[i];
      if (r.input_tokens < 1 || r.output_tokens < 1)
        throw InputError(fmt::format("request {}: input and output tokens must be >= 1", r.id));
      // With recompute the longest prefill is input + output - 1 tokens.
      const int64_t kv_need = blocks_for(r.input_tokens + r.output_tokens - 1, block_tokens_);
      if (kv_need > blocks_per_unit_)
        throw InputError(fmt::format(
            "request {} ({} + {} tokens) needs {} KV blocks; a replica's scheduler holds {} "
            "(kv_blocks {} / pp {}): raise the KV capacity or cap max_seq_len",
            r.id, r.input_tokens, r.output_tokens, kv_need, blocks_per_unit_, L.kv_blocks, cfg.pp));
      if (!L.chunked_prefill && r.input_tokens + r.output_tokens - 1 > L.max_num_batched_tokens)
        throw InputError(fmt::format(
            "request {}: a prefill of up to {} tokens exceeds max_num_batched_tokens ({}) and "
            "chunked prefill is off", r.id, r.input_tokens + r.output_tokens - 1,
            L.max_num_batched_tokens));
      if (L.max_model_len > 0 && r.input_tokens + r.output_tokens > L.max_model_len)
        throw InputError(fmt::format(
            "request {} ({} + {} tokens) is longer than max_model_len ({}): cap the workload's "
            "limits.max_seq_len", r.id, r.input_tokens, r.output_tokens, L.max_model_len));
      if (stream.closed_loop_users == 0 && i > 0 && r.arrival_s < stream.requests[i - 1].arrival_s)
        throw InputError(fmt::format("request {}: arrivals must be sorted by time (arrival_s {} "
                                     "after {})", r.id, r.arrival_s,
                                     stream.requests[i - 1].arrival_s));
      if (r.replica >= cfg.num_replicas)
        throw InputError(fmt::format("request {}: replica {} not in the plan (replicas: {})", r.id,
                                     r.replica, cfg.num_replicas));
      seqs_[i].input = r.input_tokens;
      seqs_[i].output = r.output_tokens;
      auto& rr = res_.requests[i];
      rr.id = r.id;
      rr.input_tokens = r.input_tokens;
      rr.output_tokens = r.output_tokens;
      rr.arrival_s = r.arrival_s;
    }
    if (stream.closed_loop_users > 0) {
      const size_t first = std::min<size_t>(n, static_cast<size_t>(stream.closed_loop_users));
      for (size_t i = 0; i < first; ++i) issue_closed(static_cast<int32_t>(i), 0.0);
      next_unissued_ = first;
    }
    ready_.assign(static_cast<size_t>(cfg.pp), 0.0);
    parked_.assign(static_cast<size_t>(cfg.pp), true);
    batches_.resize(static_cast<size_t>(cfg.num_replicas));
    sched_.resize(static_cast<size_t>(cfg.num_replicas));
    if (cfg.sample_moe_load) {
      const MoeLoadShape shape = cm.moe_load_shape();
      if (shape.num_experts > 0 && shape.ep > 1) sampler_.emplace(shape, cfg.moe_load_seed);
    }
  }

  SimResult run() {
    const int64_t n = static_cast<int64_t>(seqs_.size());
    while (finished_ < n) {
      if (cfg_.stop_after_bad > 0 && bad_ >= cfg_.stop_after_bad) {
        res_.stopped_early = true;
        break;
      }
      int v = pick_slot();
      if (v < 0) {  // nothing runnable: jump to the next arrival
        const double t = next_arrival_time();
        if (!std::isfinite(t))
          throw RuntimeError("serving simulator: requests left unfinished with nothing to run");
        admit_until(t);
        continue;
      }
      const double t_start = std::max(ready_[static_cast<size_t>(v)], entry_free_);
      admit_until(t_start);
      if (!slot_has_work(v)) {
        parked_[static_cast<size_t>(v)] = true;
        continue;
      }
      run_step(v, t_start);
      if (cfg_.progress && cfg_.progress_every > 0 && steps_ % cfg_.progress_every == 0)
        cfg_.progress(SimProgress{t_start, finished_, n, steps_});
    }
    if (cfg_.progress) cfg_.progress(SimProgress{last_end_, finished_, n, steps_});
    for (size_t i = 0; i < seqs_.size(); ++i) res_.requests[i].preemptions = seqs_[i].preemptions;
    if (res_.stopped_early) {
      std::vector<RequestResult> done;
      for (size_t i = 0; i < seqs_.size(); ++i)
        if (seqs_[i].done) done.push_back(res_.requests[i]);
      res_.requests = std::move(done);
    }
    res_.metrics = compute_metrics(res_, cfg_);
    auto& m = res_.metrics;
    m.num_steps = steps_;
    m.num_preemptions = 0;
    for (const auto& u : units_) m.num_preemptions += u.preemptions();
    m.num_empty_replica_steps = empty_replica_steps_;
    m.mean_step_time_ms = steps_ > 0 ? step_time_sum_us_ * 1e-3 / double(steps_) : 0;
    m.mean_tokens_per_step = steps_ > 0 ? double(tokens_sum_) / double(steps_) : 0;
    m.busy_fraction = m.duration_s > 0 ? busy_s_ / m.duration_s : 0;
    m.max_output_tokens_per_s = 0;
    for (int64_t c : tokens_per_second_) m.max_output_tokens_per_s =
        std::max(m.max_output_tokens_per_s, double(c));
    m.kv_blocks_per_replica = cfg_.limits.kv_blocks;
    m.mean_moe_max_over_mean = load_samples_ > 0 ? load_sum_ / double(load_samples_) : 0;
    return std::move(res_);
  }

 private:
  BatchScheduler& unit(int slot, int replica) {
    return units_[static_cast<size_t>(slot * cfg_.num_replicas + replica)];
  }
  bool slot_has_work(int v) {
    for (int r = 0; r < cfg_.num_replicas; ++r)
      if (unit(v, r).has_work()) return true;
    return false;
  }

  // The unparked slot that can start first (lowest index on ties), or -1.
  int pick_slot() const {
    int best = -1;
    for (int v = 0; v < cfg_.pp; ++v) {
      if (parked_[static_cast<size_t>(v)]) continue;
      if (best < 0 || ready_[static_cast<size_t>(v)] < ready_[static_cast<size_t>(best)]) best = v;
    }
    return best;
  }

  double next_arrival_time() const {
    double t = std::numeric_limits<double>::infinity();
    if (stream_.closed_loop_users == 0 && next_open_ < stream_.requests.size())
      t = stream_.requests[next_open_].arrival_s;
    if (!closed_.empty()) t = std::min(t, closed_.top().first);
    return t;
  }

  void issue_closed(int32_t i, double t) {
    res_.requests[static_cast<size_t>(i)].arrival_s = t;
    closed_.emplace(t, i);
  }

  void admit_until(double t) {
    if (stream_.closed_loop_users == 0) {
      while (next_open_ < stream_.requests.size() && stream_.requests[next_open_].arrival_s <= t) {
        route(static_cast<int32_t>(next_open_), stream_.requests[next_open_].arrival_s);
        ++next_open_;
      }
    }
    while (!closed_.empty() && closed_.top().first <= t) {
      const auto [ta, i] = closed_.top();
      closed_.pop();
      route(i, ta);
    }
  }

  void route(int32_t i, double t_arrival) {
    const Request& req = stream_.requests[static_cast<size_t>(i)];
    int r = req.replica;
    if (r < 0) {
      if (cfg_.router == RouterKind::round_robin) {
        r = static_cast<int>(rr_next_++ % static_cast<uint64_t>(cfg_.num_replicas));
      } else {
        r = 0;
        for (int k = 1; k < cfg_.num_replicas; ++k)
          if (replica_load(k) < replica_load(r)) r = k;
      }
    }
    int v = 0;  // micro-batch slot: the least loaded of the replica's
    for (int k = 1; k < cfg_.pp; ++k)
      if (unit(k, r).unfinished() < unit(v, r).unfinished()) v = k;
    SeqInfo& s = info_[static_cast<size_t>(i)];
    s.slot = v;
    s.replica = r;
    res_.requests[static_cast<size_t>(i)].replica = r;
    unit(v, r).enqueue(i);
    if (parked_[static_cast<size_t>(v)]) {
      parked_[static_cast<size_t>(v)] = false;
      ready_[static_cast<size_t>(v)] = std::max(ready_[static_cast<size_t>(v)], t_arrival);
    }
  }

  int64_t replica_load(int r) {
    int64_t l = 0;
    for (int v = 0; v < cfg_.pp; ++v) l += unit(v, r).unfinished();
    return l;
  }

  void mark_bad(SeqInfo& s) {
    if (!s.bad) ++bad_;
    s.bad = true;
  }

  void run_step(int v, double t_start) {
    int64_t tokens = 0;
    int empty = 0;
    for (int r = 0; r < cfg_.num_replicas; ++r) {
      auto& list = sched_[static_cast<size_t>(r)];
      unit(v, r).schedule(steps_, list);
      const ReplicaBatch b = batch_of(list, seqs_);
      tokens += b.tokens();
      empty += b.empty() ? 1 : 0;
      batches_[static_cast<size_t>(r)] = b;
    }
    if (tokens == 0)
      throw RuntimeError("serving simulator: a slot with queued work formed an empty step");
    StepCost c;
    if (sampler_) {
      sampler_->sample(tokens, load_);
      for (double x : load_.max_over_mean) load_sum_ += x;
      load_samples_ += static_cast<int64_t>(load_.max_over_mean.size());
      c = cm_.step(batches_, false, load_);
    } else {
      c = cm_.step(batches_, false);
    }
    if (!(c.time_us > 0))
      throw RuntimeError(fmt::format("cost model '{}' returned a step time of {} us",
                                     cm_.name(), c.time_us));
    const double stage_us = c.stage_time_us > 0 ? c.stage_time_us : c.time_us / cfg_.pp;
    const double t_end = t_start + c.time_us * 1e-6;
    entry_free_ = cfg_.pp > 1 ? t_start + stage_us * 1e-6 : t_end;
    ready_[static_cast<size_t>(v)] = t_end;
    busy_s_ += std::max(0.0, t_end - std::max(t_start, covered_until_));
    covered_until_ = std::max(covered_until_, t_end);
    last_end_ = std::max(last_end_, t_end);
    if (cfg_.record_steps)
      res_.steps.push_back(StepRecord{t_start, c.time_us, v, batches_,
                                      sampler_ ? load_.max_over_mean : std::vector<double>{}});
    ++steps_;
    step_time_sum_us_ += c.time_us;
    tokens_sum_ += tokens;
    empty_replica_steps_ += empty;

    for (int r = 0; r < cfg_.num_replicas; ++r) {
      unit(v, r).complete(sched_[static_cast<size_t>(r)], [&](int32_t si) {
        const SchedSeq& q = seqs_[static_cast<size_t>(si)];
        SeqInfo& s = info_[static_cast<size_t>(si)];
        auto& rr = res_.requests[static_cast<size_t>(si)];
        if (q.generated == 1) {
          rr.first_token_s = t_end;
          if (cfg_.slo_ttft_ms > 0 && rr.ttft_ms() > cfg_.slo_ttft_ms) mark_bad(s);
        } else {
          res_.itls_ms.push_back((t_end - s.last_token_s) * 1e3);
        }
        s.last_token_s = t_end;
        const auto bucket = static_cast<size_t>(t_end);
        if (bucket >= tokens_per_second_.size()) tokens_per_second_.resize(bucket + 1, 0);
        ++tokens_per_second_[bucket];
        if (q.done) {
          rr.finish_s = t_end;
          if ((cfg_.slo_tpot_ms > 0 && rr.tpot_ms() > cfg_.slo_tpot_ms) ||
              (cfg_.slo_e2el_ms > 0 && rr.e2el_ms() > cfg_.slo_e2el_ms))
            mark_bad(s);
          ++finished_;
          if (stream_.closed_loop_users > 0 && next_unissued_ < seqs_.size())
            issue_closed(static_cast<int32_t>(next_unissued_++), t_end);
        }
      });
    }
  }

  const StepCostModel& cm_;
  const ServingConfig& cfg_;
  const RequestStream& stream_;
  int64_t block_tokens_ = 16, blocks_per_unit_ = 0;
  std::vector<SchedSeq> seqs_;
  std::vector<SeqInfo> info_;
  std::vector<BatchScheduler> units_;
  std::vector<double> ready_;
  std::vector<bool> parked_;
  double entry_free_ = 0, busy_s_ = 0, covered_until_ = 0, last_end_ = 0;
  size_t next_open_ = 0, next_unissued_ = 0;
  using Pending = std::pair<double, int32_t>;
  std::priority_queue<Pending, std::vector<Pending>, std::greater<>> closed_;
  uint64_t rr_next_ = 0;
  int64_t finished_ = 0, bad_ = 0, steps_ = 0, empty_replica_steps_ = 0, tokens_sum_ = 0;
  double step_time_sum_us_ = 0;
  std::vector<int64_t> tokens_per_second_;
  std::vector<ReplicaBatch> batches_;
  std::vector<std::vector<Scheduled>> sched_;
  std::optional<MoeLoadSampler> sampler_;
  MoeStepLoad load_;
  double load_sum_ = 0;
  int64_t load_samples_ = 0;
  SimResult res_;
};

constexpr auto kRouterNames = MIXSERVE_ENUM_TABLE(RouterKind, MIXSERVE_ROUTERS);

}  // namespace

std::string_view to_string(RouterKind r) { return enum_to_string(kRouterNames, r); }

std::optional<RouterKind> parse_router(std::string_view s) { return enum_parse(kRouterNames, s); }

std::vector<std::string> router_names() { return enum_names(kRouterNames); }

double percentile(std::span<const double> sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q / 100.0 * double(sorted.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - double(lo)) * (sorted[hi] - sorted[lo]);
}

namespace {

// percentile() without sorting: the order statistics at floor(pos) and the next one, by
// selection (O(n); the pooled ITLs of a long run are millions of values). Reorders v.
double select_percentile(std::vector<double>& v, double q) {
  const double pos = q / 100.0 * double(v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(lo), v.end());
  const double a = v[lo];
  const double b = lo + 1 < v.size()
                       ? *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(lo + 1), v.end())
                       : a;
  return a + (pos - double(lo)) * (b - a);
}

}  // namespace

LatencyStats latency_stats(std::vector<double> v) {
  LatencyStats s;
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.stddev = std::sqrt(ss / double(v.size()));
  s.median = select_percentile(v, 50);
  s.p90 = select_percentile(v, 90);
  s.p99 = select_percentile(v, 99);
  return s;
}

ServingMetrics compute_metrics(const SimResult& r, const ServingConfig& cfg) {
  ServingMetrics m;
  std::vector<double> ttft, tpot, e2el;
  ttft.reserve(r.requests.size());
  e2el.reserve(r.requests.size());
  const bool any_slo = cfg.slo_ttft_ms > 0 || cfg.slo_tpot_ms > 0 || cfg.slo_e2el_ms > 0;
  std::vector<std::pair<double, int>> events;  // (time, +1 arrival / -1 finish)
  events.reserve(2 * r.requests.size());
  for (const auto& q : r.requests) {
    ++m.completed;
    m.total_input_tokens += q.input_tokens;
    m.total_output_tokens += q.output_tokens;
    m.duration_s = std::max(m.duration_s, q.finish_s);
    ttft.push_back(q.ttft_ms());
    e2el.push_back(q.e2el_ms());
    if (q.output_tokens > 1) tpot.push_back(q.tpot_ms());
    const bool good = (cfg.slo_ttft_ms <= 0 || q.ttft_ms() <= cfg.slo_ttft_ms) &&
                      (cfg.slo_tpot_ms <= 0 || q.tpot_ms() <= cfg.slo_tpot_ms) &&
                      (cfg.slo_e2el_ms <= 0 || q.e2el_ms() <= cfg.slo_e2el_ms);
    m.good_requests += good ? 1 : 0;
    events.emplace_back(q.arrival_s, 1);
    events.emplace_back(q.finish_s, -1);
  }
  std::sort(events.begin(), events.end());  // finishes (-1) before arrivals at equal times
  int64_t cur = 0;
  for (const auto& e : events) {
    cur += e.second;
    m.max_concurrent_requests = std::max(m.max_concurrent_requests, cur);
  }
  if (m.duration_s > 0) {
    m.request_throughput = double(m.completed) / m.duration_s;
    m.output_throughput = double(m.total_output_tokens) / m.duration_s;
    m.total_token_throughput = double(m.total_input_tokens + m.total_output_tokens) / m.duration_s;
    m.request_goodput = any_slo ? double(m.good_requests) / m.duration_s : 0;
  }
  m.slo_attainment = m.completed > 0 ? double(m.good_requests) / double(m.completed) : 0;
  m.ttft = latency_stats(std::move(ttft));
  m.tpot = latency_stats(std::move(tpot));
  m.itl = latency_stats(r.itls_ms);
  m.e2el = latency_stats(std::move(e2el));
  return m;
}

SimResult simulate(const StepCostModel& cm, const ServingConfig& cfg, const RequestStream& stream) {
  if (stream.requests.empty()) throw InputError("serving simulator: no requests to simulate");
  Engine e(cm, cfg, stream);
  return e.run();
}

ServingConfig serving_config_for(const StepCostModel& cm, const Layout& layout,
                                 const RuntimeLimits& limits, const WorkloadSpec& w) {
  ServingConfig cfg;
  cfg.num_replicas = layout.attn_dp;
  cfg.pp = layout.pp;
  cfg.limits = limits;
  if (w.max_num_seqs > 0) cfg.limits.max_num_seqs = w.max_num_seqs;
  if (w.max_seq_len > 0) cfg.limits.max_model_len = w.max_seq_len;
  if (cfg.limits.kv_blocks <= 0) {
    const MemoryBreakdown mem = cm.memory(cfg.limits);
    if (!mem.fits || mem.kv_tokens <= 0)
      throw InputError(fmt::format("layout '{}': the memory model leaves no room for a KV cache "
                                   "(kv_tokens {})", layout.name(), mem.kv_tokens));
    cfg.limits.kv_blocks = mem.kv_tokens / std::max(1, cfg.limits.kv_block_tokens);
  }
  cfg.slo_ttft_ms = w.slo_ttft_ms;
  cfg.slo_tpot_ms = w.slo_tpot_ms;
  cfg.slo_e2el_ms = w.slo_e2el_ms;
  cfg.moe_load_seed = w.seed;
  return cfg;
}

CapacityResult capacity_search(const StepCostModel& cm, const ServingConfig& base,
                               const WorkloadSpec& w, const CapacityOptions& opt, int num_gpus) {
  if (w.arrival != ArrivalKind::poisson && w.arrival != ArrivalKind::gamma)
    throw InputError(fmt::format("workload '{}': the capacity search varies the request rate, so "
                                 "the arrival kind must be poisson or gamma, not {}",
                                 w.name, to_string(w.arrival)));
  if (opt.slo_ttft_ms <= 0 && opt.slo_tpot_ms <= 0 && opt.slo_e2el_ms <= 0)
    throw InputError("capacity search: set at least one SLO (ttft, tpot or e2el)");
  if (!(opt.attainment > 0 && opt.attainment <= 1) || !(opt.start_rate > 0) ||
      !(opt.rel_tol > 0) || opt.num_requests < 1 || opt.max_requests < opt.num_requests ||
      !(opt.trial_duration_s >= 0))
    throw InputError("capacity search: expected attainment in (0, 1], start_rate > 0, "
                     "rel_tol > 0, 1 <= num_requests <= max_requests, trial_duration_s >= 0");
  ServingConfig cfg = base;
  cfg.slo_ttft_ms = opt.slo_ttft_ms;
  cfg.slo_tpot_ms = opt.slo_tpot_ms;
  cfg.slo_e2el_ms = opt.slo_e2el_ms;
  cfg.record_steps = false;
  cfg.progress = nullptr;
  WorkloadSpec wl = w;

  CapacityResult out;
  bool last_stopped = false;
  auto run_at = [&](double rate) {
    wl.rate = rate;
    const double want = std::ceil(rate * opt.trial_duration_s);
    wl.num_requests = static_cast<int>(
        std::clamp(want, double(opt.num_requests), double(opt.max_requests)));
    // More than (1 - attainment) * n bad requests decide the trial: stop there.
    cfg.stop_after_bad =
        static_cast<int64_t>(std::floor((1 - opt.attainment) * wl.num_requests)) + 1;
    ++out.simulations;
    SimResult r = simulate(cm, cfg, generate_requests(wl));
    last_stopped = r.stopped_early;
    return r.metrics;
  };
  auto ok = [&](const ServingMetrics& m) {
    const bool sustained = !last_stopped && m.slo_attainment >= opt.attainment;
    if (opt.on_trial) opt.on_trial(wl.rate, wl.num_requests, sustained);
    if (opt.on_trial_metrics) opt.on_trial_metrics(wl.rate, m, sustained);
    return sustained;
  };

  double lo = 0, hi = 0;
  ServingMetrics best;
  double rate = opt.start_rate;
  ServingMetrics m = run_at(rate);
  if (ok(m)) {
    lo = rate;
    best = m;
    while (out.simulations < opt.max_simulations) {
      rate *= 2;
      m = run_at(rate);
      if (!ok(m)) {
        hi = rate;
        break;
      }
      lo = rate;
      best = m;
    }
  } else {
    hi = rate;
    while (out.simulations < opt.max_simulations && rate > opt.start_rate * 1e-6) {
      rate /= 2;
      m = run_at(rate);
      if (ok(m)) {
        lo = rate;
        best = m;
        break;
      }
      hi = rate;
    }
  }
  if (lo > 0 && hi > 0) {
    while ((hi - lo) / hi > opt.rel_tol && out.simulations < opt.max_simulations) {
      const double mid = 0.5 * (lo + hi);
      m = run_at(mid);
      if (ok(m)) {
        lo = mid;
        best = m;
      } else {
        hi = mid;
      }
    }
  }
  out.max_rate = lo;
  out.max_rate_per_gpu = num_gpus > 0 ? lo / num_gpus : 0;
  out.at_max = best;
  return out;
}

}  // namespace mixserve::sim
