// Transports of the GPU MoE communication (moe_comm.hpp, docs/moe-comm.md): what the schedules of
// sim/comm_schedule.hpp need from the machine — grouped point-to-point rounds between ranks and
// all-gather / reduce-scatter inside a group — each enqueued on the streams the caller gives per
// rank. Every call takes the global description of the operation (all ranks); a transport issues
// the part of the ranks it holds (is_local), so one process may drive every rank or one.
//   LocalTransport: R logical ranks on ONE GPU. Each rank has its own buffers and streams (the
//     caller's); a send is a cudaMemcpyAsync device-to-device into the receiver's preallocated
//     buffer, ordered with CUDA events (the copy waits for the receiver's stream, the receiver's
//     stream waits for the copy); all-gather is copies, reduce-scatter a summing kernel over the
//     group's inputs, both fenced by an event barrier of the group's streams. The "network" is a
//     device copy: times measure copies, not links.
//   NcclTransport (built with NCCL): one rank per GPU; ncclSend/ncclRecv inside one
//     ncclGroupStart/End per round (on the rail communicator when both ranks have the same slice
//     index r % T, the world communicator otherwise), ncclAllGather / ncclReduceScatter on the
//     group communicators (ranks r / T). NCCL cannot put two ranks on one GPU: hence the local one.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include <cuda_runtime_api.h>

#include "mixserve/kernels/moe_pack.cuh"

#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#endif

namespace mixserve::gpu {

// One message of a point-to-point round: `bytes` from `send` on rank src to `recv` on rank dst.
// A process fills the pointers of the ranks it holds (send for its sources, recv for its
// destinations). src == dst is a local copy.
struct P2pOp {
  int src = 0, dst = 0;
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t bytes = 0;
};

// One rank's side of a collective over a group: its buffers and the stream it is ordered on.
struct CollRank {
  const void* send = nullptr;
  void* recv = nullptr;
  cudaStream_t stream = nullptr;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int num_ranks() const = 0;
  virtual bool is_local(int rank) const = 0;
  virtual int device_of(int rank) const = 0;  // only for local ranks
  virtual const char* name() const = 0;

  // One round of messages; streams[r] (indexed by global rank, size num_ranks) orders rank r's
  // side (null for ranks not held here). Every op of the round is issued before any waits.
  virtual void p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) = 0;

  // All-gather over `group` (global ranks in group order): member u contributes
  // `bytes_per_rank` at ranks[u].send and every member receives [group.size()][bytes_per_rank]
  // at its recv (in place when send == recv + u * bytes_per_rank). ranks: parallel to group.
  virtual void all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                          std::size_t bytes_per_rank) = 0;

  // Reduce-scatter (sum) over `group`: member u's send holds [group.size()][count] elements of
  // `dtype`, its recv gets the sum over members of chunk u, [count].
  virtual void reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                              std::size_t count, kernels::MoeDType dtype) = 0;
};

// R logical ranks on the current device.
class LocalTransport final : public Transport {
 public:
  explicit LocalTransport(int num_ranks, int device = -1);  // -1: the current device
  ~LocalTransport() override;
  LocalTransport(const LocalTransport&) = delete;
  LocalTransport& operator=(const LocalTransport&) = delete;

  int num_ranks() const override { return num_ranks_; }
  bool is_local(int rank) const override { return rank >= 0 && rank < num_ranks_; }
  int device_of(int) const override { return device_; }
  const char* name() const override { return "local"; }
  void p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) override;
  void all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                  std::size_t bytes_per_rank) override;
  void reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                      std::size_t count, kernels::MoeDType dtype) override;

 private:
  // Every stream of the group waits for every other one's work issued so far.
  void barrier(std::span<const CollRank> ranks);
  cudaEvent_t event(int i);
  int num_ranks_ = 0, device_ = 0;
  std::vector<cudaEvent_t> events_;  // scratch events, recorded and waited on at once
};

// Ranks [first, first + n) of `base` as ranks 0..n-1 (a pipeline stage of the world's
// transport, for the MoE schedules of that stage), counting the bytes each rank sends through it
// by the schedules' accounting (sim/comm_schedule.hpp): a p2p message to another rank counts its
// bytes at the sender (a copy to itself: nothing); a member of an all-gather sends its piece to
// the T-1 others, (T-1) * bytes_per_rank; of a reduce-scatter, (T-1) chunks of count elements.
class StageTransport final : public Transport {
 public:
  StageTransport(Transport& base, int first, int num_ranks);
  int num_ranks() const override { return n_; }
  bool is_local(int rank) const override;
  int device_of(int rank) const override { return base_.device_of(rank + first_); }
  const char* name() const override { return base_.name(); }
  void p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) override;
  void all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                  std::size_t bytes_per_rank) override;
  void reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                      std::size_t count, kernels::MoeDType dtype) override;
  // Bytes rank r (0..n-1) sent through this transport since construction.
  double bytes_sent(int rank) const { return sent_.at(static_cast<std::size_t>(rank)); }

 private:
  std::vector<int> global(std::span<const int> group) const;
  Transport& base_;
  int first_ = 0, n_ = 0;
  std::vector<double> sent_;
};

#if MIXSERVE_HAVE_NCCL
// One rank per device. `world` holds the world communicators of the ranks this process drives
// (init_single_process or init_mpi_world); `group_size` T groups ranks [q*T, (q+1)*T) for the
// all-gathers and reduce-scatters and gives the rails (ranks with equal r % T). Collective:
// every rank must construct it. Group and rail communicators are split from the world ones.
class NcclTransport final : public Transport {
 public:
  NcclTransport(const std::vector<const Comm*>& world, int group_size);
  int num_ranks() const override { return num_ranks_; }
  bool is_local(int rank) const override;
  int device_of(int rank) const override;
  const char* name() const override { return "nccl"; }
  void p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) override;
  void all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                  std::size_t bytes_per_rank) override;
  void reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                      std::size_t count, kernels::MoeDType dtype) override;

 private:
  int local_index(int rank) const;  // -1 when not held here
  int num_ranks_ = 0, group_size_ = 1;
  std::vector<const Comm*> world_;   // per local rank
  std::vector<Comm> group_, rail_;   // per local rank, same order
};
#endif

}  // namespace mixserve::gpu
