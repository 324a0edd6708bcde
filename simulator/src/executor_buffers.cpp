// The executor's per-rank MoE buffers (executor_buffers.hpp), for the planner's memory model.
#include "mixserve/sim/executor_buffers.hpp"

#include <algorithm>

#include "mixserve/core/expert_path.hpp"
#include "mixserve/sim/comm_schedule.hpp"

namespace mixserve::sim {

ExecutorMoePath executor_moe_path(const Layout& l, const ModelSpec& m) {
  if (l.stage_size() == 1 || l.moe_ep == 1 || m.num_moe_layers() == 0) return ExecutorMoePath::exchange;
  switch (l.moe_comm) {
    case MoeComm::nccl_a2a:
      return ExecutorMoePath::ep;  // build_ep_schedule: any moe_tp
    case MoeComm::fused:
    case MoeComm::rs_a2a_ag:
      if (l.attn_tp != l.moe_tp || m.hidden_size % l.moe_tp != 0) return ExecutorMoePath::exchange;
      return l.moe_comm == MoeComm::fused ? ExecutorMoePath::fused : ExecutorMoePath::rs_a2a_ag;
    default:
      return ExecutorMoePath::exchange;
  }
}

int64_t executor_max_tokens_per_step(const RuntimeLimits& limits) {
  return std::max<int64_t>({limits.max_num_batched_tokens, int64_t(limits.max_num_seqs), 1});
}

ExecutorMoeBuffers executor_moe_buffers(const ClusterSpec& c, const ModelSpec& m, const Layout& l,
                                        int64_t max_tokens_per_step) {
  constexpr double kBf16 = 2, kF32 = 4, kI32 = 4, kI64 = 8;  // the executor's element bytes
  ExecutorMoeBuffers b;
  const int64_t T = std::max<int64_t>(1, max_tokens_per_step);
  const double H = double(m.hidden_size);
  b.tokens = T;
  b.path = executor_moe_path(l, m);
  // TransportComm: one [T, H] bf16 all-reduce scratch on every rank of a sharded layout.
  if (l.world_size() > 1) b.comm_bytes += double(T) * H * kBf16;
  if (m.num_moe_layers() == 0) return b;

  const int E = m.moe.num_experts, K = std::max(m.moe.top_k, 1), P = l.stage_size();
  const int64_t El = E / l.moe_ep;
  const double I = double(m.moe.expert_intermediate_size / l.moe_tp);
  const double S = double(m.moe.shared_intermediate_size / l.moe_tp);
  const double D = m.num_dense_layers() > 0 ? double(m.dense_intermediate_size / l.attn_tp) : 0.0;
  const bool gathered = P > 1 && l.attn_dp > 1;
  int64_t Tm = T * (gathered ? P : 1);
  CommGeometry geo;
  if (b.path != ExecutorMoePath::exchange) {
    geo = make_comm_geometry(c, m, l);
    geo.elem_bytes = kBf16;
    if (b.path == ExecutorMoePath::ep) {
      b.comm_rows = ep_capacity_rows(geo, T, EpSource::split);
      const int64_t shared_rows = S > 0 ? int64_t(l.moe_tp) * T : 0;
      Tm = std::max({Tm, shared_rows, (b.comm_rows + K - 1) / K});
    } else {
      b.comm_rows = fused_capacity_rows(geo, T);
      Tm = std::max(Tm, b.comm_rows);
    }
  }
  b.moe_rows = Tm;
  const int64_t R = Tm * K;
  b.routed_rows = R;
  b.expert_rows = uses_expert_streams(R, El) && is_bucketed_expert_gemm(kExpertGemmDefault)
                      ? std::max(R, expert_bucket_capacity(R, El, kExpertBucketRowAlign))
                      : R;
  const double X = double(b.expert_rows), Tmd = double(Tm), Td = double(T), Rd = double(R);
  double bf16 = 2 * X * H;                                      // permuted_x, expert_out
  bf16 += std::max({X * 2 * I, Tmd * 2 * S, Td * 2 * D});       // gate|up
  bf16 += std::max({X * I, Tmd * S, Td * D});                   // SwiGLU output
  bf16 += Tmd * H;                                              // shared_out
  if (gathered) bf16 += 2 * Tmd * H;                            // moe_in, moe_out
  b.expert_bytes = bf16 * kBf16 + (Tmd * E + Rd + Tmd) * kF32 + (3 * Rd + X) * kI32;

  const double Td1 = double(T), C = double(b.comm_rows);
  switch (b.path) {
    case ExecutorMoePath::exchange:
      break;
    case ExecutorMoePath::ep: {
      double rows = Td1 + Td1 * K + 2 * C + Td1 * (K + 1) + Td1;  // x, sendbuf, recv/out, back, y
      if (l.moe_tp > 1) rows += 2 * C;                               // rsbuf, redbuf
      b.comm_bytes += rows * H * kBf16 + 2.0 * P * double(El) * kI64 + Td1 * K * kI32 +
                      (Td1 + 1) * kI64 + 2 * Td1 * (K + 1) * kI64 + (C + 1) * kI64 + C * kI32 + C * kI64;
      break;
    }
    case ExecutorMoePath::fused:
    case ExecutorMoePath::rs_a2a_ag: {
      const double Q = l.moe_ep, hs = H / l.moe_tp;
      const double pairs = C * std::min<double>(K, double(El)) + (geo.shared_expert ? Td1 : 0.0);
      b.comm_bytes += (2 * Td1 * H + 2 * C * H + ((Q - 1) + 2 * Q + l.moe_tp) * Td1 * hs) * kBf16 +
                      (Td1 + (Q - 1) * Td1 + Q * Td1) * kI32 + (Q + 1 + C + 1) * kI64 +
                      pairs * (kI32 + kI64);
      break;
    }
  }
  return b;
}

}  // namespace mixserve::sim
