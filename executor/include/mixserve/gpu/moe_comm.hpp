// GPU execution of the MoE communication schedules of sim/comm_schedule.hpp over a Transport
// (transport.hpp): the same plain structs the simulator costs and the host executor
// (sim/host_exec.hpp) runs, so the planner costs exactly what is moved here. docs/moe-comm.md.
//
// FusedMoeComm — MixServe fused AG-Dispatch / RS-Combine (and rs_a2a_ag: overlap off, both legs
// of a rank on one stream). Per rank (q, t) two streams: "inter" runs the rail rounds (pack of
// slice t of the rows for group (q+i) mod Q, grouped send/recv) and the home scatter-adds;
// "intra" runs round 0's copy of the group's own rows, the group all-gather of the slices
// received in round i (after an event from the inter stream), the experts, the reduce-scatter
// of each combine round (the inter stream waits on its event before the rail send) and the final
// all-gather after the last scatter-add. Received rows are kept slice-major per dispatch block
// ([T][rows_i][h/T], moe_pack.cuh) so every all-gather / reduce-scatter is one contiguous call.
// EpMoeComm — EP by all-to-all (MoeComm::nccl_a2a, any moe_tp): counts exchanged (one round,
// then a host sync that sizes the receives and checks them against the schedule), one grouped
// send/recv of the (token, expert) rows, with moe_tp > 1 the all-gather of the received rows
// over the EP index's members (one grouped send/recv: the pieces are uneven), the experts (the
// member's TP slice), with moe_tp > 1 the reduce-scatter of their partial sums (moe_tp - 1
// grouped send/recv rounds, each followed by a sum), the rows sent back, the weighted combine at
// home and, for
// EpSource::split, an all-gather of the combined rows in the attention replica (grouped
// send/recv: the ranks' token ranges are uneven).
// Buffers are preallocated at construction from the capacity bounds (fused_capacity_rows,
// ep_capacity_rows) of `max_tokens_per_replica`; prepare() uploads one step's index tables and
// rejects a step above the bound. Per step: prepare, write inputs, fork, dispatch, experts,
// combine, join. Only the ranks the transport holds are touched.
//
// The experts are the toy FFN of sim/host_exec.hpp (f64 only, exact arithmetic) so the GPU result
// must equal the host executor's and reference_moe() with 0 wrong elements; with another dtype
// the communication runs on whatever the partial-sum buffers hold (the benchmark's case).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include <cuda_runtime_api.h>

#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/kernels/moe_pack.cuh"
#include "mixserve/sim/comm_schedule.hpp"

namespace mixserve::gpu {

class FusedMoeComm {
 public:
  // Throws InputError when the geometry does not fit the fused schedule or the transport.
  FusedMoeComm(const sim::CommGeometry& geo, int64_t max_tokens_per_replica,
               kernels::MoeDType dtype, Transport& transport);
  ~FusedMoeComm();
  FusedMoeComm(const FusedMoeComm&) = delete;
  FusedMoeComm& operator=(const FusedMoeComm&) = delete;

  // overlap = false: inter and intra work of a rank on one stream (MoeComm::rs_a2a_ag).
  void set_overlap(bool overlap) { overlap_ = overlap; }
  bool overlap() const { return overlap_; }

  // Uploads the step's tables (synchronous). The schedule must have this object's geometry and
  // have been built from `routing` (whose token counts size the outputs); it must outlive the
  // step. InputError when the step exceeds max_tokens_per_replica.
  void prepare(const sim::FusedSchedule& s, std::span<const sim::ReplicaRouting> routing);
  // Rank r's input rows, [n_q, hidden] row-major (device, dtype), and its output after combine.
  void* input(int rank) const;
  void* output(int rank) const;
  // Number of tokens of rank r's replica in the prepared step.
  int64_t num_tokens(int rank) const;
  // The expert side of rank r (the forward's expert step, in place of toy_experts): after
  // dispatch, received(r) holds the group's received rows, slice-major per block
  // ([T][rows_i][h/T] at block_row_offset[i] * h, ExpertSide of the prepared schedule); before
  // combine, partial(r) must hold the rank's partial sums of those rows in the same layout.
  void* received(int rank) const;
  void* partial(int rank) const;
  const sim::FusedSchedule* schedule() const { return s_; }

  // The rank's streams wait for `main[r]` (recorded now); join: main[r] waits for both streams.
  // main: one stream per global rank (null for ranks not held here), on the rank's device.
  void fork(std::span<const cudaStream_t> main);
  void join(std::span<const cudaStream_t> main);

  void dispatch();
  // The toy expert (f64 only): partial sums of every received row on the intra streams.
  void toy_experts();
  void combine();

 private:
  struct Rank;
  cudaStream_t inter(int r) const;
  cudaStream_t intra(int r) const;
  std::vector<cudaStream_t> streams(bool inter_leg) const;
  sim::CommGeometry geo_;
  int64_t cap_ = 0;
  kernels::MoeDType dtype_;
  int eb_ = 2;
  Transport& tr_;
  bool overlap_ = true;
  const sim::FusedSchedule* s_ = nullptr;
  std::vector<std::unique_ptr<Rank>> ranks_;  // [P], null for ranks not held here
};

// The transport rounds of EpMoeComm, built on the host from the schedule alone (no device):
// each transfer moves `rows` full rows ([rows, hidden] row-major) from a row of one per-rank
// buffer of src to a row of one of dst, and the executor only turns them into pointers. So a
// CPU test can sum what the executor sends against EpRankPlan::dispatch_bytes / combine_bytes
// (tests/gpu/test_ep_rounds.cpp). The counts round (int64 counts, not rows, outside the
// schedule's bytes) and the local copies of the shared rows stay in EpMoeComm::dispatch().
// Per-rank buffers of EpMoeComm, with the rows a step uses of each (EpRankPlan fields; n = the
// replica's tokens, sent = send_offset.back()).
enum class EpBuf {
  x,        // [n, h] the replica's tokens
  sendbuf,  // [sent, h] rows by (destination, local expert, token, slot)
  recvbuf,  // [gather_rows, h] the EP index's rows (EpRankPlan::shared_* / gather_*)
  outbuf,   // [gather_rows, h] expert (TP-partial) outputs, same order
  rsbuf,    // [shared_rows + recv_rows(), h] one member's partials of this rank's piece
  redbuf,   // [shared_rows + recv_rows(), h] this rank's piece, summed over the members
  backbuf,  // [sent, h] outputs back home, in send order (then the shared rows, copied locally)
  y,        // [n, h] combined rows
};
struct EpTransfer {
  int src = 0, dst = 0;  // ranks of the stage
  int64_t rows = 0;      // > 0: rounds hold no empty transfers
  EpBuf send_buf = EpBuf::sendbuf;
  int64_t send_row = 0;
  EpBuf recv_buf = EpBuf::recvbuf;
  int64_t recv_row = 0;
};
struct EpRounds {
  std::vector<EpTransfer> dispatch_rows;            // the all-to-all of the (token, expert) rows
  std::vector<EpTransfer> dispatch_gather;          // moe-TP all-gather (+ shared source rows)
  std::vector<std::vector<EpTransfer>> combine_rs;  // [moe_tp - 1] reduce-scatter rounds
  std::vector<EpTransfer> combine_back;             // rows back to their source rank
  std::vector<EpTransfer> combine_gather;           // split source, attn_tp > 1: the replica's
                                                    // exchange of its combined token ranges
};
// Row offsets come from the schedule's recv_counts, which dispatch() checks the exchanged
// counts against before any row moves.
EpRounds ep_rounds(const sim::EpSchedule& s);

class EpMoeComm {
 public:
  EpMoeComm(const sim::CommGeometry& geo, int64_t max_tokens_per_replica, sim::EpSource source,
            kernels::MoeDType dtype, Transport& transport);
  ~EpMoeComm();
  EpMoeComm(const EpMoeComm&) = delete;
  EpMoeComm& operator=(const EpMoeComm&) = delete;

  void prepare(const sim::EpSchedule& s, std::span<const sim::ReplicaRouting> routing);
  void* input(int rank) const;   // [n_replica, hidden]
  void* output(int rank) const;  // [n_replica, hidden]; split: full after combine's all-gather
  int64_t num_tokens(int rank) const;
  // The expert side of rank r: after dispatch, received(r) holds the EP index's gather_rows
  // rows [rows, hidden] row-major: the members' shared-expert source rows first (a shared expert),
  // then by (member, source rank, local expert) (moe_tp 1: its own rows only); before combine, expert_out(r) must hold each row's expert output of the
  // rank's TP slice, unweighted (the weights are applied at home), same layout.
  void* received(int rank) const;
  void* expert_out(int rank) const;
  const sim::EpSchedule* schedule() const { return s_; }
  void fork(std::span<const cudaStream_t> main);
  void join(std::span<const cudaStream_t> main);

  // Counts round, host sync (RuntimeError when the exchanged counts differ from the
  // schedule's), pack and the grouped send/recv of the rows, the moe-TP all-gather.
  void dispatch();
  void toy_experts();  // f64 only
  void combine();

 private:
  struct Rank;
  std::vector<cudaStream_t> streams() const;
  // One p2p round of `ts` (pointers of the ranks held here), skipped when empty.
  void issue(std::span<const EpTransfer> ts);
  sim::CommGeometry geo_;
  int64_t cap_ = 0;
  sim::EpSource source_;
  kernels::MoeDType dtype_;
  int eb_ = 2;
  Transport& tr_;
  const sim::EpSchedule* s_ = nullptr;
  EpRounds rounds_;  // of *s_, built by prepare()
  std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace mixserve::gpu
