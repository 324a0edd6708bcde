// The "mixserve" step-cost model (cost_model.hpp), make_cost_model and analytic_metrics.
//
// One step, per pipeline stage, on the critical path:
//   dense layer: max over DP replicas of (attention block + dense FFN);
//   MoE layer:   max over DP replicas of (attention block + router) + the MoE block, which the
//                replicas go through together (the slowest replica and the most loaded EP rank
//                set the pace);
//   first stage: embedding; last stage: final norm + LM head for one row per sequence;
//   every stage but the last: send/recv of the activations to the next stage.
// StepCost.time_us sums the stages (one micro-batch through the pipeline); stage_time_us is the
// slowest stage. Attention block: norm (+ the elementwise passes of kCostConstants), QKV
// projections (MLA: replicated down-projections, TP-sharded up-projections), core attention
// (prefill pairs / decode context), o_proj, all-reduce over attn_tp.
// MoE block, with T_g = the source tokens of one MoE TP group (T_rep * moe_tp / attn_tp, at
// most all tokens) and rows = the routed rows of the most loaded EP rank: the expected maximum
// (moe_load expected_ep_load), or the per-layer sampled load given to step(..., MoeStepLoad)
// (the block costed at the step's smallest and largest layer load, layers in between
// interpolated linearly):
//   tp_allreduce: one all-reduce over moe_tp (with attn_dp > 1: all-gather of all replicas'
//                 tokens over the stage before, reduce-scatter after);
//   nccl_a2a:     each rank dispatches T_g/moe_tp tokens as (token, expert) rows of full hidden,
//                 pairwise all-to-all over the EP group, no dedup; all-gather / reduce-scatter
//                 over moe_tp when moe_tp > 1; all-to-all back; all-gather over attn_tp to
//                 restore the replicated hidden states;
//   fused:        AG-Dispatch and RS-Combine costed round by round on two streams
//                 (cost_moe_comm.hpp), rows deduplicated per destination group, hidden/moe_tp
//                 slices on the rails, plus the final all-gather;
//   rs_a2a_ag:    the same operations as fused, summed without overlap.
// Expert GEMMs are grouped GEMMs over the E/moe_ep local experts on `rows` rows, reading the
// weights of the experts expected to receive at least one token.
#include "mixserve/sim/cost_model.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/sim/cost_constants.hpp"
#include "mixserve/sim/cost_moe_comm.hpp"
#include "mixserve/sim/cost_shapes.hpp"
#include "mixserve/sim/executor_buffers.hpp"
#include "mixserve/sim/moe_load.hpp"
#include "mixserve/sim/op_timer.hpp"
#include "mixserve/sim/paper_model.hpp"
#include "mixserve/sim/queueing.hpp"

namespace mixserve::sim {
namespace {

constexpr const CostConstants& K = kCostConstants;

// Op slots of the breakdown; names follow the executor's op names (plan.hpp OpCost).
#define MIXSERVE_SIM_SLOTS(X)                                                        \
  X(attn_norm, "attn.norm") X(attn_qkv, "attn.qkv_proj") X(attn_core, "attn.core")   \
  X(attn_o, "attn.o_proj") X(attn_ar, "attn.allreduce") X(moe_router, "moe.router")  \
  X(moe_reshard, "moe.reshard") X(moe_dispatch, "moe.dispatch")                      \
  X(moe_experts, "moe.experts") X(moe_shared, "moe.shared")                          \
  X(moe_combine, "moe.combine") X(dense_ffn, "dense.ffn")                            \
  X(dense_ar, "dense.allreduce") X(embedding, "embedding") X(lm_head, "lm_head")     \
  X(pp_send, "pp.send_recv") X(fused_layer, "fused.decode_layer")
enum Slot {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_SIM_SLOTS(MIXSERVE_X)
#undef MIXSERVE_X
  kSlots
};
constexpr const char* kSlotNames[] = {
#define MIXSERVE_X(e, s) s,
    MIXSERVE_SIM_SLOTS(MIXSERVE_X)
#undef MIXSERVE_X
};

// Less reliable sources win when one slot mixes several (measured < ... < datasheet).
CostSource worse(CostSource a, CostSource b) { return int(a) >= int(b) ? a : b; }

// Every add(slot, time) is one kernel launch of the executor (core/decode_path.hpp says which);
// add_coll (NCCL collectives) and add_launches(slot, time, n) say otherwise.
struct Acc {
  std::array<double, kSlots> t{};
  std::array<CostSource, kSlots> s{};
  std::array<bool, kSlots> used{};
  std::array<double, kSlots> n{};   // launches per slot
  std::array<double, kSlots> np{};  // of which launched without programmatic dependent launch
  double launches = 0;
  void add_launches(Slot i, OpTime o, double count) {
    t[i] += o.time_us;
    s[i] = used[i] ? worse(s[i], o.source) : o.source;
    used[i] = true;
    n[i] += count;
    launches += count;
  }
  void add(Slot i, OpTime o) { add_launches(i, o, 1); }
  // One launch the executor makes without PDL even in a PDL step (model_forward.cpp: attention,
  // the separate q/k norm, RoPE and KV-write kernels, the expert GEMMs that are not the device
  // GEMV, and the step's embedding, RoPE-table and LM-head launches).
  void add_no_pdl(Slot i, OpTime o) {
    add_launches(i, o, 1);
    np[i] += 1;
  }
  void add_coll(Slot i, OpTime o) { add_launches(i, o, 0); }
  void add(const Acc& o, double mult) {
    launches += o.launches * mult;
    for (int i = 0; i < kSlots; ++i) {
      n[i] += o.n[i] * mult;
      np[i] += o.np[i] * mult;
      if (!o.used[i]) continue;
      t[i] += o.t[i] * mult;
      s[i] = used[i] ? worse(s[i], o.s[i]) : o.s[i];
      used[i] = true;
    }
  }
  double total() const {
    double x = 0;
    for (double v : t) x += v;
    return x;
  }
};

std::vector<double> skewed_load_table(const std::vector<double>& tokens, int E, int k, int ep,
                                      const RoutingModel& r);

// Memoises gemm(): a profile timer looks up the nearest measured (n, k) family on every call
// (a scan with two logs per family), and a serving simulation asks for the same few (n, k)
// shapes at the same token counts thousands of times. Bounded (cleared past kMaxEntries);
// a mutex keeps the const cost model safe to share between threads.
class GemmMemoTimer final : public OpTimer {
 public:
  explicit GemmMemoTimer(std::unique_ptr<OpTimer> inner) : inner_(std::move(inner)) {}
  OpTime gemm(double m, int64_t n, int64_t k, DType dtype) const override {
    const Key key{m, n, k, int(dtype)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = cache_.find(key);
      if (it != cache_.end()) return it->second;
    }
    const OpTime t = inner_->gemm(m, n, k, dtype);
    std::lock_guard<std::mutex> lock(mu_);
    if (cache_.size() >= kMaxEntries) cache_.clear();
    cache_.emplace(key, t);
    return t;
  }
  OpTime expert_gemm(const ExpertGemmShape& s) const override { return inner_->expert_gemm(s); }
  OpTime gemv(double m, int64_t n, int64_t k, DType dtype, GemvKind kind) const override {
    return inner_->gemv(m, n, k, dtype, kind);
  }
  OpTime attention(const AttentionShape& s) const override { return inner_->attention(s); }
  OpTime memory_op(double bytes) const override { return inner_->memory_op(bytes); }
  OpTime collective(CollOp op, CommGroup g, double bytes) const override {
    return inner_->collective(op, g, bytes);
  }

 private:
  static constexpr size_t kMaxEntries = size_t(1) << 16;
  struct Key {
    double m;
    int64_t n, k;
    int dtype;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& x) const {
      size_t h = std::hash<double>()(x.m);
      for (const uint64_t v : {uint64_t(x.n), uint64_t(x.k), uint64_t(x.dtype)})
        h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
      return h;
    }
  };
  std::unique_ptr<OpTimer> inner_;
  mutable std::mutex mu_;
  mutable std::unordered_map<Key, OpTime, KeyHash> cache_;
};

// The profile's fused_decode_layer points of one layer shape, by context.
std::vector<FusedLayerPoint> fused_points_of(const HardwareProfile& p, const FusedLayerPoint& shape) {
  std::vector<FusedLayerPoint> pts;
  for (const auto& q : p.fused_decode_layer.points)
    if (q.same_shape(shape)) pts.push_back(q);
  std::sort(pts.begin(), pts.end(), [](const auto& a, const auto& b) { return a.context < b.context; });
  return pts;
}
// fused_layer_time over non-empty points of one shape sorted by context.
OpTime fused_time_at(const std::vector<FusedLayerPoint>& pts, double context) {
  for (const auto& q : pts)
    if (double(q.context) == context) return OpTime{q.time_us, CostSource::measured};
  if (pts.size() == 1 || context < double(pts.front().context))
    return OpTime{(context < double(pts.front().context) ? pts.front() : pts.back()).time_us, CostSource::extrapolated};
  size_t i = 1;
  while (i + 1 < pts.size() && double(pts[i].context) < context) ++i;
  const FusedLayerPoint &a = pts[i - 1], &b = pts[i];
  const double slope = (b.time_us - a.time_us) / double(b.context - a.context);
  const bool beyond = context > double(b.context);
  const double t = a.time_us + (beyond ? std::max(slope, 0.0) : slope) * (context - double(a.context));
  return OpTime{beyond ? std::max(t, b.time_us) : t, beyond ? CostSource::extrapolated : CostSource::interpolated};
}

struct StageLayers {
  int dense_full = 0, dense_sliding = 0, moe_full = 0, moe_sliding = 0;
  int moe_begin = 0;  // index of the stage's first MoE layer among the model's MoE layers
  bool first = false, last = false;
  CommGroup send;  // to the next stage
};

class MixServeModel final : public StepCostModel {
 public:
  MixServeModel(const ModelSpec& m, const ClusterSpec& c, const HardwareProfile& p,
                const Layout& l, const CostModelOptions& opt)
      : m_(m), l_(l), timer_(std::make_unique<GemmMemoTimer>(make_profile_timer(p, c))) {
    check_layout(m, c, l);
    dk_ = decode_kernels_enabled(opt.decode_kernels, l.world_size() > 1);
    device_greedy_ = opt.device_greedy;
    host_step_us_ = p.host_overhead.step_us;  // 0 when the profile has none
    graph_saving_us_ = opt.decode_graphs ? p.graph_launch.saving_us() : 0.0;
    graph_saving_no_pdl_us_ = opt.decode_graphs ? p.graph_launch.saving_no_pdl_us() : 0.0;
    // The fused batch-1 layer where the executor would run it and the profile has its shape.
    fused_ = fused_layer_costed(m, l, p, opt);
    if (fused_) fused_points_ = fused_points_of(p, fused_layer_shape(m));
    qk_per_head_ = !m.attention.qk_norm || qk_norm_per_head(m.architecture);
    sm_count_ = p.sm_count > 0 ? p.sm_count : 132;
    capacity_bytes_ = (c.gpu_memory_GiB > 0 ? c.gpu_memory_GiB : p.memory_GiB) * 1073741824.0;
    const int G = c.gpus_per_node, S = l.stage_size();
    g_attn_tp_ = comm_group(1, l.attn_tp, G);
    g_moe_tp_ = comm_group(1, l.moe_tp, G);
    g_ep_ = comm_group(l.moe_tp, l.moe_ep, G);
    g_stage_ = comm_group(1, S, G);
    // Rail round i goes from EP index 0 to EP index i: i*moe_tp ranks away.
    for (int i = 1; i < l.moe_ep; ++i) {
      const bool inter = (i * l.moe_tp) / G != 0;
      rail_.push_back(CommGroup{2, inter ? 2 : 1});
    }
    const auto ranges = stage_layer_ranges(m.num_layers, l.pp);
    for (int s = 0; s < l.pp; ++s) {
      StageLayers st;
      st.moe_begin = int(moe_layer_ids_.size());
      for (int i = ranges[size_t(s)].first; i < ranges[size_t(s)].second; ++i) {
        const LayerSpec& ls = m.layers[size_t(i)];
        if (ls.moe) moe_layer_ids_.push_back(i);
        const bool sl = ls.sliding && m.attention.sliding_window > 0;
        (ls.moe ? (sl ? st.moe_sliding : st.moe_full) : (sl ? st.dense_sliding : st.dense_full))++;
      }
      st.first = s == 0;
      st.last = s == l.pp - 1;
      const bool inter = S >= G || ((s + 1) * S) % G == 0;
      st.send = CommGroup{2, inter ? 2 : 1};
      stages_.push_back(st);
    }
    h_ = m.hidden_size;
    act_ = dtype_bytes(m.activation_dtype);
    cluster_ = c;
    const AttentionSpec& a = m.attention;
    heads_ = a.num_heads / l.attn_tp;
    mla_ = a.type == AttentionType::mla;
    kv_heads_ = std::max(1, a.num_kv_heads / l.attn_tp);
    E_ = m.moe.num_experts;
    k_ = m.moe.top_k;
    E_local_ = E_ > 0 ? E_ / l.moe_ep : 0;
    routing_ = opt.routing;
    if (E_ > 0) {
      c_ep_ = expected_max_std_normal(l.moe_ep);
      skewed_ = !(opt.routing.kind == "uniform" ||
                  (opt.routing.kind == "zipf" && opt.routing.skew == 0));
      if (skewed_) {  // max rows on a log grid of token counts, interpolated per step
        for (double t = 1; t <= double(1 << 24); t *= 4) skew_tokens_.push_back(t);
        skew_max_ = skewed_load_table(skew_tokens_, E_, k_, l.moe_ep, opt.routing);
      } else {
        expert_shares(E_, opt.routing);  // validates the routing model
      }
    }
  }

  std::string name() const override { return "mixserve"; }

  StepCost step(std::span<const ReplicaBatch> per_replica, bool breakdown) const override {
    return step_impl(per_replica, breakdown, nullptr);
  }

  MoeLoadShape moe_load_shape() const override {
    MoeLoadShape s;
    if (E_ <= 0 || moe_layer_ids_.empty()) return s;
    s.num_experts = E_;
    s.top_k = k_;
    s.ep = l_.moe_ep;
    s.num_moe_layers = int(moe_layer_ids_.size());
    s.moe_layer_ids = moe_layer_ids_;
    s.routing = routing_;
    return s;
  }

 protected:
  StepCost step_with_load(std::span<const ReplicaBatch> per_replica, bool breakdown,
                          const MoeStepLoad& load) const override {
    return step_impl(per_replica, breakdown, &load);
  }

 private:
  // load: nullptr or empty = the expected maximum over EP ranks. Otherwise the MoE block is
  // costed at the step's smallest and largest per-layer loads and every layer in between is
  // interpolated linearly between the two (exact where the block's time is linear in the rows
  // over that range: expert GEMMs past the weight-read bound, alpha-beta transfers).
  StepCost step_impl(std::span<const ReplicaBatch> per_replica, bool breakdown,
                     const MoeStepLoad* load) const {
    const int n_moe = int(moe_layer_ids_.size());
    if (load != nullptr && !load->max_over_mean.empty() && load->max_over_mean.size() != 1 &&
        int(load->max_over_mean.size()) != n_moe)
      throw_input_error("step", "load.max_over_mean",
                        fmt::format("0, 1 or {} values (one per MoE layer)", n_moe),
                        std::to_string(load->max_over_mean.size()));
    if (int(per_replica.size()) != l_.attn_dp)
      throw_input_error("step", "per_replica",
                        fmt::format("{} replica batches (attn_dp)", l_.attn_dp),
                        std::to_string(per_replica.size()));
    // Per-replica per-layer blocks; identical consecutive replicas are costed once.
    Acc best_full, best_slide, best_dense_full, best_dense_slide;
    double t_full = -1, t_slide = -1, t_dfull = -1, t_dslide = -1;
    double T_all = 0, T_max = 0, rows_max = 0;
    bool any_prefill = false;
    const ReplicaBatch* prev = nullptr;
    const bool has_sliding = m_.attention.sliding_window > 0;
    const bool has_dense = m_.num_dense_layers() > 0;
    for (const ReplicaBatch& b : per_replica) {
      T_all += double(b.tokens());
      T_max = std::max(T_max, double(b.tokens()));
      rows_max = std::max(rows_max, double(b.num_decode + b.num_prefill_seqs));
      any_prefill |= b.prefill_tokens > 0;
      if (prev != nullptr && same(*prev, b)) continue;
      prev = &b;
      const Acc full = attention_block(b, false);
      Acc router;
      if (E_ > 0) router = router_block(b);
      pick(best_full, t_full, full, &router);
      if (has_sliding) pick(best_slide, t_slide, attention_block(b, true), &router);
      if (has_dense) {
        const Acc ffn = dense_block(b);
        pick(best_dense_full, t_dfull, full, &ffn);
        if (has_sliding) pick(best_dense_slide, t_dslide, attention_block(b, true), &ffn);
      }
    }
    // moe_lo at load r_lo, moe_hi at r_hi; per_layer: layer l weighs (r_l - r_lo)/(r_hi - r_lo)
    // of moe_hi and the rest of moe_lo.
    Acc moe_lo, moe_hi;
    const std::vector<double>* per_layer = nullptr;
    double r_lo = 0, r_hi = 0;
    if (E_ > 0 && T_all > 0) {
      if (load == nullptr || load->max_over_mean.empty()) {
        moe_lo = moe_block(T_all, T_max, ep_rows_max(T_all));
      } else {
        const auto [lo, hi] =
            std::minmax_element(load->max_over_mean.begin(), load->max_over_mean.end());
        r_lo = *lo;
        r_hi = *hi;
        moe_lo = moe_block(T_all, T_max, rows_at(T_all, r_lo));
        if (r_hi > r_lo) {
          moe_hi = moe_block(T_all, T_max, rows_at(T_all, r_hi));
          per_layer = &load->max_over_mean;
        }
      }
    }

    StepCost out;
    Acc total;
    // A step of one sequence and one token: the executor runs each MoE layer (attention, router,
    // experts) as one fused launch (core/decode_path.hpp uses_fused_decode_layer), one measured
    // time per layer at the sequence's context (fused_layer_time).
    Acc fused;
    const bool fused_step = fused_ && per_replica.size() == 1 && per_replica[0].prefill_tokens == 0 &&
                            uses_fused_decode_layer(dk_, true, per_replica[0].tokens(), per_replica[0].num_decode);
    if (fused_step)  // (the launch of a run of layers is in the points: one a step, no table time)
      fused.add_launches(fused_layer, fused_time_at(fused_points_, double(per_replica[0].decode_context)), 0);
    for (const StageLayers& st : stages_) {
      Acc stage;
      stage.add(best_dense_full, st.dense_full);
      stage.add(best_dense_slide, st.dense_sliding);
      stage.add(fused_step ? fused : best_full, st.moe_full);
      stage.add(best_slide, st.moe_sliding);
      const int n_stage_moe = st.moe_full + st.moe_sliding;
      if (fused_step) {
        // (the MoE blocks are inside the fused layers)
      } else if (per_layer == nullptr) {
        stage.add(moe_lo, n_stage_moe);
      } else {
        double w_hi = 0;
        for (int i = st.moe_begin; i < st.moe_begin + n_stage_moe; ++i)
          w_hi += ((*per_layer)[size_t(i)] - r_lo) / (r_hi - r_lo);
        stage.add(moe_lo, n_stage_moe - w_hi);
        stage.add(moe_hi, w_hi);
      }
      if (dk_ && T_max > 0 && st.dense_full + st.dense_sliding + st.moe_full + st.moe_sliding > 0) {
        // decode kernels: the RoPE table once per step (cos/sin, fp32, per token and frequency),
        // and the stage's last layer's residual add (the others are fused into the next norm).
        stage.add_no_pdl(embedding, timer_->memory_op(T_max * (4.0 + 2.0 * m_.attention.head_dim)));
        stage.add_no_pdl(attn_norm, timer_->memory_op(3 * T_max * h_ * act_));
      }
      if (st.first && T_max > 0) {
        stage.add_no_pdl(embedding, timer_->memory_op(2 * T_max * h_ * act_));
        stage.add_coll(embedding, timer_->collective(CollOp::all_reduce, g_attn_tp_, T_max * h_ * act_));
      }
      if (st.last && rows_max > 0) {
        stage.add_no_pdl(lm_head, timer_->memory_op(2 * rows_max * h_ * act_));  // gather last rows
        stage.add_no_pdl(lm_head, timer_->memory_op(2 * rows_max * h_ * act_));  // final RMSNorm
        stage.add_no_pdl(lm_head, timer_->gemm(rows_max, m_.vocab_size / l_.attn_tp, h_, m_.activation_dtype));
        stage.add_coll(lm_head, timer_->collective(CollOp::all_gather, g_attn_tp_,
                                              rows_max * m_.vocab_size * K.logits_bytes_per_element));
        if (device_greedy_)  // argmax over each row's bf16 logits
          stage.add_no_pdl(lm_head, timer_->memory_op(2.0 * rows_max * m_.vocab_size));
      }
      if (!st.last && T_max > 0)
        stage.add_coll(pp_send, timer_->collective(CollOp::send_recv, st.send, T_max * h_ * act_));
      const double ts = stage.total();
      out.launches += stage.launches;
      out.time_us += ts;
      out.stage_time_us = std::max(out.stage_time_us, ts);
      total.add(stage, 1.0);
    }
    // A decode-only step the executor runs as a CUDA graph: its kernels run back to back, each
    // launch costing the profile's measured graph saving less than its table point (timed alone).
    // Per slot: its launches x the saving, at most the slot's time (the breakdown stays >= 0).
    double graph_us = 0;
    if (graph_saving_us_ > 0 && !any_prefill && per_replica.size() == 1 &&
        decode_step_graphed(true, l_.world_size() > 1, E_ > 0, per_replica[0].num_decode, k_)) {
      // Launches without PDL save no_pdl_extra_us less (profile graph_launch); in a step above
      // kDecodeGemvMaxTokens tokens no launch takes PDL.
      const bool pdl_step = uses_programmatic_launch(dk_, true, int64_t(per_replica[0].tokens()));
      for (int i = 0; i < kSlots; ++i) {
        const double no_pdl = pdl_step ? total.np[i] : total.n[i];
        const double cut = std::min(total.n[i] * graph_saving_us_ - no_pdl * (graph_saving_us_ - graph_saving_no_pdl_us_),
                                    total.t[i]);
        total.t[i] -= cut;
        graph_us += cut;
      }
      out.time_us -= graph_us;
      out.stage_time_us = std::max(0.0, out.stage_time_us - graph_us);  // one stage (unsharded)
    }
    // The executor's host time per step outside the GPU's busy time (profile host_overhead;
    // 0 when the profile has none). An empty step costs nothing.
    const double host_us = T_all > 0 ? host_step_us_ : 0.0;
    out.time_us += host_us;
    if (E_ > 0 && T_all > 0) out.moe_layer_launches = best_full.launches + moe_lo.launches;
    if (has_dense && T_all > 0) out.dense_layer_launches = best_dense_full.launches;
    if (breakdown) {
      const char* phase = any_prefill ? "prefill" : "decode";
      for (int i = 0; i < kSlots; ++i)
        if (total.used[i] && total.t[i] > 0)
          out.ops.push_back(OpCost{kSlotNames[i], phase, total.t[i], total.s[i]});
      if (host_us > 0) out.ops.push_back(OpCost{"host.step_overhead", phase, host_us, CostSource::measured});
    }
    return out;
  }

  MemoryBreakdown memory(const RuntimeLimits& limits) const override {
    MemoryBreakdown mb;
    mb.capacity = capacity_bytes_;
    mb.reserved = K.reserved_bytes;
    const RankWeights w = rank_weights(m_, l_);
    const double T = double(std::max<int64_t>(1, limits.max_num_batched_tokens));
    // Activations at the peak of a layer for a full token budget: an estimate of the attention
    // and hidden-state buffers, plus (MoE models) the MoE buffers exactly as the executor
    // preallocates them.
    //
    // MoE buffers: the executor sizes them for the WORST case of a step, not for the expected
    // routing (ep_rows_max, which the step TIME keeps using), so the memory model counts what it
    // allocates per rank, from the same capacity functions (executor_buffers.hpp lists every
    // buffer; T = max_tokens_per_step = max(max_num_batched_tokens, max_num_seqs), mixserve-run's
    // online_gpu_config):
    //  activations += GpuModel::allocate's MoE buffers (model_forward.cpp): permuted_x and
    //    expert_out [X, H], gate|up [X, 2I] and SwiGLU [X, I] (or the shared / dense widths when
    //    wider: the buffers are shared), shared_out [Tm, H], the gathered mode's moe_in / moe_out
    //    [Tm, H], router logits, top-k and index tables; Tm = T (x stage_size in the gathered
    //    mode, attn_dp > 1), for a schedule at least ceil(ep_capacity_rows / K) (EP) or
    //    fused_capacity_rows (fused, rs-a2a-ag); X = Tm x K, or expert_bucket_capacity(Tm x K,
    //    E / moe_ep, kExpertBucketRowAlign) where uses_expert_streams (the bucketed default).
    //  comm_buffers = the StageMoe's rank buffers: EpMoeComm (a2a: x, sendbuf [T K, H], recvbuf /
    //    outbuf (and with moe_tp > 1 rsbuf / redbuf) [ep_capacity_rows, H], backbuf [T (K+1), H],
    //    y, counts and combine/pair tables) or FusedMoeComm (fused / rs-a2a-ag: x, xr / partial
    //    [fused_capacity_rows, H], the rounds' slices [(3 moe_ep - 1 + moe_tp) T, H / moe_tp], y,
    //    route and pair tables); none for the all-reduce exchange (tp_allreduce, TP-only stages);
    //    plus TransportComm's [T, H] all-reduce scratch on every rank of a sharded layout.
    double widest = mla_ ? double(m_.attention.q_lora_rank + m_.attention.kv_lora_rank +
                                  heads_ * (m_.attention.qk_nope_head_dim + m_.attention.v_head_dim))
                         : double((heads_ + 2 * kv_heads_) * m_.attention.head_dim);
    // (MoE models: the dense FFN shares the expert gate|up / SwiGLU buffers, counted below.)
    if (E_ == 0) widest = std::max(widest, 2.0 * m_.dense_intermediate_size / l_.attn_tp);
    mb.activations = T * act_ * (K.activation_hidden_buffers * h_ + widest) +
                     double(limits.max_num_seqs) * m_.vocab_size / l_.attn_tp *
                         K.logits_bytes_per_element;
    const ExecutorMoeBuffers xb =
        executor_moe_buffers(cluster_, m_, l_, executor_max_tokens_per_step(limits));
    mb.activations += xb.expert_bytes;
    mb.comm_buffers = xb.comm_bytes;
    const double kv_layer = kv_bytes_per_token_layer(m_, l_);
    const double usable = capacity_bytes_ * limits.gpu_memory_utilization;
    int64_t kv_tokens = std::numeric_limits<int64_t>::max();
    double kv_space_min = std::numeric_limits<double>::infinity();
    for (const StageLayers& st : stages_) {
      const int n_moe = st.moe_full + st.moe_sliding;
      const int n_dense = st.dense_full + st.dense_sliding;
      const int n = n_moe + n_dense;
      double wt = n * (w.attention_layer + w.norms_layer) +
                  n_moe * (w.router_layer + w.experts_layer + w.shared_layer) +
                  n_dense * w.dense_layer;
      if (st.first) wt += w.embedding;
      if (st.last) wt += w.lm_head;
      mb.weights = std::max(mb.weights, wt);
      const double space = usable - wt - mb.reserved - mb.activations - mb.comm_buffers;
      kv_space_min = std::min(kv_space_min, space);
      const int64_t tok = space > 0 && n > 0 ? int64_t(space / (kv_layer * n)) : 0;
      kv_tokens = std::min(kv_tokens, tok);
    }
    mb.kv_cache = std::max(0.0, kv_space_min);
    mb.kv_tokens = kv_tokens == std::numeric_limits<int64_t>::max() ? 0 : kv_tokens;
    const int64_t need = limits.max_model_len > 0 ? limits.max_model_len
                                                  : limits.max_num_batched_tokens;
    mb.fits = kv_space_min > 0 && mb.kv_tokens >= need;
    return mb;
  }

 private:
  static bool same(const ReplicaBatch& a, const ReplicaBatch& b) {
    return a.prefill_tokens == b.prefill_tokens && a.num_prefill_seqs == b.num_prefill_seqs &&
           a.prefill_attn_pairs == b.prefill_attn_pairs && a.num_decode == b.num_decode &&
           a.decode_context == b.decode_context;
  }

  static void pick(Acc& best, double& best_t, const Acc& a, const Acc* extra) {
    Acc x = a;
    if (extra != nullptr) x.add(*extra, 1.0);
    const double t = x.total();
    if (t > best_t) {
      best = x;
      best_t = t;
    }
  }

  // Source tokens of one MoE TP group when one replica holds T_rep tokens.
  double group_tokens(double T_all, double T_rep) const {
    return std::min(T_all, T_rep * l_.moe_tp / l_.attn_tp);
  }

  // Rows of the most loaded EP rank at `max_over_mean` times the mean: at least the mean, at
  // most every token's full top-k on one rank.
  double rows_at(double T_all, double max_over_mean) const {
    const double mean = T_all * k_ / l_.moe_ep;
    if (l_.moe_ep == 1) return mean;
    return std::clamp(max_over_mean * mean, mean, std::max(mean, T_all * std::min(k_, E_local_)));
  }

  double ep_rows_max(double T_all) const {
    if (T_all <= 0) return 0;
    if (l_.moe_ep == 1) return T_all * k_;
    if (!skewed_) {
      const int g = E_local_;
      const double f = double(g) / E_;
      const double fpc = E_ > 1 ? double(E_ - k_) / (E_ - 1) : 0.0;
      const double mean = T_all * k_ / l_.moe_ep;
      const double sigma = std::sqrt(T_all * k_ * f * (1 - f) * fpc);
      return std::min(T_all * std::min(k_, g), mean + c_ep_ * sigma);
    }
    double y;
    bool exact;
    const int n = int(skew_tokens_.size());
    if (interpolate_loglog(skew_tokens_.data(), skew_max_.data(), n, T_all, y, exact)) return y;
    const double mean = T_all * k_ / l_.moe_ep;  // beyond the grid: keep the last max/mean
    const double last_ratio = skew_max_.back() / (skew_tokens_.back() * k_ / l_.moe_ep);
    return mean * (T_all < skew_tokens_.front() ? skew_max_.front() / (double(k_) / l_.moe_ep)
                                               : last_ratio);
  }

  Acc attention_block(const ReplicaBatch& b, bool sliding) const {
    Acc a;
    const double t = double(b.tokens());
    if (t <= 0) return a;
    const AttentionSpec& at = m_.attention;
    const DType wd = m_.weight_dtype;
    // Input RMSNorm; under the decode kernels it also adds the previous layer's output into the
    // residual (reads both, writes both).
    a.add(attn_norm, timer_->memory_op((1 + K.extra_elementwise_passes_per_layer) * (dk_ ? 4 : 2) * t * h_ * act_));
    int v_dim;
    if (mla_) {
      const int qk = at.qk_nope_head_dim + at.qk_rope_head_dim;
      if (at.q_lora_rank > 0) {
        a.add(attn_qkv, timer_->gemm(t, at.q_lora_rank + at.kv_lora_rank + at.qk_rope_head_dim, h_, wd));
        a.add(attn_qkv, timer_->gemm(t, int64_t(heads_) * qk, at.q_lora_rank, wd));
      } else {
        a.add(attn_qkv, timer_->gemm(t, at.kv_lora_rank + at.qk_rope_head_dim, h_, wd));
        a.add(attn_qkv, timer_->gemm(t, int64_t(heads_) * qk, h_, wd));
      }
      // kv_b up-projection (prefill) or its absorbed form (decode): the same weights and flops.
      a.add(attn_qkv, timer_->gemm(t, int64_t(heads_) * (at.qk_nope_head_dim + at.v_head_dim),
                                   at.kv_lora_rank, wd));
      v_dim = at.v_head_dim;
    } else {
      const int64_t qw = int64_t(heads_) * at.head_dim, kvw = int64_t(kv_heads_) * at.head_dim;
      if (dense_gemv_for(dk_, int64_t(t), h_)) {
        // Decode kernels: q|k|v in one GEMV launch over the concatenated weight, bias inside.
        a.add(attn_qkv, timer_->gemv(t, qw + 2 * kvw, h_, wd, GemvKind::plain));
      } else {
        // q, k and v as three cuBLASLt GEMMs (model_forward.cpp), then the biases (Qwen2); no PDL.
        a.add_no_pdl(attn_qkv, timer_->gemm(t, qw, h_, wd));
        a.add_no_pdl(attn_qkv, timer_->gemm(t, kvw, h_, wd));
        a.add_no_pdl(attn_qkv, timer_->gemm(t, kvw, h_, wd));
        if (at.qkv_bias) {
          a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * qw * act_));
          a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * kvw * act_));
          a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * kvw * act_));
        }
      }
      if (uses_fused_qk_rope_kv(dk_, qk_per_head_)) {
        // One launch: q/k norm + RoPE (from the step's table) + KV-cache write. Reads q, k, v,
        // writes q, k and the cache's k, v.
        const double kv_b = dtype_bytes(m_.kv_dtype);
        a.add(attn_qkv, timer_->memory_op(t * ((2 * qw + 3 * kvw) * act_ + 2 * kvw * kv_b)));
      } else {
        // Per launch: the q/k RMSNorm (Qwen3, OLMoE), RoPE on q and k, the KV-cache write.
        if (at.qk_norm) {
          a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * qw * act_));
          a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * kvw * act_));
        }
        a.add_no_pdl(attn_qkv, timer_->memory_op(2 * t * (qw + kvw) * act_));   // RoPE
        a.add_no_pdl(attn_core, timer_->memory_op(2 * t * 2 * kvw * act_));     // KV write
      }
      v_dim = at.head_dim;
    }
    const double window = sliding ? double(at.sliding_window) : 0.0;
    const double kv_b = dtype_bytes(m_.kv_dtype);
    if (b.num_decode > 0) {
      AttentionShape s;
      s.decode = true;
      s.mla = mla_;
      s.batch = b.num_decode;
      s.q_tokens = b.num_decode;
      s.context_tokens = double(b.decode_context);
      if (window > 0) s.context_tokens = std::min(s.context_tokens, b.num_decode * window);
      s.pairs = s.context_tokens;
      s.heads = heads_;
      s.act_bytes = act_;
      if (mla_) {
        s.kv_heads = 1;
        s.qk_dim = at.kv_lora_rank + at.qk_rope_head_dim;
        s.v_dim = at.kv_lora_rank;
        s.kv_bytes_per_token = double(at.kv_lora_rank + at.qk_rope_head_dim) * kv_b;
      } else {
        s.kv_heads = kv_heads_;
        s.qk_dim = s.v_dim = at.head_dim;
        s.kv_bytes_per_token = 2.0 * kv_heads_ * at.head_dim * kv_b;
      }
      a.add_launches(attn_core, timer_->attention(s), 0);
    }
    if (b.prefill_tokens > 0) {
      AttentionShape s;
      s.decode = false;
      s.mla = mla_;
      s.batch = std::max(1, b.num_prefill_seqs);
      s.q_tokens = double(b.prefill_tokens);
      s.pairs = b.prefill_attn_pairs;
      if (window > 0) s.pairs = std::min(s.pairs, s.q_tokens * window);
      s.heads = heads_;
      s.act_bytes = act_;
      s.kv_heads = mla_ ? heads_ : kv_heads_;
      s.qk_dim = mla_ ? at.qk_nope_head_dim + at.qk_rope_head_dim : at.head_dim;
      s.v_dim = mla_ ? at.v_head_dim : at.head_dim;
      a.add_launches(attn_core, timer_->attention(s), 0);
    }
    // One attention launch for the step's decodes and prefill chunks together, plus the merge
    // of the KV splits when it splits (the tables time both).
    const double attn_launches = attention_launches(b);
    a.launches += attn_launches;
    a.n[attn_core] += attn_launches;
    a.np[attn_core] += attn_launches;  // launch_attention takes no PDL
    if (dense_gemv_for(dk_, int64_t(t), int64_t(heads_) * v_dim))
      a.add(attn_o, timer_->gemv(t, h_, int64_t(heads_) * v_dim, wd, GemvKind::plain));
    else
      a.add_no_pdl(attn_o, timer_->gemm(t, h_, int64_t(heads_) * v_dim, wd));
    a.add_coll(attn_ar, timer_->collective(CollOp::all_reduce, g_attn_tp_, t * h_ * act_));
    // The layer's closing residual add (x + ffn_out), one launch after the FFN / MoE block;
    // under the decode kernels fused into the next layer's input norm (above; the stage's last
    // layer's add is costed once per stage).
    if (!dk_) a.add(attn_norm, timer_->memory_op(3 * t * h_ * act_));
    return a;
  }

  // Launches of kernels::launch_attention for the replica's batch: 1, plus the split-KV merge
  // when it splits the keys and the merge is not fused into the attention launch (decode kernels:
  // fused, core/decode_path.hpp; the attention table's time covers both parts either way)
  // (kernels/src/attention.cu choose_splits, tensor-core kernel: two
  // CTAs per SM aimed at, 64 query rows per CTA, 128 above 64 rows, 64-key tiles). The longest
  // query and context are taken as the batch's means (ReplicaBatch keeps sums only).
  double attention_launches(const ReplicaBatch& b) const {
    const int seqs = b.num_decode + b.num_prefill_seqs;
    if (seqs <= 0 || mla_) return 1;
    double max_q = b.num_decode > 0 ? 1.0 : 0.0, max_kv = 0;
    if (b.num_decode > 0) max_kv = double(b.decode_context) / b.num_decode;
    if (b.num_prefill_seqs > 0 && b.prefill_tokens > 0) {
      const double len = double(b.prefill_tokens) / b.num_prefill_seqs;
      const double pairs = b.prefill_attn_pairs / b.num_prefill_seqs;
      const double before = std::max(0.0, pairs / len - (len + 1) / 2);
      max_q = std::max(max_q, std::ceil(len));
      max_kv = std::max(max_kv, before + len);
    }
    const int64_t kv_len = std::max<int64_t>(1, int64_t(std::ceil(max_kv - 1e-9)));
    auto cdiv = [](int64_t a, int64_t d) { return (a + d - 1) / d; };
    const int group = std::max(1, heads_ / std::max(1, kv_heads_));
    const int64_t rows = int64_t(max_q) * group;
    const int64_t per_cta = rows > 64 ? 128 : 64;
    const int64_t base = cdiv(rows, per_cta) * seqs * kv_heads_;
    const int64_t target = 2 * int64_t(sm_count_);
    const int64_t want = base >= target ? 1 : cdiv(target, base);
    const int64_t split = std::max<int64_t>(64, cdiv(cdiv(kv_len, want), 64) * 64);
    return attention_launch_count(dk_, cdiv(kv_len, split) > 1);
  }

  Acc router_block(const ReplicaBatch& b) const {
    Acc a;
    const double t = double(b.tokens());
    if (t <= 0) return a;
    // Decode kernels at <= 8 tokens: logits, top-k and the permute are one launch
    // (kernels/moe_route.cuh, core/decode_path.hpp uses_fused_moe_route), costed as the sum of the
    // parts' table entries (the GEMV, the top-k pass here; the permute in moe_block, 0 launches).
    const bool fused = uses_fused_moe_route(dk_, int64_t(std::ceil(t)));
    if (router_uses_gemv(dk_, int64_t(t)) && gemv_k_fits(h_))
      a.add(moe_router, timer_->gemv(t, E_, h_, m_.activation_dtype, GemvKind::fp32_out));
    else
      a.add_no_pdl(moe_router, timer_->gemm(t, E_, h_, m_.activation_dtype));
    a.add_launches(moe_router, timer_->memory_op(2.0 * t * E_ * K.logits_bytes_per_element), fused ? 0 : 1);
    return a;
  }

  Acc dense_block(const ReplicaBatch& b) const {
    Acc a;
    const double t = double(b.tokens());
    if (t <= 0 || m_.dense_intermediate_size <= 0) return a;
    const int64_t I = m_.dense_intermediate_size / l_.attn_tp;
    a.add(dense_ffn, timer_->memory_op(2 * t * h_ * act_));  // post-attention norm
    ffn(a, dense_ffn, t, I, m_.weight_dtype);
    a.add_coll(dense_ar, timer_->collective(CollOp::all_reduce, g_attn_tp_, t * h_ * act_));
    return a;
  }

  // SwiGLU FFN of t tokens, intermediate I: under the decode kernels two GEMV launches (SwiGLU
  // fused into the down projection), else GEMM + SwiGLU + GEMM.
  void ffn(Acc& a, Slot slot, double t, int64_t I, DType wd) const {
    // Each projection takes the GEMV only if the kernel takes its k (dense_gemv_for), as the
    // executor's GpuModel::linear / ffn_dense decide.
    const int64_t tk = int64_t(std::ceil(t));
    // The cuBLASLt GEMMs and the SwiGLU kernel take no PDL (add_no_pdl), the GEMVs do.
    if (dense_gemv_for(dk_, tk, h_))
      a.add(slot, timer_->gemv(t, 2 * I, h_, wd, GemvKind::plain));
    else
      a.add_no_pdl(slot, timer_->gemm(t, 2 * I, h_, wd));
    if (dense_gemv_for(dk_, tk, I)) {
      a.add(slot, timer_->gemv(t, h_, I, wd, GemvKind::swiglu));
      return;
    }
    a.add_no_pdl(slot, timer_->memory_op(3.0 * t * I * act_));
    a.add_no_pdl(slot, timer_->gemm(t, h_, I, wd));
  }

  // rows: routed rows of the most loaded EP rank.
  Acc moe_block(double T_all, double T_rep, double rows) const {
    Acc a;
    const double Tg = group_tokens(T_all, T_rep);
    const double mean_rows = T_all * k_ / l_.moe_ep;
    const double imbalance = mean_rows > 0 ? rows / mean_rows : 1.0;
    const DType ed = m_.expert_weight_dtype;
    const int64_t I = m_.moe.expert_intermediate_size / l_.moe_tp;
    // post-attention norm of the group's tokens
    a.add(moe_experts, timer_->memory_op(2 * Tg * h_ * act_));
    // Experts: permute (4 launches: histogram, scan, slot scatter of rows x 4-byte indices, then
    // the row copy) + grouped gate/up + SiLU*mul + grouped down + combine (weighted sum of each
    // token's rows, plus the shared expert's output). The expert kernel is the one the executor
    // picks for the rank's routed rows (core/expert_path.hpp).
    const double active = expected_active_experts(T_all, E_, k_, E_local_);
    const int64_t routed = int64_t(std::ceil(Tg * k_));
    const bool gemv = uses_device_gemv(routed, h_, I), grouped = uses_grouped_gemm(routed, h_, I);
    const int64_t tok = int64_t(std::ceil(Tg));
    const bool v2 = gemv && uses_grouped_gemv_v2(dk_, tok);
    if (E_local_ < E_) a.add(moe_experts, timer_->memory_op(2.0 * Tg * k_ * 4.0));  // ids - first expert
    if (uses_fused_moe_route(dk_, tok)) {  // inside the router's launch (router_block): time only
      a.add_launches(moe_experts, timer_->memory_op(2.0 * rows * h_ * act_ + 3.0 * 2.0 * rows * 4.0), 0);
    } else if (permute_launches(dk_, routed) == 1) {  // histogram, scan, ranks and row copy in one launch
      a.add(moe_experts, timer_->memory_op(2.0 * rows * h_ * act_ + 3.0 * 2.0 * rows * 4.0));
    } else {
      for (int i = 0; i < 3; ++i) a.add(moe_experts, timer_->memory_op(2.0 * rows * 4.0));
      a.add(moe_experts, timer_->memory_op(2.0 * rows * h_ * act_));
    }
    ExpertGemmShape up{E_local_, rows, active, 2 * I, h_, ed, gemv, grouped, v2};
    ExpertGemmShape down{E_local_, rows, active, h_, I, ed, gemv, grouped, v2};
    if (gemv) {
      a.add(moe_experts, timer_->expert_gemm(up));
    } else {  // the grouped GEMM / cuBLASLt launches take no PDL
      a.add_no_pdl(moe_experts, timer_->expert_gemm(up));
    }
    if (!v2) a.add(moe_experts, timer_->memory_op(3.0 * rows * I * act_));  // v2: fused into down
    if (gemv) {
      a.add(moe_experts, timer_->expert_gemm(down));
    } else {
      a.add_no_pdl(moe_experts, timer_->expert_gemm(down));
    }
    a.add(moe_experts, timer_->memory_op((rows + 2.0 * Tg) * h_ * act_));
    if (m_.moe.has_shared_expert()) {
      const int64_t Is = m_.moe.shared_intermediate_size / l_.moe_tp;
      ffn(a, moe_shared, Tg, Is, ed);
      if (m_.moe.shared_expert_gate)  // sigmoid gate logits (fp32 linear, one launch)
        a.add_no_pdl(moe_shared, timer_->gemm(Tg, 1, h_, m_.activation_dtype));
    }
    const double tok_bytes = h_ * act_;
    // A shared expert under a scheduled MoE communication runs in every moe-TP group on the
    // group's own tokens (docs/comm-schedules.md): its TP partials ride the schedule's
    // reduce-scatter, which grows by those tokens.
    const bool shared = m_.moe.has_shared_expert();
    switch (l_.moe_comm) {
      case MoeComm::tp_allreduce:
        if (l_.attn_dp > 1) {
          a.add_coll(moe_dispatch, timer_->collective(CollOp::all_gather, g_stage_, T_all * tok_bytes));
          a.add_coll(moe_combine, timer_->collective(CollOp::reduce_scatter, g_stage_, T_all * tok_bytes));
        } else {
          a.add_coll(moe_combine, timer_->collective(CollOp::all_reduce, g_moe_tp_, Tg * tok_bytes));
        }
        break;
      case MoeComm::nccl_a2a: {
        // The EP schedule (comm_schedule.hpp); `rows`: the most loaded EP index's.
        const EpA2aBytes eb = ep_a2a_bytes(Tg, T_rep, rows, h_, act_, k_, l_.moe_tp, l_.attn_tp, shared);
        a.add_coll(moe_dispatch, timer_->collective(CollOp::all_to_all, g_ep_, eb.a2a_bytes));
        if (l_.moe_tp > 1) {
          a.add_coll(moe_dispatch, timer_->collective(CollOp::all_gather, g_moe_tp_, eb.tp_ag_bytes));
          a.add_coll(moe_combine, timer_->collective(CollOp::reduce_scatter, g_moe_tp_, eb.tp_rs_bytes));
        }
        a.add_coll(moe_combine, timer_->collective(CollOp::all_to_all, g_ep_, eb.a2a_bytes));
        a.add(moe_combine, timer_->memory_op(2.0 * eb.send_rows * tok_bytes));  // weighted sum
        if (l_.attn_tp > 1)
          a.add_coll(moe_combine, timer_->collective(CollOp::all_gather, g_attn_tp_, eb.final_ag_bytes));
        break;
      }
      case MoeComm::rs_a2a_ag:
      case MoeComm::fused: {
        const bool overlap = l_.moe_comm == MoeComm::fused;
        FusedRoundBytes fr = fused_round_bytes(Tg, h_, act_, E_, k_, l_.moe_tp, l_.moe_ep, true);
        // The most loaded group receives `imbalance` times the mean, at most every token.
        const double scale = std::min(imbalance, fr.rows > 0 ? Tg / fr.rows : 1.0);
        fr.rows *= std::max(1.0, scale);
        fr.p2p_bytes *= std::max(1.0, scale);
        fr.gather_bytes *= std::max(1.0, scale);
        // moe_tp > attn_tp: a rank holds full rows of its own replica only; the group first
        // exchanges hidden slices so rank t holds slice t of all its tokens, and the group's
        // own tokens need an all-gather too.
        double local_ag = 0;
        if (l_.moe_tp > l_.attn_tp) {
          a.add_coll(moe_reshard, timer_->collective(CollOp::all_to_all, g_moe_tp_, T_rep * tok_bytes));
          local_ag = timer_->collective(CollOp::all_gather, g_moe_tp_, fr.gather_bytes).time_us;
        }
        const int n = l_.moe_ep - 1;
        std::array<double, 64> p2p{}, gat{}, rs{};
        std::vector<double> p2p_v, gat_v, rs_v;
        double* P = p2p.data();
        double* A = gat.data();
        double* R = rs.data();
        if (n > 64) {
          p2p_v.resize(size_t(n));
          gat_v.resize(size_t(n));
          rs_v.resize(size_t(n));
          P = p2p_v.data();
          A = gat_v.data();
          R = rs_v.data();
        }
        CostSource src = CostSource::alpha_beta;
        for (int i = 0; i < n; ++i) {
          const OpTime p = timer_->collective(CollOp::send_recv, rail_[size_t(i)], fr.p2p_bytes);
          const OpTime g = timer_->collective(CollOp::all_gather, g_moe_tp_, fr.gather_bytes);
          const OpTime r = timer_->collective(CollOp::reduce_scatter, g_moe_tp_, fr.gather_bytes);
          P[i] = p.time_us;
          A[i] = g.time_us;
          R[i] = r.time_us;
          src = worse(worse(src, p.source), worse(g.source, r.source));
        }
        // Round 0's reduce-scatter: the group's rows of its own tokens; with a shared expert
        // every one of its Tg tokens (block 0 is the whole replica).
        const double local_rs =
            timer_->collective(CollOp::reduce_scatter, g_moe_tp_, shared ? Tg * tok_bytes : fr.gather_bytes)
                .time_us;
        double t_dispatch, t_combine;
        if (overlap) {
          t_dispatch = fused_dispatch_time_us({P, size_t(n)}, {A, size_t(n)}, local_ag);
          t_combine = fused_combine_time_us({R, size_t(n)}, {P, size_t(n)}, local_rs);
        } else {
          t_dispatch = local_ag;
          t_combine = local_rs;
          for (int i = 0; i < n; ++i) {
            t_dispatch += P[i] + A[i];
            t_combine += R[i] + P[i];
          }
        }
        a.add_coll(moe_dispatch, OpTime{t_dispatch, src});
        a.add_coll(moe_combine, OpTime{t_combine, src});
        // Scatter-add of the weighted slices into the home rows, then the final all-gather.
        a.add(moe_combine, timer_->memory_op(2.0 * (n + 1) * fr.p2p_bytes));
        if (l_.moe_tp >= l_.attn_tp)
          a.add_coll(moe_combine, timer_->collective(CollOp::all_gather, g_moe_tp_, Tg * tok_bytes));
        else
          a.add_coll(moe_combine, timer_->collective(CollOp::all_gather, g_attn_tp_, T_rep * tok_bytes));
        break;
      }
    }
    return a;
  }

  ModelSpec m_;
  Layout l_;
  std::unique_ptr<OpTimer> timer_;
  double capacity_bytes_ = 0;
  CommGroup g_attn_tp_, g_moe_tp_, g_ep_, g_stage_;
  std::vector<CommGroup> rail_;
  std::vector<StageLayers> stages_;
  int64_t h_ = 0;
  double act_ = 2;
  int heads_ = 0, kv_heads_ = 0;
  bool mla_ = false;
  double host_step_us_ = 0;   // profile host_overhead.step_us: once per step
  bool dk_ = false;           // the executor's decode kernels (core/decode_path.hpp)
  bool fused_ = false;        // CostModelOptions::fused_decode_layer taken (the profile has the shape)
  std::vector<FusedLayerPoint> fused_points_;  // of the model's layer shape, by context
  double graph_saving_us_ = 0;  // per launch of a graphed decode step (profile graph_launch)
  double graph_saving_no_pdl_us_ = 0;  // per launch made without PDL (saving_no_pdl_us)
  bool device_greedy_ = false;  // CostModelOptions::device_greedy
  bool qk_per_head_ = true;   // q/k norms per head or absent: the fused QK-norm/RoPE/KV write
  int sm_count_ = 132;
  int E_ = 0, k_ = 0, E_local_ = 0;
  double c_ep_ = 0;
  ClusterSpec cluster_;       // memory(): the executor's MoE buffers (executor_buffers.hpp)
  bool skewed_ = false;
  RoutingModel routing_;
  std::vector<int> moe_layer_ids_;
  std::vector<double> skew_tokens_, skew_max_;
};

// The skewed-load table depends only on (E, k, ep, routing), which many layouts of one search
// share; it costs ~0.5 ms to integrate, so it is computed once per key per process.
std::vector<double> skewed_load_table(const std::vector<double>& tokens, int E, int k, int ep,
                                      const RoutingModel& r) {
  using Key = std::tuple<int, int, int, std::string, double, std::vector<double>>;
  static std::mutex mu;
  static std::map<Key, std::vector<double>> cache;
  const Key key{E, k, ep, r.kind, r.skew, r.expert_share};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  std::vector<double> out;
  for (double t : tokens) out.push_back(expected_ep_load(t, E, k, ep, r).max_rows);
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(key, out);
  return out;
}

// Squared coefficient of variation of a length distribution (clamps ignored: an upper bound).
double length_cv2(const LengthDist& d) {
  const double m = d.expected();
  if (!(m > 0)) return 0;
  switch (d.kind) {
    case LengthKind::fixed:
      return 0;
    case LengthKind::uniform:
      return (d.max - d.min) * (d.max - d.min) / 12.0 / (m * m);
    case LengthKind::normal:
    case LengthKind::lognormal:
    case LengthKind::sharegpt:
      return d.stddev * d.stddev / (d.mean > 0 ? d.mean * d.mean : m * m);
    case LengthKind::histogram: {
      double sw = 0, sv = 0;
      for (const auto& [len, wt] : d.histogram) {
        sw += wt;
        sv += wt * (double(len) - m) * (double(len) - m);
      }
      return sw > 0 ? sv / sw / (m * m) : 0;
    }
  }
  return 1;
}

bool saturated_arrivals(const WorkloadSpec& w) {
  return w.arrival == ArrivalKind::burst || w.arrival == ArrivalKind::closed_loop ||
         !(w.rate > 0) || !std::isfinite(w.rate);
}

}  // namespace

FusedLayerPoint fused_layer_shape(const ModelSpec& m) {
  FusedLayerPoint s;
  s.hidden = m.hidden_size;
  s.q_heads = m.attention.num_heads;
  s.kv_heads = m.attention.num_kv_heads;
  s.head_dim = m.attention.head_dim;
  s.inter = m.moe.expert_intermediate_size;
  s.experts = m.moe.num_experts;
  s.top_k = m.moe.top_k;
  return s;
}

bool fused_layer_model_ok(const ModelSpec& m) {
  const AttentionSpec& a = m.attention;
  const MoESpec& e = m.moe;
  const bool qk_ok = !a.qk_norm || qk_norm_per_head(m.architecture);
  return m.num_moe_layers() > 0 && a.type != AttentionType::mla && !a.qkv_bias && !a.o_bias && qk_ok &&
         a.sliding_window == 0 && (a.head_dim == 64 || a.head_dim == 128) && a.num_kv_heads > 0 &&
         a.num_heads % a.num_kv_heads == 0 && m.hidden_size % 8 == 0 && e.expert_intermediate_size % 8 == 0 &&
         e.num_experts >= 1 && e.num_experts <= 256 && e.top_k >= 1 && e.top_k <= 8 && e.top_k <= e.num_experts &&
         !e.has_shared_expert() && e.scoring == Scoring::softmax && !e.topk_before_softmax && e.n_group <= 1 &&
         !e.router_bias && !e.score_correction_bias && !e.expert_bias;
}

std::optional<OpTime> fused_layer_time(const HardwareProfile& p, const FusedLayerPoint& shape, double context) {
  const auto pts = fused_points_of(p, shape);
  if (pts.empty()) return std::nullopt;
  return fused_time_at(pts, context);
}

bool fused_layer_costed(const ModelSpec& m, const Layout& l, const HardwareProfile& p, const CostModelOptions& opt) {
  const bool dk = decode_kernels_enabled(opt.decode_kernels, l.world_size() > 1);
  return opt.fused_decode_layer && uses_fused_decode_layer(dk, true, 1, 1) && l.world_size() == 1 &&
         fused_layer_model_ok(m) && !fused_points_of(p, fused_layer_shape(m)).empty();
}

std::unique_ptr<StepCostModel> make_cost_model(const std::string& name, const ModelSpec& m,
                                               const ClusterSpec& c, const HardwareProfile& p,
                                               const Layout& l, const CostModelOptions& opt) {
  if (name == "mixserve") return std::make_unique<MixServeModel>(m, c, p, l, opt);
  if (name == "paper") return make_paper_cost_model(m, c, p, l, opt);
  throw_input_error("--cost-model", "cost_model", "one of mixserve, paper", name);
}

// analytic_metrics, for L_in / L_out the workload's mean lengths and n the decode batch:
//   TTFT  = sum over chunks of step(prefill chunk of <= max_num_batched_tokens, its context)
//           + W_q, arrivals lambda = rate / attn_dp per replica (Poisson split evenly).
//           "mixserve": a replica is an M/G/n queue whose n servers are its sequence slots: a
//           request holds a slot from admission to its last token (service rate per slot
//           mu / n, mu the replica's saturated request rate below) and waits only when every
//           slot is busy; W_q by Allen-Cunneen (queueing.hpp) with the service-time variability
//           of the output lengths (cv^2 of the workload's output distribution, clamps ignored).
//           Its prefill then starts at a step boundary of an engine that is decoding unless it
//           is empty (probability exp(-a), a = offered erlangs: M/G/inf occupancy): on a busy
//           engine TTFT's service part is half a decode step of waiting plus the mixed steps
//           carrying its chunks (decode step + marginal prefill cost); on an idle one the
//           prefill alone. "paper": one M/M/1 server per replica (Eq. 7), W_q = rho / (mu (1 -
//           rho)), plus the idle-engine prefill. rho >= 1: TTFT = +inf (saturated).
//   ITL   = step(n/pp decodes per replica with context L_in + L_out/2 each) for one micro-batch
//           through all PP stages; n = min(pp * max_num_seqs, kv_tokens / (L_in + L_out)): each
//           of the pp micro-batches in flight has its own max_num_seqs (as in the simulator).
//   per-replica saturated request rate = 1 / (L_out * S_dec / (n/pp) + S_pf), where S_dec is
//           the slowest pipeline stage of the decode step (pp micro-batches of n/pp sequences
//           keep the stages busy, so the pipeline advances at its slowest stage) and S_pf the
//           marginal cost of one request's prefill riding in mixed batches (chunked prefill,
//           vLLM V1 / Sarathi): sum over its chunks (token budget minus the decodes) of
//           stage_time(decodes + chunk) - stage_time(decodes). The prefill thus shares the
//           weight reads with the decodes instead of being costed alone.
//   capacity   = attn_dp * rate * (L_in + L_out): the saturated token rate;
//   throughput = capacity, capped at the offered load rate * (L_in +
//           L_out) when the workload rate is finite; output_tok_s likewise with L_out.
//   TPOT  = ITL (decode steps only; prefill interference is left to the serving simulator).
PredictedMetrics analytic_metrics(const StepCostModel& cm, const Layout& l, const WorkloadSpec& w,
                                  const RuntimeLimits& limits, std::vector<OpCost>* breakdown) {
  PredictedMetrics pm;
  const double L_in = std::max(1.0, w.input.expected());
  const double L_out = std::max(1.0, w.output.expected());
  const bool want = breakdown != nullptr;
  std::vector<ReplicaBatch> batch(size_t(l.attn_dp));

  // Prefill of one mean request on replica 0, chunked by the token budget.
  const int64_t chunk = std::max<int64_t>(1, limits.chunked_prefill ? limits.max_num_batched_tokens
                                                                    : int64_t(L_in));
  double prefill_us = 0;  // alone on an idle engine: the TTFT's service part
  for (double done = 0; done < L_in;) {
    const double len = std::min(double(chunk), L_in - done);
    ReplicaBatch b;
    b.prefill_tokens = int64_t(std::ceil(len));
    b.num_prefill_seqs = 1;
    b.prefill_attn_pairs = len * (done + (len + 1) / 2);
    batch[0] = b;
    const StepCost sc = cm.step(batch, want);
    prefill_us += sc.time_us;
    if (want) breakdown->insert(breakdown->end(), sc.ops.begin(), sc.ops.end());
    done += len;
  }
  batch[0] = ReplicaBatch{};

  const MemoryBreakdown mem = cm.memory(limits);
  const double per_seq_kv = L_in + L_out;
  // Each of the pp micro-batches has its own scheduler with max_num_seqs (vLLM V0's virtual
  // engines; the serving simulator's micro-batch slots): pp * max_num_seqs sequences in flight,
  // fewer if the KV cache holds fewer.
  double n = double(limits.max_num_seqs) * l.pp;
  if (mem.kv_tokens > 0) n = std::min(n, std::floor(double(mem.kv_tokens) / per_seq_kv));
  n = std::max(1.0, n);
  const int per_mb = std::max(1, int(std::ceil(n / l.pp)));
  const double ctx = L_in + L_out / 2;
  for (ReplicaBatch& b : batch) {
    b.num_decode = per_mb;
    b.decode_context = int64_t(per_mb * ctx);
  }
  const StepCost dec = cm.step(batch, want);
  if (want) breakdown->insert(breakdown->end(), dec.ops.begin(), dec.ops.end());
  const double itl_us = dec.time_us;
  pm.itl_ms = itl_us / 1e3;
  pm.tpot_ms = pm.itl_ms;

  // Marginal prefill cost of one request inside mixed batches.
  const int64_t mixed_chunk = std::max<int64_t>(
      1, (limits.chunked_prefill ? limits.max_num_batched_tokens : int64_t(L_in)) - per_mb);
  double marginal_us = 0;
  for (double done = 0; done < L_in;) {
    const double len = std::min(double(mixed_chunk), L_in - done);
    ReplicaBatch b = batch[0];
    b.prefill_tokens = int64_t(std::ceil(len));
    b.num_prefill_seqs = 1;
    b.prefill_attn_pairs = len * (done + (len + 1) / 2);
    std::swap(batch[0], b);
    marginal_us += std::max(0.0, cm.step(batch, false).stage_time_us - dec.stage_time_us);
    std::swap(batch[0], b);
    done += len;
  }
  const double per_request_us = L_out * dec.stage_time_us / double(per_mb) + marginal_us;
  const double mu = 1e6 / per_request_us;  // requests/s per replica
  const double sat_req_s = mu * l.attn_dp;
  pm.throughput_tok_s = sat_req_s * (L_in + L_out);
  pm.capacity_tok_s = pm.throughput_tok_s;
  pm.output_tok_s = sat_req_s * L_out;
  double wq_us = 0;
  if (!saturated_arrivals(w)) {
    pm.request_rate = w.rate;
    pm.throughput_tok_s = std::min(pm.throughput_tok_s, w.rate * (L_in + L_out));
    pm.output_tok_s = std::min(pm.output_tok_s, w.rate * L_out);
    const double lambda = w.rate / l.attn_dp;
    const double rho = lambda / mu;
    if (rho >= 1) {
      wq_us = std::numeric_limits<double>::infinity();
    } else if (cm.name() == "paper") {
      wq_us = rho / (mu * (1 - rho)) * 1e6;
    } else {
      const double slot_rate = mu / n;  // requests/s one slot completes
      wq_us = mgn_mean_wait(n, lambda, slot_rate, length_cv2(w.output)) * 1e6;
      const double p_idle = std::exp(-lambda / slot_rate);
      const double busy_us = 0.5 * itl_us + itl_us + marginal_us;
      prefill_us = p_idle * prefill_us + (1 - p_idle) * busy_us;
    }
  }
  pm.ttft_ms = (prefill_us + wq_us) / 1e3;
  return pm;
}

}  // namespace mixserve::sim
