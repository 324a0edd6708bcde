// The host side of the online engine (`mixserve-run bench --workload`, online.hpp), without a
// device, so that it is tested on the CPU (tests/serving/test_online_engine.cpp):
//   - requests are routed to the attention-DP replicas as the serving simulator routes them
//     (simulator/src/serving.cpp Engine::route: the request's pinned replica, else round-robin or
//     least-loaded by ServingConfig::router), at the first step start after their arrival;
//   - every replica has its own sim::BatchScheduler (the simulator's per-replica unit for pp = 1)
//     over its own KV block pool of limits.kv_blocks blocks (each replica's ranks hold their own
//     cache), and its block counts are mapped onto block ids of that pool;
//   - one engine step steps every replica at once: schedule() gives per replica the scheduler's
//     list, the model's SequenceSteps (an idle replica's batch is empty) and the cost model's
//     ReplicaBatch; complete() takes the sampled ids and the host time of the step's end and
//     records first tokens, inter-token gaps and completions, as the simulator does at t_end.
// The caller owns the clock: the GPU engine passes the host clock, the test the cost model's
// (then the metrics equal sim::simulate's). Pipeline parallelism (pp micro-batch slots) is not
// modelled here: ServingConfig::pp must be 1.
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

#include "mixserve/model/reference.hpp"
#include "mixserve/sim/scheduler.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::gpu {

class OnlineEngine {
 public:
  struct Step {
    int64_t id = 0;                                         // 0, 1, ... (the schedulers' step id)
    std::vector<std::vector<sim::Scheduled>> lists;         // per replica: (sequence, new tokens)
    std::vector<std::vector<model::SequenceStep>> batches;  // per replica: tokens, position, block ids
    std::vector<sim::ReplicaBatch> replicas;                // per replica: the cost model's view
    sim::ReplicaBatch total;                                // summed over the replicas
    int64_t num_tokens = 0;
    int empty_replicas = 0;                                 // replicas stepping with an empty batch
  };

  // prompts[i]: request i's prompt ids (input_tokens of them). InputError for a config with pp != 1
  // or no replica, a request pinned to a replica outside [0, num_replicas), or prompts that do
  // not match the requests.
  OnlineEngine(const sim::ServingConfig& cfg, const sim::RequestStream& requests,
               std::vector<std::vector<int32_t>> prompts);
  OnlineEngine(const OnlineEngine&) = delete;  // the schedulers hold a reference to seqs_
  OnlineEngine& operator=(const OnlineEngine&) = delete;

  int num_replicas() const { return cfg_.num_replicas; }
  size_t num_requests() const { return seqs_.size(); }
  // Routes the requests with arrival_s <= t to their replicas, in arrival order.
  void admit_until(double t);
  bool has_work() const;  // a replica has a request waiting or running
  bool done() const { return finished_ == int64_t(seqs_.size()); }
  double next_arrival_s() const {  // +inf once every request has arrived
    return next_ < seqs_.size() ? requests_.requests[next_].arrival_s : std::numeric_limits<double>::infinity();
  }
  // Every replica's scheduler forms its part of the next step. RuntimeError when no replica has
  // work, or when the step holds no token.
  const Step& schedule();
  // The step ran: ids[d][k] is the greedy id of replica d's k-th sequence of the step; the
  // sequences whose whole length is now computed take theirs. RuntimeError on a count mismatch.
  void take_tokens(const std::vector<std::vector<int32_t>>& ids);
  // Then the schedulers advance: first tokens, inter-token gaps and completions at t_end (the
  // time of the step's tokens), blocks of finished sequences back to their pools.
  void complete(double t_end);

  // The requests' times, the inter-token gaps and sim::compute_metrics, with the engine's step
  // counters (steps, preemptions, empty replica-steps, tokens per step, peak tokens/s, KV blocks);
  // step_time_sum_ms: the steps' durations (mean_step_time_ms and busy_fraction).
  sim::SimResult result(double step_time_sum_ms) const;
  // Per request, its generated ids.
  std::vector<std::vector<int32_t>> output_ids() const;
  int replica_of(int32_t request) const { return replica_[static_cast<size_t>(request)]; }
  int64_t finished() const { return finished_; }
  int64_t num_steps() const { return steps_; }
  int64_t waiting() const;
  int64_t running() const;

 private:
  void release_extra_blocks();
  sim::ServingConfig cfg_;
  sim::RequestStream requests_;
  std::vector<std::vector<int32_t>> tokens_;  // per request: prompt, then generated ids
  std::vector<sim::SchedSeq> seqs_;
  std::vector<sim::BatchScheduler> sched_;    // per replica
  std::vector<int> replica_;                  // per request (-1 before it arrived)
  std::vector<std::vector<int32_t>> free_ids_;  // per replica: free block ids of its pool
  std::vector<std::vector<int32_t>> held_;      // per request: block ids it holds
  std::vector<int32_t> holding_;                // requests holding blocks
  std::vector<double> last_token_s_;
  std::vector<int64_t> tokens_per_second_;
  sim::SimResult res_;
  Step step_;
  size_t next_ = 0;
  uint64_t rr_next_ = 0;
  int64_t finished_ = 0, steps_ = 0, tokens_sum_ = 0, empty_replica_steps_ = 0;
  bool in_step_ = false, tokens_taken_ = false;
};

}  // namespace mixserve::gpu
