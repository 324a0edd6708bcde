// The `attention` family of mixserve-profile: times the executor's own attention kernel
// (kernels/attention.cuh, paged KV cache, AttentionImpl::tensor_core with the launcher's split
// choice) for the GQA/MHA head configurations of the shipped models at each TP degree
// (num_heads / tp query heads, max(1, num_kv_heads / tp) KV heads).
//   decode:  q_len 1, batch 1..256 x kv_len 128..32768 (batch * kv_len <= kMaxContextTokens);
//            timed inside a CUDA graph, as the executor runs decode steps;
//   prefill: batch 1 / 8 / 64 x q_len 128..8192 (batch * q_len <= kMaxPrefillTokens), without
//            context (kv_len = q_len) and, for batch 1, after 4096 tokens of context; timed
//            eagerly, as the executor runs prefill steps.
// Every sequence owns distinct cache blocks; the cache holds random bf16 values.
#include <algorithm>
#include <ostream>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/kernels/attention.cuh"

namespace mixserve::profiler {
namespace {

constexpr int kBlockTokens = 16;                       // GpuModelConfig::block_size default
constexpr int64_t kMaxContextTokens = int64_t(1) << 21;  // decode: cache tokens of one point
constexpr int64_t kMaxPrefillTokens = 16384;           // prefill: query tokens of one point
constexpr int64_t kPrefillContext = 4096;              // the "with context" prefill points

struct HeadConfig {
  std::string label;  // "qwen3-30b-a3b tp1"
  int heads = 0, kv_heads = 0, head_dim = 0;
};

struct Point {
  bool decode = true;
  int batch = 1;
  int64_t q_len = 1, kv_len = 1;
};

std::vector<HeadConfig> head_configs(const ProfileConfig& cfg) {
  std::vector<HeadConfig> out;
  for (const auto& name : effective_models(cfg)) {
    const ModelSpec m = load_model(name);
    const AttentionSpec& a = m.attention;
    if (a.type == AttentionType::mla) continue;  // the executor's kernel is GQA/MHA only
    if (std::find(kernels::kAttentionHeadDims.begin(), kernels::kAttentionHeadDims.end(), a.head_dim) ==
        kernels::kAttentionHeadDims.end())
      continue;
    for (int tp : cfg.tp) {
      if (a.num_heads % tp != 0) continue;
      HeadConfig h{fmt::format("{} tp{}", m.name, tp), a.num_heads / tp, std::max(1, a.num_kv_heads / tp),
                   a.head_dim};
      if (h.heads % h.kv_heads != 0 || h.heads / h.kv_heads > 64) continue;
      const bool seen = std::any_of(out.begin(), out.end(), [&](const HeadConfig& o) {
        return o.heads == h.heads && o.kv_heads == h.kv_heads && o.head_dim == h.head_dim;
      });
      if (!seen) out.push_back(h);
    }
  }
  return out;
}

std::vector<Point> points() {
  std::vector<Point> pts;
  for (int b : {1, 4, 16, 64, 256})
    for (int64_t kv : {128, 512, 2048, 8192, 32768})
      if (b * kv <= kMaxContextTokens) pts.push_back({true, b, 1, kv});
  for (int b : {1, 8, 64})
    for (int64_t q : {128, 512, 2048, 8192})
      if (b * q <= kMaxPrefillTokens) {
        pts.push_back({false, b, q, q});
        if (b == 1) pts.push_back({false, b, q, q + kPrefillContext});
      }
  return pts;
}

// Roofline-ish guess for iteration counts only.
double guess_point_us(const HeadConfig& h, const Point& p) {
  const double kv_bytes = double(p.batch) * double(p.kv_len) * 2.0 * h.kv_heads * h.head_dim * 2.0;
  const double pairs = double(p.batch) * double(p.q_len) * double(p.kv_len - p.q_len + (p.q_len + 1) / 2);
  return guess_us(4.0 * pairs * h.heads * h.head_dim, kv_bytes, DType::bf16) * 2.0;
}

}  // namespace

void profile_attention(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  const auto cfgs = head_configs(cfg);
  const auto pts = points();
  double est_total_us = 0;
  for (const auto& h : cfgs)
    for (const auto& pt : pts) {
      const double est = guess_point_us(h, pt);
      const auto t = timing_for(cfg, est, pt.decode);
      est_total_us += (est + 20.0) * (t.timed_iters + t.warmup_iters + 2) + 2000.0;
    }
  fmt::print(out.table,
             "#\n# Attention (executor kernel, paged KV, block {} tokens): {} head configurations x {} points "
             "(estimated {:.0f} s)\n",
             kBlockTokens, cfgs.size(), pts.size(), est_total_us / 1e6);
  if (cfg.dry_run) {
    for (const auto& h : cfgs)
      fmt::print(out.table, "#   {:<32} heads {:>3} kv_heads {:>3} head_dim {:>3}\n", h.label, h.heads, h.kv_heads,
                 h.head_dim);
    return;
  }
  if (cfgs.empty()) return;
  GpuContext ctx(cfg.device);
  cudaStream_t s = ctx.stream.get();
  int64_t max_kv_width = 0, max_q_width = 0;
  for (const auto& h : cfgs) {
    max_kv_width = std::max<int64_t>(max_kv_width, int64_t(h.kv_heads) * h.head_dim);
    max_q_width = std::max<int64_t>(max_q_width, int64_t(h.heads) * h.head_dim);
  }
  // Cache blocks: enough for the largest point (+ one partial block per sequence).
  int64_t max_blocks = 0, max_tokens = 0, max_seqs = 0, max_bps = 0;
  for (const auto& pt : pts) {
    const int64_t bps = (pt.kv_len + kBlockTokens - 1) / kBlockTokens;
    max_blocks = std::max(max_blocks, bps * pt.batch);
    max_tokens = std::max(max_tokens, pt.batch * pt.q_len);
    max_seqs = std::max<int64_t>(max_seqs, pt.batch);
    max_bps = std::max(max_bps, bps);
  }
  const int64_t cache_elems = max_blocks * kBlockTokens * max_kv_width;  // [blocks, block, kv_heads, head_dim]
  gpu::DeviceBuffer kc(cache_elems * 2), vc(cache_elems * 2), q(max_tokens * max_q_width * 2),
      o(max_tokens * max_q_width * 2), table(max_seqs * max_bps * 4), q_start((max_seqs + 1) * 4),
      seq_lens(max_seqs * 4);
  fill(kc.get(), cache_elems, DType::bf16, 71, -1, 1, s);
  fill(vc.get(), cache_elems, DType::bf16, 72, -1, 1, s);
  fill(q.get(), max_tokens * max_q_width, DType::bf16, 73, -1, 1, s);
  gpu::DeviceBuffer ws;
  fmt::print(out.table, "#{:>7} {:>4} {:>3} {:>4} {:>6} {:>7} {:>7} | {:>10} {:>8} {:>6} {:>6}  {}\n", "kind", "hq",
             "hkv", "hd", "batch", "q_len", "kv_len", "time(us)", "GB/s", "noise", "splits", "config");
  std::size_t i = 0;
  for (const auto& h : cfgs) {
    progress_line(out, fmt::format("attention {} heads={} kv_heads={} head_dim={}", h.label, h.heads, h.kv_heads,
                                   h.head_dim),
                  ++i, cfgs.size());
    for (const auto& pt : pts) {
      const int64_t bps = (pt.kv_len + kBlockTokens - 1) / kBlockTokens;
      std::vector<int32_t> tab(std::size_t(pt.batch * bps)), qs(std::size_t(pt.batch) + 1), sl(std::size_t(pt.batch));
      for (int64_t b = 0; b < pt.batch * bps; ++b) tab[std::size_t(b)] = int32_t(b);
      for (int b = 0; b < pt.batch; ++b) {
        qs[std::size_t(b) + 1] = int32_t((b + 1) * pt.q_len);
        sl[std::size_t(b)] = int32_t(pt.kv_len);
      }
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(table.get(), tab.data(), tab.size() * 4, cudaMemcpyHostToDevice, s));
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(q_start.get(), qs.data(), qs.size() * 4, cudaMemcpyHostToDevice, s));
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(seq_lens.get(), sl.data(), sl.size() * 4, cudaMemcpyHostToDevice, s));
      kernels::AttentionParams ap;
      ap.q = q.as<__nv_bfloat16>();
      ap.out = o.as<__nv_bfloat16>();
      ap.cache.k = kc.as<__nv_bfloat16>();
      ap.cache.v = vc.as<__nv_bfloat16>();
      ap.cache.block_table = table.as<int32_t>();
      ap.cache.num_blocks = max_blocks;
      ap.cache.block_tokens = kBlockTokens;
      ap.cache.kv_heads = h.kv_heads;
      ap.cache.head_dim = h.head_dim;
      ap.cache.max_blocks_per_seq = int(bps);
      ap.q_start = q_start.as<int32_t>();
      ap.seq_lens = seq_lens.as<int32_t>();
      ap.num_seqs = pt.batch;
      ap.num_tokens = pt.batch * pt.q_len;
      ap.q_heads = h.heads;
      ap.max_q_len = int(pt.q_len);
      ap.max_seq_len = int(pt.kv_len);
      const std::size_t wsb = kernels::attention_workspace_bytes(ap, ctx.device);
      if (wsb > ws.bytes()) ws = gpu::DeviceBuffer(wsb);
      ap.workspace = ws.get();
      ap.workspace_bytes = ws.bytes();
      const int splits = kernels::attention_num_splits(ap, ctx.device);
      const auto res = gpu::time_op([&](cudaStream_t st) { kernels::launch_attention(ap, st); }, s,
                                    timing_for(cfg, guess_point_us(h, pt), pt.decode), &ctx.flusher);
      const double kv_bytes = double(pt.batch) * double(pt.kv_len) * 2.0 * h.kv_heads * h.head_dim * 2.0;
      const char* kind = pt.decode ? "decode" : "prefill";
      fmt::print(out.table, " {:>7} {:>4} {:>3} {:>4} {:>6} {:>7} {:>7} | {:>10.2f} {:>8.0f} {:>6.3f} {:>6}  {}\n", kind,
                 h.heads, h.kv_heads, h.head_dim, pt.batch, pt.q_len, pt.kv_len, res.time_us.median,
                 kv_bytes / (res.time_us.median * 1e3), res.time_us.noise(), splits, h.label);
      AttentionPoint a;
      a.kind = kind;
      a.impl = "gqa";
      a.batch = pt.batch;
      a.q_len = pt.q_len;
      a.kv_len = pt.kv_len;
      a.num_heads = h.heads;
      a.num_kv_heads = h.kv_heads;
      a.head_dim = h.head_dim;
      a.time_us = res.time_us.median;
      p.attention.push_back(a);
      out.rows.push_back({{"bench", "attention"}, {"kind", kind}, {"num_heads", h.heads},
                          {"num_kv_heads", h.kv_heads}, {"head_dim", h.head_dim}, {"batch", pt.batch},
                          {"q_len", pt.q_len}, {"kv_len", pt.kv_len}, {"splits", splits},
                          {"time_us", res.time_us.median}, {"noise", res.time_us.noise()},
                          {"iters", res.time_us.count}, {"config", h.label}});
    }
  }
}

}  // namespace mixserve::profiler
