#include "mixserve/profiler/shapes.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <tuple>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::profiler {

std::vector<DType> timed_dtype(DType d) {
  switch (d) {
    case DType::bf16:
    case DType::fp16: return {DType::bf16};
    case DType::fp8_e4m3: return {DType::fp8_e4m3};
    case DType::fp8_block: return {DType::fp8_block};
    default: return {};
  }
}

namespace {
bool aligned(int64_t n, int64_t k, DType d) {
  const int64_t a = (d == DType::bf16) ? 8 : 16;
  return n > 0 && k > 0 && n % a == 0 && k % a == 0;
}
void add(std::vector<GemmFamily>& out, const std::string& model, int tp, const char* op,
         int64_t n_total, int64_t n_div, int64_t k_total, int64_t k_div, DType weight) {
  if (n_total % n_div != 0 || k_total % k_div != 0) return;
  const int64_t n = n_total / n_div, k = k_total / k_div;
  for (DType d : timed_dtype(weight))
    if (aligned(n, k, d)) out.push_back({fmt::format("{} tp{} {}", model, tp, op), n, k, d});
}
}  // namespace

std::vector<GemmFamily> model_gemm_families(const ModelSpec& m, int tp) {
  std::vector<GemmFamily> f;
  const int64_t h = m.hidden_size;
  const auto& a = m.attention;
  const DType w = m.weight_dtype;
  if (a.type == AttentionType::mla) {
    const int64_t qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim;
    if (a.q_lora_rank > 0) {
      // q_a and kv_a read the same input: one replicated GEMM (not TP-sharded).
      add(f, m.name, tp, "attn.qkv_a", a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim, 1, h, 1, w);
      add(f, m.name, tp, "attn.q_b", int64_t(a.num_heads) * qk_head, tp, a.q_lora_rank, 1, w);
    } else {
      add(f, m.name, tp, "attn.q", int64_t(a.num_heads) * qk_head, tp, h, 1, w);
      add(f, m.name, tp, "attn.kv_a", a.kv_lora_rank + a.qk_rope_head_dim, 1, h, 1, w);
    }
    add(f, m.name, tp, "attn.kv_b", int64_t(a.num_heads) * (a.qk_nope_head_dim + a.v_head_dim), tp,
        a.kv_lora_rank, 1, w);
    add(f, m.name, tp, "attn.o_proj", h, 1, int64_t(a.num_heads) * a.v_head_dim, tp, w);
  } else {
    const int64_t kv_heads = std::max<int64_t>(a.num_kv_heads, tp);  // replicated when tp > kv heads
    add(f, m.name, tp, "attn.qkv_proj", (int64_t(a.num_heads) + 2 * kv_heads) * a.head_dim, tp, h, 1, w);
    add(f, m.name, tp, "attn.o_proj", h, 1, m.q_width(), tp, w);
  }
  if (m.dense_intermediate_size > 0 && m.num_dense_layers() > 0) {
    add(f, m.name, tp, "dense.gate_up", 2 * int64_t(m.dense_intermediate_size), tp, h, 1, w);
    add(f, m.name, tp, "dense.down", h, 1, m.dense_intermediate_size, tp, w);
  }
  if (m.moe.has_shared_expert()) {
    add(f, m.name, tp, "moe.shared.gate_up", 2 * int64_t(m.moe.shared_intermediate_size), tp, h, 1, m.expert_weight_dtype);
    add(f, m.name, tp, "moe.shared.down", h, 1, m.moe.shared_intermediate_size, tp, m.expert_weight_dtype);
  }
  add(f, m.name, tp, "lm_head", m.vocab_size, tp, h, 1, DType::bf16);
  return f;
}

std::vector<ExpertFamily> model_expert_families(const ModelSpec& m, int tp, int ep) {
  std::vector<ExpertFamily> f;
  if (m.moe.num_experts <= 0 || m.moe.num_experts % ep != 0) return f;
  const int64_t inter = m.moe.expert_intermediate_size;
  if (inter % tp != 0) return f;
  const int local = m.moe.num_experts / ep;
  for (DType d : timed_dtype(m.expert_weight_dtype)) {
    const auto label = [&](const char* op) { return fmt::format("{} tp{} ep{} {}", m.name, tp, ep, op); };
    if (aligned(2 * inter / tp, m.hidden_size, d))
      f.push_back({label("experts.gate_up"), local, 2 * inter / tp, m.hidden_size, d});
    if (aligned(m.hidden_size, inter / tp, d))
      f.push_back({label("experts.down"), local, m.hidden_size, inter / tp, d});
  }
  return f;
}

std::vector<GemmFamily> generic_gemm_families(const std::vector<int64_t>& dims) {
  std::vector<GemmFamily> f;
  for (DType d : {DType::bf16, DType::fp8_e4m3})
    for (int64_t n : dims)
      for (int64_t k : dims)
        if (aligned(n, k, d)) f.push_back({fmt::format("generic n{} k{}", n, k), n, k, d});
  return f;
}

std::vector<GemmFamily> unique_families(std::vector<GemmFamily> f) {
  std::set<std::tuple<int64_t, int64_t, int>> seen;
  std::vector<GemmFamily> out;
  for (auto& g : f)
    if (seen.insert({g.n, g.k, int(g.dtype)}).second) out.push_back(std::move(g));
  return out;
}

std::vector<ExpertFamily> unique_families(std::vector<ExpertFamily> f) {
  std::set<std::tuple<int, int64_t, int64_t, int>> seen;
  std::vector<ExpertFamily> out;
  for (auto& g : f)
    if (seen.insert({g.num_experts, g.n, g.k, int(g.dtype)}).second) out.push_back(std::move(g));
  return out;
}

std::vector<int64_t> tokens_per_expert(const std::string& distribution, int num_experts,
                                       int64_t total_rows) {
  if (num_experts < 1 || total_rows < 0)
    throw InputError(fmt::format("expert distribution: {} experts, {} rows (need >= 1 expert, >= 0 rows)",
                                 num_experts, total_rows));
  if (distribution.rfind("routed:", 0) == 0) {
    int k = 0;
    const char* b = distribution.data() + 7;
    const char* e = distribution.data() + distribution.size();
    const auto [end, ec] = std::from_chars(b, e, k);
    if (ec != std::errc() || end != e || b == e || k < 1)
      throw InputError(fmt::format("expert distribution '{}': expected routed:K with K >= 1", distribution));
    k = std::min(k, num_experts);
    std::vector<int64_t> counts(num_experts, 0);
    std::mt19937_64 rng(0x6d69787365727665ULL ^ (uint64_t(num_experts) << 40) ^ (uint64_t(total_rows) << 8) ^
                        uint64_t(k));
    std::vector<int> ids(num_experts);
    std::iota(ids.begin(), ids.end(), 0);
    for (int64_t left = total_rows; left > 0;) {
      const int take = int(std::min<int64_t>(k, left));
      for (int j = 0; j < take; ++j) {  // partial Fisher-Yates: `take` distinct experts
        // rng() % range, not std::uniform_int_distribution (whose draws differ between standard
        // libraries): the same profile points everywhere; the modulo bias is < 2^-50 here.
        const int pick = j + static_cast<int>(rng() % uint64_t(num_experts - j));
        std::swap(ids[j], ids[pick]);
        counts[ids[j]] += 1;
      }
      left -= take;
    }
    return counts;
  }
  std::vector<double> share(num_experts, 1.0);
  if (distribution == "uniform") {
  } else if (distribution.rfind("zipf:", 0) == 0) {
    const double s = std::stod(distribution.substr(5));
    for (int i = 0; i < num_experts; ++i) share[i] = 1.0 / std::pow(double(i + 1), s);
  } else if (distribution.rfind("empty:", 0) == 0) {
    const double frac = std::stod(distribution.substr(6));
    const int empty = std::min(num_experts - 1, static_cast<int>(std::lround(frac * num_experts)));
    for (int i = 0; i < empty; ++i) share[i] = 0.0;
  } else {
    throw InputError(fmt::format("expert distribution '{}': expected uniform, zipf:S, empty:F or routed:K", distribution));
  }
  const double total_share = std::accumulate(share.begin(), share.end(), 0.0);
  std::vector<int64_t> counts(num_experts, 0);
  std::vector<std::pair<double, int>> remainders;
  int64_t assigned = 0;
  for (int i = 0; i < num_experts; ++i) {
    const double exact = double(total_rows) * share[i] / total_share;
    counts[i] = static_cast<int64_t>(std::floor(exact));
    assigned += counts[i];
    if (share[i] > 0) remainders.emplace_back(exact - double(counts[i]), -i);
  }
  // Largest remainders first; ties to the lower expert index.
  std::sort(remainders.rbegin(), remainders.rend());
  for (std::size_t j = 0; assigned < total_rows; ++j, ++assigned) counts[-remainders[j % remainders.size()].second] += 1;
  return counts;
}

std::vector<int64_t> geometric_sizes(int64_t lo, int64_t hi, int64_t factor) {
  if (lo < 1 || hi < lo || factor < 2)
    throw InputError(fmt::format("sizes: -b {} -e {} -f {} (need 1 <= b <= e and f >= 2)", lo, hi, factor));
  std::vector<int64_t> s;
  for (int64_t v = lo; v <= hi; v *= factor) {
    s.push_back(v);
    if (v > hi / factor) break;
  }
  return s;
}

}  // namespace mixserve::profiler
