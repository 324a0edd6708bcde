// Per-op time prediction backends behind one small interface (STYLE.md §4).
//   roofline timer: max(compute / (peak * efficiency), bytes / (bandwidth * efficiency)) per
//                   kernel plus launch cost; collectives by alpha-beta per domain.
//   profile timer:  interpolates the HardwareProfile's measured tables in log-log space inside
//                   their range and falls back to the roofline / alpha-beta outside it.
// Every answer carries the CostSource it came from. Times are microseconds, sizes are bytes.
#pragma once
#include <cstdint>
#include <memory>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/types.hpp"

namespace mixserve::sim {

struct OpTime {
  double time_us = 0;
  CostSource source = CostSource::roofline;
};

// Where a group of ranks lives: `size` ranks spread evenly over `nodes` nodes (1 = one node).
struct CommGroup {
  int size = 1;
  int nodes = 1;
  int per_node() const { return nodes > 0 ? size / nodes : size; }
  bool spans_nodes() const { return nodes > 1; }
};

// One grouped expert GEMM over the experts of one rank: rows_i x k times k x n per expert.
struct ExpertGemmShape {
  int num_experts = 1;         // local experts (groups)
  double rows = 0;             // routed rows over all local experts
  double active_experts = 1;   // experts with at least one row (their weights are read)
  int64_t n = 0, k = 0;        // per-expert weight [k, n]
  DType dtype = DType::bf16;   // weight dtype (its compute class sets the peak)
  bool device_gemv = false;    // the executor's device grouped GEMV (core/expert_path.hpp)
  bool grouped_gemm = false;   // the executor's tensor-core grouped GEMM (when not device_gemv); else cuBLASLt
  bool gemv_v2 = false;        // device_gemv as the grouped GEMV v2 (core/decode_path.hpp); for the
                               // down projection its input is the [rows, 2k] gate|up (SwiGLU fused)
};

// Which launch of the executor's bandwidth GEMV (core/decode_path.hpp tags).
enum class GemvKind { plain, swiglu, fp32_out };

// Core attention (softmax(QK^T)V) of one rank, without projections.
struct AttentionShape {
  bool decode = false;
  bool mla = false;
  int batch = 0;               // sequences
  double q_tokens = 0;         // query tokens over all sequences
  double pairs = 0;            // (query, key) pairs over all sequences and queries
  double context_tokens = 0;   // decode: keys read (sum of context lengths)
  int heads = 0;               // query heads on this rank
  int kv_heads = 0;            // KV heads on this rank (MLA: 1 latent)
  int qk_dim = 0;              // per-head width of q.k (MLA decode: kv_lora + rope)
  int v_dim = 0;               // per-head width of v (MLA decode: kv_lora)
  double kv_bytes_per_token = 0;  // KV cache bytes read per context token on this rank
  double act_bytes = 2;        // bytes per activation element
};

class OpTimer {
 public:
  virtual ~OpTimer() = default;
  // C[m,n] = A[m,k] * W[k,n]; `dtype` is the weight dtype.
  virtual OpTime gemm(double m, int64_t n, int64_t k, DType dtype) const = 0;
  virtual OpTime expert_gemm(const ExpertGemmShape& s) const = 0;
  // The executor's bandwidth GEMV (decode steps): out[m, n] = act[m, k] * W[k, n]. Default: the
  // gemm() cost (roofline timers: the same weight-read bound).
  virtual OpTime gemv(double m, int64_t n, int64_t k, DType dtype, GemvKind) const {
    return gemm(m, n, k, dtype);
  }
  virtual OpTime attention(const AttentionShape& s) const = 0;
  // A memory-bound kernel moving `bytes` (read + written).
  virtual OpTime memory_op(double bytes) const = 0;
  // nccl-tests convention for `bytes`: all_reduce: the buffer; reduce_scatter: the input
  // (full) buffer; all_gather: the output (full) buffer; all_to_all: the rank's whole send
  // buffer (including its own share); send_recv: the message.
  virtual OpTime collective(CollOp op, CommGroup g, double bytes) const = 0;
};

// Roofline + alpha-beta from the profile's peaks x efficiencies and the cluster's links.
// Sources: `datasheet` when the profile is a datasheet profile, else `roofline`; collectives
// are `alpha_beta`. The profile and cluster are copied.
std::unique_ptr<OpTimer> make_roofline_timer(const HardwareProfile& p, const ClusterSpec& c);

// Profile tables first (measured at an exact point, interpolated between points in log-log
// space; GEMMs use the (n, k) family nearest in log distance and scale by the roofline ratio,
// tagged extrapolated), roofline / alpha-beta outside the measured range. Table keys:
//   gemm:        (compute class, n, k), curve over m;
//   gemv:        exact (impl tag, compute class, n, k), curve over m (the GEMV table of
//                mixserve-profile gemv); a shape without its family, or m outside the curve: the
//                gemm() cost above with its source made at best extrapolated (another kernel's
//                time);
//   experts:     exact (compute class, local experts, n, k, implementation), curve over total
//                rows. The implementation comes from the point's distribution tag
//                (core/expert_path.hpp): "gemv:" points serve device_gemv shapes only (none:
//                roofline); gemv_v2 shapes take the "gemv2:" points
//                and, without them, the "gemv:" (v1) points tagged extrapolated;
//                grouped_gemm shapes take the "grouped:" points; when the family has
//                none, they fall back to the cuBLASLt tables below, tagged extrapolated (another
//                kernel's time); other shapes take the "eager:" points (the executor's cuBLASLt
//                path with its host sync) when the family has them, else the untagged (graph) points.
//                The distribution's skew and the active-expert count are not used;
//   attention:   exact (kind, impl, num_heads, num_kv_heads, head_dim = the q.k width); inside it
//                one curve per measured batch over the work of one sequence (decode: kv_len;
//                prefill: causal (query, key) pairs, queries taken as the last q_len positions of
//                kv_len), interpolated in log-log space over that work and then over the batch
//                between the two measured batches around the shape's; outside the measured
//                batches or work range: roofline;
//   elementwise: curve over bytes (below the smallest measured size: the smallest size's time,
//                tagged extrapolated: such kernels are launch-bound); collectives: (op,
//                group_size, nodes), curve over bytes.
std::unique_ptr<OpTimer> make_profile_timer(const HardwareProfile& p, const ClusterSpec& c);

// Log-log interpolation of y(x) on points sorted by x. Returns false (and leaves `y` alone)
// when x lies outside [xs.front(), xs.back()]; sets `exact` when x equals a point.
bool interpolate_loglog(const double* xs, const double* ys, int n, double x, double& y,
                        bool& exact);

}  // namespace mixserve::sim
