// Roofline / alpha-beta and profile-table op timers (op_timer.hpp).
#include "mixserve/sim/op_timer.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/sim/cost_constants.hpp"

namespace mixserve::sim {
namespace {

constexpr const CostConstants& K = kCostConstants;

double peak_tflops(const HardwareProfile& p, DType d) {
  switch (compute_class(d)) {
    case DType::fp8_e4m3:
      return p.peak_tflops_fp8 > 0 ? p.peak_tflops_fp8 : p.peak_tflops_bf16;
    case DType::fp32:
      return p.peak_tflops_fp32 > 0 ? p.peak_tflops_fp32 : p.peak_tflops_bf16 / 2;
    default:
      return p.peak_tflops_bf16;
  }
}

// ---------------------------------------------------------------------------------------------
// Roofline + alpha-beta.
class RooflineTimer final : public OpTimer {
 public:
  RooflineTimer(const HardwareProfile& p, const ClusterSpec& c) : p_(p), c_(c) {
    if (p.mem_bw_GBps <= 0 || p.peak_tflops_bf16 <= 0)
      throw_input_error(p.name.empty() ? "<profile>" : p.name, "peak_tflops_bf16 / mem_bw_GBps",
                        "positive roofline ceilings");
    src_ = p.is_datasheet() ? CostSource::datasheet : CostSource::roofline;
    bytes_per_us_ = p.mem_bw_GBps * 1e3 * p.mem_efficiency;  // GB/s -> bytes/us
    for (DType d : {DType::fp32, DType::bf16, DType::fp8_e4m3})
      flops_per_us_[static_cast<int>(d)] = peak_tflops(p, d) * 1e6 * p.gemm_efficiency;
    intra_Bpus_ = c.intra.bandwidth_GBps * 1e3 * K.intra_link_efficiency;
    inter_Bpus_ = c.inter_bw_per_gpu_GBps() * 1e3 * K.inter_link_efficiency;
    if (c.num_nodes > 1 && inter_Bpus_ <= 0)
      throw_input_error(c.name.empty() ? "<cluster>" : c.name, "inter.bandwidth_GBps",
                        "a positive NIC bandwidth and nics_per_node for a multi-node cluster");
    if (intra_Bpus_ <= 0 && c.gpus_per_node > 1)
      throw_input_error(c.name.empty() ? "<cluster>" : c.name, "intra.bandwidth_GBps",
                        "a positive intra-node bandwidth");
    intra_alpha_ = c.intra.latency_us > 0 ? c.intra.latency_us : K.intra_latency_fallback_us;
    inter_alpha_ = c.inter.latency_us > 0 ? c.inter.latency_us : K.inter_latency_fallback_us;
  }

  OpTime gemm(double m, int64_t n, int64_t k, DType dtype) const override {
    if (m <= 0) return {0, src_};
    const double a_bytes = dtype_bytes(compute_class(dtype));
    const double flops = 2.0 * m * double(n) * double(k);
    const double bytes = m * double(k) * a_bytes + double(k) * double(n) * dtype_bytes(dtype) +
                         m * double(n) * 2.0;
    return {kernel(flops, bytes, dtype), src_};
  }

  OpTime expert_gemm(const ExpertGemmShape& s) const override {
    if (s.rows <= 0) return {0, src_};
    const double a_bytes = dtype_bytes(compute_class(s.dtype));
    const double flops = 2.0 * s.rows * double(s.n) * double(s.k);
    const double bytes = s.rows * double(s.k) * a_bytes +
                         s.active_experts * double(s.k) * double(s.n) * dtype_bytes(s.dtype) +
                         s.rows * double(s.n) * 2.0;
    return {kernel(flops, bytes, s.dtype), src_};
  }

  OpTime attention(const AttentionShape& s) const override {
    if (s.q_tokens <= 0) return {0, src_};
    const double flops = 2.0 * s.pairs * s.heads * double(s.qk_dim + s.v_dim);
    const double io_bytes =
        s.q_tokens * s.heads * double(s.qk_dim + s.v_dim) * s.act_bytes;  // q in, o out
    double kv_bytes;
    if (s.decode) {
      kv_bytes = s.context_tokens * s.kv_bytes_per_token;
    } else {
      // Prefill reads the new keys/values once per query block; count them once.
      kv_bytes = s.q_tokens * s.kv_heads * double(s.qk_dim + s.v_dim) * s.act_bytes;
    }
    const double t_compute =
        flops / (flops_per_us_[int(DType::bf16)] * K.attention_vs_gemm_efficiency);
    const double mem_eff = s.decode ? K.attention_decode_mem_efficiency : 1.0;
    const double t_mem = (io_bytes + kv_bytes) / (bytes_per_us_ * mem_eff);
    return {std::max(t_compute, t_mem) + p_.kernel_launch_us, src_};
  }

  OpTime memory_op(double bytes) const override {
    if (bytes <= 0) return {0, src_};
    return {bytes / bytes_per_us_ + p_.kernel_launch_us, src_};
  }

  OpTime collective(CollOp op, CommGroup g, double bytes) const override {
    if (g.size <= 1 || bytes <= 0) return {0, CostSource::alpha_beta};
    double t;
    if (!g.spans_nodes()) {
      t = flat(op, g.size, bytes, intra_alpha_, intra_Bpus_, true);
    } else if (g.per_node() <= 1) {
      t = flat(op, g.size, bytes, inter_alpha_, inter_Bpus_, false);
    } else {
      t = hierarchical(op, g, bytes);
    }
    return {t + K.collective_launch_us, CostSource::alpha_beta};
  }

 private:
  double kernel(double flops, double bytes, DType d) const {
    const double f = flops_per_us_[static_cast<int>(compute_class(d))];
    return std::max(flops / f, bytes / bytes_per_us_) + p_.kernel_launch_us;
  }

  // One flat domain (all ranks on one link type). paper.md §13.1.
  static double flat(CollOp op, int p, double n, double a, double B, bool full_mesh) {
    const double frac = double(p - 1) / p;
    switch (op) {
      case CollOp::all_reduce: {
        const double ring = 2.0 * (p - 1) * a + 2.0 * frac * n / B;
        if (full_mesh && n <= K.oneshot_allreduce_max_bytes) {
          const double oneshot = a + (p - 1) * n / B;  // read every peer's full buffer
          return std::min(ring, oneshot);
        }
        if (!full_mesh) {  // double binary tree: latency-optimal across nodes
          const double tree = 2.0 * std::log2(double(p)) * a + 2.0 * n / B;
          return std::min(ring, tree);
        }
        return ring;
      }
      case CollOp::reduce_scatter:
      case CollOp::all_gather:
        return (p - 1) * a + frac * n / B;
      case CollOp::all_to_all:
      case CollOp::fused_ag_dispatch:
      case CollOp::fused_rs_combine:
        return (p - 1) * a + frac * n / B;  // pairwise, p-1 rounds
      case CollOp::send_recv:
        return a + n / B;
    }
    return 0;
  }

  // Group of g.per_node() ranks in each of g.nodes nodes: intra step(s) + rail step.
  double hierarchical(CollOp op, CommGroup g, double n) const {
    const int m = g.per_node(), N = g.nodes;
    switch (op) {
      case CollOp::all_reduce:  // RS in node, AR on the rails of n/m, AG in node
        return flat(CollOp::reduce_scatter, m, n, intra_alpha_, intra_Bpus_, true) +
               flat(CollOp::all_reduce, N, n / m, inter_alpha_, inter_Bpus_, false) +
               flat(CollOp::all_gather, m, n, intra_alpha_, intra_Bpus_, true);
      case CollOp::reduce_scatter:
        return flat(CollOp::reduce_scatter, m, n, intra_alpha_, intra_Bpus_, true) +
               flat(CollOp::reduce_scatter, N, n / m, inter_alpha_, inter_Bpus_, false);
      case CollOp::all_gather:
        return flat(CollOp::all_gather, N, n / m, inter_alpha_, inter_Bpus_, false) +
               flat(CollOp::all_gather, m, n, intra_alpha_, intra_Bpus_, true);
      case CollOp::all_to_all:
      case CollOp::fused_ag_dispatch:
      case CollOp::fused_rs_combine: {
        // Pairwise over p-1 peers, each costing one message latency of its domain; the bytes
        // for remote nodes ((N-1)/N of the buffer) go through the NIC share while the
        // in-node share ((m-1)/(m N)) goes over NVLink at the same time.
        const double p = double(g.size);
        const double t_inter = n * (N - 1) / N / inter_Bpus_;
        const double t_intra = n * (m - 1) / p / intra_Bpus_;
        return (m - 1) * intra_alpha_ + (p - m) * inter_alpha_ + std::max(t_inter, t_intra);
      }
      case CollOp::send_recv:
        return inter_alpha_ + n / inter_Bpus_;
    }
    return 0;
  }

  HardwareProfile p_;
  ClusterSpec c_;
  CostSource src_;
  double bytes_per_us_ = 0;
  double flops_per_us_[8] = {};
  double intra_Bpus_ = 0, inter_Bpus_ = 0;
  double intra_alpha_ = 0, inter_alpha_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Profile tables.

// A curve y(x) sorted by x, ready for log-log interpolation.
struct Curve {
  std::vector<double> x, y;
  void sort_unique() {
    std::vector<std::pair<double, double>> v;
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i] > 0 && y[i] > 0) v.emplace_back(x[i], y[i]);
    std::sort(v.begin(), v.end());
    x.clear();
    y.clear();
    for (size_t i = 0; i < v.size(); ++i) {
      if (!x.empty() && v[i].first == x.back()) {  // repeated measurement: keep the mean
        y.back() = 0.5 * (y.back() + v[i].second);
        continue;
      }
      x.push_back(v[i].first);
      y.push_back(v[i].second);
    }
  }
  // Interpolated y; false when q lies outside the measured range.
  bool at(double q, double& out, CostSource& src) const {
    bool exact = false;
    if (!interpolate_loglog(x.data(), y.data(), int(x.size()), q, out, exact)) return false;
    src = exact ? CostSource::measured : CostSource::interpolated;
    return true;
  }
};

class ProfileTimer final : public OpTimer {
 public:
  ProfileTimer(const HardwareProfile& p, const ClusterSpec& c)
      : roof_(std::make_unique<RooflineTimer>(p, c)), launch_us_(std::max(0.0, p.kernel_launch_us)) {
    for (const GemmPoint& g : p.gemm) {
      auto& f = gemm_[{int(compute_class(g.dtype)), g.n, g.k}];
      f.x.push_back(double(g.m));
      f.y.push_back(g.time_us);
    }
    for (auto& [key, f] : gemm_) f.sort_unique();
    for (const ExpertGemmPoint& e : p.experts) {
      const int impl = e.distribution.starts_with(kExpertGemvV2Tag)    ? kImplGemv2
                       : e.distribution.starts_with(kExpertGemvTag)    ? kImplGemv
                       : e.distribution.starts_with(kExpertEagerTag)   ? kImplEager
                       : e.distribution.starts_with(kExpertGroupedTag) ? kImplGrouped
                                                                        : kImplGraph;
      auto& f = experts_[{int(compute_class(e.dtype)), e.num_experts, e.n, e.k, impl}];
      f.x.push_back(double(e.tokens));
      f.y.push_back(e.time_us);
      auto& a = expert_active_[{int(compute_class(e.dtype)), e.num_experts, e.n, e.k, impl}];
      a.x.push_back(double(e.tokens));
      a.y.push_back(double(e.active_experts));
    }
    for (auto& [key, f] : experts_) f.sort_unique();
    for (auto& [key, f] : expert_active_) f.sort_unique();
    for (const GemvPoint& g : p.gemv) {
      const int kind = g.impl == kGemvImplSwiglu ? int(GemvKind::swiglu)
                       : g.impl == kGemvImplFp32 ? int(GemvKind::fp32_out)
                                                 : int(GemvKind::plain);
      auto& f = gemv_[{kind, int(compute_class(g.dtype)), g.n, g.k}];
      f.x.push_back(double(g.m));
      f.y.push_back(g.time_us);
    }
    for (auto& [key, f] : gemv_) f.sort_unique();
    for (const ElementwisePoint& e : p.elementwise) {
      elementwise_.x.push_back(e.bytes);
      elementwise_.y.push_back(e.time_us);
    }
    elementwise_.sort_unique();
    for (const AttentionPoint& a : p.attention) {
      if (a.batch <= 0) continue;
      const bool decode = a.kind == "decode";
      const double work = decode ? double(a.kv_len)
                                 : double(a.q_len) * (double(a.kv_len - a.q_len) + (a.q_len + 1) / 2.0);
      auto& f = attention_[{decode, a.impl == "mla", a.num_heads, a.num_kv_heads, a.head_dim}][a.batch];
      f.x.push_back(work);
      f.y.push_back(a.time_us);
    }
    for (auto& [key, fam] : attention_)
      for (auto& [b, f] : fam) f.sort_unique();
    for (const CollectivePoint& cp : p.collectives) {
      auto& f = coll_[{int(cp.op), cp.group_size, cp.nodes}];
      f.x.push_back(cp.bytes);
      f.y.push_back(cp.time_us);
    }
    for (auto& [key, f] : coll_) f.sort_unique();
  }

  OpTime gemm(double m, int64_t n, int64_t k, DType dtype) const override {
    const OpTime fallback = roof_->gemm(m, n, k, dtype);
    if (gemm_.empty() || m <= 0) return fallback;
    const int cls = int(compute_class(dtype));
    // Nearest (n, k) family of the same compute class in log distance.
    const Curve* best = nullptr;
    double best_d = std::numeric_limits<double>::infinity();
    int64_t bn = 0, bk = 0;
    for (const auto& [key, f] : gemm_) {
      if (std::get<0>(key) != cls) continue;
      const double dn = std::log(double(std::get<1>(key)) / double(n));
      const double dk = std::log(double(std::get<2>(key)) / double(k));
      const double d = dn * dn + dk * dk;
      if (d < best_d) {
        best_d = d;
        best = &f;
        bn = std::get<1>(key);
        bk = std::get<2>(key);
      }
    }
    double t;
    CostSource src;
    if (best == nullptr || !best->at(m, t, src)) return fallback;
    if (bn != n || bk != k) {  // scale the family's time by the roofline ratio of the shapes
      const double ref = roof_->gemm(m, bn, bk, dtype).time_us;
      if (ref <= 0) return fallback;
      t *= fallback.time_us / ref;
      src = CostSource::extrapolated;
    }
    return {t, src};
  }

  OpTime expert_gemm(const ExpertGemmShape& s) const override {
    const OpTime fallback = roof_->expert_gemm(s);
    const int cls = int(compute_class(s.dtype));
    int used = -1;  // the table family the time comes from
    auto find = [&](int impl) -> const Curve* {
      auto it = experts_.find({cls, s.num_experts, s.n, s.k, impl});
      if (it == experts_.end()) return nullptr;
      used = impl;
      return &it->second;
    };
    const OpTime r = expert_gemm_table(s, fallback, find);
    if (r.source == CostSource::roofline || r.source == CostSource::datasheet) return r;
    return {rescale_active(s, cls, r.time_us, used), r.source};
  }

 private:
  // Each expert table point records the distinct experts its rows reached (active_experts):
  // mixserve-profile experts spreads them evenly ("uniform": min(rows, num_experts)), the
  // executor's paths (expert_gemv, gemv) as a router does ("routed:K", each token on K distinct
  // experts drawn at random, so rows per expert scatter around the mean as in a real step: the
  // grouped GEMM's 128-row tiles and the GEMV's 8-row chunks follow the larger experts). A step
  // may touch fewer distinct experts than its point did (cost_model.cpp: expected_active_experts;
  // 16 Qwen3 tokens x top-8 = 128 rows reach ~82 of 128 experts, an evenly spread 128-row point
  // reads all 128; a routed point about as many as the step). These kernels are
  // weight-bandwidth bound at decode sizes, so the table time above the profile's measured
  // per-launch cost (kernel_launch_us) is scaled by the bytes the step reads over the bytes the
  // point read: weights of the active experts plus the rows' activations in and out.
  double rescale_active(const ExpertGemmShape& s, int cls, double t, int impl) const {
    if (impl < 0 || s.active_experts <= 0) return t;
    auto it = expert_active_.find({cls, s.num_experts, s.n, s.k, impl});
    if (it == expert_active_.end()) return t;
    double table_active;
    CostSource ignored;
    if (!it->second.at(s.rows, table_active, ignored) || table_active <= 0) return t;
    const double w = double(s.n) * double(s.k) * dtype_bytes(s.dtype);
    const double act = s.rows * double(s.n + s.k) * 2.0;
    const double ratio = (s.active_experts * w + act) / (table_active * w + act);
    const double floor = std::min(t, launch_us_);
    return floor + (t - floor) * ratio;
  }

  template <class Find>
  OpTime expert_gemm_table(const ExpertGemmShape& s, const OpTime& fallback, Find find) const {
    double t;
    CostSource src;
    if (s.device_gemv && s.gemv_v2) {
      if (const Curve* f = find(kImplGemv2)) {
        if (!f->at(s.rows, t, src)) return fallback;
        return {t, src};
      }
      const Curve* f = find(kImplGemv);  // v1's time stands in, marked as not this kernel's
      if (f == nullptr || !f->at(s.rows, t, src)) return fallback;
      return {t, CostSource::extrapolated};
    }
    if (s.device_gemv) {
      const Curve* f = find(kImplGemv);
      if (f == nullptr || !f->at(s.rows, t, src)) return fallback;
      return {t, src};
    }
    if (s.grouped_gemm) {
      if (const Curve* f = find(kImplGrouped)) {
        if (!f->at(s.rows, t, src)) return fallback;
        return {t, src};
      }
    }
    const Curve* f = find(kImplEager);
    if (f == nullptr) f = find(kImplGraph);
    if (f == nullptr || !f->at(s.rows, t, src)) return fallback;
    // No grouped-GEMM table: the cuBLASLt time stands in for it, marked as not this kernel's.
    if (s.grouped_gemm) src = CostSource::extrapolated;
    return {t, src};
  }

 public:
  OpTime gemv(double m, int64_t n, int64_t k, DType dtype, GemvKind kind) const override {
    auto it = gemv_.find({int(kind), int(compute_class(dtype)), n, k});
    double t;
    CostSource src;
    if (it != gemv_.end() && m > 0 && it->second.at(m, t, src)) return {t, src};
    OpTime o = gemm(m, n, k, dtype);  // cuBLASLt's table (or the roofline): not this kernel's time
    if (int(o.source) < int(CostSource::extrapolated)) o.source = CostSource::extrapolated;
    return o;
  }

  OpTime attention(const AttentionShape& s) const override {
    const OpTime fallback = roof_->attention(s);
    // MLA decode tables are keyed by query heads and the latent width as head_dim.
    auto it = attention_.find({s.decode, s.mla, s.heads, s.kv_heads, s.qk_dim});
    if (it == attention_.end() || s.batch <= 0) return fallback;
    const auto& fam = it->second;  // batch -> curve over the work of one sequence
    const double b = double(s.batch);
    const double work = (s.decode ? s.context_tokens : s.pairs) / b;
    auto hi = fam.lower_bound(s.batch);
    if (hi == fam.end()) return fallback;
    double t1;
    CostSource src1;
    if (!hi->second.at(work, t1, src1)) return fallback;
    if (hi->first == s.batch) return {t1, src1};
    if (hi == fam.begin()) return fallback;
    auto lo = std::prev(hi);
    double t0;
    CostSource src0;
    if (!lo->second.at(work, t0, src0)) return fallback;
    const double w = std::log(b / lo->first) / std::log(double(hi->first) / lo->first);
    return {std::exp(std::log(t0) + w * (std::log(t1) - std::log(t0))), CostSource::interpolated};
  }

  OpTime memory_op(double bytes) const override {
    if (bytes <= 0) return roof_->memory_op(bytes);
    double t;
    CostSource src;
    if (!elementwise_.x.empty() && bytes < elementwise_.x.front())
      return {elementwise_.y.front(), CostSource::extrapolated};  // launch-bound floor
    if (!elementwise_.at(bytes, t, src)) return roof_->memory_op(bytes);
    return {t, src};
  }

  OpTime collective(CollOp op, CommGroup g, double bytes) const override {
    if (g.size <= 1 || bytes <= 0) return {0, CostSource::alpha_beta};
    auto it = coll_.find({int(op), g.size, g.nodes});
    double t;
    CostSource src;
    if (it == coll_.end() || !it->second.at(bytes, t, src)) return roof_->collective(op, g, bytes);
    return {t, src};
  }

 private:
  std::unique_ptr<RooflineTimer> roof_;
  std::map<std::tuple<int, int64_t, int64_t>, Curve> gemm_;
  static constexpr int kImplGraph = 0, kImplGemv = 1, kImplEager = 2, kImplGrouped = 3,
                       kImplGemv2 = 4;  // expert point tags
  std::map<std::tuple<int, int, int64_t, int64_t>, Curve> gemv_;  // (kind, class, n, k) over m
  std::map<std::tuple<int, int, int64_t, int64_t, int>, Curve> experts_;
  // The same families' active_experts per point (rows -> experts whose weights the point read).
  std::map<std::tuple<int, int, int64_t, int64_t, int>, Curve> expert_active_;
  double launch_us_ = 0;  // the profile's measured kernel_launch_us
  Curve elementwise_;
  std::map<std::tuple<bool, bool, int, int, int>, std::map<int, Curve>> attention_;
  std::map<std::tuple<int, int, int>, Curve> coll_;
};

}  // namespace

bool interpolate_loglog(const double* xs, const double* ys, int n, double x, double& y,
                        bool& exact) {
  if (n <= 0 || !(x >= xs[0]) || !(x <= xs[n - 1])) return false;
  const double* hi = std::lower_bound(xs, xs + n, x);
  const int i = int(hi - xs);
  if (xs[i] == x) {
    y = ys[i];
    exact = true;
    return true;
  }
  // xs[i-1] < x < xs[i]
  const double lx0 = std::log(xs[i - 1]), lx1 = std::log(xs[i]);
  const double ly0 = std::log(ys[i - 1]), ly1 = std::log(ys[i]);
  const double w = (std::log(x) - lx0) / (lx1 - lx0);
  y = std::exp(ly0 + w * (ly1 - ly0));
  exact = false;
  return true;
}

std::unique_ptr<OpTimer> make_roofline_timer(const HardwareProfile& p, const ClusterSpec& c) {
  return std::make_unique<RooflineTimer>(p, c);
}

std::unique_ptr<OpTimer> make_profile_timer(const HardwareProfile& p, const ClusterSpec& c) {
  return std::make_unique<ProfileTimer>(p, c);
}

}  // namespace mixserve::sim
