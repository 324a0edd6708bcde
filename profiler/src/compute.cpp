// Compute-side benchmarks: machine description, peaks, GEMM families, expert GEMMs, elementwise.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <ostream>
#include <sstream>

#include <cublas_v2.h>
#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/kernels/elementwise.cuh"
#include "mixserve/profiler/shapes.hpp"

namespace mixserve::profiler {

namespace {

std::string driver_version() {
  std::ifstream f("/proc/driver/nvidia/version");
  std::string line;
  if (!f || !std::getline(f, line)) return "unknown";
  // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ..."
  std::istringstream is(line);
  std::string tok;
  while (is >> tok)
    if (!tok.empty() && std::isdigit(static_cast<unsigned char>(tok[0])) && tok.find('.') != std::string::npos)
      return tok;
  return "unknown";
}

std::vector<int64_t> m_grid(const ProfileConfig& cfg) {
  return cfg.m_grid.empty() ? geometric_sizes(1, 16384, 2) : cfg.m_grid;
}
std::vector<int64_t> rows_grid(const ProfileConfig& cfg) {
  return cfg.expert_rows.empty() ? geometric_sizes(4, 65536, 4) : cfg.expert_rows;
}

int64_t elem_bytes(DType d) { return d == DType::bf16 ? 2 : 1; }

double peak_for(const HardwareProfile& p, DType d) {
  return d == DType::bf16 ? p.peak_tflops_bf16 : p.peak_tflops_fp8;
}

void progress(Output& out, const std::string& what, std::size_t i, std::size_t n) {
  fmt::print(out.progress, "[{:>4}/{:<4}] {}\n", i, n, what);
  out.progress.flush();
}

// Operand buffers large enough for every shape of a sweep, refilled when the dtype changes.
struct GemmBuffers {
  gpu::DeviceBuffer act, weight, out, act_scale, weight_scale;
  DType filled = DType::fp32;
  int64_t act_elems = 0, weight_elems = 0, out_elems = 0, act_scales = 0, weight_scales = 0;
  void allocate() {
    act = gpu::DeviceBuffer(std::max<int64_t>(act_elems, 1) * 2);
    weight = gpu::DeviceBuffer(std::max<int64_t>(weight_elems, 1) * 2);
    out = gpu::DeviceBuffer(std::max<int64_t>(out_elems, 1) * 2);
    act_scale = gpu::DeviceBuffer(std::max<int64_t>(act_scales, 1) * 4);
    weight_scale = gpu::DeviceBuffer(std::max<int64_t>(weight_scales, 1) * 4);
  }
  void ensure(DType d, cudaStream_t s) {
    if (filled == d) return;
    // Random data, never zeros (zeros run faster than real data on tensor cores).
    fill(act.get(), act_elems, d, 11, -1.0f, 1.0f, s);
    fill(weight.get(), weight_elems, d, 12, -1.0f, 1.0f, s);
    fill(act_scale.get(), std::max<int64_t>(act_scales, 1), DType::fp32, 13, 0.5f, 1.0f, s);
    fill(weight_scale.get(), std::max<int64_t>(weight_scales, 1), DType::fp32, 14, 0.5f, 1.0f, s);
    filled = d;
  }
  gpu::GemmOperands ops() const {
    return {act.get(), weight.get(), out.get(), act_scale.as<float>(), weight_scale.as<float>()};
  }
};

gpu::TimingResult time_gemm(GpuContext& ctx, const ProfileConfig& cfg, const gpu::GemmShape& s,
                            GemmBuffers& buf) {
  buf.ensure(s.dtype, ctx.stream.get());
  gpu::LtGemm g(ctx.lt, s, ctx.workspace.get(), ctx.workspace.bytes());
  const auto ops = buf.ops();
  const double est = guess_us(g.flops(), double(s.m * s.k + s.n * s.k) * elem_bytes(s.dtype) + 2.0 * s.m * s.n, s.dtype);
  return gpu::time_op([&](cudaStream_t st) { g.run(ops, st); }, ctx.stream.get(), timing_for(cfg, est, false),
                      &ctx.flusher);
}

}  // namespace

std::vector<std::string> effective_models(const ProfileConfig& cfg) {
  return cfg.models.empty() ? shipped_models() : cfg.models;
}

void describe_machine(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  const gpu::DeviceInfo info = gpu::query_device(cfg.device);
  p.version = 1;
  p.name = cfg.name;
  p.gpu = info.name.rfind("NVIDIA ", 0) == 0 ? info.name.substr(7) : info.name;
  p.source = "measured";
  p.sm_count = info.sm_count;
  p.memory_GiB = info.memory_GiB;
  p.versions = info.versions;
  p.versions["driver"] = driver_version();
  p.versions["device_name"] = info.name;
  p.versions["compute_capability"] = fmt::format("{}.{}", info.cc_major, info.cc_minor);
  p.versions["max_sm_clock_MHz"] = std::to_string(info.sm_clock_MHz);
  p.versions["max_mem_clock_MHz"] = std::to_string(info.mem_clock_MHz);
  p.versions["l2_bytes"] = std::to_string(info.l2_bytes);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  p.measured_on = fmt::format("{} {}", host, now_iso8601_utc());
  p.gemm_efficiency = 1.0;
  p.mem_efficiency = 1.0;
  fmt::print(out.table, "# mixserve-profile {}  device {}: {} ({} SMs, {:.1f} GiB, cc {}.{}, max SM clock {} MHz, memory clock {} MHz)\n",
             kMixServeVersion, cfg.device, info.name, info.sm_count, info.memory_GiB, info.cc_major, info.cc_minor,
             info.sm_clock_MHz, info.mem_clock_MHz);
  fmt::print(out.table, "# driver {}  CUDA runtime {}  cuBLASLt {}  NCCL {}\n", p.versions["driver"],
             p.versions["cuda_runtime"], p.versions["cublasLt"],
             p.versions.count("nccl") ? p.versions["nccl"] : "n/a");
  fmt::print(out.table, "# timing: CUDA events per run, median of up to {} runs (>= {}), L2 flushed before each run, noise = (p90 - p10) / median\n",
             cfg.timing.timed_iters, cfg.min_iters);
}

void measure_peaks(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  GpuContext ctx(cfg.device);
  const int64_t n = 8192;
  GemmBuffers buf;
  buf.act_elems = buf.weight_elems = buf.out_elems = n * n;
  buf.allocate();
  fmt::print(out.table, "#\n# Peaks (measured in this run; the profile's roofline ceilings)\n");
  for (DType d : {DType::bf16, DType::fp8_e4m3}) {
    const auto r = time_gemm(ctx, cfg, {n, n, n, d}, buf);
    const double tflops = 2.0 * n * n * n / (r.time_us.median * 1e6);
    (d == DType::bf16 ? p.peak_tflops_bf16 : p.peak_tflops_fp8) = tflops;
    fmt::print(out.table, "#   cuBLASLt {:>5} GEMM 8192^3   {:9.1f} us  {:7.1f} TFLOP/s  noise {:.3f}\n",
               to_string(d), r.time_us.median, tflops, r.time_us.noise());
    out.rows.push_back({{"bench", "peak"}, {"what", fmt::format("gemm_{}", to_string(d))}, {"time_us", r.time_us.median},
                        {"tflops", tflops}, {"noise", r.time_us.noise()}});
  }
  {  // fp32: cuBLAS SGEMM (no TF32), random fp32 data
    cublasHandle_t h = nullptr;
    MIXSERVE_CUBLAS_CHECK(cublasCreate(&h));
    gpu::DeviceBuffer a(n * n * 4), b(n * n * 4), c(n * n * 4);
    fill(a.get(), n * n, DType::fp32, 21, -1, 1, ctx.stream.get());
    fill(b.get(), n * n, DType::fp32, 22, -1, 1, ctx.stream.get());
    MIXSERVE_CUBLAS_CHECK(cublasSetStream(h, ctx.stream.get()));
    MIXSERVE_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH));
    const float one = 1.0f, zero = 0.0f;
    const int ni = static_cast<int>(n);
    gpu::TimingOptions t = cfg.timing;
    t.warmup_iters = 3;
    t.timed_iters = std::max(cfg.min_iters, 5);
    const auto r = gpu::time_op([&](cudaStream_t) {
      MIXSERVE_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &one, a.as<float>(), ni,
                                        b.as<float>(), ni, &zero, c.as<float>(), ni));
    }, ctx.stream.get(), t, &ctx.flusher);
    cublasDestroy(h);
    p.peak_tflops_fp32 = 2.0 * n * n * n / (r.time_us.median * 1e6);
    fmt::print(out.table, "#   cuBLAS SGEMM fp32 8192^3     {:9.1f} us  {:7.1f} TFLOP/s  noise {:.3f}\n",
               r.time_us.median, p.peak_tflops_fp32, r.time_us.noise());
    out.rows.push_back({{"bench", "peak"}, {"what", "sgemm_fp32"}, {"time_us", r.time_us.median},
                        {"tflops", p.peak_tflops_fp32}, {"noise", r.time_us.noise()}});
  }
  {  // device copy: bytes read + written
    const std::size_t bytes = std::size_t(2) << 30;
    gpu::DeviceBuffer src(bytes), dst(bytes);
    fill(src.get(), int64_t(bytes / 4), DType::fp32, 31, -1, 1, ctx.stream.get());
    gpu::TimingOptions t = cfg.timing;
    t.flush_l2 = false;
    t.warmup_iters = 3;
    t.timed_iters = 20;
    const auto r = gpu::time_op([&](cudaStream_t s) {
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, s));
    }, ctx.stream.get(), t, nullptr);
    p.mem_bw_GBps = 2.0 * double(bytes) / (r.time_us.median * 1e3);
    fmt::print(out.table, "#   device copy 2 GiB (read+write) {:7.1f} us  {:7.1f} GB/s    noise {:.3f}\n",
               r.time_us.median, p.mem_bw_GBps, r.time_us.noise());
    out.rows.push_back({{"bench", "peak"}, {"what", "copy_d2d"}, {"time_us", r.time_us.median},
                        {"GBps", p.mem_bw_GBps}, {"noise", r.time_us.noise()}});
  }
  {  // a minimal kernel: the fixed cost the roofline adds per kernel
    gpu::DeviceBuffer x(256), y(256), o(256);
    fill(x.get(), 8, DType::bf16, 41, -1, 1, ctx.stream.get());
    fill(y.get(), 8, DType::bf16, 42, -1, 1, ctx.stream.get());
    kernels::AxpbyParams ap;
    ap.x = x.as<__nv_bfloat16>();
    ap.y = y.as<__nv_bfloat16>();
    ap.out = o.as<__nv_bfloat16>();
    ap.num_elements = 8;
    gpu::TimingOptions t = cfg.timing;
    t.flush_l2 = false;
    t.timed_iters = 100;
    const auto r = gpu::time_op([&](cudaStream_t s) { kernels::launch_axpby(ap, s); }, ctx.stream.get(), t, nullptr);
    p.kernel_launch_us = r.time_us.median;
    fmt::print(out.table, "#   minimal kernel (axpby, 8 elements), event-timed {:.2f} us\n", r.time_us.median);
  }
}

void profile_gemm(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  std::vector<GemmFamily> fams = generic_gemm_families(cfg.generic_dims);
  for (const auto& name : effective_models(cfg)) {
    const ModelSpec m = load_model(name);
    for (int tp : cfg.tp)
      for (auto& f : model_gemm_families(m, tp)) fams.push_back(f);
  }
  fams = unique_families(std::move(fams));
  std::stable_sort(fams.begin(), fams.end(), [](const GemmFamily& a, const GemmFamily& b) { return int(a.dtype) < int(b.dtype); });
  const auto ms = m_grid(cfg);
  GemmBuffers buf;
  double est_total_us = 0;
  for (const auto& f : fams)
    for (int64_t m : ms) {
      const gpu::GemmShape s{m, f.n, f.k, f.dtype};
      const int64_t rows = gpu::gemm_rows_padded(s);
      buf.act_elems = std::max(buf.act_elems, rows * f.k);
      buf.weight_elems = std::max(buf.weight_elems, f.n * f.k);
      buf.out_elems = std::max(buf.out_elems, rows * f.n);
      if (f.dtype == DType::fp8_block) {
        buf.act_scales = std::max(buf.act_scales, gpu::act_scale_count(s));
        buf.weight_scales = std::max(buf.weight_scales, gpu::weight_scale_count(s));
      }
      const double est = guess_us(2.0 * m * f.n * f.k, double(m * f.k + f.n * f.k) * elem_bytes(f.dtype), f.dtype);
      const auto t = timing_for(cfg, est, false);
      est_total_us += (est + 40.0) * (t.timed_iters + t.warmup_iters) + 2000.0;
    }
  fmt::print(out.table, "#\n# GEMM: {} families x {} values of m = {} shapes (estimated {:.0f} s)\n", fams.size(),
             ms.size(), fams.size() * ms.size(), est_total_us / 1e6);
  if (cfg.dry_run) {
    for (const auto& f : fams) fmt::print(out.table, "#   {:<40} n {:>7} k {:>7} {}\n", f.label, f.n, f.k, to_string(f.dtype));
    return;
  }
  GpuContext ctx(cfg.device);
  buf.allocate();
  fmt::print(out.table, "#{:>8} {:>8} {:>8} {:>13} | {:>10} {:>8} {:>6} {:>6}  {}\n", "m", "n", "k", "dtype", "time(us)",
             "TFLOP/s", "%peak", "noise", "family");
  std::size_t i = 0;
  for (const auto& f : fams) {
    progress(out, fmt::format("gemm {} n={} k={} {}", f.label, f.n, f.k, to_string(f.dtype)), ++i, fams.size());
    for (int64_t m : ms) {
      const gpu::GemmShape s{m, f.n, f.k, f.dtype};
      gpu::TimingResult r;
      try {
        r = time_gemm(ctx, cfg, s, buf);
      } catch (const RuntimeError& e) {  // e.g. no cuBLASLt algorithm for this shape: say so, go on
        fmt::print(out.table, "# skipped m={} n={} k={} {}: {}\n", m, f.n, f.k, to_string(f.dtype), e.what());
        out.rows.push_back({{"bench", "gemm"}, {"m", m}, {"n", f.n}, {"k", f.k}, {"dtype", to_string(f.dtype)},
                            {"skipped", e.what()}});
        continue;
      }
      const double tflops = 2.0 * m * f.n * f.k / (r.time_us.median * 1e6);
      const double peak = peak_for(p, f.dtype);
      fmt::print(out.table, " {:>8} {:>8} {:>8} {:>13} | {:>10.2f} {:>8.1f} {:>6.1f} {:>6.3f}  {}\n", m, f.n, f.k,
                 to_string(f.dtype), r.time_us.median, tflops, peak > 0 ? 100.0 * tflops / peak : 0.0,
                 r.time_us.noise(), f.label);
      GemmPoint g;
      g.m = m;
      g.n = f.n;
      g.k = f.k;
      g.dtype = f.dtype;
      g.time_us = r.time_us.median;
      p.gemm.push_back(g);
      out.rows.push_back({{"bench", "gemm"}, {"m", m}, {"n", f.n}, {"k", f.k}, {"dtype", to_string(f.dtype)},
                          {"time_us", r.time_us.median}, {"min_us", r.time_us.min}, {"p90_us", r.time_us.p90},
                          {"noise", r.time_us.noise()}, {"iters", r.time_us.count}, {"tflops", tflops},
                          {"family", f.label}});
    }
  }
}

void profile_experts(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  std::vector<ExpertFamily> fams;
  for (const auto& name : effective_models(cfg)) {
    const ModelSpec m = load_model(name);
    for (int tp : {1, 8})
      for (int ep : cfg.ep)
        for (auto& f : model_expert_families(m, tp, ep)) fams.push_back(f);
  }
  fams = unique_families(std::move(fams));
  const auto rows = rows_grid(cfg);
  int64_t max_w = 1, max_act = 1, max_out = 1, max_as = 1, max_ws = 1;
  double est_total_us = 0;
  for (const auto& f : fams) {
    const gpu::GemmShape one{1, f.n, f.k, f.dtype};
    max_w = std::max(max_w, int64_t(f.num_experts) * f.n * f.k);
    max_ws = std::max(max_ws, int64_t(f.num_experts) * gpu::weight_scale_count(one));
    for (int64_t r : rows) {
      const int64_t padded = r + 4 * f.num_experts;
      max_act = std::max(max_act, padded * f.k);
      max_out = std::max(max_out, padded * f.n);
      max_as = std::max(max_as, (f.k + 127) / 128 * padded);
      const double active = std::min<double>(f.num_experts, double(r));
      const double est = guess_us(2.0 * r * f.n * f.k, active * f.n * f.k * elem_bytes(f.dtype), f.dtype) + 3.0 * active;
      const auto t = timing_for(cfg, est, true);
      est_total_us += cfg.distributions.size() * ((est + 40.0) * (t.timed_iters + t.warmup_iters + 2) + 5000.0);
    }
  }
  fmt::print(out.table, "#\n# Expert GEMMs (one cuBLASLt GEMM per non-empty expert, CUDA graph): {} families x {} row counts x {} distributions (estimated {:.0f} s)\n",
             fams.size(), rows.size(), cfg.distributions.size(), est_total_us / 1e6);
  if (cfg.dry_run) {
    for (const auto& f : fams)
      fmt::print(out.table, "#   {:<44} E {:>4} n {:>6} k {:>6} {}\n", f.label, f.num_experts, f.n, f.k, to_string(f.dtype));
    return;
  }
  GpuContext ctx(cfg.device);
  gpu::DeviceBuffer w(max_w * 2), act(max_act * 2), o(max_out * 2), as(max_as * 4), ws(max_ws * 4);
  fill(as.get(), max_as, DType::fp32, 51, 0.5f, 1.0f, ctx.stream.get());
  fill(ws.get(), max_ws, DType::fp32, 52, 0.5f, 1.0f, ctx.stream.get());
  DType filled = DType::fp32;
  fmt::print(out.table, "#{:>4} {:>7} {:>7} {:>13} {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>6}  {}\n", "E", "n", "k",
             "dtype", "dist", "rows", "max_rows", "active", "time(us)", "TFLOP/s", "noise", "family");
  std::size_t i = 0;
  for (const auto& f : fams) {
    progress(out, fmt::format("experts {} E={} n={} k={} {}", f.label, f.num_experts, f.n, f.k, to_string(f.dtype)), ++i,
             fams.size());
    if (filled != f.dtype) {
      fill(w.get(), max_w, f.dtype, 53, -1, 1, ctx.stream.get());
      fill(act.get(), max_act, f.dtype, 54, -1, 1, ctx.stream.get());
      filled = f.dtype;
    }
    gpu::ExpertGemm eg(ctx.lt, f.num_experts, f.n, f.k, f.dtype, ctx.workspace.get(), ctx.workspace.bytes());
    for (const auto& dist : cfg.distributions)
      for (int64_t r : rows) {
        const auto counts = tokens_per_expert(dist, f.num_experts, r);
        try {
          eg.set_counts(counts);
        } catch (const RuntimeError& e) {
          fmt::print(out.table, "# skipped experts E={} n={} k={} {} {} rows={}: {}\n", f.num_experts, f.n, f.k,
                     to_string(f.dtype), dist, r, e.what());
          continue;
        }
        const int active = static_cast<int>(std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; }));
        const int64_t max_rows = *std::max_element(counts.begin(), counts.end());
        const double est = guess_us(eg.flops(), active * double(f.n * f.k) * elem_bytes(f.dtype), f.dtype) + 3.0 * active;
        gpu::TimingResult res;
        try {
          res = gpu::time_op(
              [&](cudaStream_t s) { eg.run(act.get(), w.get(), o.get(), as.as<float>(), ws.as<float>(), s); },
              ctx.stream.get(), timing_for(cfg, est, true), &ctx.flusher);
        } catch (const RuntimeError& e) {
          fmt::print(out.table, "# skipped experts E={} n={} k={} {} {} rows={}: {}\n", f.num_experts, f.n, f.k,
                     to_string(f.dtype), dist, r, e.what());
          out.rows.push_back({{"bench", "experts"}, {"family", f.label}, {"rows", r}, {"distribution", dist},
                              {"skipped", e.what()}});
          continue;
        }
        const double tflops = eg.flops() / (res.time_us.median * 1e6);
        fmt::print(out.table, " {:>4} {:>7} {:>7} {:>13} {:>10} {:>8} {:>8} {:>6} | {:>10.2f} {:>8.1f} {:>6.3f}  {}\n",
                   f.num_experts, f.n, f.k, to_string(f.dtype), dist, r, max_rows, active, res.time_us.median, tflops,
                   res.time_us.noise(), f.label);
        ExpertGemmPoint e;
        e.num_experts = f.num_experts;
        e.tokens = r;
        e.max_tokens = max_rows;
        e.active_experts = active;
        e.n = f.n;
        e.k = f.k;
        e.dtype = f.dtype;
        e.distribution = dist;
        e.time_us = res.time_us.median;
        p.experts.push_back(e);
        out.rows.push_back({{"bench", "experts"}, {"num_experts", f.num_experts}, {"n", f.n}, {"k", f.k},
                            {"dtype", to_string(f.dtype)}, {"distribution", dist}, {"rows", r},
                            {"max_rows", max_rows}, {"active_experts", active}, {"time_us", res.time_us.median},
                            {"noise", res.time_us.noise()}, {"iters", res.time_us.count}, {"family", f.label}});
      }
  }
}

void profile_elementwise(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  const auto sizes = geometric_sizes(int64_t(1) << 10, int64_t(1) << 29, 2);
  fmt::print(out.table, "#\n# Elementwise axpby (bf16, out = a*x + b*y; bytes = 3 * 2 * elements), {} sizes\n", sizes.size());
  if (cfg.dry_run) return;
  GpuContext ctx(cfg.device);
  const int64_t max_n = sizes.back();
  gpu::DeviceBuffer x(max_n * 2), y(max_n * 2), o(max_n * 2);
  fill(x.get(), max_n, DType::bf16, 61, -1, 1, ctx.stream.get());
  fill(y.get(), max_n, DType::bf16, 62, -1, 1, ctx.stream.get());
  fmt::print(out.table, "#{:>12} {:>14} | {:>10} {:>10} {:>6} {:>6}\n", "elements", "bytes", "time(us)", "GB/s", "%copy", "noise");
  for (int64_t n : sizes) {
    kernels::AxpbyParams ap;
    ap.x = x.as<__nv_bfloat16>();
    ap.y = y.as<__nv_bfloat16>();
    ap.out = o.as<__nv_bfloat16>();
    ap.num_elements = n;
    ap.alpha = 0.5f;
    ap.beta = 2.0f;
    const double bytes = 6.0 * double(n);
    const auto r = gpu::time_op([&](cudaStream_t s) { kernels::launch_axpby(ap, s); }, ctx.stream.get(),
                                timing_for(cfg, guess_us(0, bytes, DType::bf16), false), &ctx.flusher);
    const double gbps = bytes / (r.time_us.median * 1e3);
    fmt::print(out.table, " {:>12} {:>14.0f} | {:>10.2f} {:>10.1f} {:>6.1f} {:>6.3f}\n", n, bytes, r.time_us.median, gbps,
               p.mem_bw_GBps > 0 ? 100.0 * gbps / p.mem_bw_GBps : 0.0, r.time_us.noise());
    p.elementwise.push_back({bytes, r.time_us.median});
    out.rows.push_back({{"bench", "elementwise"}, {"elements", n}, {"bytes", bytes}, {"time_us", r.time_us.median},
                        {"GBps", gbps}, {"noise", r.time_us.noise()}, {"iters", r.time_us.count}});
  }
}

}  // namespace mixserve::profiler
