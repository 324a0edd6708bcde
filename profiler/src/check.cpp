// The prediction check: GEMM and expert shapes that are not in the profile's grid, timed now
// and predicted by the simulator's profile-table timer (sim::make_profile_timer) reading the
// profile; prints predicted vs measured and the error, nccl-tests style.
#include <algorithm>
#include <cmath>
#include <map>
#include <ostream>
#include <random>
#include <set>
#include <tuple>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/profiler/shapes.hpp"
#include "mixserve/sim/op_timer.hpp"

namespace mixserve::profiler {

namespace {

struct Case {
  std::string kind;  // "gemm", "gemm-offfamily", "experts"
  int64_t m = 0, n = 0, k = 0;
  int num_experts = 0;
  DType dtype = DType::bf16;
};

int64_t draw_log(std::mt19937_64& rng, int64_t lo, int64_t hi, const std::set<int64_t>& avoid) {
  std::uniform_real_distribution<double> u(std::log(double(lo)), std::log(double(hi)));
  for (int tries = 0; tries < 1000; ++tries) {
    const int64_t v = std::llround(std::exp(u(rng)));
    if (v >= lo && v <= hi && !avoid.count(v)) return v;
  }
  throw RuntimeError(fmt::format("prediction check: no value in [{}, {}] outside the grid", lo, hi));
}

std::vector<Case> draw_cases(const HardwareProfile& p, int count) {
  std::map<std::tuple<int64_t, int64_t, int>, std::set<int64_t>> gemm_fams;
  for (const auto& g : p.gemm) gemm_fams[{g.n, g.k, int(g.dtype)}].insert(g.m);
  std::map<std::tuple<int, int64_t, int64_t, int>, std::set<int64_t>> exp_fams;
  for (const auto& e : p.experts)
    if (e.distribution == "uniform") exp_fams[{e.num_experts, e.n, e.k, int(e.dtype)}].insert(e.tokens);
  if (gemm_fams.empty()) throw InputError("prediction check: the profile has no GEMM table");
  std::vector<std::tuple<int64_t, int64_t, int>> gkeys;
  for (const auto& [k, v] : gemm_fams) gkeys.push_back(k);
  std::vector<std::tuple<int, int64_t, int64_t, int>> ekeys;
  for (const auto& [k, v] : exp_fams) ekeys.push_back(k);
  std::mt19937_64 rng(20261129);  // fixed seed: the same cases for the same profile
  const int n_exp = ekeys.empty() ? 0 : count * 4 / 15;   // 8 of 30
  const int n_off = count * 2 / 15;                       // 4 of 30
  const int n_in = count - n_exp - n_off;                 // 18 of 30
  std::vector<Case> cases;
  auto pick = [&](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng); };
  for (int i = 0; i < n_in; ++i) {
    const auto& key = gkeys[pick(gkeys.size())];
    const auto& ms = gemm_fams[key];
    Case c{"gemm", 0, std::get<0>(key), std::get<1>(key), 0, DType(std::get<2>(key))};
    c.m = draw_log(rng, std::max<int64_t>(*ms.begin(), 2), *ms.rbegin(), ms);
    cases.push_back(c);
  }
  for (int i = 0; i < n_off; ++i) {  // (n, k) in no family: the timer scales the nearest family
    const auto& key = gkeys[pick(gkeys.size())];
    const auto& ms = gemm_fams[key];
    Case c{"gemm-offfamily", 0, std::get<0>(key) * 3 / 2 / 128 * 128, std::get<1>(key) * 3 / 4 / 128 * 128, 0,
           DType(std::get<2>(key))};
    c.n = std::max<int64_t>(c.n, 128);
    c.k = std::max<int64_t>(c.k, 128);
    c.m = draw_log(rng, std::max<int64_t>(*ms.begin(), 2), *ms.rbegin(), ms);
    cases.push_back(c);
  }
  for (int i = 0; i < n_exp; ++i) {
    const auto& key = ekeys[pick(ekeys.size())];
    const auto& rs = exp_fams[key];
    Case c{"experts", 0, std::get<1>(key), std::get<2>(key), std::get<0>(key), DType(std::get<3>(key))};
    c.m = draw_log(rng, *rs.begin(), *rs.rbegin(), rs);
    cases.push_back(c);
  }
  return cases;
}

}  // namespace

double check_predictions(const ProfileConfig& cfg, const HardwareProfile& p, int count, Output& out) {
  // The simulator's expert curves are keyed by (class, experts, n, k) over rows, without the
  // routing distribution, so the timer is given the uniform-routing points only.
  HardwareProfile uniform = p;
  uniform.experts.erase(std::remove_if(uniform.experts.begin(), uniform.experts.end(),
                                       [](const ExpertGemmPoint& e) { return e.distribution != "uniform"; }),
                        uniform.experts.end());
  ClusterSpec single;
  single.name = "single-gpu";
  single.gpu_model = p.gpu;
  single.gpu_memory_GiB = p.memory_GiB;
  const auto timer = sim::make_profile_timer(uniform, single);
  const auto cases = draw_cases(p, count);
  fmt::print(out.table, "#\n# Prediction check: {} shapes not in the profile's grid; predicted by sim::make_profile_timer\n", cases.size());
  fmt::print(out.table, "#{:>14} {:>7} {:>7} {:>7} {:>4} {:>13} | {:>10} {:>13} {:>10} {:>8}\n", "kind", "m/rows", "n", "k",
             "E", "dtype", "pred(us)", "source", "meas(us)", "error%");
  GpuContext ctx(cfg.device);
  std::vector<double> errors;
  std::map<std::string, std::vector<double>> by_kind;
  for (const auto& c : cases) {
    double pred = 0, meas = 0;
    CostSource src = CostSource::roofline;
    if (c.kind == "experts") {
      sim::ExpertGemmShape s;
      s.num_experts = c.num_experts;
      s.rows = double(c.m);
      s.active_experts = std::min<double>(c.num_experts, double(c.m));
      s.n = c.n;
      s.k = c.k;
      s.dtype = c.dtype;
      const auto t = timer->expert_gemm(s);
      pred = t.time_us;
      src = t.source;
      const auto counts = tokens_per_expert("uniform", c.num_experts, c.m);
      gpu::ExpertGemm eg(ctx.lt, c.num_experts, c.n, c.k, c.dtype, ctx.workspace.get(), ctx.workspace.bytes());
      eg.set_counts(counts);
      const int64_t rows = eg.total_rows();
      const gpu::GemmShape one{1, c.n, c.k, c.dtype};
      gpu::DeviceBuffer w(int64_t(c.num_experts) * c.n * c.k * 2), act(std::max<int64_t>(rows, 1) * c.k * 2),
          o(std::max<int64_t>(rows, 1) * c.n * 2), as(std::max<int64_t>((c.k + 127) / 128 * (rows + 4), 1) * 4),
          ws(std::max<int64_t>(c.num_experts * gpu::weight_scale_count(one), 1) * 4);
      fill(w.get(), int64_t(c.num_experts) * c.n * c.k, c.dtype, 71, -1, 1, ctx.stream.get());
      fill(act.get(), std::max<int64_t>(rows, 1) * c.k, c.dtype, 72, -1, 1, ctx.stream.get());
      fill(as.get(), as.bytes() / 4, DType::fp32, 73, 0.5f, 1.0f, ctx.stream.get());
      fill(ws.get(), ws.bytes() / 4, DType::fp32, 74, 0.5f, 1.0f, ctx.stream.get());
      const double est = guess_us(eg.flops(), double(c.num_experts) * c.n * c.k, c.dtype);
      meas = gpu::time_op([&](cudaStream_t s) { eg.run(act.get(), w.get(), o.get(), as.as<float>(), ws.as<float>(), s); },
                          ctx.stream.get(), timing_for(cfg, est, true), &ctx.flusher)
                 .time_us.median;
    } else {
      const auto t = timer->gemm(double(c.m), c.n, c.k, c.dtype);
      pred = t.time_us;
      src = t.source;
      const gpu::GemmShape s{c.m, c.n, c.k, c.dtype};
      const int64_t rows = gpu::gemm_rows_padded(s);
      gpu::DeviceBuffer act(rows * c.k * 2), w(c.n * c.k * 2), o(rows * c.n * 2),
          as(std::max<int64_t>(gpu::act_scale_count(s), 1) * 4), ws(std::max<int64_t>(gpu::weight_scale_count(s), 1) * 4);
      fill(act.get(), rows * c.k, c.dtype, 81, -1, 1, ctx.stream.get());
      fill(w.get(), c.n * c.k, c.dtype, 82, -1, 1, ctx.stream.get());
      fill(as.get(), as.bytes() / 4, DType::fp32, 83, 0.5f, 1.0f, ctx.stream.get());
      fill(ws.get(), ws.bytes() / 4, DType::fp32, 84, 0.5f, 1.0f, ctx.stream.get());
      gpu::LtGemm g(ctx.lt, s, ctx.workspace.get(), ctx.workspace.bytes());
      const gpu::GemmOperands ops{act.get(), w.get(), o.get(), as.as<float>(), ws.as<float>()};
      const double est = guess_us(g.flops(), double(c.n) * c.k, c.dtype);
      meas = gpu::time_op([&](cudaStream_t st) { g.run(ops, st); }, ctx.stream.get(), timing_for(cfg, est, false),
                          &ctx.flusher)
                 .time_us.median;
    }
    const double err = (pred - meas) / meas;
    errors.push_back(std::abs(err));
    by_kind[c.kind].push_back(std::abs(err));
    fmt::print(out.table, " {:>14} {:>7} {:>7} {:>7} {:>4} {:>13} | {:>10.2f} {:>13} {:>10.2f} {:>+8.1f}\n", c.kind, c.m,
               c.n, c.k, c.num_experts, to_string(c.dtype), pred, to_string(src), meas, 100.0 * err);
    out.rows.push_back({{"bench", "check"}, {"kind", c.kind}, {"m", c.m}, {"n", c.n}, {"k", c.k},
                        {"num_experts", c.num_experts}, {"dtype", to_string(c.dtype)}, {"predicted_us", pred},
                        {"source", to_string(src)}, {"measured_us", meas}, {"error", err}});
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    if (v.empty()) return 0.0;
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  for (const auto& [kind, v] : by_kind)
    fmt::print(out.table, "# {:<15} {:>3} shapes, median |error| {:.1f}%, max {:.1f}%\n", kind, v.size(), 100.0 * median(v),
               100.0 * *std::max_element(v.begin(), v.end()));
  const double med = median(errors);
  fmt::print(out.table, "# all             {:>3} shapes, median |error| {:.1f}% (bar: 10%)\n", errors.size(), 100.0 * med);
  return med;
}

}  // namespace mixserve::profiler
