// Host side of the online engine: routing, per-replica schedulers and block ids (online_engine.hpp).
#include "mixserve/gpu/online_engine.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::gpu {

OnlineEngine::OnlineEngine(const sim::ServingConfig& cfg, const sim::RequestStream& requests,
                           std::vector<std::vector<int32_t>> prompts)
    : cfg_(cfg), requests_(requests), tokens_(std::move(prompts)) {
  if (cfg_.num_replicas < 1 || cfg_.pp != 1)
    throw InputError(fmt::format("online engine: {} replicas and pp {}: expected >= 1 replica and pp 1 (the online "
                                 "engine does not run pipeline micro-batches)", cfg_.num_replicas, cfg_.pp));
  const size_t n = requests_.requests.size();
  if (tokens_.size() != n)
    throw InputError(fmt::format("online engine: {} prompts for {} requests", tokens_.size(), n));
  seqs_.resize(n);
  replica_.assign(n, -1);
  held_.resize(n);
  last_token_s_.assign(n, 0.0);
  res_.requests.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const sim::Request& r = requests_.requests[i];
    if (r.replica >= cfg_.num_replicas)
      throw InputError(fmt::format("request {}: replica {} not in the plan (replicas: {})", r.id, r.replica,
                                   cfg_.num_replicas));
    if (int64_t(tokens_[i].size()) != r.input_tokens)
      throw InputError(fmt::format("online engine: request {} has {} prompt ids for {} input tokens", r.id,
                                   tokens_[i].size(), r.input_tokens));
    seqs_[i].input = r.input_tokens;
    seqs_[i].output = r.output_tokens;
    auto& q = res_.requests[i];
    q.id = r.id;
    q.arrival_s = r.arrival_s;
    q.input_tokens = r.input_tokens;
    q.output_tokens = r.output_tokens;
  }
  const int64_t blocks = cfg_.limits.kv_blocks;
  sched_.reserve(static_cast<size_t>(cfg_.num_replicas));
  free_ids_.resize(static_cast<size_t>(cfg_.num_replicas));
  for (int d = 0; d < cfg_.num_replicas; ++d) {
    sched_.emplace_back(cfg_.limits, blocks, seqs_);
    for (int64_t b = blocks - 1; b >= 0; --b) free_ids_[size_t(d)].push_back(static_cast<int32_t>(b));
  }
  step_.lists.resize(static_cast<size_t>(cfg_.num_replicas));
  step_.batches.resize(static_cast<size_t>(cfg_.num_replicas));
}

void OnlineEngine::admit_until(double t) {
  const auto& reqs = requests_.requests;
  while (next_ < reqs.size() && reqs[next_].arrival_s <= t) {
    // serving.cpp Engine::route (pp = 1: one micro-batch slot per replica).
    int r = reqs[next_].replica;
    if (r < 0) {
      if (cfg_.router == sim::RouterKind::round_robin) {
        r = static_cast<int>(rr_next_++ % static_cast<uint64_t>(cfg_.num_replicas));
      } else {
        r = 0;
        for (int k = 1; k < cfg_.num_replicas; ++k)
          if (sched_[size_t(k)].unfinished() < sched_[size_t(r)].unfinished()) r = k;
      }
    }
    replica_[next_] = r;
    res_.requests[next_].replica = r;
    sched_[size_t(r)].enqueue(static_cast<int32_t>(next_));
    ++next_;
  }
}

bool OnlineEngine::has_work() const {
  return std::any_of(sched_.begin(), sched_.end(), [](const sim::BatchScheduler& s) { return s.has_work(); });
}

int64_t OnlineEngine::waiting() const {
  int64_t w = 0;
  for (const auto& s : sched_) w += int64_t(s.waiting().size());
  return w;
}

int64_t OnlineEngine::running() const {
  int64_t w = 0;
  for (const auto& s : sched_) w += int64_t(s.running().size());
  return w;
}

// Blocks of preempted or finished sequences go back to their replica's pool (the scheduler's
// count only drops on preemption or completion).
void OnlineEngine::release_extra_blocks() {
  for (int32_t si : holding_) {
    auto& h = held_[size_t(si)];
    auto& pool = free_ids_[size_t(replica_[size_t(si)])];
    while (int64_t(h.size()) > seqs_[size_t(si)].blocks) {
      pool.push_back(h.back());
      h.pop_back();
    }
  }
  std::erase_if(holding_, [&](int32_t si) { return held_[size_t(si)].empty(); });
}

const OnlineEngine::Step& OnlineEngine::schedule() {
  if (in_step_) throw RuntimeError("online engine: schedule() twice without complete()");
  if (!has_work()) throw RuntimeError("online engine: schedule() with no replica holding work");
  Step& st = step_;
  st.id = steps_;
  st.replicas.assign(size_t(cfg_.num_replicas), sim::ReplicaBatch{});
  st.total = sim::ReplicaBatch{};
  st.num_tokens = 0;
  st.empty_replicas = 0;
  for (int d = 0; d < cfg_.num_replicas; ++d) {
    auto& list = st.lists[size_t(d)];
    list.clear();
    sched_[size_t(d)].schedule(st.id, list);  // an idle replica forms an empty list
  }
  release_extra_blocks();  // preempted in this schedule: their blocks return first
  for (int d = 0; d < cfg_.num_replicas; ++d) {
    const auto& list = st.lists[size_t(d)];
    auto& batch = st.batches[size_t(d)];
    batch.clear();
    auto& pool = free_ids_[size_t(d)];
    for (const auto& [si, k] : list) {
      const sim::SchedSeq& s = seqs_[size_t(si)];
      auto& h = held_[size_t(si)];
      if (h.empty() && s.blocks > 0) holding_.push_back(si);
      while (int64_t(h.size()) < s.blocks) {
        if (pool.empty()) throw RuntimeError("online engine: KV block ids out of step with the scheduler");
        h.push_back(pool.back());
        pool.pop_back();
      }
      const auto& toks = tokens_[size_t(si)];
      model::SequenceStep q;
      q.tokens.assign(toks.begin() + s.computed, toks.begin() + s.computed + k);
      q.position = s.computed;
      q.block_table = h;
      batch.push_back(std::move(q));
      st.num_tokens += k;
    }
    const sim::ReplicaBatch b = sim::batch_of(list, seqs_);
    st.replicas[size_t(d)] = b;
    st.total.prefill_tokens += b.prefill_tokens;
    st.total.num_prefill_seqs += b.num_prefill_seqs;
    st.total.prefill_attn_pairs += b.prefill_attn_pairs;
    st.total.num_decode += b.num_decode;
    st.total.decode_context += b.decode_context;
    st.empty_replicas += b.empty() ? 1 : 0;
  }
  if (st.num_tokens == 0) throw RuntimeError("online engine: a step with queued work formed an empty batch");
  in_step_ = true;
  return st;
}

void OnlineEngine::take_tokens(const std::vector<std::vector<int32_t>>& ids) {
  if (!in_step_ || tokens_taken_) throw RuntimeError("online engine: take_tokens() once per scheduled step");
  if (int(ids.size()) != cfg_.num_replicas)
    throw RuntimeError(fmt::format("online engine: ids of {} replicas for {}", ids.size(), cfg_.num_replicas));
  for (int d = 0; d < cfg_.num_replicas; ++d) {
    const auto& list = step_.lists[size_t(d)];
    if (ids[size_t(d)].size() != list.size())
      throw RuntimeError(fmt::format("online engine: replica {}: {} sampled ids for {} sequences", d,
                                     ids[size_t(d)].size(), list.size()));
    // The sequences whose whole length is now computed take their token.
    for (size_t k = 0; k < list.size(); ++k) {
      const auto& [si, m] = list[k];
      const sim::SchedSeq& s = seqs_[size_t(si)];
      if (s.computed + m == s.len()) tokens_[size_t(si)].push_back(ids[size_t(d)][k]);
    }
  }
  tokens_taken_ = true;
}

void OnlineEngine::complete(double t_end) {
  if (!in_step_ || !tokens_taken_) throw RuntimeError("online engine: complete() before take_tokens()");
  for (int d = 0; d < cfg_.num_replicas; ++d)
    sched_[size_t(d)].complete(step_.lists[size_t(d)], [&](int32_t si) {
      const sim::SchedSeq& q = seqs_[size_t(si)];
      auto& rr = res_.requests[size_t(si)];
      if (q.generated == 1)
        rr.first_token_s = t_end;
      else
        res_.itls_ms.push_back((t_end - last_token_s_[size_t(si)]) * 1e3);
      last_token_s_[size_t(si)] = t_end;
      const auto bucket = static_cast<size_t>(t_end);
      if (bucket >= tokens_per_second_.size()) tokens_per_second_.resize(bucket + 1, 0);
      ++tokens_per_second_[bucket];
      if (q.done) {
        rr.finish_s = t_end;
        ++finished_;
      }
    });
  release_extra_blocks();
  tokens_sum_ += step_.num_tokens;
  empty_replica_steps_ += step_.empty_replicas;
  ++steps_;
  in_step_ = tokens_taken_ = false;
}

sim::SimResult OnlineEngine::result(double step_time_sum_ms) const {
  sim::SimResult r = res_;
  for (size_t i = 0; i < seqs_.size(); ++i) r.requests[i].preemptions = seqs_[i].preemptions;
  r.metrics = sim::compute_metrics(r, cfg_);
  auto& m = r.metrics;
  m.num_steps = steps_;
  m.num_preemptions = 0;
  for (const auto& s : sched_) m.num_preemptions += s.preemptions();
  m.num_empty_replica_steps = empty_replica_steps_;
  m.mean_step_time_ms = steps_ > 0 ? step_time_sum_ms / double(steps_) : 0;
  m.mean_tokens_per_step = steps_ > 0 ? double(tokens_sum_) / double(steps_) : 0;
  m.busy_fraction = m.duration_s > 0 ? step_time_sum_ms * 1e-3 / m.duration_s : 0;
  for (int64_t c : tokens_per_second_) m.max_output_tokens_per_s = std::max(m.max_output_tokens_per_s, double(c));
  m.kv_blocks_per_replica = cfg_.limits.kv_blocks;
  return r;
}

std::vector<std::vector<int32_t>> OnlineEngine::output_ids() const {
  std::vector<std::vector<int32_t>> out(tokens_.size());
  for (size_t i = 0; i < tokens_.size(); ++i)
    out[i].assign(tokens_[i].begin() + requests_.requests[i].input_tokens, tokens_[i].end());
  return out;
}

}  // namespace mixserve::gpu
