// What one rank of a plan holds of the model and where its forward communicates (docs/distributed.md).
//
// ShardSpec is the rank's role, lowered from the plan's layout and rank map (shard_for_rank):
//   attention  TP over attn_tp: query heads [r*Hq/tp, (r+1)*Hq/tp); KV heads [r*KV/tp, ...) when
//              KV % tp == 0, else (tp % KV == 0) KV head r / (tp/KV), replicated on tp/KV ranks.
//              o_proj by columns (its input), then an all-reduce over the attention TP group.
//   experts    EP-owned range [expert_begin, expert_end), each TP-sharded over moe_tp: gate and up
//              by rows of [I, H] (output columns), down by columns of [H, I] (input rows).
//              The shared expert is TP-sharded over moe_tp and added by the ranks of EP index 0.
//   dense FFN  TP over attn_tp (gate/up rows, down columns), all-reduced over the attention TP
//              group. Router, norms, embedding and LM head are replicated.
//   layers     the pipeline stage's [layer_begin, layer_end); the residual goes to the next
//              stage's rank of the same stage index.
// MoE communication of a stage (moe_mode):
//   none        one rank per stage.
//   replicated  attn_dp == 1: every rank of the stage holds the same tokens; each computes its
//               experts' share (partial sums) and the stage all-reduces them.
//   gathered    attn_dp > 1: the DP replicas' tokens (padded to the stage's largest replica) are
//               all-gathered over the stage, each rank computes its experts' share of every row,
//               and a reduce-scatter returns each member the sum for its own rows. A replica
//               with no requests joins with zero rows (an empty batch).
// ForwardComm is what GpuModel calls at those sites; TransportComm implements it over a
// Transport (transport.hpp): LocalTransport with one thread per logical rank meeting at a
// Rendezvous, or NcclTransport with one rank per process.
#pragma once
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <span>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/plan.hpp"
#include "mixserve/sim/comm_schedule.hpp"

namespace mixserve::gpu {

enum class MoeMode { none, replicated, gathered };

// The plan's MoE communication run by schedule (docs/distributed.md, docs/moe-comm.md), in place
// of the moe_mode exchange above: `ep` the EP dispatch/combine (a2a: counts exchanged, then
// grouped send/recv; EpSource::split; with moe_tp > 1 the all-gather / reduce-scatter over the
// EP index's members around the experts), `fused` MixServe's AG-Dispatch / RS-Combine,
// `rs_a2a_ag` the same schedule without overlap; a shared expert runs on the group's own tokens
// inside them (ExpertSlots / MoeExpertRows::shared_rows). `none`: the moe_mode exchange (plans
// with `allreduce`, TP-only stages).
enum class MoeSched { none, ep, fused, rs_a2a_ag };
const char* to_string(MoeSched s);
MoeSched moe_sched_for(const Layout& l, const ModelSpec& m);

struct ShardSpec {
  int attn_tp = 1, attn_rank = 0;
  int moe_tp = 1, moe_rank = 0;
  int expert_begin = 0, expert_end = -1;  // -1: every expert
  int layer_begin = 0, layer_end = -1;    // -1: every layer
  bool shared_expert = true;              // this rank adds (its shard of) the shared expert:
                                          // EP index 0 in the moe_mode exchange, every rank
                                          // under a schedule
  MoeMode moe_mode = MoeMode::none;
  MoeSched moe_sched = MoeSched::none;    // the plan's MoE communication by schedule
  int stage_size = 1;                     // ranks of the pipeline stage (MoE group)
  int num_stages = 1;
  // More than one rank holds the model (then the forward needs a ForwardComm).
  bool sharded() const { return attn_tp > 1 || moe_tp > 1 || stage_size > 1 || num_stages > 1; }
};

// The rank's slice of every sharded dimension (begin and count), from a ShardSpec.
struct ShardDims {
  int q_head0 = 0, q_heads = 0;
  int kv_head0 = 0, kv_heads = 0;
  int expert0 = 0, experts = 0;
  int64_t inter0 = 0, inter = 0;    // routed expert width
  int64_t shared0 = 0, shared = 0;  // shared expert width
  int64_t dense0 = 0, dense = 0;    // dense FFN width
  int layer_begin = 0, layer_end = 0;
  bool first_stage = true, last_stage = true;
};

// InputError naming the dimension when the model does not divide as the spec says (or a
// whole-projection QK-norm meets attention TP).
ShardDims shard_dims(const ModelSpec& m, const ShardSpec& s);

// The role of `rank` in the layout (rank map entry `info`).
ShardSpec shard_for_rank(const Layout& l, const RankInfo& info, const ModelSpec& m);

// The executor's checks of a plan before it runs (STYLE.md §5): InputError with a precise
// message when the plan's world size differs from `world_size` (ranks launched), when
// `gpus_available` is below what this launch needs (`gpus_needed`), when the plan's model is not
// `model` (name and shape), when the rank map is not the one the layout defines, or when the
// layout is one the forward cannot run.
struct LaunchShape {
  int world_size = 1;       // ranks launched (MPI world, threads, or emulated logical ranks)
  int gpus_needed = 1;      // devices this process must see
  int gpus_available = 1;   // devices it sees
};
void check_plan_for_run(const Plan& p, const ModelSpec& model, const LaunchShape& launch);

// ----------------------------------------------------------------------------- scheduled MoE
// Host logic of the scheduled MoE layer (unit-tested on the CPU, tests/gpu/test_shard.cpp).
//
// Routing exchange: every rank of the stage contributes one piece of routing_words(T_stage, k)
// int32 words (its token count, its [T, k] global top-k ids, then its [T, k] f32 weights as bits,
// the rest unused), all-gathered over the stage; unpack_routing gives one table per attention-DP
// replica (the piece of its first attention-TP rank; every rank of the replica must hold the same
// count, RuntimeError otherwise; InputError for a count outside [0, T_stage]).
int64_t routing_words(int64_t stage_tokens, int top_k);
std::vector<sim::ReplicaRouting> unpack_routing(std::span<const int32_t> gathered, int stage_size, int attn_tp,
                                                int64_t stage_tokens, int top_k);

// The expert step of the received rows as the forward's permute / experts / combine take it:
// per row k slots of a local expert id (-1: empty) and a weight. Fused: the group's pairs
// (ExpertSide, k = top_k, weights applied on the expert side); EP: the EP index's gathered rows
// (EpRankPlan::gather_rows), one unweighted slot per row (k = 1, the weights are applied at
// home), none (-1) on the leading shared-expert rows. RuntimeError if a row has more than k pairs.
struct ExpertSlots {
  int k = 1;
  int64_t rows = 0;
  std::vector<int32_t> ids;     // [rows * k]
  std::vector<float> weights;   // [rows * k]
  int64_t shared_rows = 0;      // leading rows that also get the shared expert (StageMoe sets it)
};
ExpertSlots fused_expert_slots(const sim::ExpertSide& xs, int top_k);
ExpertSlots ep_expert_slots(const sim::EpSchedule& s, int rank);

// Bytes rank `rank` sends in one MoE layer by the schedule's accounting (what the cost model
// reads): dispatch and combine, all rounds (fused: + the final all-gather).
struct MoeBytes {
  double dispatch = 0, combine = 0;
};
MoeBytes schedule_bytes(const sim::FusedSchedule& s, int rank);
MoeBytes schedule_bytes(const sim::EpSchedule& s, int rank);

class Transport;
class StageTransport;
class FusedMoeComm;
class EpMoeComm;

// One MoE layer of one rank as moved by a StageMoe (its transport's counters) beside the
// schedule's bytes; the EP counts round is `counts` (not in the schedule's bytes).
struct MoeBytesRecord {
  int rank = 0;  // in the stage
  MoeBytes moved, scheduled;
  double counts = 0;
};

// The scheduled MoE communication of one pipeline stage for the ranks of it this process holds:
// one FusedMoeComm or EpMoeComm (buffers for `max_tokens_per_replica` tokens per replica,
// allocated once here) over a StageTransport of the world transport `world`. Shared by the
// stage's rank threads: dispatch() and combine() run once per layer for every local rank (the
// last thread to reach the stage's meeting calls them; not thread-safe otherwise).
class StageMoe {
 public:
  StageMoe(const sim::CommGeometry& geo, MoeSched sched, int64_t max_tokens_per_replica, Transport& world,
           int first_rank);
  ~StageMoe();
  StageMoe(const StageMoe&) = delete;
  StageMoe& operator=(const StageMoe&) = delete;
  const sim::CommGeometry& geometry() const { return geo_; }
  MoeSched sched() const { return sched_; }
  int64_t max_tokens() const { return cap_; }
  // Rows a rank's expert step may receive (fused_capacity_rows / ep_capacity_rows).
  int64_t max_expert_rows() const;
  void* input(int rank) const;
  void* output(int rank) const;
  // Builds the layer's schedule from the replicas' routing, uploads it, forks from main (one
  // stream per stage rank, null for ranks not here), dispatches, joins.
  void dispatch(std::vector<sim::ReplicaRouting> routing, std::span<const cudaStream_t> main);
  void combine(std::span<const cudaStream_t> main);
  // After dispatch: rank r's expert slots and rows.
  ExpertSlots expert_slots(int rank) const;
  const void* received(int rank) const;  // fused: slice-major blocks; EP: row-major
  void* expert_out(int rank) const;      // fused: partial sums, slice-major; EP: row-major
  const sim::FusedSchedule* fused_schedule() const;
  // One record per layer and local rank since the last clear (the first kMaxRecords).
  static constexpr std::size_t kMaxRecords = std::size_t(1) << 16;
  const std::vector<MoeBytesRecord>& records() const { return records_; }
  void clear_records() { records_.clear(); }

 private:
  sim::CommGeometry geo_;
  MoeSched sched_;
  int64_t cap_ = 0;
  std::unique_ptr<StageTransport> tr_;
  std::unique_ptr<FusedMoeComm> fused_;
  std::unique_ptr<EpMoeComm> ep_;
  std::vector<sim::ReplicaRouting> routing_;
  sim::FusedSchedule fs_;
  sim::EpSchedule es_;
  std::vector<double> before_;  // transport counters at the start of the phase
  std::vector<MoeBytesRecord> pending_;
  std::vector<MoeBytesRecord> records_;
};

// Rows handed to the forward's expert step by a scheduled dispatch (device pointers).
struct MoeExpertRows {
  const __nv_bfloat16* x = nullptr;  // [rows, hidden] row-major
  __nv_bfloat16* out = nullptr;      // [rows, hidden]: the step writes its (TP-partial) sums here
  int64_t rows = 0;
  int k = 1;
  const int32_t* ids = nullptr;      // [rows * k] local expert ids, -1 empty
  const float* weights = nullptr;    // [rows * k]
  // The leading rows [0, shared_rows) also get the rank's TP slice of the shared expert (with
  // its gate): the tokens its moe-TP group owns (fused: expert-side block 0, every token of the
  // replica; EP: the members' source tokens). 0 without a shared expert.
  int64_t shared_rows = 0;
};

enum class CommGroup { attn_tp, stage };

class ForwardComm {
 public:
  virtual ~ForwardComm() = default;
  virtual int group_size(CommGroup g) const = 0;
  virtual int group_index(CommGroup g) const = 0;
  // Sum of x [count] over the group, in place, ordered on s.
  virtual void all_reduce(CommGroup g, __nv_bfloat16* x, int64_t count, cudaStream_t s) = 0;
  // buf [group size][bytes_per_rank]; this member's piece at its index; in place.
  virtual void all_gather(CommGroup g, void* buf, std::size_t bytes_per_rank, cudaStream_t s) = 0;
  // send [group size][count]; recv [count] = sum over members of chunk (this member's index).
  virtual void reduce_scatter(CommGroup g, const __nv_bfloat16* send, __nv_bfloat16* recv, int64_t count,
                              cudaStream_t s) = 0;
  // Largest v over the group (host value; synchronises s).
  virtual int64_t max_over(CommGroup g, int64_t v, cudaStream_t s) = 0;
  // Pipeline: the residual to the same stage index of the next stage / from the previous one.
  virtual void send_next_stage(const void* buf, std::size_t bytes, cudaStream_t s) = 0;
  virtual void recv_prev_stage(void* buf, std::size_t bytes, cudaStream_t s) = 0;
  // Scheduled MoE (ShardSpec::moe_sched): x [T, H] this rank's rows, topk_ids / topk_w [T, k]
  // their global routing (device); T_stage the stage's largest T (the routing exchange's piece).
  // Returns the received rows for the expert step; moe_combine then writes the rank's [T, H]
  // MoE output into out. Both are collective over the stage. Default: RuntimeError.
  virtual MoeExpertRows moe_dispatch(const __nv_bfloat16* x, const int32_t* topk_ids, const float* topk_w,
                                     int64_t T, int64_t T_stage, cudaStream_t s);
  virtual void moe_combine(__nv_bfloat16* out, int64_t T, cudaStream_t s);
};

// Threads of one process meeting per group: the last member to arrive runs the operation for
// all (with every member's argument, in group order) while the others wait; all return after it.
// abort() wakes every waiter with an error (a thread that failed must not leave its peers hung).
class Rendezvous {
 public:
  void meet(const std::vector<int>& group, int index, const void* arg,
            const std::function<void(std::span<const void* const>)>& fn);
  void abort();

 private:
  struct Meeting {
    std::vector<const void*> args;
    int arrived = 0;
    uint64_t generation = 0;
    std::exception_ptr error;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::vector<int>, Meeting> meetings_;
  bool aborted_ = false;
};

// ForwardComm of one rank over transports: `attn` for the attention TP groups and `stage` for
// the stage's MoE exchange and the pipeline sends (one LocalTransport can serve both; NCCL needs
// one NcclTransport per group size: attn_tp and the stage size). rendezvous: the shared meeting
// point when one process drives several ranks (one thread each: LocalTransport, or NCCL with a
// GPU per thread); null when the transports hold only this rank (NCCL, one process per GPU).
// max_elements: the largest all-reduce (elements), for the scratch buffer. Buffers are
// allocated on the current device (the rank's).
class TransportComm final : public ForwardComm {
 public:
  TransportComm(Transport& attn, Transport& stage, const Layout& layout, int rank, Rendezvous* rendezvous,
                int64_t max_elements);
  ~TransportComm() override;
  TransportComm(const TransportComm&) = delete;
  TransportComm& operator=(const TransportComm&) = delete;

  int group_size(CommGroup g) const override;
  int group_index(CommGroup g) const override;
  void all_reduce(CommGroup g, __nv_bfloat16* x, int64_t count, cudaStream_t s) override;
  void all_gather(CommGroup g, void* buf, std::size_t bytes_per_rank, cudaStream_t s) override;
  void reduce_scatter(CommGroup g, const __nv_bfloat16* send, __nv_bfloat16* recv, int64_t count,
                      cudaStream_t s) override;
  int64_t max_over(CommGroup g, int64_t v, cudaStream_t s) override;
  void send_next_stage(const void* buf, std::size_t bytes, cudaStream_t s) override;
  void recv_prev_stage(void* buf, std::size_t bytes, cudaStream_t s) override;
  // The stage's scheduled MoE (shared by its ranks in this process); allocates this rank's
  // buffers (routing exchange, row-major expert rows, slots) on the current device.
  void set_stage_moe(StageMoe* moe, int top_k);
  MoeExpertRows moe_dispatch(const __nv_bfloat16* x, const int32_t* topk_ids, const float* topk_w, int64_t T,
                             int64_t T_stage, cudaStream_t s) override;
  void moe_combine(__nv_bfloat16* out, int64_t T, cudaStream_t s) override;

 private:
  const std::vector<int>& group(CommGroup g) const;
  Transport& tr(CommGroup g) const { return g == CommGroup::attn_tp ? attn_tr_ : stage_tr_; }
  void p2p(int src, int dst, const void* send, void* recv, std::size_t bytes, cudaStream_t s);
  Transport& attn_tr_;
  Transport& stage_tr_;
  Layout layout_;
  int rank_ = 0;
  Rendezvous* rdv_ = nullptr;
  std::vector<int> attn_group_, stage_group_;
  void* scratch_ = nullptr;        // [max_elements] bf16: all-reduce chunk
  int64_t max_elements_ = 0;
  int64_t* counts_dev_ = nullptr;  // [stage size] for max_over
  StageMoe* moe_ = nullptr;
  int top_k_ = 1;
  int32_t* route_dev_ = nullptr;   // [stage size][routing_words(max tokens, k)]
  std::vector<int32_t> route_host_;
  __nv_bfloat16* xrow_ = nullptr;  // fused: [max_expert_rows, H] received rows, row-major
  __nv_bfloat16* yrow_ = nullptr;  // fused: their partial sums, row-major
  int32_t* ids_dev_ = nullptr;     // [max_expert_rows * k]
  float* w_dev_ = nullptr;
  ExpertSlots slots_;
};

}  // namespace mixserve::gpu
