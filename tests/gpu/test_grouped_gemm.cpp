// GPU tests of the grouped expert GEMM (kernels/grouped_gemm.cuh) against a float64 CPU reference
// (STYLE.md §12-13): seeded random bf16 inputs, the output poisoned (bf16 NaN) before every run,
// awkward sizes (empty experts, one expert holding every row, row counts that are not multiples
// of the 128-row tile, n and k that are not multiples of the 128 x 64 tile, k = 8, one expert,
// 128 experts) and Qwen3-30B-A3B's expert shapes. Rows at and past offsets[E] must stay poisoned.
// The per-expert cuBLASLt path (gpu::ExpertGemm) serially and forked over streams likewise, and
// the same GEMMs as one cuBLAS grouped call (ExpertGemm::run_grouped_call), the padded batch
// (run_padded_batch) and the bucketed padded layout (kernels/expert_pad.cuh per-expert mode +
// ExpertGemm::run_bucketed_call, both issue forms).
// The prefill-step benchmark (8 x 2048 tokens of Qwen3-30B-A3B in one step) is here too.
// The benchmark (TFLOP/s against one cuBLASLt GEMM of the same FLOPs and against the per-expert
// cuBLASLt path, measured in the same run) is skipped by default; run it with:
//   test_gpu_grouped_gemm --no-skip -tc="bench*"
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <cuda_profiler_api.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/kernels/expert_pad.cuh"
#include "mixserve/kernels/fill.cuh"
#include "mixserve/kernels/grouped_gemm.cuh"
#include "mixserve/kernels/permute.cuh"
#include "reference.hpp"

using namespace mixserve;
using namespace mixserve::test;
using bf16 = __nv_bfloat16;

namespace {

// One bf16 rounding of the output (unit roundoff 2^-9), exact bf16 inputs, fp32 accumulation of
// <= 2048 products (~1e-5 relative): norm-wise error ~1e-3. 1e-2 leaves margin; a wrong row,
// column, expert or k-chunk gives O(1).
constexpr double kTol = 1e-2;

int device() {
  int d = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

std::vector<bf16> rand_bf16(std::size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<bf16> v(n);
  for (auto& x : v) x = __float2bfloat16_rn(d(rng));
  return v;
}

uint16_t bits(const bf16& v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

// Runs the kernel on `counts` rows per expert (plus `spare` rows past offsets[E] that must stay
// untouched) and compares with the float64 reference.
void check_case_impl(const std::vector<int>& counts, int64_t n, int64_t k, int spare, uint64_t seed,
                     kernels::GroupedGemmImpl impl) {
  const int E = static_cast<int>(counts.size());
  std::vector<int32_t> off(E + 1, 0);
  for (int e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  const int64_t rows = off[E], cap = rows + spare;
  INFO("E=" << E << " rows=" << rows << " n=" << n << " k=" << k << " impl=" << int(impl));
  const auto act = rand_bf16(std::size_t(std::max<int64_t>(cap, 1) * k), seed);
  const auto w = rand_bf16(std::size_t(E) * n * k, seed + 1);
  gpu::DeviceBuffer d_act(act.size() * 2), d_w(w.size() * 2), d_out(std::size_t(std::max<int64_t>(cap, 1) * n) * 2),
      d_off(off.size() * 4);
  upload(d_act.get(), act);
  upload(d_w.get(), w);
  upload(d_off.get(), off);
  MIXSERVE_CUDA_CHECK(cudaMemset(d_out.get(), 0xff, d_out.bytes()));
  kernels::GroupedGemmParams p;
  p.act = d_act.as<bf16>();
  p.weights = d_w.as<bf16>();
  p.out = d_out.as<bf16>();
  p.expert_offsets = d_off.as<int32_t>();
  p.num_experts = E;
  p.n = n;
  p.k = k;
  p.impl = impl;
  REQUIRE(kernels::grouped_gemm_unsupported_reason(p, device()).empty());
  kernels::launch_grouped_gemm(p, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = download<bf16>(d_out.get(), std::size_t(cap) * n);
  std::vector<double> ref(std::size_t(rows) * n), gd(std::size_t(rows) * n);
  for (int e = 0; e < E; ++e)
    for (int64_t r = off[e]; r < off[e + 1]; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        const bf16* a = &act[r * k];
        const bf16* b = &w[(int64_t(e) * n + j) * k];
        for (int64_t c = 0; c < k; ++c) s += double(__bfloat162float(a[c])) * double(__bfloat162float(b[c]));
        ref[r * n + j] = s;
        gd[r * n + j] = __bfloat162float(got[r * n + j]);
      }
  CHECK(all_finite(gd));
  if (rows > 0) CHECK(rel_error(gd, ref) < kTol);
  int64_t touched = 0;
  for (int64_t i = rows * n; i < cap * n; ++i) touched += bits(got[i]) != 0xffff;
  CHECK_MESSAGE(touched == 0, touched << " elements past offsets[E] were written");
}

// Both tile implementations where they exist (wgmma: sm_90a builds on SM 9.0).
bool has_wgmma() {
  kernels::GroupedGemmParams p;
  p.act = p.weights = reinterpret_cast<const bf16*>(16);
  p.out = reinterpret_cast<bf16*>(16);
  p.expert_offsets = reinterpret_cast<const int32_t*>(16);
  p.num_experts = 1;
  p.n = p.k = 8;
  p.impl = kernels::GroupedGemmImpl::wgmma;
  return kernels::grouped_gemm_unsupported_reason(p, device()).empty();
}
void check_case(const std::vector<int>& counts, int64_t n, int64_t k, int spare, uint64_t seed) {
  check_case_impl(counts, n, k, spare, seed, kernels::GroupedGemmImpl::mma_sync);
  if (has_wgmma()) {
    check_case_impl(counts, n, k, spare, seed, kernels::GroupedGemmImpl::wgmma);
    check_case_impl(counts, n, k, spare, seed, kernels::GroupedGemmImpl::wgmma_wide);
  } else {
    std::printf("grouped_gemm: no wgmma kernel on this device; mma_sync checked only\n");
  }
}

}  // namespace

TEST_CASE("grouped_gemm: awkward sizes vs the float64 reference") {
  SUBCASE("empty experts, ragged rows, n and k off the tile") { check_case({0, 1, 130, 0, 257, 0}, 136, 72, 5, 1); }
  SUBCASE("one hot expert holds every row") { check_case({0, 0, 0, 300, 0, 0, 0, 0}, 264, 200, 3, 2); }
  SUBCASE("every expert empty") { check_case({0, 0, 0, 0}, 64, 64, 40, 3); }
  SUBCASE("one expert, one row, k = 8") { check_case({1}, 8, 8, 2, 4); }
  SUBCASE("one expert, exactly one tile, several k tiles") { check_case({128}, 128, 256, 0, 5); }
  SUBCASE("128 experts, random routing") {
    std::mt19937_64 rng(6);
    std::vector<int> counts(128, 0);
    std::uniform_int_distribution<int> d(0, 127);
    for (int i = 0; i < 3000; ++i) ++counts[d(rng)];
    counts[17] = 0;
    counts[90] = 260;
    check_case(counts, 200, 520, 7, 6);
  }
  SUBCASE("Qwen3-30B-A3B gate|up (n 1536, k 2048) and down (n 2048, k 768)") {
    check_case({40, 0, 129, 3}, 1536, 2048, 4, 7);
    check_case({40, 0, 129, 3}, 2048, 768, 4, 8);
  }
}

namespace {

// The per-expert cuBLASLt path (gpu::ExpertGemm, the executor's ExpertPath::cublaslt and the
// automatic path of large steps) on `streams` streams (1: the step's stream only, no fan-out;
// kExpertGemmGroupedCall: one cuBLAS grouped call, run three times: the second reuses its device
// pointer arrays, the third follows set_counts and uploads them again) against the same float64
// reference; rows past the last expert must stay poisoned. The
// fan-out is forked from a non-default stream whose earlier work (the poison memset) the side
// streams must wait for, and the result is read after synchronising that stream only, so a
// missing fork or join shows as poison or a race.
// float64 reference of the per-expert GEMMs: rows grouped by expert in order, act [rows, k], w [E, n, k].
std::vector<double> expert_gemm_reference(const std::vector<int>& counts, int64_t n, int64_t k,
                                          const std::vector<bf16>& act, const std::vector<bf16>& w) {
  int64_t rows = 0;
  for (int c : counts) rows += c;
  std::vector<double> a(std::size_t(rows * k)), ref(std::size_t(rows) * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = __bfloat162float(act[i]);
  std::vector<double> b(std::size_t(n * k));
  int64_t r0 = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] == 0) continue;
    for (int64_t i = 0; i < n * k; ++i) b[std::size_t(i)] = __bfloat162float(w[std::size_t(int64_t(e) * n * k + i)]);
    for (int64_t r = r0; r < r0 + counts[e]; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0;
        for (int64_t c = 0; c < k; ++c) sum += a[std::size_t(r * k + c)] * b[std::size_t(j * k + c)];
        ref[std::size_t(r * n + j)] = sum;
      }
    r0 += counts[e];
  }
  return ref;
}

// ref: the float64 reference of these inputs when the caller computed it (check_expert_gemm_all:
// once for every streams value), else null.
void check_expert_gemm(const std::vector<int>& counts, int64_t n, int64_t k, int spare, uint64_t seed, int streams,
                       const std::vector<double>* ref_in = nullptr) {
  const int E = static_cast<int>(counts.size());
  std::vector<int64_t> c64(counts.begin(), counts.end());
  int64_t rows = 0;
  for (int c : counts) rows += c;
  const int64_t cap = rows + spare;
  INFO("per-expert cuBLASLt E=" << E << " rows=" << rows << " n=" << n << " k=" << k << " streams=" << streams);
  const auto act = rand_bf16(std::size_t(std::max<int64_t>(cap, 1) * k), seed);
  const auto w = rand_bf16(std::size_t(E) * n * k, seed + 1);
  gpu::DeviceBuffer d_act(act.size() * 2), d_w(w.size() * 2), d_out(std::size_t(std::max<int64_t>(cap, 1) * n) * 2),
      ws(gpu::LtGemm::kWorkspaceBytes);
  upload(d_act.get(), act);
  upload(d_w.get(), w);
  gpu::Stream st;
  gpu::LtHandle lt;
  gpu::ExpertGemm eg(lt, E, n, k, DType::bf16, ws.get(), ws.bytes());
  eg.set_counts(c64);
  REQUIRE(eg.total_rows() == rows);
  const bool grouped_call = streams == kExpertGemmGroupedCall;
  gpu::StreamFanout fan(std::max(streams, 1), ws.bytes());
  std::unique_ptr<gpu::BlasHandle> blas;
  if (grouped_call) blas = std::make_unique<gpu::BlasHandle>();
  const std::vector<double> own = ref_in ? std::vector<double>{} : expert_gemm_reference(counts, n, k, act, w);
  const std::vector<double>& ref = ref_in ? *ref_in : own;
  REQUIRE(ref.size() == std::size_t(rows) * n);
  // Twice: the second fork follows a join on the same events; the grouped call a third time.
  for (int rep = 0; rep < (grouped_call ? 3 : 2); ++rep) {
    INFO("rep " << rep);
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xff, d_out.bytes(), st.get()));
    if (grouped_call) {
      if (rep == 2) eg.set_counts(c64);
      eg.run_grouped_call(d_act.get(), d_w.get(), d_out.get(), st.get(), *blas);
    } else if (streams == 1) {
      eg.run(d_act.get(), d_w.get(), d_out.get(), nullptr, nullptr, st.get());
    } else {
      eg.run(d_act.get(), d_w.get(), d_out.get(), nullptr, nullptr, st.get(), fan);
    }
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
    const auto got = download<bf16>(d_out.get(), std::size_t(cap) * n);
    std::vector<double> gd(std::size_t(rows) * n);
    for (int64_t i = 0; i < rows * n; ++i) gd[i] = __bfloat162float(got[i]);
    CHECK(all_finite(gd));
    if (rows > 0) CHECK(rel_error(gd, ref) < kTol);
    int64_t touched = 0;
    for (int64_t i = rows * n; i < cap * n; ++i) touched += bits(got[i]) != 0xffff;
    CHECK_MESSAGE(touched == 0, touched << " elements past the last expert's rows were written");
  }
}

void check_expert_gemm_all(const std::vector<int>& counts, int64_t n, int64_t k, int spare, uint64_t seed) {
  // The same inputs check_expert_gemm draws (same sizes and seeds), so one reference serves every
  // streams value (it was computed five times: the Qwen3-shaped case ran past 72 s on the GPU host).
  int64_t rows = 0;
  for (int c : counts) rows += c;
  const auto act = rand_bf16(std::size_t(std::max<int64_t>(rows + spare, 1) * k), seed);
  const auto w = rand_bf16(std::size_t(counts.size()) * n * k, seed + 1);
  const auto ref = expert_gemm_reference(counts, n, k, act, w);
  for (int streams : {1, 2, 4, 7, kExpertGemmGroupedCall}) check_expert_gemm(counts, n, k, spare, seed, streams, &ref);
}

}  // namespace

TEST_CASE("expert GEMM: per-expert cuBLASLt on 1, 2, 4, 7 streams and one cuBLAS grouped call vs the float64 reference") {
  SUBCASE("empty experts, ragged rows, n and k off the tile") { check_expert_gemm_all({0, 1, 130, 0, 257, 0}, 136, 72, 5, 21); }
  SUBCASE("one hot expert holds every row") { check_expert_gemm_all({0, 0, 0, 300, 0, 0, 0, 0}, 264, 200, 3, 22); }
  SUBCASE("every expert empty") { check_expert_gemm_all({0, 0, 0, 0}, 64, 64, 40, 23); }
  SUBCASE("one expert, one row, k = 8") { check_expert_gemm_all({1}, 8, 8, 2, 24); }
  SUBCASE("fewer experts with rows than streams") { check_expert_gemm_all({0, 37, 0, 0, 0, 0, 0, 0, 0, 5}, 40, 48, 1, 25); }
  SUBCASE("128 experts, random routing, skewed") {
    std::mt19937_64 rng(26);
    std::vector<int> counts(128, 0);
    std::uniform_int_distribution<int> d(0, 127);
    for (int i = 0; i < 3000; ++i) ++counts[d(rng)];
    counts[17] = 0;
    counts[90] = 1031;
    check_expert_gemm_all(counts, 200, 520, 7, 26);
  }
  SUBCASE("Qwen3-30B-A3B gate|up (n 1536, k 2048) and down (n 2048, k 768)") {
    check_expert_gemm_all({40, 0, 129, 3, 1024, 977}, 1536, 2048, 4, 27);
    check_expert_gemm_all({40, 0, 129, 3, 1024, 977}, 2048, 768, 4, 28);
  }
}

namespace {

// The padded batched expert GEMM as the executor runs it (kExpertGemmPaddedBatch,
// GpuModel::run_padded_experts): index-only permute of top_k = 1 ids with the given counts (pairs
// in shuffled order), host copy of the counts, rows_per_expert = expert_padded_rows(max count);
// if E x rows_per_expert <= capacity rows: slot_row remapped and the token rows gathered into
// the padded layout (launch_pad_expert_rows, launch_gather_rows), ONE strided-batched GEMM
// (ExpertGemm::run_padded_batch) whose output, read through slot_row, must match the float64
// reference of x[t] . W_e^T; pad rows must be zero (zero activations). Else (the fallback) the
// rows are gathered in expert order through permuted_token and must equal x's rows exactly.
// Returns whether the padded layout fitted. Outputs are poisoned before each run; run twice (the
// second reuses the plan).
// ref_stride: the float64 reference covers every ref_stride-th token (1: all; the 131072-row case
// takes every 997th, ~130 rows: with every 97th it ran past 60 s on the GPU host, session 5); the row
// placement and the pad rows are checked for every row.
bool check_padded_batch(const std::vector<int>& counts, int64_t n, int64_t k, int64_t capacity, uint64_t seed,
                        int64_t ref_stride = 1) {
  const int E = static_cast<int>(counts.size());
  std::vector<int32_t> ids;
  for (int e = 0; e < E; ++e) ids.insert(ids.end(), std::size_t(counts[e]), e);
  std::mt19937_64 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  const int64_t T = static_cast<int64_t>(ids.size());
  const int max_count = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  const int64_t S = expert_padded_rows(max_count);
  const bool fits = int64_t(E) * S <= capacity;
  INFO("padded batch E=" << E << " tokens=" << T << " n=" << n << " k=" << k << " rows_per_expert=" << S
                         << " capacity=" << capacity << " fits=" << fits);
  const auto x = rand_bf16(std::size_t(std::max<int64_t>(T, 1) * k), seed + 1);
  const auto w = rand_bf16(std::size_t(E) * n * k, seed + 2);
  const int64_t cap = std::max<int64_t>({capacity, T, 1});
  gpu::DeviceBuffer d_x(x.size() * 2), d_w(w.size() * 2), d_act(std::size_t(cap * k) * 2),
      d_out(std::size_t(cap * n) * 2), ws(gpu::LtGemm::kWorkspaceBytes);
  gpu::DeviceBuffer d_ids(std::max<std::size_t>(ids.size(), 1) * 4), d_counts(std::size_t(E) * 4),
      d_offsets(std::size_t(E + 1) * 4), d_slot(std::max<std::size_t>(ids.size(), 1) * 4),
      d_ptok(std::max<std::size_t>(ids.size(), 1) * 4), d_padtok(std::size_t(cap) * 4);
  const std::size_t pws_bytes = kernels::permute_workspace_bytes(T, 1, E);
  gpu::DeviceBuffer d_pws(std::max<std::size_t>(pws_bytes, 4));
  upload(d_x.get(), x);
  upload(d_w.get(), w);
  if (T > 0) upload(d_ids.get(), ids);
  gpu::Stream st;
  gpu::LtHandle lt;
  gpu::ExpertGemm eg(lt, E, n, k, DType::bf16, ws.get(), ws.bytes());
  for (int rep = 0; rep < 2; ++rep) {
    INFO("rep " << rep);
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_act.get(), 0xff, d_act.bytes(), st.get()));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xff, d_out.bytes(), st.get()));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_padtok.get(), 0x7f, d_padtok.bytes(), st.get()));
    kernels::PermuteParams pp;
    pp.topk_ids = d_ids.as<int32_t>();
    pp.x = nullptr;  // index maps only
    pp.permuted_x = d_act.as<bf16>();
    pp.expert_counts = d_counts.as<int32_t>();
    pp.expert_offsets = d_offsets.as<int32_t>();
    pp.slot_row = d_slot.as<int32_t>();
    pp.permuted_token = d_ptok.as<int32_t>();
    pp.workspace = d_pws.get();
    pp.workspace_bytes = pws_bytes;
    pp.num_tokens = T;
    pp.top_k = 1;
    pp.num_experts = E;
    pp.hidden = k;
    kernels::launch_permute(pp, st.get());
    const auto got_counts = [&] {
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
      return download<int32_t>(d_counts.get(), std::size_t(E));
    }();
    for (int e = 0; e < E; ++e) REQUIRE(got_counts[e] == counts[e]);
    if (!fits) {
      kernels::GatherRowsParams gp;
      gp.x = d_x.as<bf16>();
      gp.row_token = d_ptok.as<int32_t>();
      gp.dst = d_act.as<bf16>();
      gp.num_rows = T;
      gp.hidden = k;
      kernels::launch_gather_rows(gp, st.get());
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
      const auto got = download<bf16>(d_act.get(), std::size_t(T * k));
      const auto ptok = download<int32_t>(d_ptok.get(), std::size_t(T));
      int64_t wrong = 0;
      for (int64_t r = 0; r < T; ++r)
        for (int64_t c = 0; c < k; ++c) wrong += bits(got[r * k + c]) != bits(x[ptok[r] * k + c]);
      CHECK_MESSAGE(wrong == 0, wrong << " gathered elements differ from x");
      continue;
    }
    kernels::PadExpertRowsParams pr;
    pr.topk_ids = d_ids.as<int32_t>();
    pr.expert_counts = d_counts.as<int32_t>();
    pr.expert_offsets = d_offsets.as<int32_t>();
    pr.permuted_token = d_ptok.as<int32_t>();
    pr.slot_row = d_slot.as<int32_t>();
    pr.padded_token = d_padtok.as<int32_t>();
    pr.num_tokens = T;
    pr.top_k = 1;
    pr.num_experts = E;
    pr.rows_per_expert = S;
    kernels::launch_pad_expert_rows(pr, st.get());
    kernels::GatherRowsParams gp;
    gp.x = d_x.as<bf16>();
    gp.row_token = d_padtok.as<int32_t>();
    gp.dst = d_act.as<bf16>();
    gp.num_rows = int64_t(E) * S;
    gp.hidden = k;
    kernels::launch_gather_rows(gp, st.get());
    eg.run_padded_batch(d_act.get(), d_w.get(), d_out.get(), S, st.get());
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
    const int64_t padded = int64_t(E) * S;
    const auto slot = download<int32_t>(d_slot.get(), std::size_t(T));
    const auto padtok = download<int32_t>(d_padtok.get(), std::size_t(std::max<int64_t>(padded, 1)));
    const auto got = download<bf16>(d_out.get(), std::size_t(std::max<int64_t>(padded, 1) * n));
    // Every token's row lies in its expert's block, and the padded map points back to the token.
    int64_t bad_rows = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = slot[t];
      bad_rows += r < int64_t(ids[t]) * S || r >= int64_t(ids[t] + 1) * S || padtok[r] != t;
    }
    REQUIRE_MESSAGE(bad_rows == 0, bad_rows << " tokens with a wrong padded row");
    std::vector<double> ref, gd;
    for (int64_t t = 0; t < T; t += ref_stride)
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0;
        const bf16* a = &x[t * k];
        const bf16* b = &w[(int64_t(ids[t]) * n + j) * k];
        for (int64_t c = 0; c < k; ++c) sum += double(__bfloat162float(a[c])) * double(__bfloat162float(b[c]));
        ref.push_back(sum);
        gd.push_back(__bfloat162float(got[slot[t] * n + j]));
      }
    CHECK(all_finite(gd));
    if (T > 0) CHECK(rel_error(gd, ref) < kTol);
    // Pad rows: token -1, zero activations, so zero outputs (finite: never NaN-poisoned).
    int64_t pad_rows = 0, nonzero = 0;
    for (int64_t r = 0; r < padded; ++r) {
      const int e = static_cast<int>(r / S);
      if (r - int64_t(e) * S < counts[e]) continue;
      ++pad_rows;
      if (padtok[r] != -1) ++nonzero;
      for (int64_t j = 0; j < n; ++j) nonzero += __bfloat162float(got[r * n + j]) != 0.0f;
    }
    CHECK(pad_rows == padded - T);
    CHECK_MESSAGE(nonzero == 0, nonzero << " pad-row elements or tokens are not zero / -1");
  }
  return fits;
}

}  // namespace

TEST_CASE("expert GEMM: padded strided-batched cuBLASLt GEMM vs the float64 reference") {
  SUBCASE("ragged experts with an empty one, n and k off the tile") {
    CHECK(check_padded_batch({5, 0, 130, 17, 64, 1}, 136, 72, 6 * 144, 31));
  }
  SUBCASE("one expert holds every row") { CHECK(check_padded_batch({0, 0, 300, 0}, 264, 200, 4 * 304, 32)); }
  SUBCASE("every expert empty (nothing to run)") { CHECK(check_padded_batch({0, 0, 0}, 64, 64, 16, 33)); }
  SUBCASE("one expert, one row, k = 8") { CHECK(check_padded_batch({1}, 8, 8, 16, 34)); }
  SUBCASE("capacity fallback: E x rows_per_expert one row over the capacity") {
    CHECK_FALSE(check_padded_batch({5, 0, 130, 17, 64, 1}, 136, 72, 6 * 144 - 1, 35));
  }
  SUBCASE("128 experts ~1024 rows each at 1.25x capacity, Qwen3-30B-A3B gate|up and down") {
    std::mt19937_64 rng(36);
    std::uniform_int_distribution<int> d(992, 1056);
    std::vector<int> counts(128);
    for (int& c : counts) c = d(rng);
    counts[7] = 0;
    const int64_t rows = std::accumulate(counts.begin(), counts.end(), int64_t(0));
    const int64_t capacity = expert_padded_rows(rows + rows / 4);
    CHECK(check_padded_batch(counts, 1536, 2048, capacity, 37, 997));
    CHECK(check_padded_batch(counts, 2048, 768, capacity, 38, 997));
  }
}

namespace {

// One configuration of the bucketed layout to run on the same inputs.
struct BucketRun {
  int64_t align;
  gpu::BucketIssue issue;
};

const char* issue_name(gpu::BucketIssue i) {
  return i == gpu::BucketIssue::grouped_call ? "one grouped call" : "batched call per bucket";
}

// The bucketed padded layout as the executor runs it (kExpertGemmBucketed[Batched],
// GpuModel::run_bucketed_experts): index-only permute of top_k = 1 ids with the given counts plus
// `dropped` tokens routed off the rank (id -1), pairs in shuffled order; host copy of the counts;
// padded counts expert_bucket_rows(count, align) and their prefix sums poff uploaded;
// launch_pad_expert_rows in the per-expert mode; launch_gather_rows; ExpertGemm::run_bucketed_call.
// Checked exactly: slot_row (a routed token's row moves from p to poff[e] + (p - offsets[e]); a
// dropped token keeps -1), padded_token over all poff[E] rows (expert e's first counts[e] rows map
// to permuted_token[offsets[e] + i], the rest are -1), the pad rows gathered as zeros, and the
// number of buckets (distinct non-zero padded counts). The GEMM output read through slot_row must
// match the float64 reference of x[t] . W_e^T (every ref_stride-th token; the reference is
// computed once for all runs). Pad rows' outputs are not checked (computed, never read).
// Every run poisons its outputs first and runs twice (the second reuses the uploaded pointer
// arrays; each ExpertGemm is new per run, so the first call uploads).
void check_bucketed(const std::vector<int>& counts, int dropped, int64_t n, int64_t k, uint64_t seed,
                    const std::vector<BucketRun>& runs, int64_t ref_stride = 1) {
  const int E = static_cast<int>(counts.size());
  std::vector<int32_t> ids;
  for (int e = 0; e < E; ++e) ids.insert(ids.end(), std::size_t(counts[e]), e);
  ids.insert(ids.end(), std::size_t(dropped), -1);
  std::mt19937_64 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t routed = T - dropped;
  const auto x = rand_bf16(std::size_t(std::max<int64_t>(T, 1) * k), seed + 1);
  const auto w = rand_bf16(std::size_t(E) * n * k, seed + 2);
  // The float64 reference for the sampled routed tokens, once.
  std::vector<int64_t> sampled;
  for (int64_t t = 0, seen = 0; t < T; ++t)
    if (ids[t] >= 0 && seen++ % ref_stride == 0) sampled.push_back(t);
  std::vector<double> ref;
  ref.reserve(sampled.size() * std::size_t(n));
  {
    std::vector<float> wf(w.size()), xf(x.size());
    for (std::size_t i = 0; i < w.size(); ++i) wf[i] = __bfloat162float(w[i]);
    for (std::size_t i = 0; i < x.size(); ++i) xf[i] = __bfloat162float(x[i]);
    for (int64_t t : sampled)
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0;
        const float* a = &xf[std::size_t(t * k)];
        const float* b = &wf[std::size_t((int64_t(ids[t]) * n + j) * k)];
        for (int64_t c = 0; c < k; ++c) sum += double(a[c]) * double(b[c]);
        ref.push_back(sum);
      }
  }
  if (!ref.empty()) {
    double mag = 0;
    for (double v : ref) mag = std::max(mag, std::abs(v));
    REQUIRE(mag > 0);  // the reference is not all zeros
  }
  int64_t max_align = 1;
  for (const auto& r : runs) max_align = std::max(max_align, r.align);
  const int64_t cap = std::max<int64_t>(expert_bucket_capacity(routed, E, max_align), 1);
  gpu::DeviceBuffer d_x(x.size() * 2), d_w(w.size() * 2), d_act(std::size_t(cap * k) * 2),
      d_out(std::size_t(cap * n) * 2), ws(gpu::LtGemm::kWorkspaceBytes);
  const std::size_t pairs = std::max<std::size_t>(ids.size(), 1);
  gpu::DeviceBuffer d_ids(pairs * 4), d_counts(std::size_t(E) * 4), d_offsets(std::size_t(E + 1) * 4),
      d_slot(pairs * 4), d_ptok(pairs * 4), d_padtok(std::size_t(cap) * 4), d_poff(std::size_t(E + 1) * 4);
  const std::size_t pws_bytes = kernels::permute_workspace_bytes(T, 1, E);
  gpu::DeviceBuffer d_pws(std::max<std::size_t>(pws_bytes, 4));
  upload(d_x.get(), x);
  upload(d_w.get(), w);
  if (T > 0) upload(d_ids.get(), ids);
  gpu::Stream st;
  gpu::LtHandle lt;
  gpu::BlasHandle blas;
  for (const BucketRun& run : runs) {
    const int64_t P = run.align;
    std::vector<int64_t> padded(static_cast<std::size_t>(E));
    std::vector<int32_t> poff(std::size_t(E + 1), 0);
    std::set<int64_t> distinct;
    for (int e = 0; e < E; ++e) {
      padded[std::size_t(e)] = expert_bucket_rows(counts[e], P);
      poff[std::size_t(e + 1)] = poff[std::size_t(e)] + int32_t(padded[std::size_t(e)]);
      if (padded[std::size_t(e)] > 0) distinct.insert(padded[std::size_t(e)]);
    }
    const int64_t total = poff[std::size_t(E)];
    INFO("bucketed E=" << E << " tokens=" << T << " dropped=" << dropped << " n=" << n << " k=" << k << " align=" << P
                       << " padded rows=" << total << " buckets=" << distinct.size() << " " << issue_name(run.issue));
    REQUIRE(total <= cap);
    upload(d_poff.get(), poff);
    MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());  // the pageable uploads have landed before st reads them
    gpu::ExpertGemm eg(lt, E, n, k, DType::bf16, ws.get(), ws.bytes());
    for (int rep = 0; rep < 2; ++rep) {
      INFO("rep " << rep);
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_act.get(), 0xff, d_act.bytes(), st.get()));
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_out.get(), 0xff, d_out.bytes(), st.get()));
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(d_padtok.get(), 0x7f, d_padtok.bytes(), st.get()));
      kernels::PermuteParams pp;
      pp.topk_ids = d_ids.as<int32_t>();
      pp.x = nullptr;  // index maps only
      pp.permuted_x = d_act.as<bf16>();
      pp.expert_counts = d_counts.as<int32_t>();
      pp.expert_offsets = d_offsets.as<int32_t>();
      pp.slot_row = d_slot.as<int32_t>();
      pp.permuted_token = d_ptok.as<int32_t>();
      pp.workspace = d_pws.get();
      pp.workspace_bytes = pws_bytes;
      pp.num_tokens = T;
      pp.top_k = 1;
      pp.num_experts = E;
      pp.hidden = k;
      kernels::launch_permute(pp, st.get());
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
      const auto got_counts = download<int32_t>(d_counts.get(), std::size_t(E));
      const auto off = download<int32_t>(d_offsets.get(), std::size_t(E + 1));
      const auto slot_before = download<int32_t>(d_slot.get(), pairs);
      const auto ptok = download<int32_t>(d_ptok.get(), pairs);
      for (int e = 0; e < E; ++e) REQUIRE(got_counts[e] == counts[e]);
      kernels::PadExpertRowsParams pr;
      pr.topk_ids = d_ids.as<int32_t>();
      pr.expert_counts = d_counts.as<int32_t>();
      pr.expert_offsets = d_offsets.as<int32_t>();
      pr.permuted_token = d_ptok.as<int32_t>();
      pr.slot_row = d_slot.as<int32_t>();
      pr.padded_token = d_padtok.as<int32_t>();
      pr.num_tokens = T;
      pr.top_k = 1;
      pr.num_experts = E;
      pr.padded_offsets = d_poff.as<int32_t>();
      pr.num_padded_rows = total;
      kernels::launch_pad_expert_rows(pr, st.get());
      kernels::GatherRowsParams gp;
      gp.x = d_x.as<bf16>();
      gp.row_token = d_padtok.as<int32_t>();
      gp.dst = d_act.as<bf16>();
      gp.num_rows = total;
      gp.hidden = k;
      kernels::launch_gather_rows(gp, st.get());
      const int buckets = eg.run_bucketed_call(d_act.get(), d_w.get(), d_out.get(), padded, st.get(), blas, run.issue);
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
      CHECK(buckets == static_cast<int>(distinct.size()));
      const auto slot = download<int32_t>(d_slot.get(), pairs);
      const auto padtok = download<int32_t>(d_padtok.get(), std::size_t(cap));
      const auto act = download<bf16>(d_act.get(), std::size_t(cap * k));
      const auto got = download<bf16>(d_out.get(), std::size_t(cap * n));
      // slot_row: exact.
      int64_t bad_slots = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int e = ids[t];
        const int64_t want = e < 0 ? -1 : int64_t(poff[std::size_t(e)]) + (slot_before[t] - off[std::size_t(e)]);
        bad_slots += slot[t] != want || (e >= 0 && padtok[std::size_t(slot[t])] != t);
      }
      CHECK_MESSAGE(bad_slots == 0, bad_slots << " tokens with a wrong bucketed row");
      // padded_token and the gathered rows: exact over every padded row.
      int64_t bad_map = 0, bad_rows = 0, pad_rows = 0;
      for (int e = 0; e < E; ++e)
        for (int64_t r = poff[std::size_t(e)]; r < poff[std::size_t(e + 1)]; ++r) {
          const int64_t i = r - poff[std::size_t(e)];
          const bool real = i < counts[e];
          const int32_t want = real ? ptok[std::size_t(off[std::size_t(e)] + i)] : -1;
          const bool bad = padtok[std::size_t(r)] != want || (real && (want < 0 || want >= T || ids[std::size_t(want)] != e));
          bad_map += bad;
          pad_rows += !real;
          if (bad) continue;  // want may not index x
          for (int64_t c = 0; c < k; ++c) {
            const uint16_t b = bits(act[std::size_t(r * k + c)]);
            bad_rows += real ? b != bits(x[std::size_t(int64_t(want) * k + c)]) : b != 0;
          }
        }
      CHECK_MESSAGE(bad_map == 0, bad_map << " padded_token entries differ from the expected map");
      CHECK_MESSAGE(bad_rows == 0, bad_rows << " gathered elements differ from x (or a pad row is not zero)");
      CHECK(pad_rows == total - routed);
      // The GEMM output of the sampled tokens, through slot_row.
      std::vector<double> gd;
      gd.reserve(ref.size());
      for (int64_t t : sampled)
        for (int64_t j = 0; j < n; ++j) gd.push_back(__bfloat162float(got[std::size_t(int64_t(slot[t]) * n + j)]));
      CHECK(all_finite(gd));
      if (!ref.empty()) CHECK(rel_error(gd, ref) < kTol);
    }
  }
}

std::vector<BucketRun> both_issues(std::initializer_list<int64_t> aligns) {
  std::vector<BucketRun> r;
  for (int64_t a : aligns)
    for (auto i : {gpu::BucketIssue::grouped_call, gpu::BucketIssue::batched_per_bucket}) r.push_back({a, i});
  return r;
}

}  // namespace

TEST_CASE("expert GEMM: bucketed padded layout, cuBLAS grouped call and batched calls vs the float64 reference") {
  SUBCASE("ragged experts with empty ones, dropped tokens, n and k off the tile") {
    check_bucketed({5, 0, 130, 17, 64, 1, 0, 33}, 7, 136, 72, 41, both_issues({16, 64, 1}));
  }
  SUBCASE("every count already a multiple of the alignment") {
    check_bucketed({64, 128, 0, 64, 192}, 0, 200, 520, 42, both_issues({64}));
  }
  SUBCASE("one expert holds every row") { check_bucketed({0, 0, 300, 0}, 3, 264, 200, 43, both_issues({128, 64})); }
  SUBCASE("every expert empty (nothing to run)") { check_bucketed({0, 0, 0}, 5, 64, 64, 44, both_issues({128})); }
  SUBCASE("one expert, one row, k = 8") { check_bucketed({1}, 0, 8, 8, 45, both_issues({128})); }
  SUBCASE("128 experts, skewed counts (log-normal around 100 rows), one empty, one of 1031 rows") {
    std::mt19937_64 rng(46);
    std::lognormal_distribution<double> d(std::log(100.0), 0.6);
    std::vector<int> counts(128);
    for (int& c : counts) c = static_cast<int>(d(rng));
    counts[17] = 0;
    counts[90] = 1031;
    counts[3] = 128;
    check_bucketed(counts, 11, 200, 520, 46, both_issues({128, 64, 1}), 5);
  }
  SUBCASE("Qwen3-30B-A3B gate|up (n 1536, k 2048) and down (n 2048, k 768), ~1024-row experts") {
    const std::vector<int> counts{40, 0, 129, 3, 1024, 977, 1100, 896};
    check_bucketed(counts, 0, 1536, 2048, 47, both_issues({128, 64}), 13);
    check_bucketed(counts, 0, 2048, 768, 48, both_issues({128, 64}), 13);
  }
}

TEST_CASE("expert GEMM: padded batch rejects bad parameters") {
  gpu::LtHandle lt;
  gpu::DeviceBuffer ws(gpu::LtGemm::kWorkspaceBytes);
  gpu::ExpertGemm fp8(lt, 2, 16, 16, DType::fp8_e4m3, ws.get(), ws.bytes());
  gpu::Stream st;
  CHECK_THROWS_AS(fp8.run_padded_batch(ws.get(), ws.get(), ws.get(), 16, st.get()), InputError);
  gpu::ExpertGemm eg(lt, 2, 16, 16, DType::bf16, ws.get(), ws.bytes());
  CHECK_THROWS_AS(eg.run_padded_batch(ws.get(), ws.get(), ws.get(), -1, st.get()), InputError);
  kernels::PadExpertRowsParams pr;  // pointers unset
  pr.num_tokens = 1;
  pr.top_k = 1;
  pr.num_experts = 1;
  pr.rows_per_expert = 16;
  CHECK_THROWS_AS(kernels::launch_pad_expert_rows(pr, st.get()), InputError);
  kernels::GatherRowsParams gp;
  gp.num_rows = 1;
  gp.hidden = 0;
  CHECK_THROWS_AS(kernels::launch_gather_rows(gp, st.get()), InputError);
  // The per-expert layout: rows_per_expert must be 0 with padded_offsets, num_padded_rows 0 without.
  gpu::DeviceBuffer ints(64 * 4);
  kernels::PadExpertRowsParams ok;
  ok.topk_ids = ok.expert_counts = ok.expert_offsets = ok.permuted_token = ints.as<int32_t>();
  ok.slot_row = ok.padded_token = ints.as<int32_t>();
  ok.num_tokens = 1;
  ok.top_k = 1;
  ok.num_experts = 1;
  ok.padded_offsets = ints.as<int32_t>();
  ok.num_padded_rows = 16;
  CHECK(kernels::pad_expert_rows_unsupported_reason(ok).empty());
  auto with_rpe = ok;
  with_rpe.rows_per_expert = 16;
  CHECK_THROWS_AS(kernels::launch_pad_expert_rows(with_rpe, st.get()), InputError);
  auto negative = ok;
  negative.num_padded_rows = -1;
  CHECK_THROWS_AS(kernels::launch_pad_expert_rows(negative, st.get()), InputError);
  auto uniform_with_rows = ok;
  uniform_with_rows.padded_offsets = nullptr;
  uniform_with_rows.rows_per_expert = 16;
  CHECK_THROWS_AS(kernels::launch_pad_expert_rows(uniform_with_rows, st.get()), InputError);
  // The bucketed call: bf16 only, one padded count per expert, counts >= 0.
  gpu::BlasHandle blas;
  CHECK_THROWS_AS(fp8.run_bucketed_call(ws.get(), ws.get(), ws.get(), {16, 16}, st.get(), blas), InputError);
  CHECK_THROWS_AS(eg.run_bucketed_call(ws.get(), ws.get(), ws.get(), {16}, st.get(), blas), InputError);
  CHECK_THROWS_AS(eg.run_bucketed_call(ws.get(), ws.get(), ws.get(), {16, -16}, st.get(), blas), InputError);
  CHECK(eg.run_bucketed_call(ws.get(), ws.get(), ws.get(), {0, 0}, st.get(), blas) == 0);
}

TEST_CASE("expert GEMM: stream fan-out rejects bad parameters") {
  CHECK_THROWS_AS(gpu::StreamFanout(0, 1 << 20), InputError);
  gpu::LtHandle lt;
  gpu::DeviceBuffer ws(gpu::LtGemm::kWorkspaceBytes);
  gpu::ExpertGemm eg(lt, 2, 16, 16, DType::bf16, ws.get(), ws.bytes());
  eg.set_counts({1, 2});
  gpu::StreamFanout small(2, ws.bytes() / 2);  // smaller per-stream workspace than the plans
  gpu::Stream st;
  CHECK_THROWS_AS(eg.run(ws.get(), ws.get(), ws.get(), nullptr, nullptr, st.get(), small), InputError);
  gpu::BlasHandle blas;  // the cuBLAS grouped call is bf16 only
  gpu::ExpertGemm fp8(lt, 2, 16, 16, DType::fp8_e4m3, ws.get(), ws.bytes());
  fp8.set_counts({1, 2});
  CHECK_THROWS_AS(fp8.run_grouped_call(ws.get(), ws.get(), ws.get(), st.get(), blas), InputError);
}

TEST_CASE("grouped_gemm: rejects unsupported parameters") {
  gpu::DeviceBuffer buf(1 << 12);
  kernels::GroupedGemmParams p;
  p.act = buf.as<bf16>();
  p.weights = buf.as<bf16>();
  p.out = buf.as<bf16>();
  p.expert_offsets = buf.as<int32_t>();
  p.num_experts = 2;
  p.n = 16;
  p.k = 16;
  CHECK(kernels::grouped_gemm_unsupported_reason(p, device()).empty());
  auto rejects = [&](kernels::GroupedGemmParams q, const std::string& needle) {
    CHECK(kernels::grouped_gemm_unsupported_reason(q, device()).find(needle) != std::string::npos);
    bool thrown = false;
    try {
      kernels::launch_grouped_gemm(q, nullptr);
    } catch (const InputError& e) {
      thrown = std::string(e.what()).find(needle) != std::string::npos;
    }
    CHECK_MESSAGE(thrown, "expected an InputError naming " << needle);
  };
  auto q = p;
  q.n = 12;
  rejects(q, "n=12");
  q = p;
  q.k = 0;
  rejects(q, "k=0");
  q = p;
  q.num_experts = 0;
  rejects(q, "num_experts=0");
  q = p;
  q.act = reinterpret_cast<const bf16*>(buf.as<char>() + 2);
  rejects(q, "aligned");
}

namespace {

// Expert ids [tokens, top_k] of `tokens` tokens each routed to `top_k` distinct experts drawn
// uniformly, and their row counts per expert.
std::vector<int32_t> routed_ids(int64_t tokens, int top_k, int E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> out;
  out.reserve(std::size_t(tokens * top_k));
  std::vector<int> ids(E);
  std::iota(ids.begin(), ids.end(), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int i = 0; i < top_k; ++i) std::swap(ids[i], ids[i + rng() % (E - i)]);
    out.insert(out.end(), ids.begin(), ids.begin() + top_k);
  }
  return out;
}
std::vector<int64_t> counts_of(const std::vector<int32_t>& ids, int E) {
  std::vector<int64_t> c(E, 0);
  for (int32_t e : ids) ++c[e];
  return c;
}

}  // namespace

// Qwen3-30B-A3B expert GEMMs (E 128, top-8, H 2048, I 768) at a 2048-token chunk and at an
// 8 x 2048-token prefill step: the grouped kernel, the executor's per-expert cuBLASLt path (its
// GEMMs only: the host count copy and sync are not timed) on 1 stream (the "vs per-exp"
// baseline) and forked over 2, 4 and 8 streams, as one cuBLAS grouped call (cublasGemmGroupedBatchedEx;
// its pointer-array upload happens before the timed runs), on the bucketed padded layout
// (kExpertGemmBucketed / kExpertGemmBucketedBatched: every expert's rows rounded up to P = 128 and
// 64, one cuBLAS grouped call with a group per distinct padded count, or one batched call per
// count; TFLOP/s over the real rows' FLOPs, the pad rows' work counted as overhead), and one
// cuBLASLt GEMM of the same total rows (the dense bound), all in this run. The layout's own cost
// is timed apart, once per token count: the per-expert path's permute with its row gather, against
// the bucketed path's index-only permute + padded-offset upload + pad remap + gather (both also
// pay the host count copy, not timed). Not a test: prints only.
TEST_CASE("bench: grouped expert GEMM vs cuBLASLt (Qwen3-30B-A3B expert shapes)" * doctest::skip()) {
  const int E = 128, K = 8;
  const int64_t H = 2048, I = 768;
  gpu::Stream st;
  gpu::L2Flusher flusher(device());
  gpu::TimingOptions topt;
  topt.warmup_iters = 3;
  topt.timed_iters = 20;
  gpu::LtHandle lt;
  gpu::DeviceBuffer ws(gpu::LtGemm::kWorkspaceBytes);
  std::printf("%-76s %10s %8s %10s %10s %10s %10s\n", "case", "time(us)", "noise", "TFLOP/s", "vs dense", "vs per-exp",
              "% 797.6");
  for (int64_t tokens : {int64_t(2048), int64_t(16384)}) {
    const int64_t rows = tokens * K;
    const auto ids = routed_ids(tokens, K, E, 11);
    const auto counts = counts_of(ids, E);
    std::vector<int32_t> off(E + 1, 0);
    for (int e = 0; e < E; ++e) off[e + 1] = off[e] + int32_t(counts[e]);
    constexpr int64_t kAligns[] = {128, 64};
    // Rows of the bucketed layout at the largest alignment (the buffers below hold it).
    const int64_t cap = expert_bucket_capacity(rows, E, kAligns[0]);
    {
      // The layout's cost: the per-expert path's permute (index maps + gather of x in expert order)
      // against the bucketed path's index-only permute, the padded-offset upload (pinned host ->
      // device) and the pad remap + gather into the bucketed rows.
      gpu::DeviceBuffer x(std::size_t(tokens * H) * 2), px(std::size_t(cap * H) * 2), d_ids(ids.size() * 4),
          d_counts(std::size_t(E) * 4), d_offs(std::size_t(E + 1) * 4), d_slot(ids.size() * 4),
          d_ptok(ids.size() * 4), d_padtok(std::size_t(cap) * 4), d_poff(std::size_t(E + 1) * 4),
          d_pws(kernels::permute_workspace_bytes(tokens, K, E));
      kernels::FillParams f;
      f.data = x.get();
      f.num_elements = tokens * H;
      kernels::launch_fill_uniform(f, st.get());
      upload(d_ids.get(), ids);
      kernels::PermuteParams pp;
      pp.topk_ids = d_ids.as<int32_t>();
      pp.x = x.as<bf16>();
      pp.permuted_x = px.as<bf16>();
      pp.expert_counts = d_counts.as<int32_t>();
      pp.expert_offsets = d_offs.as<int32_t>();
      pp.slot_row = d_slot.as<int32_t>();
      pp.permuted_token = d_ptok.as<int32_t>();
      pp.workspace = d_pws.get();
      pp.workspace_bytes = d_pws.bytes();
      pp.num_tokens = tokens;
      pp.top_k = K;
      pp.num_experts = E;
      pp.hidden = H;
      const auto t_permute = gpu::time_op([&](cudaStream_t s) { kernels::launch_permute(pp, s); }, st.get(), topt,
                                          &flusher);
      std::printf("%-76s %10.1f %8.3f   (memory-bound: no TFLOP/s)\n",
                  (std::to_string(tokens) + " tok permute + gather, per-expert rows").c_str(), t_permute.time_us.median,
                  t_permute.time_us.noise());
      int32_t* poff_host = nullptr;
      MIXSERVE_CUDA_CHECK(cudaMallocHost(&poff_host, std::size_t(E + 1) * 4));
      for (int64_t P : kAligns) {
        poff_host[0] = 0;
        for (int e = 0; e < E; ++e) poff_host[e + 1] = poff_host[e] + int32_t(expert_bucket_rows(counts[e], P));
        const int64_t total = poff_host[E];
        kernels::PadExpertRowsParams pr;
        pr.topk_ids = d_ids.as<int32_t>();
        pr.expert_counts = d_counts.as<int32_t>();
        pr.expert_offsets = d_offs.as<int32_t>();
        pr.permuted_token = d_ptok.as<int32_t>();
        pr.slot_row = d_slot.as<int32_t>();
        pr.padded_token = d_padtok.as<int32_t>();
        pr.num_tokens = tokens;
        pr.top_k = K;
        pr.num_experts = E;
        pr.padded_offsets = d_poff.as<int32_t>();
        pr.num_padded_rows = total;
        kernels::GatherRowsParams gp;
        gp.x = x.as<bf16>();
        gp.row_token = d_padtok.as<int32_t>();
        gp.dst = px.as<bf16>();
        gp.num_rows = total;
        gp.hidden = H;
        auto idx_only = pp;
        idx_only.x = nullptr;
        // The permute rewrites slot_row before the pad remaps it, so every timed run is a real one.
        const auto t_pad = gpu::time_op([&](cudaStream_t s) {
          kernels::launch_permute(idx_only, s);
          MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(d_poff.get(), poff_host, std::size_t(E + 1) * 4, cudaMemcpyHostToDevice, s));
          kernels::launch_pad_expert_rows(pr, s);
          kernels::launch_gather_rows(gp, s);
        }, st.get(), topt, &flusher);
        std::printf("%-76s %10.1f %8.3f   (%.1f%% pad rows)\n",
                    (std::to_string(tokens) + " tok permute + pad + gather, bucketed P=" + std::to_string(P)).c_str(),
                    t_pad.time_us.median, t_pad.time_us.noise(), 100.0 * double(total - rows) / double(total));
      }
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(st.get()));
      MIXSERVE_CUDA_CHECK(cudaFreeHost(poff_host));
    }
    for (const auto& [name, n, k] : {std::tuple<const char*, int64_t, int64_t>{"gate|up", 2 * I, H},
                                     std::tuple<const char*, int64_t, int64_t>{"down", H, I}}) {
      // act and out hold the bucketed layout's rows (the other paths use the first `rows`).
      gpu::DeviceBuffer act(std::size_t(cap * k) * 2), w(std::size_t(E * n * k) * 2), out(std::size_t(cap * n) * 2),
          d_off(off.size() * 4);
      kernels::FillParams f;
      f.data = act.get();
      f.num_elements = cap * k;
      kernels::launch_fill_uniform(f, st.get());
      f.data = w.get();
      f.num_elements = E * n * k;
      f.seed = 2;
      kernels::launch_fill_uniform(f, st.get());
      upload(d_off.get(), off);
      const double flops = 2.0 * double(rows) * double(n) * double(k);
      kernels::GroupedGemmParams p;
      p.act = act.as<bf16>();
      p.weights = w.as<bf16>();
      p.out = out.as<bf16>();
      p.expert_offsets = d_off.as<int32_t>();
      p.num_experts = E;
      p.n = n;
      p.k = k;
      p.impl = kernels::GroupedGemmImpl::mma_sync;
      const auto tm = gpu::time_op([&](cudaStream_t s) { kernels::launch_grouped_gemm(p, s); }, st.get(), topt, &flusher);
      gpu::TimingResult tw, tww;
      if (has_wgmma()) {
        p.impl = kernels::GroupedGemmImpl::wgmma;
        tw = gpu::time_op([&](cudaStream_t s) { kernels::launch_grouped_gemm(p, s); }, st.get(), topt, &flusher);
        p.impl = kernels::GroupedGemmImpl::wgmma_wide;
        tww = gpu::time_op([&](cudaStream_t s) { kernels::launch_grouped_gemm(p, s); }, st.get(), topt, &flusher);
      }
      gpu::ExpertGemm eg(lt, E, n, k, DType::bf16, ws.get(), ws.bytes());
      eg.set_counts(counts);
      const auto te = gpu::time_op([&](cudaStream_t s) { eg.run(act.get(), w.get(), out.get(), nullptr, nullptr, s); },
                                   st.get(), topt, &flusher);
      // The same GEMMs forked over several streams (core/expert_path.hpp kExpertGemmStreams is the
      // executor's default).
      std::vector<std::pair<int, gpu::TimingResult>> t_streams;
      for (int ns : {2, 4, 8}) {
        gpu::StreamFanout fan(ns, ws.bytes());
        t_streams.emplace_back(ns, gpu::time_op([&](cudaStream_t s) {
                                 eg.run(act.get(), w.get(), out.get(), nullptr, nullptr, s, fan);
                               }, st.get(), topt, &flusher));
      }
      // The same GEMMs as one cuBLAS grouped call (the pointer arrays are uploaded on the first
      // call only: the counts and buffers do not change between the timed runs).
      gpu::BlasHandle blas;
      const auto tg = gpu::time_op([&](cudaStream_t s) { eg.run_grouped_call(act.get(), w.get(), out.get(), s, blas); },
                                   st.get(), topt, &flusher);
      // The bucketed layout's GEMMs (pointer arrays uploaded on the first call only, as above).
      struct BucketedRow {
        std::string what;
        gpu::TimingResult t;
      };
      std::vector<BucketedRow> t_bucketed;
      for (int64_t P : kAligns) {
        std::vector<int64_t> padded(static_cast<std::size_t>(E));
        int64_t total = 0;
        for (int e = 0; e < E; ++e) total += padded[std::size_t(e)] = expert_bucket_rows(counts[e], P);
        for (auto issue : {gpu::BucketIssue::grouped_call, gpu::BucketIssue::batched_per_bucket}) {
          gpu::ExpertGemm egb(lt, E, n, k, DType::bf16, ws.get(), ws.bytes());
          int buckets = 0;
          const auto t = gpu::time_op([&](cudaStream_t s) {
            buckets = egb.run_bucketed_call(act.get(), w.get(), out.get(), padded, s, blas, issue);
          }, st.get(), topt, &flusher);
          char what[96];
          std::snprintf(what, sizeof what, " bucketed P=%lld %s (%d buckets, +%.1f%% rows)", static_cast<long long>(P),
                        issue == gpu::BucketIssue::grouped_call ? "1 grouped call" : "batched/bucket", buckets,
                        100.0 * double(total - rows) / double(rows));
          t_bucketed.push_back({what, t});
        }
      }
      gpu::LtGemm dense(lt, {rows, n, k, DType::bf16}, ws.get(), ws.bytes());
      gpu::GemmOperands ops;
      ops.act = act.get();
      ops.weight = w.get();
      ops.out = out.get();
      const auto td = gpu::time_op([&](cudaStream_t s) { dense.run(ops, s); }, st.get(), topt, &flusher);
      auto row = [&](const std::string& what, const gpu::TimingResult& r) {
        const double tf = flops / (r.time_us.median * 1e6);
        std::printf("%-76s %10.1f %8.3f %10.1f %9.2fx %9.2fx %9.1f%%\n", what.c_str(), r.time_us.median,
                    r.time_us.noise(), tf, td.time_us.median / r.time_us.median, te.time_us.median / r.time_us.median,
                    100.0 * tf / 797.6);
      };
      const std::string tag = std::to_string(tokens) + " tok " + name;
      row(tag + " grouped mma.sync", tm);
      if (tw.time_us.median > 0) row(tag + " grouped wgmma 128x128", tw);
      if (tww.time_us.median > 0) row(tag + " grouped wgmma 128x256", tww);
      row(tag + " per-expert cuBLASLt", te);
      for (const auto& [ns, t] : t_streams) row(tag + " per-expert cuBLASLt " + std::to_string(ns) + " streams", t);
      row(tag + " per-expert cuBLAS grouped call", tg);
      for (const auto& b : t_bucketed) row(tag + b.what, b.t);
      row(tag + " dense cuBLASLt", td);
    }
  }
}

// One prefill step of 8 sequences x 2048 tokens (16384 tokens, 131072 routed rows) of
// Qwen3-30B-A3B at full width (device-drawn weights), with the grouped-GEMM, the per-expert
// cuBLASLt expert paths on 1, 2, 4 and 8 streams and as one cuBLAS grouped call per projection
// (host count copy included, as the step runs it), the padded batch, the bucketed padded layout
// (P = 128 and 64; one grouped call, or one batched call per bucket; its layer runs and buckets per
// projection printed under each row), the automatic path, and the previous and the
// pipelined prefill attention kernels in the same run: step time and TFLOP/s over the step's matrix FLOPs (q/k/v/o,
// router, top-8 experts, causal attention QK^T and PV, LM head per sequence) against the measured
// cuBLAS bf16 peak (797.6 TFLOP/s, profiles/h200.yaml). Layers: MIXSERVE_BENCH_LAYERS (default
// 4). With MIXSERVE_BENCH_PROFILE=1 one more step of the automatic path runs between cudaProfilerStart and
// Stop, for a per-kernel breakdown under
//   ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv ...
// Not a test: prints only.
//   test_gpu_grouped_gemm --no-skip -tc='bench: prefill*'
TEST_CASE("bench: prefill 8x2048 in one step, Qwen3-30B-A3B" * doctest::skip()) {
  const char* env = std::getenv("MIXSERVE_BENCH_LAYERS");
  const int layers = env ? std::atoi(env) : 4;
  const bool profile = std::getenv("MIXSERVE_BENCH_PROFILE") != nullptr;
  const ModelSpec m = model::with_num_layers(load_model("qwen3-30b-a3b"), layers);
  const int seqs = 8, len = 2048;
  gpu::GpuModelConfig c;
  c.block_size = 16;
  c.max_tokens_per_step = seqs * len;
  c.max_seqs_per_step = seqs;
  c.max_blocks_per_seq = len / c.block_size;
  c.num_blocks = seqs * c.max_blocks_per_seq;
  c.expert_padded_capacity = 1.25;  // room for the padded-batch rows (off by default)
  // Built for the bucketed layout at the largest alignment timed below (its buffers: routed rows +
  // 128 x 127; the rows above set the path of each variant).
  c.expert_gemm_streams = kExpertGemmBucketed;
  c.expert_bucket_row_align = 128;
  gpu::GpuModel g(m, 7, c);
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, m.vocab_size - 1);
  std::vector<model::SequenceStep> batch;
  for (int s = 0; s < seqs; ++s) {
    model::SequenceStep q;
    for (int i = 0; i < len; ++i) q.tokens.push_back(tok(rng));
    for (int k = 0; k < c.max_blocks_per_seq; ++k) q.block_table.push_back(s * c.max_blocks_per_seq + k);
    batch.push_back(q);
  }
  const auto& a = m.attention;
  const double H = m.hidden_size, QW = double(m.q_width()), KVW = double(a.num_kv_heads) * a.head_dim;
  double proj = 0, attn = 0, experts = 0, head = 0;
  for (const auto& q : batch) {
    const double n = double(q.tokens.size()), ctx = double(q.position) + n / 2.0;
    experts += m.num_layers * 2 * n * 3.0 * m.moe.top_k * H * m.moe.expert_intermediate_size;
    attn += m.num_layers * 4 * n * ctx * QW;
    proj += m.num_layers * 2 * n * (2 * H * QW + 2 * H * KVW + H * m.moe.num_experts);
    head += 2 * H * m.vocab_size;
  }
  const double flops = proj + attn + experts + head;
  gpu::TimingOptions topt;
  topt.warmup_iters = 2;
  topt.timed_iters = 5;
  topt.flush_l2 = false;
  std::printf("# %s, %d layers, 8 x 2048 prefill in one step: %.2f TFLOP (experts %.1f%%, attention %.1f%%, "
              "q/k/v/o + router %.1f%%)\n",
              m.name.c_str(), m.num_layers, flops / 1e12, 100 * experts / flops, 100 * attn / flops,
              100 * proj / flops);
  std::printf("%-40s %12s %8s %10s %12s %10s\n", "expert path", "step (ms)", "noise", "TFLOP/s", "% of 797.6",
              "vs first");
  struct Variant {
    const char* name;
    gpu::ExpertPath path;
    int streams;
    kernels::AttentionPrefillKernel attention;
    int64_t bucket_align = kExpertBucketRowAlign;  // kExpertGemmBucketed[Batched] only
  };
  // The first row is the baseline of the "vs first" column: the step as it ran before the
  // streams and the pipelined attention (grouped GEMM, the previous attention kernel).
  constexpr auto kOldAttn = kernels::AttentionPrefillKernel::registers;
  const auto kNewAttn = gpu::GpuModelConfig{}.attention_prefill_kernel;  // the executor's default
  const Variant variants[] = {
      {"grouped GEMM, old attention", gpu::ExpertPath::grouped_gemm, 1, kOldAttn},
      {"grouped GEMM", gpu::ExpertPath::grouped_gemm, 1, kNewAttn},
      {"cuBLASLt per expert, 1 stream", gpu::ExpertPath::cublaslt, 1, kNewAttn},
      {"cuBLASLt per expert, 2 streams", gpu::ExpertPath::cublaslt, 2, kNewAttn},
      {"cuBLASLt per expert, 4 streams", gpu::ExpertPath::cublaslt, 4, kNewAttn},
      {"cuBLASLt per expert, 8 streams", gpu::ExpertPath::cublaslt, 8, kNewAttn},
      {"cuBLAS grouped call per projection", gpu::ExpertPath::cublaslt, kExpertGemmGroupedCall, kNewAttn},
      {"cuBLASLt padded batch", gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, kNewAttn},
      {"automatic, cuBLASLt padded batch", gpu::ExpertPath::automatic, kExpertGemmPaddedBatch, kNewAttn},
      {"bucketed P=128, 1 grouped call", gpu::ExpertPath::cublaslt, kExpertGemmBucketed, kNewAttn, 128},
      {"bucketed P=64, 1 grouped call", gpu::ExpertPath::cublaslt, kExpertGemmBucketed, kNewAttn, 64},
      {"bucketed P=128, batched call per bucket", gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, kNewAttn, 128},
      {"bucketed P=64, batched call per bucket", gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, kNewAttn, 64},
      {"automatic, bucketed P=128, 1 grouped call", gpu::ExpertPath::automatic, kExpertGemmBucketed, kNewAttn, 128},
      {"automatic, old attention", gpu::ExpertPath::automatic, kExpertGemmStreams, kOldAttn},
      {"automatic, attention pipelined (8 warps)", gpu::ExpertPath::automatic, kExpertGemmStreams,
       kernels::AttentionPrefillKernel::pipelined},
      {"automatic, 2 streams (the default before session 5)", gpu::ExpertPath::automatic, kExpertGemmStreams, kNewAttn},
      {"automatic (executor default)", gpu::ExpertPath::automatic, gpu::GpuModelConfig{}.expert_gemm_streams, kNewAttn},
  };
  double first_us = 0;
  for (const Variant& v : variants) {
    try {
      g.set_expert_path(v.path);
      g.set_expert_bucket_row_align(v.bucket_align);
      g.set_expert_gemm_streams(v.streams);
      g.set_attention_prefill_kernel(v.attention);
      g.prepare(batch, gpu::StepOptions{});
      const auto before = g.padded_batch_counts();
      const auto r = gpu::time_op([&](cudaStream_t s) { g.enqueue(s); }, g.stream(), topt, nullptr);
      const double tf = flops / (r.time_us.median * 1e6);
      if (first_us == 0) first_us = r.time_us.median;
      std::printf("%-40s %12.2f %8.3f %10.1f %11.1f%% %9.3fx\n", v.name, r.time_us.median / 1e3, r.time_us.noise(),
                  tf, 100.0 * tf / 797.6, first_us / r.time_us.median);
      if (v.streams == kExpertGemmPaddedBatch) {
        // Whether the row timed the padded layout or its fallback (expert_padded_capacity).
        const auto& after = g.padded_batch_counts();
        std::printf("#   %s: %lld MoE layer runs padded, %lld fell back to %d streams\n", v.name,
                    static_cast<long long>(after.padded - before.padded),
                    static_cast<long long>(after.fallback - before.fallback), kExpertGemmStreams);
      }
      if (is_bucketed_expert_gemm(v.streams)) {
        // Layer runs on the bucketed layout, and the buckets per projection (the groups of the one
        // grouped call, or the host calls of the batched form).
        const auto& after = g.padded_batch_counts();
        const auto runs = after.bucketed - before.bucketed;
        std::printf("#   %s: %lld MoE layer runs bucketed, %.1f buckets per projection on average\n", v.name,
                    static_cast<long long>(runs),
                    runs > 0 ? double(after.buckets - before.buckets) / double(runs) : 0.0);
      }
    } catch (const std::runtime_error& e) {
      FAIL_CHECK(v.name << ": " << e.what());
    }
  }
  g.set_expert_gemm_streams(kExpertGemmStreams);
  g.set_expert_bucket_row_align(kExpertBucketRowAlign);
  g.set_attention_prefill_kernel(kNewAttn);
  if (profile) {
    g.set_expert_path(gpu::ExpertPath::automatic);
    g.prepare(batch, gpu::StepOptions{});
    MIXSERVE_CUDA_CHECK(cudaProfilerStart());
    g.enqueue(g.stream());
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
    MIXSERVE_CUDA_CHECK(cudaProfilerStop());
  }
}
