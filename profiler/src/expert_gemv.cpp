// The `expert_gemv` family of mixserve-profile: the two expert paths of the single-GPU executor
// (model_forward.cpp), timed as the executor runs them, bf16 weights (the executor's only dtype):
//   - the device grouped GEMV (executor/expert_gemm.hpp), routed rows 1, 2, 4 .. kDeviceGemvMaxRows
//     spread over the local experts as a router spreads them ("routed:K", profiler/shapes.hpp),
//     inside a CUDA graph (decode steps are graphs); points tagged "gemv:routed:K", for every expert family at MoE TP 1 and EP 1 plus --ep;
//   - the cuBLASLt path above kDeviceGemvMaxRows rows, eagerly: device->host copy of the expert
//     counts, stream sync, set_counts, one GEMM per non-empty expert spread over
//     kExpertGemmStreams streams as the executor's default (no graph, host launches in the timed
//     interval); rows 1024 .. 16384, EP 1 families; points tagged "eager:routed:K";
//   - the executor's automatic path above kDeviceGemvMaxRows, no graph (as a prefill step runs
//     it): the tensor-core grouped GEMM (kernels/grouped_gemm.cuh, one launch per projection,
//     rows from device offsets), or, at the rows where core/expert_path.hpp uses_expert_streams,
//     the executor's per-expert default (kExpertGemmDefault: the bucketed layout, one
//     cublasGemmBatchedEx per bucket of padded counts, after the host copy of the counts); rows
//     1024 .. 131072 (an 8 x 2048-token step of top-8), EP 1 families; points tagged
//     "grouped:routed:K".
#include <algorithm>
#include <memory>
#include <optional>
#include <ostream>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/kernels/grouped_gemm.cuh"
#include "mixserve/profiler/shapes.hpp"

namespace mixserve::profiler {
namespace {

struct Family {
  ExpertFamily f;
  bool eager = false;  // also time the eager cuBLASLt path and the grouped GEMM above the GEMV rows
  // The executor's device GEMV takes this model's experts (core/expert_path.hpp: both projections'
  // k fit the kernel, k <= kGemvMaxK = 32768; Mixtral's k = 14336 down projection since session 5).
  // When it does not, the executor runs the tensor-core grouped GEMM at every row count, decode
  // included: the family's grouped points then start at the GEMV's row counts (grouped_small) and
  // no GEMV is timed.
  bool gemv = true;
  bool grouped_small = false;
  // Rows per expert of every point: "routed:<top_k>" (profiler/shapes.hpp tokens_per_expert), the
  // scatter of a real router's rows; the first model's top_k when models share the shape.
  std::string distribution;
};

std::vector<Family> families(const ProfileConfig& cfg) {
  std::vector<int> eps = {1};
  for (int e : cfg.ep)
    if (std::find(eps.begin(), eps.end(), e) == eps.end()) eps.push_back(e);
  std::vector<Family> out;
  for (const auto& name : effective_models(cfg)) {
    const ModelSpec m = load_model(name);
    for (int ep : eps)
      for (auto f : model_expert_families(m, 1, ep)) {
        f.dtype = DType::bf16;
        gpu::GroupedGemvParams g;
        g.num_experts = f.num_experts;
        g.n = f.n;
        g.k = f.k;
        g.act = reinterpret_cast<const __nv_bfloat16*>(16);
        g.weights = g.act;
        g.out = reinterpret_cast<__nv_bfloat16*>(16);
        g.expert_offsets = reinterpret_cast<const int32_t*>(16);
        const bool gemv = gemv_k_fits(m.hidden_size) && gemv_k_fits(m.moe.expert_intermediate_size) &&
                          gpu::grouped_gemv_unsupported_reason(g).empty();
        const auto same = [&](const Family& o) {
          return o.f.num_experts == f.num_experts && o.f.n == f.n && o.f.k == f.k;
        };
        const auto it = std::find_if(out.begin(), out.end(), same);
        if (it == out.end()) {
          out.push_back({f, ep == 1 || !gemv, gemv, !gemv, fmt::format("routed:{}", m.moe.top_k)});
        } else {  // the same shape in another model or EP degree: time what either path needs
          it->eager = it->eager || ep == 1 || !gemv;
          it->gemv = it->gemv || gemv;
          it->grouped_small = it->grouped_small || !gemv;
        }
      }
  }
  return out;
}

std::vector<int64_t> gemv_rows() {
  std::vector<int64_t> r;
  for (int64_t x = 1; x <= kDeviceGemvMaxRows; x *= 2) r.push_back(x);
  return r;
}

const std::vector<int64_t> kEagerRows = {1024, 2048, 4096, 8192, 16384};
const std::vector<int64_t> kGroupedRows = {1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072};

std::vector<int32_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int32_t> off(counts.size() + 1, 0);
  for (std::size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + int32_t(counts[e]);
  return off;
}

}  // namespace

void profile_expert_gemv(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  const auto fams = families(cfg);
  const auto rows = gemv_rows();
  double est_total_us = 0;
  int64_t max_w = 1, max_act = 1, max_out = 1, max_e = 1;
  for (const auto& f : fams) {
    max_w = std::max(max_w, int64_t(f.f.num_experts) * f.f.n * f.f.k);
    max_e = std::max<int64_t>(max_e, f.f.num_experts);
    int64_t top = f.eager ? std::max(kEagerRows.back(), kGroupedRows.back()) : rows.back();
    if (f.eager)  // the bucketed layout's pad rows (kExpertGemmDefault at uses_expert_streams rows)
      top = expert_bucket_capacity(top, f.f.num_experts, kExpertBucketRowAlign);
    max_act = std::max(max_act, top * f.f.k);
    max_out = std::max(max_out, top * f.f.n);
    for (int64_t r : rows) {
      if (!f.gemv && !f.grouped_small) break;
      const double active = std::min<double>(f.f.num_experts, double(r));
      const double est = guess_us(0, active * double(f.f.n * f.f.k) * 2.0, DType::bf16);
      const auto t = timing_for(cfg, est, true);
      est_total_us += ((f.gemv ? 1 : 0) + (f.grouped_small ? 1 : 0)) *
                      ((est + 20.0) * (t.timed_iters + t.warmup_iters + 2) + 2000.0);
    }
    if (f.eager)
      for (int64_t r : kEagerRows) {
        const double est = guess_us(2.0 * r * f.f.n * f.f.k, double(f.f.num_experts * f.f.n * f.f.k) * 2.0,
                                    DType::bf16) + 6.0 * f.f.num_experts;
        const auto t = timing_for(cfg, est, false);
        est_total_us += (est + 20.0) * (t.timed_iters + t.warmup_iters + 2) + 2000.0;
      }
    if (f.eager)
      for (int64_t r : kGroupedRows) {
        const double est = guess_us(2.0 * r * f.f.n * f.f.k, double(f.f.num_experts * f.f.n * f.f.k) * 2.0, DType::bf16);
        const auto t = timing_for(cfg, est, false);
        est_total_us += (est + 20.0) * (t.timed_iters + t.warmup_iters + 2) + 2000.0;
      }
  }
  fmt::print(out.table,
             "#\n# Expert paths of the executor (bf16): device GEMV (graph) over {} row counts up to {}, eager "
             "cuBLASLt with host count copy over {} row counts and the grouped GEMM over {} (EP 1): {} families "
             "(estimated {:.0f} s)\n",
             rows.size(), kDeviceGemvMaxRows, kEagerRows.size(), kGroupedRows.size(), fams.size(), est_total_us / 1e6);
  if (cfg.dry_run) {
    for (const auto& f : fams)
      fmt::print(out.table, "#   {:<44} E {:>4} n {:>6} k {:>6}{}{}{}\n", f.f.label, f.f.num_experts, f.f.n,
                 f.f.k, f.gemv ? " gemv" : "", f.grouped_small ? " grouped(1..)" : "",
                 f.eager ? " grouped+eager" : "");
    return;
  }
  if (fams.empty()) return;
  // A merged profile's points of these shapes from the executor's own paths (tagged) are replaced
  // by this run's; other shapes' points stay.
  std::erase_if(p.experts, [&](const ExpertGemmPoint& e) {
    const bool ours = e.distribution.starts_with(kExpertGemvTag) || e.distribution.starts_with(kExpertEagerTag) ||
                      e.distribution.starts_with(kExpertGroupedTag);
    return ours && std::any_of(fams.begin(), fams.end(), [&](const Family& f) {
             return f.f.num_experts == e.num_experts && f.f.n == e.n && f.f.k == e.k;
           });
  });
  GpuContext ctx(cfg.device);
  cudaStream_t s = ctx.stream.get();
  gpu::DeviceBuffer w(max_w * 2), act(max_act * 2), o(max_out * 2), off((max_e + 1) * 4), counts_dev(max_e * 4);
  fill(w.get(), max_w, DType::bf16, 81, -1, 1, s);
  fill(act.get(), max_act, DType::bf16, 82, -1, 1, s);
  int32_t* counts_host = nullptr;
  MIXSERVE_CUDA_CHECK(cudaMallocHost(&counts_host, std::size_t(max_e) * 4));
  struct PinnedFree {
    int32_t* p;
    ~PinnedFree() { cudaFreeHost(p); }
  } pinned{counts_host};
  fmt::print(out.table, "#{:>4} {:>7} {:>7} {:>6} {:>8} {:>6} | {:>10} {:>8} {:>6}  {}\n", "E", "n", "k", "path", "rows",
             "active", "time(us)", "GB/s", "noise", "family");
  auto record = [&](const ExpertFamily& f, const char* path, const std::string& tag, int64_t r, int64_t max_rows,
                    int active, const gpu::TimingResult& res) {
    const double wbytes = double(active) * double(f.n * f.k) * 2.0;
    fmt::print(out.table, " {:>4} {:>7} {:>7} {:>6} {:>8} {:>6} | {:>10.2f} {:>8.0f} {:>6.3f}  {}\n", f.num_experts, f.n,
               f.k, path, r, active, res.time_us.median, wbytes / (res.time_us.median * 1e3), res.time_us.noise(),
               f.label);
    ExpertGemmPoint e;
    e.num_experts = f.num_experts;
    e.tokens = r;
    e.max_tokens = max_rows;
    e.active_experts = active;
    e.n = f.n;
    e.k = f.k;
    e.dtype = DType::bf16;
    e.distribution = tag;
    e.time_us = res.time_us.median;
    p.experts.push_back(e);
    out.rows.push_back({{"bench", "expert_gemv"}, {"path", path}, {"num_experts", f.num_experts}, {"n", f.n},
                        {"k", f.k}, {"distribution", tag}, {"rows", r}, {"max_rows", max_rows},
                        {"active_experts", active}, {"time_us", res.time_us.median}, {"noise", res.time_us.noise()},
                        {"iters", res.time_us.count}, {"family", f.label}});
  };
  std::unique_ptr<gpu::StreamFanout> fanout;  // made on the first per-expert cuBLASLt point
  std::size_t i = 0;
  for (const auto& fam : fams) {
    const ExpertFamily& f = fam.f;
    progress_line(out, fmt::format("expert_gemv {} E={} n={} k={}", f.label, f.num_experts, f.n, f.k), ++i,
                  fams.size());
    for (int64_t r : rows) {
      if (!fam.gemv) break;
      const auto counts = tokens_per_expert(fam.distribution, f.num_experts, r);
      const auto offsets = offsets_of(counts);
      MIXSERVE_CUDA_CHECK(
          cudaMemcpyAsync(off.get(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice, s));
      gpu::GroupedGemvParams g;
      g.act = act.as<__nv_bfloat16>();
      g.weights = w.as<__nv_bfloat16>();
      g.out = o.as<__nv_bfloat16>();
      g.expert_offsets = off.as<int32_t>();
      g.num_experts = f.num_experts;
      g.n = f.n;
      g.k = f.k;
      const int active = int(std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; }));
      const double est = guess_us(0, active * double(f.n * f.k) * 2.0, DType::bf16);
      const auto res = gpu::time_op([&](cudaStream_t st) { gpu::launch_grouped_gemv(g, st); }, s,
                                    timing_for(cfg, est, true), &ctx.flusher);
      record(f, "gemv", std::string(kExpertGemvTag) + fam.distribution, r, *std::max_element(counts.begin(), counts.end()),
             active, res);
    }
    // The executor's cuBLASLt branch (model_forward.cpp): counts to the host, sync, plan, run the
    // per-expert GEMMs on the streams. Empty result when cuBLASLt has no algorithm.
    std::optional<gpu::ExpertGemm> eg;
    auto time_per_expert = [&](int64_t r, const std::vector<int64_t>& counts, int active) -> std::optional<gpu::TimingResult> {
      if (!eg) eg.emplace(ctx.lt, f.num_experts, f.n, f.k, DType::bf16, ctx.workspace.get(), ctx.workspace.bytes());
      if (!fanout) fanout = std::make_unique<gpu::StreamFanout>(kExpertGemmStreams, ctx.workspace.bytes());
      std::vector<int32_t> c32(counts.begin(), counts.end());
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(counts_dev.get(), c32.data(), c32.size() * 4, cudaMemcpyHostToDevice, s));
      const int E = f.num_experts;
      auto op = [&](cudaStream_t st) {
        MIXSERVE_CUDA_CHECK(
            cudaMemcpyAsync(counts_host, counts_dev.get(), std::size_t(E) * 4, cudaMemcpyDeviceToHost, st));
        MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st));
        std::vector<int64_t> h(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) h[std::size_t(e)] = counts_host[e];
        eg->set_counts(h);
        eg->run(act.get(), w.get(), o.get(), nullptr, nullptr, st, *fanout);
      };
      const double est = guess_us(2.0 * r * f.n * f.k, active * double(f.n * f.k) * 2.0, DType::bf16) + 6.0 * active;
      try {
        return gpu::time_op(op, s, timing_for(cfg, est, false), &ctx.flusher);
      } catch (const RuntimeError& e) {
        fmt::print(out.table, "# skipped per-expert cuBLASLt E={} n={} k={} rows={}: {}\n", f.num_experts, f.n, f.k,
                   r, e.what());
        return std::nullopt;
      }
    };
    // The executor's default at uses_expert_streams rows (kExpertGemmDefault, the bucketed layout):
    // counts to the host, sync, padded counts, one cublasGemmBatchedEx per bucket. The pad and
    // gather kernels that lay the rows out are not timed (the per-expert path's gather is not
    // either: both are the permute's cost).
    std::optional<gpu::BlasHandle> blas;
    auto time_bucketed = [&](int64_t r, const std::vector<int64_t>& counts, int active) -> std::optional<gpu::TimingResult> {
      if (!eg) eg.emplace(ctx.lt, f.num_experts, f.n, f.k, DType::bf16, ctx.workspace.get(), ctx.workspace.bytes());
      if (!blas) blas.emplace();
      std::vector<int32_t> c32(counts.begin(), counts.end());
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(counts_dev.get(), c32.data(), c32.size() * 4, cudaMemcpyHostToDevice, s));
      const int E = f.num_experts;
      const gpu::BucketIssue issue = kExpertGemmDefault == kExpertGemmBucketed ? gpu::BucketIssue::grouped_call
                                                                               : gpu::BucketIssue::batched_per_bucket;
      auto op = [&](cudaStream_t st) {
        MIXSERVE_CUDA_CHECK(
            cudaMemcpyAsync(counts_host, counts_dev.get(), std::size_t(E) * 4, cudaMemcpyDeviceToHost, st));
        MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st));
        std::vector<int64_t> padded(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) padded[std::size_t(e)] = expert_bucket_rows(counts_host[e], kExpertBucketRowAlign);
        eg->run_bucketed_call(act.get(), w.get(), o.get(), padded, st, *blas, issue);
      };
      const double est = guess_us(2.0 * r * f.n * f.k, active * double(f.n * f.k) * 2.0, DType::bf16) + 20.0;
      try {
        return gpu::time_op(op, s, timing_for(cfg, est, false), &ctx.flusher);
      } catch (const RuntimeError& e) {
        fmt::print(out.table, "# skipped bucketed experts E={} n={} k={} rows={}: {}\n", f.num_experts, f.n, f.k, r,
                   e.what());
        return std::nullopt;
      }
    };
    std::vector<int64_t> grouped_rows;
    if (fam.grouped_small) grouped_rows = rows;
    if (fam.eager) grouped_rows.insert(grouped_rows.end(), kGroupedRows.begin(), kGroupedRows.end());
    for (int64_t r : grouped_rows) {
      const auto counts = tokens_per_expert(fam.distribution, f.num_experts, r);
      const auto offsets = offsets_of(counts);
      MIXSERVE_CUDA_CHECK(
          cudaMemcpyAsync(off.get(), offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice, s));
      kernels::GroupedGemmParams g;
      g.act = act.as<__nv_bfloat16>();
      g.weights = w.as<__nv_bfloat16>();
      g.out = o.as<__nv_bfloat16>();
      g.expert_offsets = off.as<int32_t>();
      g.num_experts = f.num_experts;
      g.n = f.n;
      g.k = f.k;
      if (const auto why = kernels::grouped_gemm_unsupported_reason(g, cfg.device); !why.empty()) {
        fmt::print(out.table, "# skipped grouped experts E={} n={} k={}: {}\n", f.num_experts, f.n, f.k, why);
        break;
      }
      const int active = int(std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; }));
      const int64_t max_rows = *std::max_element(counts.begin(), counts.end());
      if (uses_expert_streams(r, f.num_experts)) {  // what the executor runs at these rows
        const bool bucketed = is_bucketed_expert_gemm(kExpertGemmDefault);
        if (const auto res = bucketed ? time_bucketed(r, counts, active) : time_per_expert(r, counts, active))
          record(f, "grouped", std::string(kExpertGroupedTag) + fam.distribution, r, max_rows, active, *res);
        continue;
      }
      const double est = guess_us(2.0 * r * f.n * f.k, active * double(f.n * f.k) * 2.0, DType::bf16);
      const auto res = gpu::time_op([&](cudaStream_t st) { kernels::launch_grouped_gemm(g, st); }, s,
                                    timing_for(cfg, est, false), &ctx.flusher);
      record(f, "grouped", std::string(kExpertGroupedTag) + fam.distribution, r, max_rows, active, res);
    }
    if (!fam.eager) continue;
    for (int64_t r : kEagerRows) {
      const auto counts = tokens_per_expert(fam.distribution, f.num_experts, r);
      const int active = int(std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; }));
      if (const auto res = time_per_expert(r, counts, active))
        record(f, "eager", std::string(kExpertEagerTag) + fam.distribution, r,
               *std::max_element(counts.begin(), counts.end()), active, *res);
    }
  }
}

}  // namespace mixserve::profiler
