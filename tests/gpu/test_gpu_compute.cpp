// GPU tests of the device runtime and compute paths against float64 CPU references:
// the timing helper, cuBLASLt GEMMs (bf16, fp8 per-tensor, fp8 128-block), the grouped expert
// GEMM with empty experts, the elementwise kernel. Outputs are poisoned (NaN) before each run.
#include <doctest/doctest.h>

#include <cstring>
#include <numeric>

#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/kernels/elementwise.cuh"
#include "mixserve/kernels/fill.cuh"
#include "reference.hpp"

namespace mixserve::test {
void launch_spin(uint64_t ns, cudaStream_t s);
}

using namespace mixserve;
using namespace mixserve::test;

namespace {

// bf16 output rounding (unit roundoff 2^-9) with fp32 accumulation: a norm-wise relative error
// near 1e-3; 5e-3 leaves margin and still catches any indexing or layout error (those give O(1)).
constexpr double kTolBf16 = 5e-3;
// fp8: the inputs are exact fp8 values, so the only errors are the bf16 output rounding and the
// accumulation inside Hopper's fp8 tensor cores, which keep fewer mantissa bits than fp32
// (DeepSeek-V3 report §3.3.2: ~2% worst case at K=4096 without promotion); K <= 640 here.
constexpr double kTolFp8 = 2e-2;

void fill_dev(void* p, int64_t n, DType d, uint64_t seed, float lo, float hi) {
  kernels::FillParams f;
  f.data = p;
  f.num_elements = n;
  f.dtype = d;
  f.seed = seed;
  f.lo = lo;
  f.hi = hi;
  kernels::launch_fill_uniform(f, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<double> read_values(const void* d, int64_t n, DType dt) {
  if (dt == DType::bf16) return to_double(download<__nv_bfloat16>(d, n));
  return to_double(download<__nv_fp8_e4m3>(d, n));
}

// out[m, n] for act [m, k], w [n, k], with optional scales (see gemm.hpp for the layouts).
std::vector<double> ref_gemm(const gpu::GemmShape& s, const std::vector<double>& act, const std::vector<double>& w,
                             const std::vector<float>& as, const std::vector<float>& ws) {
  std::vector<double> out(s.m * s.n, 0.0);
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j) {
      double acc = 0;
      for (int64_t kk = 0; kk < s.k; ++kk) {
        double v = act[i * s.k + kk] * w[j * s.k + kk];
        if (s.dtype == DType::fp8_block) {
          const int64_t kb = kk / gpu::kFp8BlockSize;
          v *= double(as[gpu::act_scale_index(s, i, kb)]) *
               double(ws[gpu::weight_scale_index(s, j / gpu::kFp8BlockSize, kb)]);
        }
        acc += v;
      }
      if (s.dtype == DType::fp8_e4m3) acc *= double(as[0]) * double(ws[0]);
      out[i * s.n + j] = acc;
    }
  return out;
}

struct GemmCase {
  gpu::GemmShape s;
  uint64_t seed;
};

double run_gemm_case(const GemmCase& c) {
  const auto& s = c.s;
  const int64_t rows = gpu::gemm_rows_padded(s);
  const int64_t eb = s.dtype == DType::bf16 ? 2 : 1;
  gpu::DeviceBuffer act(rows * s.k * eb), w(s.n * s.k * eb), out(rows * s.n * 2), ws_buf(gpu::LtGemm::kWorkspaceBytes);
  const bool block = s.dtype == DType::fp8_block;
  const int64_t n_as = block ? gpu::act_scale_count(s) : 1, n_ws = block ? gpu::weight_scale_count(s) : 1;
  gpu::DeviceBuffer as(n_as * 4), wsc(n_ws * 4);
  fill_dev(act.get(), rows * s.k, s.dtype, c.seed, -2.0f, 2.0f);
  fill_dev(w.get(), s.n * s.k, s.dtype, c.seed + 1, -2.0f, 2.0f);
  fill_dev(as.get(), n_as, DType::fp32, c.seed + 2, 0.25f, 4.0f);
  fill_dev(wsc.get(), n_ws, DType::fp32, c.seed + 3, 0.25f, 4.0f);
  MIXSERVE_CUDA_CHECK(cudaMemset(out.get(), 0xff, rows * s.n * 2));  // poison: bf16 NaN
  gpu::LtHandle h;
  gpu::LtGemm g(h, s, ws_buf.get(), ws_buf.bytes());
  g.run({act.get(), w.get(), out.get(), as.as<float>(), wsc.as<float>()}, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto a = read_values(act.get(), s.m * s.k, s.dtype);  // the first m rows
  const auto b = read_values(w.get(), s.n * s.k, s.dtype);
  const auto ref = ref_gemm(s, a, b, download<float>(as.get(), n_as), download<float>(wsc.get(), n_ws));
  const auto got = to_double(download<__nv_bfloat16>(out.get(), s.m * s.n));
  INFO("m=" << s.m << " n=" << s.n << " k=" << s.k << " dtype=" << to_string(s.dtype));
  REQUIRE(norm(ref) > 0);
  CHECK(all_finite(got));
  return rel_error(got, ref);
}

}  // namespace

TEST_CASE("summarize: order statistics of known samples") {
  // 1..10: median between 5 and 6; p10 at rank 0.9 -> 1 + 0.9; p90 at rank 8.1 -> 9 + 0.1.
  std::vector<double> v;
  for (int i = 10; i >= 1; --i) v.push_back(i);
  const auto st = gpu::summarize(v);
  CHECK(st.count == 10);
  CHECK(st.median == doctest::Approx(5.5));
  CHECK(st.p10 == doctest::Approx(1.9));
  CHECK(st.p90 == doctest::Approx(9.1));
  CHECK(st.min == 1.0);
  CHECK(st.max == 10.0);
  CHECK(st.noise() == doctest::Approx((9.1 - 1.9) / 5.5));
  CHECK(gpu::summarize({}).count == 0);
}

TEST_CASE("time_op: a kernel that spins 200 us is timed at >= 200 us, with and without graph and flush") {
  gpu::Stream s;
  gpu::L2Flusher fl(s.device());
  for (bool graph : {false, true})
    for (bool flush : {false, true}) {
      gpu::TimingOptions o;
      o.warmup_iters = 2;
      o.timed_iters = 7;
      o.cuda_graph = graph;
      o.flush_l2 = flush;
      const auto r = gpu::time_op([](cudaStream_t st) { launch_spin(200000, st); }, s.get(), o, &fl);
      INFO("graph=" << graph << " flush=" << flush);
      CHECK(r.samples_us.size() == 7u);
      // The spin cannot end before the GPU clock advanced 200 us; the upper bound only rejects
      // nonsense (a unit error of 1000x), it is not a performance threshold.
      CHECK(r.time_us.min >= 199.0);
      CHECK(r.time_us.median < 200000.0);
      CHECK(r.time_us.min <= r.time_us.median);
      CHECK(r.time_us.median <= r.time_us.max);
    }
}

TEST_CASE("device arena: aligned carves, reset, overflow throws") {
  gpu::DeviceArena arena(4096);
  auto* a = arena.carve(10, "a");
  auto* b = arena.carve(100, "b");
  CHECK(reinterpret_cast<uintptr_t>(a) % gpu::DeviceArena::kAlignBytes == 0);
  CHECK(reinterpret_cast<uintptr_t>(b) % gpu::DeviceArena::kAlignBytes == 0);
  CHECK(static_cast<char*>(b) - static_cast<char*>(a) == 256);
  CHECK_THROWS_AS(arena.carve(8192, "too big"), RuntimeError);
  arena.reset();
  CHECK(arena.carve(10, "again") == a);
}

TEST_CASE("cuBLASLt bf16 GEMM vs float64 reference") {
  const GemmCase cases[] = {{{1, 64, 64, DType::bf16}, 100}, {{37, 136, 520, DType::bf16}, 200},
                            {{128, 256, 1024, DType::bf16}, 300}, {{3, 8, 8, DType::bf16}, 400}};
  for (const auto& c : cases) {
    const double err = run_gemm_case(c);
    INFO("m=" << c.s.m << " n=" << c.s.n << " k=" << c.s.k << " rel error " << err);
    CHECK(err < kTolBf16);
  }
}

TEST_CASE("cuBLASLt fp8 GEMM (per-tensor and 128-block scales) vs float64 reference") {
  const GemmCase cases[] = {{{17, 128, 256, DType::fp8_e4m3}, 500},  {{64, 256, 512, DType::fp8_e4m3}, 600},
                            {{5, 256, 512, DType::fp8_block}, 700},   {{64, 384, 640, DType::fp8_block}, 800},
                            {{1, 128, 128, DType::fp8_block}, 900},   {{130, 128, 384, DType::fp8_block}, 1000}};
  for (const auto& c : cases) {
    const double err = run_gemm_case(c);
    INFO("m=" << c.s.m << " n=" << c.s.n << " k=" << c.s.k << " " << to_string(c.s.dtype) << " rel error " << err);
    CHECK(err < kTolFp8);
  }
}

TEST_CASE("GEMM shapes cuBLASLt cannot take are rejected with the reason") {
  CHECK(gpu::gemm_unsupported_reason({4, 100, 64, DType::bf16}).find("n=100") != std::string::npos);
  CHECK(gpu::gemm_unsupported_reason({4, 128, 24, DType::fp8_e4m3}).find("k=24") != std::string::npos);
  CHECK(gpu::gemm_unsupported_reason({4, 128, 64, DType::mxfp4}).find("dtype") != std::string::npos);
  CHECK(gpu::gemm_unsupported_reason({4, 128, 64, DType::bf16}).empty());
}

TEST_CASE("expert grouped GEMM vs float64 reference, with empty experts") {
  struct Case {
    std::vector<int64_t> counts;
    int64_t n, k;
    DType d;
    double tol;
  };
  const Case cases[] = {{{5, 0, 17, 0, 1, 9}, 64, 128, DType::bf16, kTolBf16},
                        {{0, 0, 3}, 32, 64, DType::bf16, kTolBf16},
                        {{3, 0, 8}, 256, 256, DType::fp8_block, kTolFp8},
                        {{2, 7, 0, 1}, 128, 128, DType::fp8_e4m3, kTolFp8}};
  uint64_t seed = 2000;
  for (const auto& c : cases) {
   SUBCASE((std::string(to_string(c.d)) + " E=" + std::to_string(c.counts.size()) + " n=" + std::to_string(c.n)).c_str()) {
    const int E = static_cast<int>(c.counts.size());
    const int64_t eb = c.d == DType::bf16 ? 2 : 1;
    gpu::DeviceBuffer wsbuf(gpu::LtGemm::kWorkspaceBytes);
    gpu::LtHandle h;
    gpu::ExpertGemm eg(h, E, c.n, c.k, c.d, wsbuf.get(), wsbuf.bytes());
    eg.set_counts(c.counts);
    const int64_t rows = std::max<int64_t>(eg.total_rows(), 1);
    const gpu::GemmShape one{1, c.n, c.k, c.d};
    const int64_t wsc_per = c.d == DType::fp8_block ? gpu::weight_scale_count(one) : gpu::ExpertGemm::kScaleStrideFloats;
    int64_t n_as = 1;
    if (c.d == DType::fp8_block)
      for (int e = 0; e < E; ++e)
        if (c.counts[e]) n_as = eg.act_scale_offset(e) + gpu::act_scale_count({c.counts[e], c.n, c.k, c.d});
    gpu::DeviceBuffer act(rows * c.k * eb), w(int64_t(E) * c.n * c.k * eb), out(rows * c.n * 2), as(n_as * 4),
        wsc(int64_t(E) * wsc_per * 4);
    fill_dev(act.get(), rows * c.k, c.d, seed++, -2, 2);
    fill_dev(w.get(), int64_t(E) * c.n * c.k, c.d, seed++, -2, 2);
    fill_dev(as.get(), n_as, DType::fp32, seed++, 0.25f, 4.0f);
    fill_dev(wsc.get(), int64_t(E) * wsc_per, DType::fp32, seed++, 0.25f, 4.0f);
    MIXSERVE_CUDA_CHECK(cudaMemset(out.get(), 0xff, rows * c.n * 2));
    eg.run(act.get(), w.get(), out.get(), as.as<float>(), wsc.as<float>(), nullptr);
    MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto A = read_values(act.get(), rows * c.k, c.d);
    const auto W = read_values(w.get(), int64_t(E) * c.n * c.k, c.d);
    const auto AS = download<float>(as.get(), n_as);
    const auto WS = download<float>(wsc.get(), int64_t(E) * wsc_per);
    const auto O = to_double(download<__nv_bfloat16>(out.get(), rows * c.n));
    std::vector<double> got, ref;
    for (int e = 0; e < E; ++e) {
      const int64_t cnt = c.counts[e];
      if (!cnt) continue;
      const gpu::GemmShape s{cnt, c.n, c.k, c.d};
      const int64_t r0 = eg.row_offsets()[e];
      std::vector<double> a(A.begin() + r0 * c.k, A.begin() + (r0 + cnt) * c.k);
      std::vector<double> we(W.begin() + int64_t(e) * c.n * c.k, W.begin() + int64_t(e + 1) * c.n * c.k);
      std::vector<float> as_e(AS.begin() + (c.d == DType::fp8_block ? eg.act_scale_offset(e) : 0), AS.end());
      std::vector<float> ws_e(WS.begin() + (c.d == DType::bf16 ? 0 : e * wsc_per), WS.end());
      const auto r = ref_gemm(s, a, we, as_e, ws_e);
      ref.insert(ref.end(), r.begin(), r.end());
      got.insert(got.end(), O.begin() + r0 * c.n, O.begin() + (r0 + cnt) * c.n);
    }
    INFO(to_string(c.d) << " experts " << E << " n=" << c.n << " k=" << c.k);
    REQUIRE(norm(ref) > 0);
    CHECK(all_finite(got));
    CHECK(rel_error(got, ref) < c.tol);
    CHECK(eg.flops() == doctest::Approx(2.0 * c.n * c.k *
                                        double(std::accumulate(c.counts.begin(), c.counts.end(), int64_t(0)))));
   }
  }
}

TEST_CASE("axpby kernel vs float64 reference: odd sizes, misaligned pointers, CUDA graph") {
  // out = alpha*x + beta*y from exact bf16 inputs; the only error is the bf16 output rounding
  // (unit roundoff 2^-9 ~ 2e-3 per element at worst), so a norm-wise 4e-3 bound is safe.
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(8), int64_t(9), int64_t(1000003)})
    for (int offset : {0, 1})
      for (bool graph : {false, true}) {
        gpu::DeviceBuffer x((n + 1) * 2), y((n + 1) * 2), o((n + 1) * 2);
        auto* xp = x.as<__nv_bfloat16>() + offset;
        auto* yp = y.as<__nv_bfloat16>() + offset;
        auto* op = o.as<__nv_bfloat16>() + offset;
        if (n) {
          fill_dev(xp, n, DType::bf16, 3000 + n + offset, -3, 3);
          fill_dev(yp, n, DType::bf16, 4000 + n + offset, -3, 3);
        }
        MIXSERVE_CUDA_CHECK(cudaMemset(o.get(), 0xff, (n + 1) * 2));
        kernels::AxpbyParams p;
        p.x = xp;
        p.y = yp;
        p.out = op;
        p.num_elements = n;
        p.alpha = 0.75f;
        p.beta = -1.5f;
        gpu::Stream s;
        CHECK(kernels::is_supported(p, s.device()));
        gpu::TimingOptions t;
        t.warmup_iters = 1;
        t.timed_iters = 2;
        t.flush_l2 = false;
        t.cuda_graph = graph;
        gpu::time_op([&](cudaStream_t st) { kernels::launch_axpby(p, st); }, s.get(), t, nullptr);
        s.synchronize();
        if (n == 0) continue;
        const auto X = to_double(download<__nv_bfloat16>(xp, n));
        const auto Y = to_double(download<__nv_bfloat16>(yp, n));
        const auto O = to_double(download<__nv_bfloat16>(op, n));
        std::vector<double> ref(n);
        for (int64_t i = 0; i < n; ++i) ref[i] = 0.75 * X[i] - 1.5 * Y[i];
        INFO("n=" << n << " offset=" << offset << " graph=" << graph);
        REQUIRE(norm(ref) > 0);
        CHECK(all_finite(O));
        CHECK(rel_error(O, ref) < 4e-3);
      }
  kernels::AxpbyParams bad;
  bad.num_elements = 5;
  CHECK_THROWS_AS(kernels::launch_axpby(bad, nullptr), InputError);
}

TEST_CASE("fill kernel writes the documented values") {
  const int64_t n = 1001;
  gpu::DeviceBuffer b(n * 4);
  fill_dev(b.get(), n, DType::fp32, 77, -1.0f, 3.0f);
  const auto v = download<float>(b.get(), n);
  for (int64_t i = 0; i < n; ++i) {
    INFO("i=" << i);
    REQUIRE(v[i] == kernels::fill_value_host(77, i, -1.0f, 3.0f));
    REQUIRE(v[i] >= -1.0f);
    REQUIRE(v[i] < 3.0f);
  }
}
