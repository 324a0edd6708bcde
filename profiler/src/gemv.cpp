// The `gemv` family of mixserve-profile: the decode kernels of the single-GPU executor
// (docs/forward.md "Decode step", core/decode_path.hpp), timed as a decode step runs them: inside
// a CUDA graph, L2 flushed before each run (a decode step streams weights far larger than L2),
// bf16 weights, rows 1 .. kDecodeGemvMaxTokens:
//   - launch_gemv over the unsharded shapes of the shipped GQA models: q|k|v fused (n = (heads +
//     2 kv_heads) * head_dim, k = hidden, bias in the epilogue when the model has one), o_proj,
//     the dense FFN and shared expert gate|up ("gemv") and down with the SwiGLU applied to its
//     [m, 2k] input ("gemv_swiglu"), the router logits with fp32 out ("gemv_fp32"): the
//     profile's tables.gemv;
//   - launch_grouped_gemv_v2 over the models' expert families at EP 1, tokens 1 .. 8, rows =
//     tokens * top_k, each token on top_k distinct experts drawn at random ("routed:K",
//     profiler/shapes.hpp; at most `tokens` rows per expert, as the executor bounds them), the
//     down projection with its SwiGLU input: expert points tagged "gemv2:routed:K".
// Sharded models keep the previous kernels (decode_kernels off), so only TP 1 / EP 1 is timed.
#include <algorithm>
#include <ostream>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/kernels/rmsnorm.cuh"
#include "mixserve/profiler/shapes.hpp"

namespace mixserve::profiler {
namespace {

struct DenseShape {
  std::string label;
  std::string impl;  // kGemvImpl*
  int64_t n = 0, k = 0;
  bool bias = false;
};

struct V2Shape {
  std::string label;
  int num_experts = 0;
  int64_t n = 0, k = 0;
  int top_k = 0;
  bool swiglu = false;  // the down projection
};

gpu::GemvParams dense_params(const DenseShape& d, int64_t rows) {
  gpu::GemvParams g;
  g.num_rows = rows;
  g.n = d.n;
  g.k = d.k;
  g.seg[0] = {reinterpret_cast<void*>(16), d.n};
  g.out_fp32 = d.impl == kGemvImplFp32;
  g.swiglu_act = d.impl == kGemvImplSwiglu;
  return g;
}

void collect_shapes(const ProfileConfig& cfg, std::vector<DenseShape>& dense, std::vector<V2Shape>& v2) {
  auto add_dense = [&](const ModelSpec& m, const char* what, std::string_view impl, int64_t n, int64_t k, bool bias) {
    if (n <= 0 || k <= 0) return;
    for (const auto& d : dense)
      if (d.impl == impl && d.n == n && d.k == k && d.bias == bias) return;
    DenseShape d{fmt::format("{} {}", m.name, what), std::string(impl), n, k, bias};
    gpu::GemvParams g = dense_params(d, 1);
    g.act = reinterpret_cast<const __nv_bfloat16*>(16);
    g.weights = g.act;
    if (!gpu::gemv_unsupported_reason(g).empty()) return;
    dense.push_back(d);
  };
  for (const auto& name : effective_models(cfg)) {
    const ModelSpec m = load_model(name);
    const AttentionSpec& a = m.attention;
    if (a.type == AttentionType::mla) continue;  // not run by the executor
    const int64_t H = m.hidden_size, qw = int64_t(a.num_heads) * a.head_dim, kvw = int64_t(a.num_kv_heads) * a.head_dim;
    add_dense(m, "attn.qkv", kGemvImplPlain, qw + 2 * kvw, H, a.qkv_bias);
    add_dense(m, "attn.o_proj", kGemvImplPlain, H, qw, false);
    if (m.num_dense_layers() > 0 && m.dense_intermediate_size > 0) {
      add_dense(m, "dense.gate_up", kGemvImplPlain, 2 * m.dense_intermediate_size, H, false);
      add_dense(m, "dense.down", kGemvImplSwiglu, H, m.dense_intermediate_size, false);
    }
    if (m.moe.num_experts > 0) {
      add_dense(m, "moe.router", kGemvImplFp32, m.moe.num_experts, H, false);
      if (m.moe.has_shared_expert()) {
        add_dense(m, "moe.shared.gate_up", kGemvImplPlain, 2 * m.moe.shared_intermediate_size, H, false);
        add_dense(m, "moe.shared.down", kGemvImplSwiglu, H, m.moe.shared_intermediate_size, false);
      }
      for (const auto& f : model_expert_families(m, 1, 1)) {
        V2Shape s{f.label, f.num_experts, f.n, f.k, m.moe.top_k, f.label.ends_with("experts.down")};
        gpu::GroupedGemvParams g;
        g.num_experts = s.num_experts;
        g.n = s.n;
        g.k = s.k;
        g.swiglu_act = s.swiglu;
        g.act = reinterpret_cast<const __nv_bfloat16*>(16);
        g.weights = g.act;
        g.out = reinterpret_cast<__nv_bfloat16*>(16);
        g.expert_offsets = reinterpret_cast<const int32_t*>(16);
        if (!gpu::grouped_gemv_v2_unsupported_reason(g).empty()) continue;
        const bool seen = std::any_of(v2.begin(), v2.end(), [&](const V2Shape& o) {
          return o.num_experts == s.num_experts && o.n == s.n && o.k == s.k && o.top_k == s.top_k &&
                 o.swiglu == s.swiglu;
        });
        if (!seen) v2.push_back(s);
      }
    }
  }
}

// HardwareProfile::graph_launch: a minimal kernel (RMSNorm of one 2048-wide bf16 row, as a decode
// step's norms) timed alone as a graph of one launch and eagerly, L2 flushed (as the table points
// are timed), then per kernel inside a graph of kChain back-to-back launches with programmatic
// dependent launch (as a decode step's graph runs its kernels).
void measure_graph_launch(const ProfileConfig& cfg, GpuContext& ctx, HardwareProfile& p, Output& out) {
  constexpr int kWidth = 2048, kChain = 64;
  cudaStream_t s = ctx.stream.get();
  gpu::DeviceBuffer x(kWidth * 2), w(kWidth * 2), y(kWidth * 2);
  fill(x.get(), kWidth, DType::bf16, 94, -1, 1, s);
  fill(w.get(), kWidth, DType::bf16, 95, 0.5f, 1.5f, s);
  kernels::RmsNormParams r;
  r.x = x.as<__nv_bfloat16>();
  r.weight = w.as<__nv_bfloat16>();
  r.out = y.as<__nv_bfloat16>();
  r.num_rows = 1;
  r.width = kWidth;
  auto one = [&](cudaStream_t st) { kernels::launch_rmsnorm(r, st); };
  const auto graph1 = gpu::time_op(one, s, timing_for(cfg, 3.0, true), &ctx.flusher);
  const auto eager1 = gpu::time_op(one, s, timing_for(cfg, 3.0, false), &ctx.flusher);
  kernels::RmsNormParams rp = r;
  rp.pdl = true;
  const auto chain = gpu::time_op(
      [&](cudaStream_t st) {
        for (int i = 0; i < kChain; ++i) kernels::launch_rmsnorm(rp, st);
      },
      s, timing_for(cfg, 3.0 * kChain, true), &ctx.flusher);
  // The same with the weight-streaming kernel a decode step alternates with its norms: a GEMV of
  // one row over a 2048 x 4096 bf16 weight (16 MiB, o_proj-sized), every launch of the chain on
  // its own weights (no L2 reuse), alone as a graph of one launch (as the GEMV points are timed).
  constexpr int64_t kN = 2048, kK = 4096;
  constexpr int kPairs = kChain / 2;
  gpu::DeviceBuffer gw(int64_t(kPairs) * kN * kK * 2), ga(kK * 2), go(kN * 2);
  fill(gw.get(), int64_t(kPairs) * kN * kK, DType::bf16, 96, -1, 1, s);
  fill(ga.get(), kK, DType::bf16, 97, -1, 1, s);
  gpu::GemvParams gp;
  gp.act = ga.as<__nv_bfloat16>();
  gp.weights = gw.as<__nv_bfloat16>();
  gp.seg[0] = {go.get(), kN};
  gp.num_rows = 1;
  gp.n = kN;
  gp.k = kK;
  const auto gemv1 = gpu::time_op([&](cudaStream_t st) { gpu::launch_gemv(gp, st); }, s,
                                  timing_for(cfg, 8.0, true), &ctx.flusher);
  const auto mixed = gpu::time_op(
      [&](cudaStream_t st) {
        for (int i = 0; i < kPairs; ++i) {
          kernels::launch_rmsnorm(rp, st);
          gpu::GemvParams gi = gp;
          gi.weights = gw.as<__nv_bfloat16>() + int64_t(i) * kN * kK;
          gi.pdl = true;
          gpu::launch_gemv(gi, st);
        }
      },
      s, timing_for(cfg, 10.0 * kChain, true), &ctx.flusher);
  p.graph_launch.alone_gemv_us = gemv1.time_us.median;
  p.graph_launch.mixed_chain_us = mixed.time_us.median / kChain;
  p.graph_launch.alone_graph_us = graph1.time_us.median;
  p.graph_launch.alone_eager_us = eager1.time_us.median;
  p.graph_launch.chain_us = chain.time_us.median / kChain;
  p.graph_launch.chain_kernels = kChain;
  p.graph_launch.measured_with = fmt::format(
      "mixserve-profile gemv: RMSNorm 1 x {} bf16 and GEMV 1 x {} x {} bf16 alone (graph of 1; the norm also "
      "eager; L2 flushed), {} norms and {} norm+GEMV pairs back to back in a graph with programmatic dependent "
      "launch | {} | {}",
      kWidth, kN, kK, kChain, kChain / 2, p.gpu, now_iso8601_utc());
  fmt::print(out.table,
             "# Graph launches: RMSNorm alone {:.2f} us (graph of 1), {:.2f} us (eager), {:.2f} us each in a chain "
             "of {} -> {:.2f} us saved per launch of a graphed step; GEMV 16 MiB alone {:.2f} us, norm+GEMV pairs "
             "{:.2f} us per kernel ({:.2f} us saved per launch, recorded, not used)\n",
             p.graph_launch.alone_graph_us, p.graph_launch.alone_eager_us, p.graph_launch.chain_us, kChain,
             p.graph_launch.saving_us(), p.graph_launch.alone_gemv_us, p.graph_launch.mixed_chain_us,
             p.graph_launch.mixed_saving_us());
  out.rows.push_back({{"bench", "graph_launch"}, {"alone_graph_us", p.graph_launch.alone_graph_us},
                      {"alone_eager_us", p.graph_launch.alone_eager_us}, {"chain_us", p.graph_launch.chain_us},
                      {"alone_gemv_us", p.graph_launch.alone_gemv_us},
                      {"mixed_chain_us", p.graph_launch.mixed_chain_us}, {"chain_kernels", kChain},
                      {"noise_chain", chain.time_us.noise()}, {"noise_mixed", mixed.time_us.noise()},
                      {"noise_graph1", graph1.time_us.noise()}, {"noise_eager1", eager1.time_us.noise()},
                      {"noise_gemv1", gemv1.time_us.noise()}});
}

}  // namespace

void profile_gemv(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  std::vector<DenseShape> dense;
  std::vector<V2Shape> v2;
  collect_shapes(cfg, dense, v2);
  const int64_t M = kDecodeGemvMaxTokens;
  double est_total_us = 0;
  int64_t max_w = 1, max_act = 1, max_out = 1, max_e = 1;
  for (const auto& d : dense) {
    max_w = std::max(max_w, d.n * d.k);
    max_act = std::max(max_act, M * d.k * 2);
    max_out = std::max(max_out, M * d.n * 2);  // fp32 out: twice the bf16 elements
    est_total_us += M * (guess_us(0, double(d.n * d.k) * 2.0, DType::bf16) + 20.0) *
                    (timing_for(cfg, 10.0, true).timed_iters + 4);
  }
  for (const auto& s : v2) {
    max_w = std::max(max_w, int64_t(s.num_experts) * s.n * s.k);
    max_act = std::max(max_act, M * s.top_k * s.k * 2);
    max_out = std::max(max_out, M * s.top_k * s.n);
    max_e = std::max<int64_t>(max_e, s.num_experts);
    est_total_us += M * (guess_us(0, double(M * s.top_k) * double(s.n * s.k) * 2.0, DType::bf16) + 20.0) *
                    (timing_for(cfg, 10.0, true).timed_iters + 4);
  }
  fmt::print(out.table,
             "#\n# Decode kernels of the executor (bf16, CUDA graph): launch_gemv over {} shapes and "
             "launch_grouped_gemv_v2 over {} expert families, 1 .. {} rows/tokens (estimated {:.0f} s)\n",
             dense.size(), v2.size(), M, est_total_us / 1e6);
  if (cfg.dry_run) {
    for (const auto& d : dense)
      fmt::print(out.table, "#   {:<44} {:<12} n {:>6} k {:>6}{}\n", d.label, d.impl, d.n, d.k, d.bias ? " +bias" : "");
    for (const auto& s : v2)
      fmt::print(out.table, "#   {:<44} {:<12} E {:>4} n {:>6} k {:>6} top_k {}\n", s.label,
                 s.swiglu ? "gemv2_swiglu" : "gemv2", s.num_experts, s.n, s.k, s.top_k);
    return;
  }
  GpuContext ctx(cfg.device);
  measure_graph_launch(cfg, ctx, p, out);
  if (dense.empty() && v2.empty()) return;
  cudaStream_t s = ctx.stream.get();
  gpu::DeviceBuffer w(max_w * 2), act(max_act * 2), o(max_out * 2), bias(max_out * 2), off((max_e + 1) * 4);
  fill(w.get(), max_w, DType::bf16, 91, -1, 1, s);
  fill(act.get(), max_act, DType::bf16, 92, -1, 1, s);
  fill(bias.get(), max_out, DType::bf16, 93, -1, 1, s);
  fmt::print(out.table, "# {:<12} {:>4} {:>7} {:>7} {:>6} | {:>10} {:>8} {:>6}  {}\n", "impl", "E", "n", "k", "rows",
             "time(us)", "GB/s", "noise", "shape");
  auto row = [&](const std::string& impl, int E, int64_t n, int64_t k, int64_t r, double wbytes,
                 const gpu::TimingResult& res, const std::string& label) {
    fmt::print(out.table, "  {:<12} {:>4} {:>7} {:>7} {:>6} | {:>10.2f} {:>8.0f} {:>6.3f}  {}\n", impl, E, n, k, r,
               res.time_us.median, wbytes / (res.time_us.median * 1e3), res.time_us.noise(), label);
    out.rows.push_back({{"bench", "gemv"}, {"impl", impl}, {"num_experts", E}, {"n", n}, {"k", k}, {"rows", r},
                        {"time_us", res.time_us.median}, {"noise", res.time_us.noise()},
                        {"iters", res.time_us.count}, {"shape", label}});
  };
  std::size_t i = 0;
  const std::size_t total = dense.size() + v2.size();
  for (const auto& d : dense) {
    progress_line(out, fmt::format("gemv {} {} n={} k={}", d.label, d.impl, d.n, d.k), ++i, total);
    for (int64_t r = 1; r <= M; ++r) {
      gpu::GemvParams g = dense_params(d, r);
      g.act = act.as<__nv_bfloat16>();
      g.weights = w.as<__nv_bfloat16>();
      g.seg[0] = {o.get(), d.n};
      if (d.bias) g.bias = bias.as<__nv_bfloat16>();
      const double wbytes = double(d.n * d.k) * 2.0;
      const auto res = gpu::time_op([&](cudaStream_t st) { gpu::launch_gemv(g, st); }, s,
                                    timing_for(cfg, guess_us(0, wbytes, DType::bf16), true), &ctx.flusher);
      row(d.impl, 1, d.n, d.k, r, wbytes, res, d.label);
      p.gemv.push_back(GemvPoint{d.impl, r, d.n, d.k, DType::bf16, res.time_us.median});
    }
  }
  for (const auto& f : v2) {
    progress_line(out, fmt::format("gemv2 {} E={} n={} k={}", f.label, f.num_experts, f.n, f.k), ++i, total);
    for (int64_t t = 1; t <= M; ++t) {
      const int64_t rows = t * f.top_k;
      const std::string dist = fmt::format("routed:{}", f.top_k);  // a router's scatter (shapes.hpp)
      const auto counts = tokens_per_expert(dist, f.num_experts, rows);
      std::vector<int32_t> offsets(counts.size() + 1, 0);
      for (std::size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + int32_t(counts[e]);
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(off.get(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice, s));
      gpu::GroupedGemvParams g;
      g.act = act.as<__nv_bfloat16>();
      g.weights = w.as<__nv_bfloat16>();
      g.out = o.as<__nv_bfloat16>();
      g.expert_offsets = off.as<int32_t>();
      g.num_experts = f.num_experts;
      g.n = f.n;
      g.k = f.k;
      g.max_rows = rows;
      g.max_rows_per_expert = t;
      g.swiglu_act = f.swiglu;
      const int active = int(std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; }));
      const double wbytes = double(active) * double(f.n * f.k) * 2.0;
      const auto res = gpu::time_op([&](cudaStream_t st) { gpu::launch_grouped_gemv_v2(g, st); }, s,
                                    timing_for(cfg, guess_us(0, wbytes, DType::bf16), true), &ctx.flusher);
      row(f.swiglu ? "gemv2_swiglu" : "gemv2", f.num_experts, f.n, f.k, rows, wbytes, res, f.label);
      ExpertGemmPoint e;
      e.num_experts = f.num_experts;
      e.tokens = rows;
      e.max_tokens = *std::max_element(counts.begin(), counts.end());
      e.active_experts = active;
      e.n = f.n;
      e.k = f.k;
      e.dtype = DType::bf16;
      e.distribution = std::string(kExpertGemvV2Tag) + dist;
      e.time_us = res.time_us.median;
      p.experts.push_back(e);
    }
  }
}

}  // namespace mixserve::profiler
