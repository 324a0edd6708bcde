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

namespace mixserve::gpu {

enum class MoeMode { none, replicated, gathered };

struct ShardSpec {
  int attn_tp = 1, attn_rank = 0;
  int moe_tp = 1, moe_rank = 0;
  int expert_begin = 0, expert_end = -1;  // -1: every expert
  int layer_begin = 0, layer_end = -1;    // -1: every layer
  bool shared_expert = true;              // this rank adds (its shard of) the shared expert
  MoeMode moe_mode = MoeMode::none;
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

class Transport;

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
};

}  // namespace mixserve::gpu
