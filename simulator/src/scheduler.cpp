// One replica's step selection (scheduler.hpp), shared by the simulator and the GPU engine.
#include "mixserve/sim/scheduler.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {

BatchScheduler::BatchScheduler(const RuntimeLimits& limits, int64_t num_blocks,
                               std::vector<SchedSeq>& seqs)
    : limits_(limits), num_blocks_(num_blocks), free_blocks_(num_blocks), seqs_(seqs) {
  if (limits.max_num_seqs < 1 || limits.max_num_batched_tokens < 1 || limits.kv_block_tokens < 1)
    throw InputError("scheduler: limits max_num_seqs, max_num_batched_tokens and "
                     "kv_block_tokens must be >= 1");
  if (num_blocks < 1)
    throw InputError(fmt::format("scheduler: {} KV blocks: expected at least 1", num_blocks));
}

void BatchScheduler::enqueue(int32_t seq) {
  waiting_.push_back(seq);
  ++unfinished_;
}

void BatchScheduler::preempt(size_t j) {
  const int32_t victim = running_[j];
  SchedSeq& s = seqs_[static_cast<size_t>(victim)];
  free_blocks_ += s.blocks;
  s.blocks = 0;
  s.computed = 0;
  ++s.preemptions;
  ++preemptions_;
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(j));
  waiting_.push_front(victim);
}

// Schedules the running sequences in order; returns false if a preemption happened.
bool BatchScheduler::schedule_running(int64_t step, int64_t& budget, std::vector<Scheduled>& out) {
  const int64_t bt = limits_.kv_block_tokens;
  bool preempted = false;
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    const int32_t si = running_[i];
    SchedSeq& s = seqs_[static_cast<size_t>(si)];
    if (s.sched_stamp == step) continue;  // admitted this step (prefill-first)
    const int64_t n = std::min(s.len() - s.computed, budget);
    const int64_t need = blocks_for(s.computed + n, bt) - s.blocks;
    bool self_preempted = false;
    while (need > free_blocks_) {
      // Evict the newest running sequence not already scheduled in this step (may be s).
      size_t j = running_.size() - 1;
      while (j > i && seqs_[static_cast<size_t>(running_[j])].sched_stamp == step) --j;
      preempted = true;
      preempt(j);
      if (j == i) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;
    free_blocks_ -= need;
    s.blocks += need;
    s.sched_stamp = step;
    budget -= n;
    out.push_back({si, n});
  }
  return !preempted;
}

void BatchScheduler::schedule_waiting(int64_t step, int64_t& budget, std::vector<Scheduled>& out) {
  const int64_t bt = limits_.kv_block_tokens;
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < limits_.max_num_seqs) {
    const int32_t si = waiting_.front();
    SchedSeq& s = seqs_[static_cast<size_t>(si)];
    const int64_t want = s.len() - s.computed;
    if (!limits_.chunked_prefill && want > budget) break;
    const int64_t n = std::min(want, budget);
    const int64_t need = blocks_for(s.computed + n, bt) - s.blocks;
    if (need > free_blocks_) break;
    waiting_.pop_front();
    running_.push_back(si);
    free_blocks_ -= need;
    s.blocks += need;
    s.sched_stamp = step;
    budget -= n;
    out.push_back({si, n});
  }
}

void BatchScheduler::schedule(int64_t step_id, std::vector<Scheduled>& out) {
  out.clear();
  int64_t budget = limits_.max_num_batched_tokens;
  if (limits_.decode_first) {
    // vLLM V1: running requests first; no new admissions in a step that had to preempt.
    if (schedule_running(step_id, budget, out)) schedule_waiting(step_id, budget, out);
  } else {
    schedule_waiting(step_id, budget, out);
    schedule_running(step_id, budget, out);
  }
}

void BatchScheduler::erase_done() {
  std::erase_if(running_, [&](int32_t si) { return seqs_[static_cast<size_t>(si)].done; });
}

bool is_decode(const SchedSeq& s, int64_t tokens) {
  return s.computed > 0 && tokens == 1 && s.len() - s.computed == 1;
}

ReplicaBatch batch_of(std::span<const Scheduled> list, std::span<const SchedSeq> seqs) {
  ReplicaBatch b;
  for (const auto& [si, n] : list) {
    const SchedSeq& s = seqs[static_cast<size_t>(si)];
    if (is_decode(s, n)) {
      ++b.num_decode;
      b.decode_context += s.len();
    } else {
      b.prefill_tokens += n;
      ++b.num_prefill_seqs;
      b.prefill_attn_pairs += double(n) * (double(s.computed) + double(n + 1) / 2.0);
    }
  }
  return b;
}

}  // namespace mixserve::sim
