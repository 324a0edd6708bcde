// The ranks of a plan driven by one process, one host thread per rank meeting at a Rendezvous,
// one GpuModel shard (shard.hpp) per rank (docs/distributed.md). Two placements:
//   one_gpu       R logical ranks on ONE GPU through a LocalTransport: a multi-GPU layout runs
//                 through the same forward, communication sites and transport interface as with
//                 NCCL; the "network" is device copies (correctness and the path, not speed).
//   gpu_per_rank  rank r on device r through NCCL (NcclTransport over ncclCommInitAll
//                 communicators): a single-node run of up to the node's GPUs.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/model/weights.hpp"

namespace mixserve::gpu {

enum class Placement { one_gpu, gpu_per_rank };

class EmulatedRanks {
 public:
  // Weights from the host (sliced per rank), or drawn on the device per shard (seeded; for timing).
  // base: the per-rank config (limits, KV blocks, expert path); its shard and comm are replaced.
  // gpu_per_rank: InputError when fewer than R devices are visible or NCCL is not built in.
  EmulatedRanks(const model::WeightSet& w, const ClusterSpec& c, const Layout& l, const GpuModelConfig& base,
                Placement placement = Placement::one_gpu);
  EmulatedRanks(const ModelSpec& m, uint64_t seed, const ClusterSpec& c, const Layout& l,
                const GpuModelConfig& base, Placement placement = Placement::one_gpu);
  ~EmulatedRanks();

  const Layout& layout() const { return layout_; }
  const std::vector<RankInfo>& rank_map() const { return rank_map_; }
  int num_ranks() const { return int(models_.size()); }
  GpuModel& model(int rank) { return *models_.at(std::size_t(rank)); }
  // The scheduled MoE communication of pipeline stage `stage` (null when the plan's moe_comm runs
  // through the moe_mode exchange: ShardSpec::moe_sched none); its records() count the bytes.
  StageMoe* stage_moe(int stage) { return stage_moe_.empty() ? nullptr : stage_moe_.at(std::size_t(stage)).get(); }

  // One step of every rank at once. batches[d]: the requests of attention-DP replica d (attn_dp
  // entries; an empty one steps with an empty batch). Returns per replica its output: logits
  // from the last stage, the recorded hidden states of each layer from the stage that owns it.
  std::vector<GpuStepOutput> step(const std::vector<std::vector<model::SequenceStep>>& batches,
                                  const StepOptions& opt = {});
  // Timing: prepare every rank, then enqueue every rank, each on its own thread and stream
  // (synchronised at the end); the same prepared batches can be enqueued repeatedly. collect():
  // the outputs of the last enqueue, per replica, as step() returns them. After an error the
  // ranks are unusable (the rendezvous stays aborted).
  void prepare(const std::vector<std::vector<model::SequenceStep>>& batches, const StepOptions& opt = {});
  void enqueue_and_wait();
  std::vector<GpuStepOutput> collect(bool record_hidden = false);
  void reset_cache();

 private:
  void build(const model::WeightSet* w, const ModelSpec& m, uint64_t seed, const ClusterSpec& c,
             const GpuModelConfig& base, Placement placement);
  // Runs fn(rank) on one thread per rank; the first error is rethrown after every thread ended.
  void on_every_rank(const std::function<void(int)>& fn);
  int replica_of(int rank) const;
  Layout layout_;
  std::vector<RankInfo> rank_map_;
  std::vector<int> device_;  // per rank
  std::shared_ptr<void> nccl_world_;  // the NCCL world communicators (gpu_per_rank); outlive the splits
  std::vector<std::unique_ptr<Transport>> transports_;
  std::unique_ptr<Rendezvous> rendezvous_;
  std::vector<std::unique_ptr<StageMoe>> stage_moe_;  // per stage, before the comms that use them
  std::vector<std::unique_ptr<TransportComm>> comms_;
  std::vector<std::unique_ptr<GpuModel>> models_;
};

#if MIXSERVE_HAVE_NCCL
// One rank of a plan in this process (one process per GPU, launched by MPI: the world
// communicator from init_mpi_world, rank = world.rank(); it must outlive this object): its GpuModel shard over NcclTransports
// that hold this rank only, a TransportComm without rendezvous, and its stage's StageMoe when the
// plan's MoE runs by schedule. Collective: every rank of the plan constructs it at once, and
// steps at once (GpuModel::prepare / enqueue). Compiled, not run (no multi-GPU host lent), and
// not yet wired into mixserve-run (docs/distributed.md).
class ProcessRank {
 public:
  ProcessRank(const Comm& world, const ModelSpec& m, uint64_t seed, const ClusterSpec& c, const Layout& l,
              const GpuModelConfig& base);
  ~ProcessRank();
  int rank() const { return rank_; }
  int replica() const { return (rank_ % layout_.stage_size()) / layout_.attn_tp; }
  GpuModel& model() { return *model_; }
  StageMoe* stage_moe() { return stage_moe_.get(); }

 private:
  Layout layout_;
  int rank_ = 0;
  std::vector<std::unique_ptr<Transport>> transports_;
  std::unique_ptr<StageMoe> stage_moe_;
  std::unique_ptr<TransportComm> comm_;
  std::unique_ptr<GpuModel> model_;
};
#endif

}  // namespace mixserve::gpu
