// The paper's cost model (paper_model.hpp), Eqs. 1-13 as digested in paper.md §4-§5.
//
// The paper gives proportionalities; the constants put in (all stated here):
//   Eq. 1  RS(size, d) = AG(size, d) = alpha + size / (d * B)           (one round, d > 1)
//   Eq. 2  AR(size, d) = RS(size/d, d) + AG(size/d, d)                  (as printed; paper.md
//          flags that this scales as 1/d^2, we keep it: this model is the paper's)
//   Eq. 3  A2A(size, d) = (d - 1) * alpha + (size / d) * (d - 1) / B   (pairwise, d-1 rounds)
//   B, alpha: the domain of the group (intra-node link, or the per-GPU share of the node's NICs
//   once a group spans nodes), at the same link efficiencies and latencies as the "mixserve"
//   model (cost_constants.hpp), so only the equations differ.
//   Eq. 4  tau = 2 * Psi_rank * tokens / F per layer: Psi_rank = the layer's non-expert weights
//          / attn_tp (attention, norms, router, dense FFN, shared experts / moe_tp) + routed
//          expert weights / (moe_tp * moe_ep), tokens = b*s/d_DP (the largest replica), F = the
//          tensor-core peak of the expert dtype x gemm_efficiency. The printed extra factor h
//          is dropped: Psi * tokens already counts the multiply-adds. No memory-bound term and
//          no attention-over-context term: the paper has none.
//   Eq. 5  lambda = 2 AR(b s h/d_DP, d_TP) + 2 A2A(b s h k/d_DP, d_EP) if d_DP >= d_EP, else
//          2 A2A(b s h k/d_EP, d_DP); the first AR over attn_tp, the second over moe_tp.
//          fused / rs-a2a-ag layouts use Eq. 13 instead (the paper's own hybrid volume).
//   Eq. 6  dt_svc = sum of layers (tau + lambda) + (d_PP - 1) P2P(b s h / d_DP), P2P = alpha +
//          size / B over the stage boundary's domain.
//   Eq. 8  weights per GPU: Psi_attn/d_TP + Psi_MoE/(d_EP d_TP), divided by d_PP (the printed
//          equation leaves PP out of the weight term; without it no PP layout of a large model
//          could ever fit); KV: 2 h bytes per token per layer on l/d_PP layers (the paper's
//          2bsh l/d_PP, neither MLA nor GQA compression, nor TP sharding). No reserved memory,
//          activations or buffers.
//   Eq. 7 (M/M/1 queueing) is applied in analytic_metrics for the "paper" model.
// No load-imbalance term: the paper costs the mean tokens per EP rank, so this model reports no
// MoE load shape (the serving simulator samples nothing) and step(..., MoeStepLoad) ignores a
// given load (StepCostModel's default).
#include "mixserve/sim/paper_model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/sim/cost_constants.hpp"
#include "mixserve/sim/cost_shapes.hpp"

namespace mixserve::sim {

PaperMoeVolumes paper_eq12_volumes(double tokens, int hidden, double act_bytes, int top_k) {
  PaperMoeVolumes v;
  v.ar_bytes = tokens * hidden * act_bytes;
  v.a2a_bytes = tokens * hidden * act_bytes * top_k;
  return v;
}

PaperMoeVolumes paper_eq13_volumes(double tokens, int hidden, double act_bytes, int top_k,
                                   int n_proc) {
  PaperMoeVolumes v;
  v.ar_bytes = tokens * hidden * act_bytes;
  v.ag_bytes = tokens * hidden * act_bytes * top_k / n_proc;
  v.a2a_bytes = tokens * hidden * act_bytes * top_k / n_proc;
  return v;
}

namespace {

constexpr const CostConstants& K = kCostConstants;

struct Domain {
  double alpha_us = 0, B = 1;  // B in bytes/us
};

class PaperModel final : public StepCostModel {
 public:
  PaperModel(const ModelSpec& m, const ClusterSpec& c, const HardwareProfile& p, const Layout& l)
      : m_(m), l_(l) {
    check_layout(m, c, l);
    capacity_ = (c.gpu_memory_GiB > 0 ? c.gpu_memory_GiB : p.memory_GiB) * 1073741824.0;
    intra_.alpha_us = c.intra.latency_us > 0 ? c.intra.latency_us : K.intra_latency_fallback_us;
    intra_.B = std::max(1e-9, c.intra.bandwidth_GBps * 1e3 * K.intra_link_efficiency);
    inter_.alpha_us = c.inter.latency_us > 0 ? c.inter.latency_us : K.inter_latency_fallback_us;
    inter_.B = std::max(1e-9, c.inter_bw_per_gpu_GBps() * 1e3 * K.inter_link_efficiency);
    const int G = c.gpus_per_node;
    const CommGroup attn = comm_group(1, l.attn_tp, G), moe = comm_group(1, l.moe_tp, G),
                    ep = comm_group(l.moe_tp, l.moe_ep, G);
    d_attn_ = attn.spans_nodes() ? inter_ : intra_;
    d_moe_ = moe.spans_nodes() ? inter_ : intra_;
    d_ep_ = ep.spans_nodes() ? inter_ : intra_;
    d_pp_ = (l.stage_size() >= G) ? inter_ : intra_;
    const double ab = dtype_bytes(m.activation_dtype), wb = dtype_bytes(m.weight_dtype),
                 eb = dtype_bytes(m.expert_weight_dtype);
    w_ = rank_weights(m, l);
    // Elements per rank per layer kind (Eq. 4's Psi / (d_TP d_EP)).
    const double common = w_.attention_layer / wb + w_.norms_layer / ab;
    psi_dense_ = common + w_.dense_layer / wb;
    psi_moe_ = common + w_.router_layer / ab + w_.shared_layer / eb + w_.experts_layer / eb;
    flops_per_us_ = (compute_class(m.expert_weight_dtype) == DType::fp8_e4m3 && p.peak_tflops_fp8 > 0
                         ? p.peak_tflops_fp8
                         : p.peak_tflops_bf16) *
                    1e6 * p.gemm_efficiency;
    if (flops_per_us_ <= 0)
      throw_input_error(p.name.empty() ? "<profile>" : p.name, "peak_tflops_bf16", "a positive peak");
    src_ = p.is_datasheet() ? CostSource::datasheet : CostSource::roofline;
    const auto ranges = stage_layer_ranges(m.num_layers, l.pp);
    for (const auto& [b, e] : ranges) {
      int moe_layers = 0;
      for (int i = b; i < e; ++i) moe_layers += m.layers[size_t(i)].moe ? 1 : 0;
      stages_.push_back({e - b - moe_layers, moe_layers});
    }
  }

  std::string name() const override { return "paper"; }

  StepCost step(std::span<const ReplicaBatch> per_replica, bool breakdown) const override {
    if (int(per_replica.size()) != l_.attn_dp)
      throw_input_error("step", "per_replica",
                        fmt::format("{} replica batches (attn_dp)", l_.attn_dp),
                        std::to_string(per_replica.size()));
    double t = 0, T_all = 0;
    for (const ReplicaBatch& b : per_replica) {
      t = std::max(t, double(b.tokens()));
      T_all += double(b.tokens());
    }
    StepCost out;
    if (t <= 0) return out;
    const double h = m_.hidden_size, ab = dtype_bytes(m_.activation_dtype);
    const double k = m_.moe.top_k;
    const double tau_dense = 2 * psi_dense_ * t / flops_per_us_;
    const double tau_moe = 2 * psi_moe_ * t / flops_per_us_;
    const double lam_dense = AR(t * h * ab, l_.attn_tp, d_attn_) + AR(t * h * ab, l_.attn_tp, d_attn_);
    double lam_moe;
    if (l_.moe_comm == MoeComm::fused || l_.moe_comm == MoeComm::rs_a2a_ag) {
      const PaperMoeVolumes v = paper_eq13_volumes(t, m_.hidden_size, ab, m_.moe.top_k, l_.moe_tp);
      lam_moe = AR(v.ar_bytes, l_.attn_tp, d_attn_) + RS_AG(v.ag_bytes, l_.moe_tp, d_moe_) +
                2 * A2A(v.a2a_bytes, l_.moe_ep, d_ep_);
    } else {
      lam_moe = AR(t * h * ab, l_.attn_tp, d_attn_) + AR(t * h * ab, l_.moe_tp, d_moe_);
      if (l_.attn_dp >= l_.moe_ep)
        lam_moe += 2 * A2A(t * h * k * ab, l_.moe_ep, d_ep_);
      else
        lam_moe += 2 * A2A(T_all / l_.moe_ep * h * k * ab, l_.attn_dp, d_ep_);
    }
    const double p2p = d_pp_.alpha_us + t * h * ab / d_pp_.B;
    double compute = 0, comm = 0, pp = 0;
    for (size_t s = 0; s < stages_.size(); ++s) {
      const auto [dense, moe] = stages_[s];
      const double c = dense * tau_dense + moe * tau_moe;
      const double x = dense * lam_dense + moe * lam_moe;
      const double send = s + 1 < stages_.size() ? p2p : 0.0;
      compute += c;
      comm += x;
      pp += send;
      out.stage_time_us = std::max(out.stage_time_us, c + x + send);
    }
    out.time_us = compute + comm + pp;
    if (breakdown) {
      bool prefill = false;
      for (const ReplicaBatch& b : per_replica) prefill |= b.prefill_tokens > 0;
      const char* phase = prefill ? "prefill" : "decode";
      out.ops.push_back({"paper.compute", phase, compute, src_});
      out.ops.push_back({"paper.comm", phase, comm, CostSource::alpha_beta});
      if (pp > 0) out.ops.push_back({"paper.p2p", phase, pp, CostSource::alpha_beta});
    }
    return out;
  }

  MemoryBreakdown memory(const RuntimeLimits& limits) const override {
    MemoryBreakdown mb;
    mb.capacity = capacity_;
    const int L = m_.num_layers, L_moe = m_.num_moe_layers();
    mb.weights = (L * (w_.attention_layer + w_.norms_layer) +
                  L_moe * (w_.router_layer + w_.experts_layer + w_.shared_layer) +
                  (L - L_moe) * w_.dense_layer) /
                 l_.pp;
    const double layers_per_stage = std::ceil(double(L) / l_.pp);
    const double kv_per_token = 2.0 * m_.hidden_size * layers_per_stage * dtype_bytes(m_.kv_dtype);
    const double space = capacity_ * limits.gpu_memory_utilization - mb.weights;
    mb.kv_cache = std::max(0.0, space);
    mb.kv_tokens = space > 0 ? int64_t(space / kv_per_token) : 0;
    const int64_t need = limits.max_model_len > 0 ? limits.max_model_len
                                                  : limits.max_num_batched_tokens;
    mb.fits = space > 0 && mb.kv_tokens >= need;
    return mb;
  }

 private:
  static double RS_AG(double size, int d, const Domain& D) {  // Eq. 1
    return d > 1 ? D.alpha_us + size / (d * D.B) : 0.0;
  }
  static double AR(double size, int d, const Domain& D) {  // Eq. 2
    return d > 1 ? RS_AG(size / d, d, D) + RS_AG(size / d, d, D) : 0.0;
  }
  static double A2A(double size, int d, const Domain& D) {  // Eq. 3
    return d > 1 ? (d - 1) * D.alpha_us + (size / d) * (d - 1) / D.B : 0.0;
  }

  ModelSpec m_;
  Layout l_;
  double capacity_ = 0;
  Domain intra_, inter_, d_attn_, d_moe_, d_ep_, d_pp_;
  RankWeights w_;
  double psi_dense_ = 0, psi_moe_ = 0, flops_per_us_ = 0;
  CostSource src_ = CostSource::datasheet;
  std::vector<std::pair<int, int>> stages_;  // (dense, moe) layers per stage
};

}  // namespace

std::unique_ptr<StepCostModel> make_paper_cost_model(const ModelSpec& m, const ClusterSpec& c,
                                                     const HardwareProfile& p, const Layout& l,
                                                     const CostModelOptions&) {
  return std::make_unique<PaperModel>(m, c, p, l);
}

}  // namespace mixserve::sim
