#pragma once
// The MoE buffers the executor preallocates on one rank for a layout, as the planner's memory
// model counts them (StepCostModel::memory: `activations` and `comm_buffers`). The executor sizes
// them for the WORST case of a step of max_tokens_per_step tokens per replica, not for the expected
// routing, so the planner does the same, with the same capacity functions:
//   sim::ep_capacity_rows / sim::fused_capacity_rows (comm_schedule.hpp): the scheduled MoE
//     layer's received rows (executor/src/moe_comm.cpp EpMoeComm / FusedMoeComm, shard.cpp
//     StageMoe);
//   expert_bucket_capacity / uses_expert_streams (core/expert_path.hpp): the bucketed layout's
//     room in the expert buffers (executor/src/model_forward.cpp GpuModel::allocate).
// GpuModel::allocate keeps its own expressions (it sizes from the ShardSpec); a change to its MoE
// buffers must be mirrored in executor_buffers.cpp (tests/sim/test_memory.cpp checks the sizes).
#include <cstdint>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/workload.hpp"

namespace mixserve::sim {

// The MoE communication the executor runs by schedule for a layout (gpu::moe_sched_for calls
// this): `exchange` the moe_mode exchange (all-reduce / gathered rows; TP-only stages, moe_ep 1,
// plans with `allreduce`, fused/rs-a2a-ag where attn_tp != moe_tp or hidden % moe_tp != 0), `ep`
// the EP dispatch/combine (a2a), `fused` / `rs_a2a_ag` the AG-Dispatch / RS-Combine schedule.
enum class ExecutorMoePath { exchange, ep, fused, rs_a2a_ag };
ExecutorMoePath executor_moe_path(const Layout& l, const ModelSpec& m);

// The executor's rows of every activation buffer per replica (mixserve-run online_gpu_config:
// GpuModelConfig::max_tokens_per_step = max(max_num_batched_tokens, max_num_seqs)).
int64_t executor_max_tokens_per_step(const RuntimeLimits& limits);

struct ExecutorMoeBuffers {
  ExecutorMoePath path = ExecutorMoePath::exchange;
  int64_t tokens = 0;       // T: max_tokens_per_step (the StageMoe's max_tokens_per_replica)
  int64_t moe_rows = 0;     // Tm: token rows of the MoE buffers (GpuModel::allocate)
  int64_t routed_rows = 0;  // Tm x top_k
  int64_t expert_rows = 0;  // rows of permuted_x / expert_out / gate|up / SwiGLU (bucketed room)
  int64_t comm_rows = 0;    // ep_capacity_rows or fused_capacity_rows (0: exchange)
  double expert_bytes = 0;  // GpuModel's MoE activation buffers (planner: activations)
  double comm_bytes = 0;    // StageMoe rank buffers + TransportComm scratch (planner: comm_buffers)
};

// Per rank, for a model with MoE layers (zeros but `comm_bytes`' all-reduce scratch otherwise).
// The per-rank list (bf16 = 2 bytes, fp32/int32 = 4, int64/f64 = 8; H hidden, K top_k, El = E /
// moe_ep local experts, I = expert width / moe_tp, S = shared width / moe_tp, D = dense width /
// attn_tp, T tokens, Tm, R = Tm x K routed rows, X expert rows, C comm rows):
//  GpuModel::allocate (expert_bytes):
//    Tm = T x (stage_size if attn_dp > 1 and stage_size > 1 (gathered mode) else 1), raised for a
//         schedule to ceil(ep_capacity_rows / K) (at least moe_tp x T with a shared expert; ep) or
//         fused_capacity_rows (fused, rs_a2a_ag);
//    X  = R, or expert_bucket_capacity(R, El, kExpertBucketRowAlign) where uses_expert_streams(R,
//         El) (the default kExpertGemmDefault is bucketed, the default expert path automatic);
//    bf16 permuted_x X x H, expert_out X x H, gate|up max(X x 2I, Tm x 2S, T x 2D),
//         SwiGLU max(X x I, Tm x S, T x D), shared_out Tm x H, gathered mode moe_in and moe_out
//         Tm x H each;
//    fp32 router_logits Tm x E, topk_w R, shared_gate Tm;
//    int32 topk_ids R, slot_row R, permuted_token R, padded_token X.
//    (Not counted: the El-sized count/offset tables and the permute workspace, KBs.)
//  EpMoeComm (ep; C = ep_capacity_rows(geo, T, split)) (comm_bytes):
//    bf16 x T x H, sendbuf T x K x H, recvbuf C x H, outbuf C x H, moe_tp > 1: rsbuf and redbuf
//         C x H each, backbuf T x (K + 1) x H, y T x H;
//    int64 send/recv counts 2 x stage_size x El, int32 send_token T x K, int64 comb_off T + 1, comb_row T x (K + 1), f64 comb_w
//         T x (K + 1), int64 pair_off C + 1, int32 pair_expert C, f64 pair_w C.
//  FusedMoeComm (fused, rs_a2a_ag; C = fused_capacity_rows(geo, T), Q = moe_ep, hs = H / moe_tp):
//    bf16 x T x H, xr C x H, partial C x H, send_pack (Q - 1) x T x hs, red Q x T x hs, crecv
//         Q x T x hs, y_gather moe_tp x T x hs, y T x H;
//    int32 idx_own T, idx_send (Q - 1) x T, idx_home Q x T; int64 block_off Q + 1, pair_off
//         C + 1; pairs = C x min(K, El) (+ T with a shared expert): int32 pair_expert, f64
//         pair_weight.
//  TransportComm (every rank of a sharded layout): bf16 all-reduce scratch T x H.
ExecutorMoeBuffers executor_moe_buffers(const ClusterSpec& c, const ModelSpec& m, const Layout& l,
                                        int64_t max_tokens_per_step);

}  // namespace mixserve::sim
