// CPU reference forward in float64 (Eigen). Straightforward loops over tokens and heads: it is
// an oracle for tiny configurations, not a fast path.
#include "mixserve/model/reference.hpp"

#include <fmt/format.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "mixserve/core/error.hpp"
#include "mixserve/model/bf16.hpp"

namespace mixserve::model {

namespace {

using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vec = Eigen::VectorXd;

// [rows, cols] row-major, widened exactly from bf16.
Mat to_mat(const Tensor& t) {
  const int64_t rows = t.shape.size() == 1 ? 1 : t.shape[0];
  const int64_t cols = t.shape.back();
  Mat m(rows, cols);
  for (int64_t i = 0; i < rows * cols; ++i) m.data()[i] = bf16_to_f32(t.bf16[static_cast<size_t>(i)]);
  return m;
}

Vec to_vec(const Tensor& t) {
  Vec v(t.numel());
  for (int64_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(t.bf16[static_cast<size_t>(i)]);
  return v;
}

// x * rsqrt(mean(x^2) + eps) * w, row by row, over `width`-wide segments (width = cols: the
// whole row; width = head_dim: each head, sharing w).
void rms_norm_inplace(Mat& x, const Vec& w, double eps) {
  const Eigen::Index width = w.size();
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    for (Eigen::Index c0 = 0; c0 < x.cols(); c0 += width) {
      auto seg = x.row(r).segment(c0, width);
      const double inv = 1.0 / std::sqrt(seg.squaredNorm() / double(width) + eps);
      seg = (seg.array() * inv * w.transpose().array()).matrix();
    }
  }
}

// Rotate-half RoPE on each head_dim-wide segment of row r at position pos.
void rope_row(Mat& x, Eigen::Index r, int head_dim, int64_t pos, double theta) {
  const int half = head_dim / 2;
  for (Eigen::Index c0 = 0; c0 < x.cols(); c0 += head_dim) {
    for (int i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * i / head_dim);
      const double ang = double(pos) * inv_freq;
      const double c = std::cos(ang), s = std::sin(ang);
      const double a = x(r, c0 + i), b = x(r, c0 + i + half);
      x(r, c0 + i) = a * c - b * s;
      x(r, c0 + i + half) = b * c + a * s;
    }
  }
}

double silu(double v) { return v / (1.0 + std::exp(-v)); }

struct Ffn {
  Mat gate, up, down;  // [I, h], [I, h], [h, I]
  // [T, h] -> [T, h]
  Mat operator()(const Mat& x) const {
    Mat g = x * gate.transpose();
    const Mat u = x * up.transpose();
    for (Eigen::Index i = 0; i < g.size(); ++i) g.data()[i] = silu(g.data()[i]) * u.data()[i];
    return g * down.transpose();
  }
};

struct Layer {
  Vec ln1, ln2;
  Mat wq, wk, wv, wo;  // [q, h], [kv, h], [kv, h], [h, q]
  Vec bq, bk, bv, bo;  // empty when absent
  Vec q_norm, k_norm;  // empty when absent; size head_dim (per head) or full width
  bool moe = false;
  Mat router;          // [E, h]
  std::vector<Ffn> experts;
  bool has_shared = false;
  Ffn shared;
  Vec shared_gate;     // [h]; empty when ungated
  Ffn dense;
  Mat k_cache, v_cache;  // [num_blocks * block_size, kv]
};

}  // namespace

void route_softmax_topk(std::span<const double> logits, int top_k, bool renormalize, double scale,
                        std::span<int32_t> ids, std::span<double> weights) {
  const int n = static_cast<int>(logits.size());
  if (top_k < 1 || top_k > n || ids.size() != size_t(top_k) || weights.size() != size_t(top_k))
    throw RuntimeError(fmt::format("route_softmax_topk: top_k {} with {} experts, {} ids, {} "
                                   "weights",
                                   top_k, n, ids.size(), weights.size()));
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(static_cast<size_t>(n));
  double sum = 0.0;
  for (int e = 0; e < n; ++e) sum += p[size_t(e)] = std::exp(logits[size_t(e)] - mx);
  for (auto& v : p) v /= sum;
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
  double kept = 0.0;
  for (int j = 0; j < top_k; ++j) kept += p[size_t(order[size_t(j)])];
  for (int j = 0; j < top_k; ++j) {
    ids[size_t(j)] = order[size_t(j)];
    const double w = p[size_t(order[size_t(j)])];
    weights[size_t(j)] = (renormalize ? w / kept : w) * scale;
  }
}

struct ReferenceModel::Impl {
  ModelSpec spec;
  Family family;
  KVCacheConfig kv;
  Mat embed;    // [V, h]
  Vec final_norm;
  Mat lm_head;  // [V, h]
  std::vector<Layer> layers;
};

ReferenceModel::ReferenceModel(const WeightSet& w, KVCacheConfig kv) : impl_(new Impl) {
  Impl& s = *impl_;
  s.spec = w.spec();
  s.family = w.family();
  s.kv = kv;
  const ModelSpec& m = s.spec;
  if (kv.block_size < 1 || kv.num_blocks < 1)
    throw InputError(fmt::format("reference KV cache: block_size and num_blocks: expected >= 1, "
                                 "got {} and {}",
                                 kv.block_size, kv.num_blocks));
  for (int i = 0; i < m.num_layers; ++i)
    if (m.layers[size_t(i)].sliding && m.attention.sliding_window > 0)
      throw InputError(fmt::format("model '{}': layer {} uses sliding-window attention, which the "
                                   "reference does not implement",
                                   m.name, i));
  const auto opt_vec = [&](const std::string& name) {
    const Tensor* t = w.find(name);
    return t ? to_vec(*t) : Vec();
  };
  const auto ffn = [&](auto name_of) {
    return Ffn{to_mat(w.at(name_of(FfnProj::gate))), to_mat(w.at(name_of(FfnProj::up))),
               to_mat(w.at(name_of(FfnProj::down)))};
  };
  s.embed = to_mat(w.at(names::embed()));
  s.final_norm = to_vec(w.at(names::final_norm()));
  s.lm_head = m.tie_word_embeddings ? s.embed : to_mat(w.at(names::lm_head()));
  const int64_t kv_width = int64_t{m.attention.num_kv_heads} * m.attention.head_dim;
  for (int i = 0; i < m.num_layers; ++i) {
    Layer L;
    L.ln1 = to_vec(w.at(names::input_norm(i)));
    L.ln2 = to_vec(w.at(names::post_attn_norm(i)));
    L.wq = to_mat(w.at(names::attn(i, "q_proj")));
    L.wk = to_mat(w.at(names::attn(i, "k_proj")));
    L.wv = to_mat(w.at(names::attn(i, "v_proj")));
    L.wo = to_mat(w.at(names::attn(i, "o_proj")));
    L.bq = opt_vec(names::attn(i, "q_proj", "bias"));
    L.bk = opt_vec(names::attn(i, "k_proj", "bias"));
    L.bv = opt_vec(names::attn(i, "v_proj", "bias"));
    L.bo = opt_vec(names::attn(i, "o_proj", "bias"));
    L.q_norm = opt_vec(names::attn(i, "q_norm"));
    L.k_norm = opt_vec(names::attn(i, "k_norm"));
    L.moe = m.layers[size_t(i)].moe;
    if (L.moe) {
      L.router = to_mat(w.at(names::router(s.family, i)));
      for (int e = 0; e < m.moe.num_experts; ++e)
        L.experts.push_back(ffn([&](FfnProj p) { return names::expert(s.family, i, e, p); }));
      if (m.moe.shared_intermediate_size > 0) {
        L.has_shared = true;
        L.shared = ffn([&](FfnProj p) { return names::shared_expert(i, p); });
        if (m.moe.shared_expert_gate)
          L.shared_gate = to_vec(w.at(names::shared_expert_gate(i)));
      }
    } else {
      L.dense = ffn([&](FfnProj p) { return names::dense(i, p); });
    }
    L.k_cache = Mat::Zero(int64_t{kv.num_blocks} * kv.block_size, kv_width);
    L.v_cache = L.k_cache;
    s.layers.push_back(std::move(L));
  }
}

ReferenceModel::~ReferenceModel() = default;

const ModelSpec& ReferenceModel::spec() const { return impl_->spec; }
const KVCacheConfig& ReferenceModel::kv_config() const { return impl_->kv; }

void ReferenceModel::reset_cache() {
  for (auto& L : impl_->layers) {
    L.k_cache.setZero();
    L.v_cache.setZero();
  }
}

namespace {

// The rows of one step: position and KV slot of every new token.
struct StepRows {
  std::vector<int64_t> pos;  // position of each row in its sequence
  std::vector<int64_t> seq;  // batch index of each row
  const std::vector<SequenceStep>* batch = nullptr;
  int block_size = 0;
  int64_t slot(int64_t seq_idx, int64_t p) const {
    const auto& bt = (*batch)[size_t(seq_idx)].block_table;
    return int64_t{bt[size_t(p / block_size)]} * block_size + p % block_size;
  }
};

// GQA/MHA attention of one layer on the normed input xn [T, h]: projections (+bias), QK-norm,
// RoPE, K/V written to the cache, causal attention over the cache, o_proj (+bias).
// Returns [T, h]. MLA would be a second function of this shape.
Mat attention_gqa(const ModelSpec& m, Layer& L, const Mat& xn, const StepRows& rows) {
  const auto& a = m.attention;
  const int64_t T = xn.rows();
  const int hd = a.head_dim;
  const int group = a.num_heads / a.num_kv_heads;
  const double scale = 1.0 / std::sqrt(double(hd));
  Mat q = xn * L.wq.transpose();
  Mat k = xn * L.wk.transpose();
  Mat v = xn * L.wv.transpose();
  if (L.bq.size()) q.rowwise() += L.bq.transpose();
  if (L.bk.size()) k.rowwise() += L.bk.transpose();
  if (L.bv.size()) v.rowwise() += L.bv.transpose();
  if (L.q_norm.size()) {  // per head (Qwen3) or whole projection (OLMoE): the weight's width
    rms_norm_inplace(q, L.q_norm, m.rms_norm_eps);
    rms_norm_inplace(k, L.k_norm, m.rms_norm_eps);
  }
  for (int64_t r = 0; r < T; ++r) {
    rope_row(q, r, hd, rows.pos[size_t(r)], m.rope_theta);
    rope_row(k, r, hd, rows.pos[size_t(r)], m.rope_theta);
    const int64_t sl = rows.slot(rows.seq[size_t(r)], rows.pos[size_t(r)]);
    L.k_cache.row(sl) = k.row(r);
    L.v_cache.row(sl) = v.row(r);
  }
  Mat attn = Mat::Zero(T, int64_t{a.num_heads} * hd);
  std::vector<double> p;
  for (int64_t r = 0; r < T; ++r) {
    const int64_t pos = rows.pos[size_t(r)];
    const int64_t sq = rows.seq[size_t(r)];
    p.resize(size_t(pos + 1));
    for (int h = 0; h < a.num_heads; ++h) {
      const int64_t qc = int64_t{h} * hd, kc = int64_t{h / group} * hd;
      double mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const int64_t sl = rows.slot(sq, j);
        p[size_t(j)] = scale * q.row(r).segment(qc, hd).dot(L.k_cache.row(sl).segment(kc, hd));
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= pos; ++j) sum += p[size_t(j)] = std::exp(p[size_t(j)] - mx);
      for (int64_t j = 0; j <= pos; ++j) {
        const int64_t sl = rows.slot(sq, j);
        attn.row(r).segment(qc, hd) += (p[size_t(j)] / sum) * L.v_cache.row(sl).segment(kc, hd);
      }
    }
  }
  Mat o = attn * L.wo.transpose();
  if (L.bo.size()) o.rowwise() += L.bo.transpose();
  return o;
}

// Routing of one token: softmax top-k. Sigmoid group-limited routing (DeepSeek) would be a
// second case here; the constructor rejects models that need it.
void route(const MoESpec& e, std::span<const double> logits, std::span<int32_t> ids,
           std::span<double> weights) {
  route_softmax_topk(logits, e.top_k, e.norm_topk_prob, e.routed_scaling_factor, ids, weights);
}

// MoE block on the normed input xn [T, h]: routing, the top-k experts weighted, the shared
// expert (sigmoid-gated when it has a gate). ids/wts receive the routing [T, top_k].
Mat moe_block(const ModelSpec& m, const Layer& L, const Mat& xn, std::vector<int32_t>& ids,
              std::vector<double>& wts) {
  const int64_t T = xn.rows();
  const int k = m.moe.top_k;
  const Mat logits = xn * L.router.transpose();  // [T, E]
  ids.assign(size_t(T * k), 0);
  wts.assign(size_t(T * k), 0.0);
  Mat y = Mat::Zero(T, m.hidden_size);
  for (int64_t r = 0; r < T; ++r) {
    const Vec lr = logits.row(r).transpose();
    const std::span<int32_t> id(ids.data() + r * k, size_t(k));
    const std::span<double> wt(wts.data() + r * k, size_t(k));
    route(m.moe, std::span<const double>(lr.data(), size_t(lr.size())), id, wt);
    const Mat xr = xn.row(r);
    for (int j = 0; j < k; ++j) y.row(r) += wt[size_t(j)] * L.experts[size_t(id[size_t(j)])](xr);
  }
  if (L.has_shared) {
    Mat sh = L.shared(xn);
    if (L.shared_gate.size())
      for (int64_t r = 0; r < T; ++r)
        sh.row(r) *= 1.0 / (1.0 + std::exp(-xn.row(r).dot(L.shared_gate)));
    y += sh;
  }
  return y;
}

}  // namespace

StepOutput ReferenceModel::step(const std::vector<SequenceStep>& batch) {
  Impl& s = *impl_;
  const ModelSpec& m = s.spec;
  const int bs = s.kv.block_size;

  // Validate the batch and lay out one row per new token.
  StepOutput out;
  StepRows rows;
  rows.batch = &batch;
  rows.block_size = bs;
  std::set<int32_t> used_blocks;
  out.seq_offsets.push_back(0);
  for (size_t q = 0; q < batch.size(); ++q) {
    const SequenceStep& sq = batch[q];
    auto bad = [&](const std::string& what) {
      throw InputError(fmt::format("reference step: sequence {}: {}", q, what));
    };
    if (sq.tokens.empty()) bad("no new tokens");
    if (sq.position < 0) bad(fmt::format("position {} is negative", sq.position));
    const int64_t end = sq.position + int64_t(sq.tokens.size());
    const int64_t need = (end + bs - 1) / bs;
    if (int64_t(sq.block_table.size()) < need)
      bad(fmt::format("block table holds {} blocks of {} tokens, positions up to {} need {}",
                      sq.block_table.size(), bs, end - 1, need));
    for (int32_t b : sq.block_table) {
      if (b < 0 || b >= s.kv.num_blocks)
        bad(fmt::format("block {} out of range [0, {})", b, s.kv.num_blocks));
      if (!used_blocks.insert(b).second) bad(fmt::format("block {} is used twice in this step", b));
    }
    for (size_t t = 0; t < sq.tokens.size(); ++t) {
      if (sq.tokens[t] < 0 || sq.tokens[t] >= m.vocab_size)
        bad(fmt::format("token {} = {} out of range [0, {})", t, sq.tokens[t], m.vocab_size));
      rows.pos.push_back(sq.position + int64_t(t));
      rows.seq.push_back(int64_t(q));
    }
    out.seq_offsets.push_back(int64_t(rows.pos.size()));
  }
  const int64_t T = int64_t(rows.pos.size());
  out.num_tokens = T;

  Mat x(T, m.hidden_size);
  {
    int64_t r = 0;
    for (const auto& sq : batch)
      for (int32_t tok : sq.tokens) x.row(r++) = s.embed.row(tok);
  }
  for (Layer& L : s.layers) {
    Mat xn = x;
    rms_norm_inplace(xn, L.ln1, m.rms_norm_eps);
    x += attention_gqa(m, L, xn, rows);
    out.attn_hidden.emplace_back(x.data(), x.data() + x.size());

    xn = x;
    rms_norm_inplace(xn, L.ln2, m.rms_norm_eps);
    std::vector<int32_t> ids;
    std::vector<double> wts;
    x += L.moe ? moe_block(m, L, xn, ids, wts) : L.dense(xn);
    out.topk_ids.push_back(std::move(ids));
    out.topk_weights.push_back(std::move(wts));
    out.layer_hidden.emplace_back(x.data(), x.data() + x.size());
  }

  rms_norm_inplace(x, s.final_norm, m.rms_norm_eps);
  const Mat logits = x * s.lm_head.transpose();
  out.logits.assign(logits.data(), logits.data() + logits.size());
  return out;
}

}  // namespace mixserve::model
