// The step-selection policy of one replica's engine (after vLLM's scheduler), shared by the
// serving simulator (serving.cpp: the cost model's clock) and the GPU engine of
// `mixserve-run bench --workload` (executor/src/online.cpp: the real clock), so both form the
// same batches from the same queue state:
//   - continuous batching: at most max_num_seqs running sequences and max_num_batched_tokens new
//     tokens per step; a prompt is prefilled in chunks of the remaining budget (chunked prefill)
//     or whole;
//   - decode-first (vLLM V1): running sequences first (decodes and unfinished prefill chunks, in
//     admission order), then waiting ones FCFS while budget, slots and KV blocks last; a step that
//     preempted admits nothing new. prefill-first: waiting first, then running;
//   - KV cache of `num_blocks` blocks of kv_block_tokens: a sequence holds
//     ceil(computed tokens / block) blocks; when a running sequence needs a block and none is free,
//     the newest running sequence not yet scheduled in this step is preempted by recompute (its
//     blocks freed, computed reset, back to the front of the queue; it re-prefills its prompt plus
//     the tokens generated so far).
// The scheduler holds block counts only; an engine with a real cache maps them onto block ids
// (a sequence's `blocks` only grows while it runs and drops to 0 on preemption or completion).
#pragma once
#include <cstdint>
#include <deque>
#include <span>
#include <vector>

#include "mixserve/core/workload.hpp"
#include "mixserve/sim/cost_model.hpp"

namespace mixserve::sim {

// A sequence's scheduling state. The engine owns the table; schedulers index into it.
struct SchedSeq {
  int64_t input = 0, output = 0;
  int64_t generated = 0;    // tokens produced so far
  int64_t computed = 0;     // tokens whose KV is in the cache
  int64_t blocks = 0;       // KV blocks held
  int64_t sched_stamp = -1; // id of the step it was last scheduled in
  int preemptions = 0;
  bool done = false;
  int64_t len() const { return input + generated; }
};

struct Scheduled {
  int32_t seq;     // index into the sequence table
  int64_t tokens;  // new tokens this step, from position seqs[seq].computed
};

inline int64_t blocks_for(int64_t tokens, int64_t block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

class BatchScheduler {
 public:
  // limits: max_num_seqs, max_num_batched_tokens, chunked_prefill, decode_first, kv_block_tokens
  // (kv_blocks is ignored: `num_blocks` is this scheduler's share).
  BatchScheduler(const RuntimeLimits& limits, int64_t num_blocks, std::vector<SchedSeq>& seqs);

  void enqueue(int32_t seq);  // arrival: to the back of the waiting queue
  // Forms the batch of step `step_id` (a new id every step of this scheduler's engine) in `out`.
  // May preempt running sequences (counted in preemptions()).
  void schedule(int64_t step_id, std::vector<Scheduled>& out);
  // After the step ran: advances every scheduled sequence by its tokens; a sequence whose whole
  // length is now computed yields one token: ++generated, then on_token(seq) is called (first
  // token when generated == 1); a sequence that reached its output length is done, its blocks
  // freed, and it leaves the running list (on_token sees done already set).
  template <class F>
  void complete(std::span<const Scheduled> list, F&& on_token) {
    bool any_done = false;
    for (const auto& [si, n] : list) {
      SchedSeq& s = seqs_[static_cast<size_t>(si)];
      s.computed += n;
      if (s.computed < s.len()) continue;  // chunked prefill continues next step
      ++s.generated;
      if (s.generated == s.output) {
        s.done = true;
        any_done = true;
        free_blocks_ += s.blocks;
        s.blocks = 0;
        --unfinished_;
      }
      on_token(si);
    }
    if (any_done) erase_done();
  }

  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  int64_t unfinished() const { return unfinished_; }  // enqueued and not done
  int64_t free_blocks() const { return free_blocks_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t preemptions() const { return preemptions_; }
  const std::vector<int32_t>& running() const { return running_; }
  const std::deque<int32_t>& waiting() const { return waiting_; }

 private:
  bool schedule_running(int64_t step, int64_t& budget, std::vector<Scheduled>& out);
  void schedule_waiting(int64_t step, int64_t& budget, std::vector<Scheduled>& out);
  void preempt(size_t j);
  void erase_done();

  RuntimeLimits limits_;
  int64_t num_blocks_ = 0, free_blocks_ = 0, unfinished_ = 0, preemptions_ = 0;
  std::vector<SchedSeq>& seqs_;
  std::deque<int32_t> waiting_;
  std::vector<int32_t> running_;
};

// The cost model's view of a scheduled step: a sequence with one new token, its last, after a
// computed prefix is a decode (attending to its whole context, itself included); anything else a
// prefill chunk attending causally to its prefix and itself.
bool is_decode(const SchedSeq& s, int64_t tokens);
ReplicaBatch batch_of(std::span<const Scheduled> list, std::span<const SchedSeq> seqs);

}  // namespace mixserve::sim
