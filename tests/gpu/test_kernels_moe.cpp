// GPU tests of the MoE layer kernels (rmsnorm, rope, router, permute, swiglu, combine, the plain and
// grouped GEMV of executor/expert_gemm.hpp) against the
// float64 CPU references in ref_moe_kernels.hpp (STYLE.md §12-13): fresh seeded random inputs,
// outputs poisoned before every run (bf16/fp32 NaN, int32 0x7f7f7f7f), awkward sizes (0, 1,
// primes, widths that are not multiples of the 8-element vector, misaligned pointers) and the
// real model shapes (Qwen3-30B-A3B, Mixtral-8x7B, OLMoE, gpt-oss, DeepSeek-V3). Index outputs
// (top-k ids, permute maps, gathered rows) must match exactly: 0 wrong.
// The benchmark (achieved GB/s vs the device copy measured in the same run) is the test case
// "bench: ..." marked skip; run it with: test_gpu_kernels --no-skip -tc="bench*"
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/gpu/model_forward_kernels.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/kernels/combine.cuh"
#include "mixserve/kernels/grouped_gemm.cuh"
#include "mixserve/kernels/moe_route.cuh"
#include "mixserve/kernels/permute.cuh"
#include "mixserve/kernels/rmsnorm.cuh"
#include "mixserve/kernels/rope.cuh"
#include "mixserve/kernels/router.cuh"
#include "mixserve/kernels/swiglu.cuh"
#include "ref_moe_kernels.hpp"
#include "reference.hpp"

using namespace mixserve;
using namespace mixserve::test;
using kernels::RouterScoring;
using bf16 = __nv_bfloat16;

namespace {

// bf16 outputs: one rounding to bf16 (unit roundoff 2^-9 = 2e-3 per element, ~1e-3 norm-wise for
// random data), bf16 inputs read exactly, fp32 accumulation (<= 32768 terms: ~1e-4 at worst);
// the residual path rounds the sum once more before normalising. 1e-2 leaves margin, while any
// indexing, layout or formula error gives O(1).
constexpr double kTolBf16Out = 1e-2;
// fp32 router weights: exp and the division within a few ulp, the softmax denominator a sum of
// <= 256 fp32 terms (worst-case bound 256 * 2^-24 = 1.5e-5, typical sqrt of that); 3e-5 bounds it.
constexpr double kTolRouterWeights = 3e-5;
// Router selection scores computed in fp32 (sigmoid + bias, group sums of two): within ~1e-6 of
// the float64 value for scores below 4 (a few ulp of 4.8e-7). Decisions closer than this are
// genuine near-ties that either order resolves correctly; those tokens are not compared.
constexpr double kRouterTieMargin = 4e-6;

int device() {
  int d = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

// A device buffer of n elements (at least 16 bytes, so a zero-size case still gets a pointer).
struct Dev {
  gpu::DeviceBuffer buf;
  explicit Dev(std::size_t bytes) : buf(std::max<std::size_t>(bytes, 16)) {}
  void* get() const { return buf.get(); }
  template <class T> T* as() const { return buf.as<T>(); }
  void poison() const { MIXSERVE_CUDA_CHECK(cudaMemset(buf.get(), 0xff, buf.bytes())); }       // bf16/fp32 NaN
  void poison_int() const { MIXSERVE_CUDA_CHECK(cudaMemset(buf.get(), 0x7f, buf.bytes())); }   // int32 0x7f7f7f7f
};

std::vector<bf16> rand_bf16(std::size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<bf16> v(n);
  for (auto& x : v) x = __float2bfloat16_rn(d(rng));
  return v;
}
std::vector<float> rand_f32(std::size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
bool is_nan_bits(const bf16& v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b == 0xffff;
}
uint16_t bits(const bf16& v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

void sync() { MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize()); }

// Runs `f` and checks it throws InputError whose message contains `needle`.
template <class F>
void check_rejects(F&& f, const std::string& needle) {
  bool thrown = false;
  try {
    f();
  } catch (const InputError& e) {
    thrown = true;
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
  INFO("expected an InputError containing '" << needle << "'");
  CHECK(thrown);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST_CASE("rmsnorm: float64 reference, with and without the residual add, awkward sizes and QK-norm") {
  struct Case {
    int64_t rows;
    int width;
    bool residual;
    int misalign;  // elements added to every pointer (1: not 16-byte aligned, scalar path)
  };
  const std::vector<Case> cases = {
      {0, 2048, true, 0},    {1, 2048, false, 0},  {1, 2048, true, 0},    {7, 2048, true, 0},
      {131, 4096, true, 0},  {3, 1000, false, 0},  {5, 7, true, 0},       {13, 129, false, 0},
      {1, 7168, true, 0},    {64, 8192, true, 0},  {2, 16384, false, 0},  {11, 2048, true, 1},
      {7 * 32, 128, false, 0} /* QK-norm: Qwen3 q heads of 7 tokens */, {131 * 4, 128, false, 0},
      {1, 1, false, 0},      {37, 512, true, 0},   {37, 520, true, 0}};
  uint64_t seed = 1000;
  for (const auto& c : cases) {
    INFO("rows=" << c.rows << " width=" << c.width << " residual=" << c.residual << " misalign=" << c.misalign);
    const std::size_t n = c.rows * c.width, pad = c.misalign;
    const auto x = rand_bf16(n, ++seed, -2.0f, 2.0f), r = rand_bf16(n, ++seed, -2.0f, 2.0f);
    const auto w = rand_bf16(c.width, ++seed, 0.5f, 1.5f);
    Dev dx((n + pad) * 2), dr((n + pad) * 2), dro((n + pad) * 2), dw((c.width + pad) * 2), dout((n + pad) * 2);
    upload(dx.as<bf16>() + pad, x);
    upload(dr.as<bf16>() + pad, r);
    upload(dw.as<bf16>() + pad, w);
    dout.poison();
    dro.poison();
    kernels::RmsNormParams p;
    p.x = dx.as<bf16>() + pad;
    p.residual = c.residual ? dr.as<bf16>() + pad : nullptr;
    p.residual_out = c.residual ? dro.as<bf16>() + pad : nullptr;
    p.weight = dw.as<bf16>() + pad;
    p.out = dout.as<bf16>() + pad;
    p.num_rows = c.rows;
    p.width = c.width;
    p.eps = 1e-6f;
    REQUIRE(kernels::is_supported(p, device()));
    kernels::launch_rmsnorm(p, nullptr);
    sync();
    if (n == 0) continue;
    const auto ref = moe_ref::rmsnorm(to_double(x), c.residual ? to_double(r) : std::vector<double>{}, to_double(w),
                                      c.rows, c.width, 1e-6);
    const auto got = to_double(download<bf16>(p.out, n));
    REQUIRE(norm(ref.out) > 0);
    CHECK(all_finite(got));
    const double err = rel_error(got, ref.out);
    INFO("rel error out " << err);
    CHECK(err < kTolBf16Out);
    if (c.residual) {
      const auto got_r = to_double(download<bf16>(p.residual_out, n));
      CHECK(all_finite(got_r));
      CHECK(rel_error(got_r, ref.residual_out) < kTolBf16Out);
    }
  }
}

TEST_CASE("rmsnorm: in place (out = x, residual_out = residual) matches the out-of-place result") {
  const int64_t rows = 131;
  const int width = 2048;
  const std::size_t n = rows * width;
  const auto x = rand_bf16(n, 77, -2, 2), r = rand_bf16(n, 78, -2, 2), w = rand_bf16(width, 79, 0.5f, 1.5f);
  Dev dx(n * 2), dr(n * 2), dw(width * 2), dout(n * 2), dro(n * 2);
  upload(dx.as<bf16>(), x);
  upload(dr.as<bf16>(), r);
  upload(dw.as<bf16>(), w);
  kernels::RmsNormParams p{dx.as<bf16>(), dr.as<bf16>(), dro.as<bf16>(), dw.as<bf16>(), dout.as<bf16>(), rows, width, 1e-6f};
  kernels::launch_rmsnorm(p, nullptr);
  sync();
  const auto want_out = download<bf16>(dout.get(), n), want_res = download<bf16>(dro.get(), n);
  p.out = dx.as<bf16>();
  p.residual_out = dr.as<bf16>();
  kernels::launch_rmsnorm(p, nullptr);
  sync();
  const auto got_out = download<bf16>(dx.get(), n), got_res = download<bf16>(dr.get(), n);
  int64_t wrong = 0;
  for (std::size_t i = 0; i < n; ++i) wrong += bits(got_out[i]) != bits(want_out[i]) || bits(got_res[i]) != bits(want_res[i]);
  CHECK(wrong == 0);
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("rope: float64 reference, model shapes, partial rotary, strided fused qkv, mixed positions") {
  struct Case {
    const char* name;
    int64_t tokens;
    int hq, hkv, head_dim, rotary_dim;
    float theta;
    bool fused_qkv;  // q and k inside one [tokens, (hq + 2 hkv) * head_dim] buffer
    bool with_k;
  };
  const std::vector<Case> cases = {
      {"qwen3-30b-a3b", 0, 32, 4, 128, 128, 1e6f, false, true},  {"qwen3-30b-a3b", 1, 32, 4, 128, 128, 1e6f, false, true},
      {"qwen3-30b-a3b", 131, 32, 4, 128, 128, 1e6f, true, true}, {"mixtral-8x7b", 7, 32, 8, 128, 128, 1e6f, false, true},
      {"olmoe", 13, 16, 16, 128, 128, 1e4f, true, true},         {"partial 64/32", 7, 8, 2, 64, 32, 1e4f, false, true},
      {"head 256 rot 64", 5, 4, 1, 256, 64, 1e4f, false, true},  {"head 80 (odd vec)", 3, 5, 1, 80, 80, 1e4f, true, true},
      {"q only, 1 head", 1, 1, 0, 2, 2, 500.0f, false, false},   {"head 256 full", 2, 2, 2, 256, 256, 1e6f, false, true}};
  uint64_t seed = 2000;
  for (const auto& c : cases) {
    INFO(c.name << " tokens=" << c.tokens << " hq=" << c.hq << " hkv=" << c.hkv << " head_dim=" << c.head_dim
                << " rotary_dim=" << c.rotary_dim << " fused=" << c.fused_qkv);
    const int64_t qw = int64_t(c.hq) * c.head_dim, kw = int64_t(c.hkv) * c.head_dim;
    const int64_t qs = c.fused_qkv ? qw + 2 * kw : qw, ks = c.fused_qkv ? qw + 2 * kw : kw;
    const std::size_t nq = c.tokens * qs, nk = c.fused_qkv ? 0 : c.tokens * ks;
    const auto q0 = rand_bf16(nq, ++seed, -2, 2), k0 = rand_bf16(nk, ++seed, -2, 2);
    // Mixed batch: a prefill run 0..n-1 for the first half, decode positions up to 2^17 after.
    std::mt19937_64 rng(++seed);
    std::vector<int32_t> pos(c.tokens);
    for (int64_t t = 0; t < c.tokens; ++t) pos[t] = t < c.tokens / 2 ? int32_t(t) : int32_t(rng() % 131072);
    Dev dq(nq * 2), dk(nk * 2), dpos(c.tokens * 4);
    upload(dq.as<bf16>(), q0);
    upload(dk.as<bf16>(), k0);
    upload(dpos.as<int32_t>(), pos);
    kernels::RopeParams p;
    p.q = dq.as<bf16>();
    p.k = !c.with_k ? nullptr : c.fused_qkv ? dq.as<bf16>() + qw : dk.as<bf16>();
    p.positions = dpos.as<int32_t>();
    p.num_tokens = c.tokens;
    p.num_q_heads = c.hq;
    p.num_kv_heads = c.hkv;
    p.head_dim = c.head_dim;
    p.rotary_dim = c.rotary_dim;
    p.theta = c.theta;
    p.q_token_stride = c.fused_qkv ? qs : 0;
    p.k_token_stride = c.fused_qkv ? ks : 0;
    REQUIRE(kernels::is_supported(p, device()));
    kernels::launch_rope(p, nullptr);
    sync();
    if (c.tokens == 0) continue;
    // Reference on the same buffers; in the fused case k lives inside q's buffer at offset qw.
    auto refq = to_double(q0);
    moe_ref::rope(refq, c.tokens, qs, c.hq, c.head_dim, c.rotary_dim, c.theta, pos);
    auto refk = to_double(k0);
    if (c.with_k && c.fused_qkv) {
      std::vector<double> tail(refq.begin() + qw, refq.end());
      moe_ref::rope(tail, c.tokens, qs, c.hkv, c.head_dim, c.rotary_dim, c.theta, pos);
      std::copy(tail.begin(), tail.end(), refq.begin() + qw);
    } else if (c.with_k) {
      moe_ref::rope(refk, c.tokens, ks, c.hkv, c.head_dim, c.rotary_dim, c.theta, pos);
    }
    const auto gotq = download<bf16>(dq.get(), nq), gotk = download<bf16>(dk.get(), nk);
    // Rotated elements against the reference; all others (past rotary_dim, the v part) unchanged bit for bit.
    std::vector<double> got_rot, ref_rot;
    int64_t changed = 0;
    auto sweep = [&](const std::vector<bf16>& got, const std::vector<bf16>& in, const std::vector<double>& ref,
                     int64_t stride, int64_t first_head_off, int heads) {
      for (int64_t t = 0; t < c.tokens; ++t)
        for (int64_t col = 0; col < stride; ++col) {
          const int64_t rel = col - first_head_off;
          const bool rotated = rel >= 0 && rel < int64_t(heads) * c.head_dim && rel % c.head_dim < c.rotary_dim;
          const std::size_t i = t * stride + col;
          if (rotated) {
            got_rot.push_back(double(__bfloat162float(got[i])));
            ref_rot.push_back(ref[i]);
          } else if (bits(got[i]) != bits(in[i])) {
            ++changed;
          }
        }
    };
    if (c.fused_qkv) {
      // q heads [0, qw) and k heads [qw, qw + kw) rotate; sweep once with both as one run of heads.
      sweep(gotq, q0, refq, qs, 0, c.hq + (c.with_k ? c.hkv : 0));
    } else {
      sweep(gotq, q0, refq, qs, 0, c.hq);
      if (c.with_k) sweep(gotk, k0, refk, ks, 0, c.hkv);
    }
    REQUIRE(norm(ref_rot) > 0);
    CHECK(all_finite(got_rot));
    const double err = rel_error(got_rot, ref_rot);
    INFO("rel error " << err << ", untouched elements changed " << changed);
    CHECK(err < kTolBf16Out);
    CHECK(changed == 0);
  }
}

// ---------------------------------------------------------------------------------------------
namespace {
struct RouterCase {
  const char* name;
  int64_t tokens;
  int E, k;
  RouterScoring scoring;
  bool renorm;
  float scaling;
  int groups, topk_groups;
  bool bias;
  float lo, hi;  // logit range; a coarse grid (step) makes exact ties
  float step;
};

void run_router_case(const RouterCase& c, uint64_t seed) {
  INFO(c.name << " tokens=" << c.tokens << " E=" << c.E << " k=" << c.k << " scoring=" << kernels::to_string(c.scoring)
              << " renorm=" << c.renorm << " scaling=" << c.scaling << " groups=" << c.groups << "/" << c.topk_groups
              << " bias=" << c.bias << " seed=" << seed);
  auto logits = rand_f32(c.tokens * c.E, seed, c.lo, c.hi);
  if (c.step > 0)
    for (auto& v : logits) v = std::round(v / c.step) * c.step;
  const auto bias = c.bias ? rand_f32(c.E, seed + 1, -0.5f, 0.5f) : std::vector<float>{};
  Dev dl(logits.size() * 4), db(bias.size() * 4), dids(c.tokens * c.k * 4), dw(c.tokens * c.k * 4);
  upload(dl.as<float>(), logits);
  upload(db.as<float>(), bias);
  dids.poison_int();
  dw.poison();
  kernels::RouterParams p;
  p.logits = dl.as<float>();
  p.correction_bias = c.bias ? db.as<float>() : nullptr;
  p.topk_ids = dids.as<int32_t>();
  p.topk_weights = dw.as<float>();
  p.num_tokens = c.tokens;
  p.num_experts = c.E;
  p.top_k = c.k;
  p.scoring = c.scoring;
  p.renormalize = c.renorm;
  p.routed_scaling = c.scaling;
  p.num_groups = c.groups;
  p.topk_groups = c.topk_groups;
  REQUIRE(kernels::is_supported(p, device()));
  kernels::launch_router(p, nullptr);
  sync();
  if (c.tokens == 0) return;
  const auto ref = moe_ref::router(logits, bias, p);
  const auto ids = download<int32_t>(dids.get(), c.tokens * c.k);
  const auto w = download<float>(dw.get(), c.tokens * c.k);
  int64_t wrong = 0, compared = 0, bad_ids = 0;
  std::vector<double> got_w, ref_w;
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::set<int32_t> distinct;
    for (int j = 0; j < c.k; ++j) {
      const int32_t id = ids[t * c.k + j];
      bad_ids += id < 0 || id >= c.E;
      distinct.insert(id);
    }
    bad_ids += int64_t(distinct.size()) != c.k;
    if (ref.margin[t] < kRouterTieMargin) continue;  // a genuine near-tie in fp32: either order is right
    ++compared;
    for (int j = 0; j < c.k; ++j) {
      wrong += ids[t * c.k + j] != ref.ids[t * c.k + j];
      got_w.push_back(w[t * c.k + j]);
      ref_w.push_back(ref.weights[t * c.k + j]);
    }
  }
  INFO("wrong ids " << wrong << ", invalid/duplicate " << bad_ids << ", tokens compared " << compared << "/" << c.tokens);
  CHECK(bad_ids == 0);
  CHECK(wrong == 0);
  CHECK(c.tokens - compared <= std::max<int64_t>(1, c.tokens / 10));  // near-ties are rare: at most 10%
  REQUIRE(norm(ref_w) > 0);
  CHECK(all_finite(got_w));
  const double err = rel_error(got_w, ref_w);
  INFO("weights rel error " << err);
  CHECK(err < kTolRouterWeights);
}
}  // namespace

TEST_CASE("router: top-k ids exact and weights vs float64 for every model's scoring rule") {
  using S = RouterScoring;
  const std::vector<RouterCase> shapes = {
      {"qwen3-30b-a3b", 0, 128, 8, S::softmax_topk, true, 1.0f, 1, 1, false, -4, 4, 0},
      {"mixtral-8x7b", 0, 8, 2, S::softmax_topk, true, 1.0f, 1, 1, false, -4, 4, 0},
      {"olmoe / qwen2-57b (no renorm)", 0, 64, 8, S::softmax_topk, false, 1.0f, 1, 1, false, -4, 4, 0},
      {"gpt-oss-120b (top-k then softmax)", 0, 128, 4, S::topk_softmax, false, 1.0f, 1, 1, false, -4, 4, 0},
      {"deepseek-v3 (sigmoid, bias, 8 groups keep 4)", 0, 256, 8, S::sigmoid, true, 2.5f, 8, 4, true, -4, 4, 0},
      {"sigmoid no bias no groups", 0, 256, 8, S::sigmoid, false, 1.0f, 1, 1, false, -4, 4, 0},
      {"sigmoid groups without bias", 0, 64, 6, S::sigmoid, true, 1.0f, 4, 2, false, -4, 4, 0},
      {"E=200 in 8 groups of 25 keep 3", 0, 200, 8, S::sigmoid, true, 1.0f, 8, 3, true, -4, 4, 0},
      {"E=7 k=3", 0, 7, 3, S::softmax_topk, false, 1.0f, 1, 1, false, -4, 4, 0},
      {"E=1 k=1", 0, 1, 1, S::softmax_topk, true, 1.0f, 1, 1, false, -4, 4, 0},
      {"E=33 k=5 sigmoid+bias", 0, 33, 5, S::sigmoid, true, 1.0f, 1, 1, true, -4, 4, 0},
      {"E=97 k=8 topk_softmax", 0, 97, 8, S::topk_softmax, false, 1.0f, 1, 1, false, -4, 4, 0},
      // Exact ties everywhere (logits on a grid of 1): the lower id must win, as in the reference.
      {"ties: qwen3 grid", 0, 128, 8, S::softmax_topk, true, 1.0f, 1, 1, false, -2, 2, 1.0f},
      {"ties: E=256 sigmoid grid", 0, 256, 8, S::sigmoid, false, 1.0f, 1, 1, false, -2, 2, 1.0f},
      {"ties: gpt-oss grid", 0, 128, 4, S::topk_softmax, false, 1.0f, 1, 1, false, -2, 2, 0.5f},
  };
  uint64_t seed = 3000;
  for (const int64_t tokens : {int64_t(0), int64_t(1), int64_t(7), int64_t(131), int64_t(1000)})
    for (auto c : shapes) {
      c.tokens = tokens;
      run_router_case(c, seed += 7);
    }
}

TEST_CASE("router: all-equal logits give ids 0..k-1 and equal weights") {
  const int64_t tokens = 5;
  for (const auto& [E, k] : std::vector<std::pair<int, int>>{{128, 8}, {8, 2}, {256, 8}, {1, 1}}) {
    INFO("E=" << E << " k=" << k);
    std::vector<float> logits(tokens * E, 0.25f);
    Dev dl(logits.size() * 4), dids(tokens * k * 4), dw(tokens * k * 4);
    upload(dl.as<float>(), logits);
    dids.poison_int();
    dw.poison();
    kernels::RouterParams p;
    p.logits = dl.as<float>();
    p.topk_ids = dids.as<int32_t>();
    p.topk_weights = dw.as<float>();
    p.num_tokens = tokens;
    p.num_experts = E;
    p.top_k = k;
    p.renormalize = false;
    kernels::launch_router(p, nullptr);
    sync();
    const auto ids = download<int32_t>(dids.get(), tokens * k);
    const auto w = download<float>(dw.get(), tokens * k);
    for (int64_t t = 0; t < tokens; ++t)
      for (int j = 0; j < k; ++j) {
        CHECK(ids[t * k + j] == j);
        CHECK(w[t * k + j] == doctest::Approx(1.0 / E).epsilon(1e-6));
      }
  }
}

// ---------------------------------------------------------------------------------------------
namespace {
struct PermuteCase {
  const char* name;
  int64_t tokens;
  int k, E;
  int64_t hidden;  // 0: no x (index maps only)
  int id_range;    // ids drawn from [0, id_range) (> E: some dropped), distinct per token
  bool minus_one;  // some ids are -1
};

void run_permute_case(const PermuteCase& c, uint64_t seed, bool single_launch) {
  INFO(c.name << " tokens=" << c.tokens << " k=" << c.k << " E=" << c.E << " hidden=" << c.hidden
              << " id_range=" << c.id_range << " seed=" << seed << " single_launch=" << single_launch);
  const int64_t pairs = c.tokens * c.k;
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(pairs);
  std::vector<int32_t> pool(c.id_range);
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::iota(pool.begin(), pool.end(), 0);
    for (int j = 0; j < c.k; ++j) {  // partial Fisher-Yates: k distinct ids per token
      const int pick = j + int(rng() % uint64_t(c.id_range - j));
      std::swap(pool[j], pool[pick]);
      ids[t * c.k + j] = pool[j];
      if (c.minus_one && rng() % 5 == 0) ids[t * c.k + j] = -1;
    }
  }
  const auto x = rand_bf16(c.tokens * c.hidden, seed + 1, -2, 2);
  Dev dids(pairs * 4), dx(x.size() * 2), dpx(pairs * c.hidden * 2), dcnt(c.E * 4), doff((c.E + 1) * 4),
      dslot(pairs * 4), dtok(pairs * 4), dws(kernels::permute_workspace_bytes(c.tokens, c.k, c.E));
  upload(dids.as<int32_t>(), ids);
  upload(dx.as<bf16>(), x);
  for (const Dev* d : {&dcnt, &doff, &dslot, &dtok, &dws}) d->poison_int();
  dpx.poison();
  kernels::PermuteParams p;
  p.topk_ids = dids.as<int32_t>();
  p.x = c.hidden > 0 ? dx.as<bf16>() : nullptr;
  p.permuted_x = c.hidden > 0 ? dpx.as<bf16>() : nullptr;
  p.expert_counts = dcnt.as<int32_t>();
  p.expert_offsets = doff.as<int32_t>();
  p.slot_row = dslot.as<int32_t>();
  p.permuted_token = dtok.as<int32_t>();
  p.workspace = dws.as<void>();
  p.workspace_bytes = dws.buf.bytes();
  p.num_tokens = c.tokens;
  p.top_k = c.k;
  p.num_experts = c.E;
  p.hidden = c.hidden;
  p.allow_single_launch = single_launch;
  REQUIRE(kernels::is_supported(p, device()));
  kernels::launch_permute(p, nullptr);
  sync();
  const auto ref = moe_ref::permute(ids, c.tokens, c.k, c.E);
  const auto cnt = download<int32_t>(dcnt.get(), c.E), off = download<int32_t>(doff.get(), c.E + 1);
  const auto slot = download<int32_t>(dslot.get(), pairs), tok = download<int32_t>(dtok.get(), pairs);
  int64_t wrong_cnt = 0, wrong_off = 0, wrong_slot = 0, wrong_tok = 0, wrong_x = 0;
  for (int e = 0; e < c.E; ++e) wrong_cnt += cnt[e] != ref.counts[e];
  for (int e = 0; e <= c.E; ++e) wrong_off += off[e] != ref.offsets[e];
  for (int64_t i = 0; i < pairs; ++i) {
    wrong_slot += slot[i] != ref.slot_row[i];
    wrong_tok += tok[i] != ref.permuted_token[i];
  }
  if (c.hidden > 0 && pairs > 0) {
    const auto px = download<bf16>(dpx.get(), pairs * c.hidden);
    for (int64_t r = 0; r < ref.offsets[c.E]; ++r)
      for (int64_t h = 0; h < c.hidden; ++h)
        wrong_x += bits(px[r * c.hidden + h]) != bits(x[ref.permuted_token[r] * c.hidden + h]);
    for (int64_t r = ref.offsets[c.E]; r < pairs; ++r)  // rows past the routed ones stay untouched
      for (int64_t h = 0; h < c.hidden; ++h) wrong_x += !is_nan_bits(px[r * c.hidden + h]);
  }
  INFO("wrong: counts " << wrong_cnt << " offsets " << wrong_off << " slot_row " << wrong_slot << " permuted_token "
                        << wrong_tok << " permuted_x " << wrong_x << "; routed " << ref.offsets[c.E] << "/" << pairs);
  CHECK(wrong_cnt == 0);
  CHECK(wrong_off == 0);
  CHECK(wrong_slot == 0);
  CHECK(wrong_tok == 0);
  CHECK(wrong_x == 0);
}
}  // namespace

TEST_CASE("permute: device-side counts, offsets, stable expert-contiguous order and gather, exact") {
  const std::vector<PermuteCase> cases = {
      {"qwen3-30b-a3b", 0, 8, 128, 2048, 128, false},
      {"qwen3-30b-a3b", 1, 8, 128, 2048, 128, false},
      {"mixtral-8x7b", 7, 2, 8, 4096, 8, false},
      {"qwen3-30b-a3b", 131, 8, 128, 2048, 128, false},
      {"odd hidden", 131, 8, 256, 7, 256, false},
      {"many chunks (prefill)", 4099, 8, 128, 2048, 128, false},
      {"skew: 9 hot experts of 128", 3001, 8, 128, 0, 9, false},
      {"deepseek-v3 E=256", 257, 8, 256, 0, 256, false},
      {"EP: half the ids not local, some -1", 1000, 8, 64, 129, 128, true},
      {"E=1 k=1", 13, 1, 1, 16, 1, false},
      {"E=1024", 131, 8, 1024, 0, 1024, false},
      {"one hot expert", 2500, 1, 64, 24, 1, false},
      {"decode b=64 qwen3 (512 pairs)", 64, 8, 128, 2048, 128, false},
      {"decode b=16 qwen3 (128 pairs: the single launch's largest)", 16, 8, 128, 2048, 128, false},
      {"128 pairs, E=1024, some -1", 16, 8, 1024, 24, 1024, true},
      {"129 pairs (one past the single launch)", 43, 3, 60, 16, 60, false},
      {"decode b=3 odd hidden", 3, 8, 128, 7, 128, false},
      {"EP decode: ids beyond E", 17, 8, 32, 40, 64, true},
  };
  uint64_t seed = 4000;
  // Both paths: the single launch (pairs <= kPermuteSingleLaunchMaxPairs) and the 4-launch one.
  for (const auto& c : cases)
    for (bool single : {true, false}) run_permute_case(c, seed += 11, single);
}

// ---------------------------------------------------------------------------------------------
// GEMV (expert_gemm.hpp): out = act * W^T (+ bias) in float64 from the same bf16 inputs. bf16
// outputs: kTolBf16Out. fp32 outputs: fp32 accumulation of <= 32768 products in a fixed order,
// relative error ~sqrt(k) * 6e-8 <= 1.1e-5 norm-wise for random data; kTolGemvF32 = 1e-4.
constexpr double kTolGemvF32 = 1e-4;

// The output columns compared with the float64 reference: all of them, or, when the reference
// would take more than kRefMacs multiply-adds (k = 14336..32768 at model widths), every
// stride-th column (an odd stride, so that both parities and every position in the kernels'
// 64-column tiles are hit) and the last one. Every output is still checked to be written (finite).
constexpr int64_t kRefMacs = int64_t(1) << 27;
std::vector<int64_t> ref_columns(int64_t rows, int64_t n, int64_t k) {
  const int64_t stride = std::max<int64_t>(1, rows * n * k / kRefMacs) | 1;
  std::vector<int64_t> cols;
  for (int64_t j = 0; j < n; j += stride) cols.push_back(j);
  if (cols.back() != n - 1) cols.push_back(n - 1);
  return cols;
}

// out[r, i] = the reference of column cols[i]. swiglu: act rows are gate | up [rows, 2k] and the
// input is silu(gate) * up, in float64.
std::vector<double> ref_gemv(const std::vector<bf16>& act, int64_t act_row0, const std::vector<bf16>& w,
                             int64_t w_off, const std::vector<bf16>* bias, int64_t rows,
                             const std::vector<int64_t>& cols, int64_t k, bool swiglu = false) {
  const int64_t n = static_cast<int64_t>(cols.size());
  std::vector<double> out(static_cast<std::size_t>(rows * n));
  std::vector<double> a(static_cast<std::size_t>(k));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      if (swiglu) {
        const double g = double(__bfloat162float(act[(act_row0 + r) * 2 * k + c]));
        const double u = double(__bfloat162float(act[(act_row0 + r) * 2 * k + k + c]));
        a[c] = g / (1.0 + std::exp(-g)) * u;
      } else {
        a[c] = double(__bfloat162float(act[(act_row0 + r) * k + c]));
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = cols[std::size_t(i)];
      double acc = bias ? double(__bfloat162float((*bias)[j])) : 0.0;
      const bf16* b = w.data() + w_off + j * k;
      for (int64_t c = 0; c < k; ++c) acc += a[c] * double(__bfloat162float(b[c]));
      out[std::size_t(r * n + i)] = acc;
    }
  }
  return out;
}

// got[r, cols[i]] of a [rows, n] result, as ref_gemv lays them out.
std::vector<double> at_columns(const std::vector<double>& got, int64_t rows, int64_t n,
                               const std::vector<int64_t>& cols) {
  std::vector<double> out;
  out.reserve(std::size_t(rows) * cols.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j : cols) out.push_back(got[std::size_t(r * n + j)]);
  return out;
}

struct PlainGemvCase {
  const char* name;
  int64_t rows, n, k;
  std::vector<int64_t> widths;  // segments
  bool bias, f32;
  bool swiglu = false;
};

// The kernels launch_gemv and launch_grouped_gemv_v2 can run (GemvParams::kernel): each case runs
// the previous kernel, the balanced one, and the balanced one again under a programmatic launch
// (grouped: also reading the offsets before its wait), which must give the same bits (the same grid
// and summation order: deterministic).
struct GemvVariant {
  const char* name;
  gpu::GemvKernel kernel;
  bool pdl;
};
const GemvVariant kGemvVariants[] = {
    {"by_column", gpu::GemvKernel::by_column, false},
    {"balanced", gpu::GemvKernel::balanced, false},
    {"balanced, pdl", gpu::GemvKernel::balanced, true},
};

// One case on every kernel variant (kGemvVariants) against the float64 reference.
void run_plain_gemv_case(const PlainGemvCase& c, uint64_t seed) {
  const auto act = rand_bf16(c.rows * c.k * (c.swiglu ? 2 : 1), seed, -2, 2);
  const auto w = rand_bf16(c.n * c.k, seed + 1, -1, 1);
  const auto bias = rand_bf16(c.n, seed + 2, -1, 1);
  Dev da(act.size() * 2), dw(w.size() * 2), db(bias.size() * 2);
  upload(da.as<bf16>(), act);
  upload(dw.as<bf16>(), w);
  upload(db.as<bf16>(), bias);
  std::vector<Dev> outs;
  outs.reserve(c.widths.size());
  const int64_t eb = c.f32 ? 4 : 2;
  for (int64_t wd : c.widths) outs.emplace_back(std::size_t(c.rows * wd * eb));
  const auto cols = ref_columns(c.rows, c.n, c.k);
  const auto ref = ref_gemv(act, 0, w, 0, c.bias ? &bias : nullptr, c.rows, cols, c.k, c.swiglu);
  std::vector<std::vector<uint8_t>> balanced_bits;  // the first balanced run's outputs
  for (const auto& var : kGemvVariants) {
    INFO(c.name << " rows=" << c.rows << " n=" << c.n << " k=" << c.k << " kernel " << var.name);
    gpu::GemvParams p;
    p.act = da.as<bf16>();
    p.weights = dw.as<bf16>();
    p.bias = c.bias ? db.as<bf16>() : nullptr;
    p.num_segments = static_cast<int>(c.widths.size());
    for (std::size_t s2 = 0; s2 < c.widths.size(); ++s2) {
      outs[s2].poison();
      p.seg[s2] = {outs[s2].get(), c.widths[s2]};
    }
    p.out_fp32 = c.f32;
    p.swiglu_act = c.swiglu;
    p.num_rows = c.rows;
    p.n = c.n;
    p.k = c.k;
    p.kernel = var.kernel;
    p.pdl = var.pdl;
    REQUIRE(gpu::gemv_unsupported_reason(p).empty());
    gpu::launch_gemv(p, nullptr);
    sync();
    std::vector<double> got(std::size_t(c.rows * c.n));  // [rows, n]
    std::vector<std::vector<uint8_t>> bits_now;
    int64_t col0 = 0;
    for (std::size_t s2 = 0; s2 < c.widths.size(); ++s2) {
      const int64_t wd = c.widths[s2];
      bits_now.push_back(download<uint8_t>(outs[s2].get(), std::size_t(c.rows * wd * eb)));
      std::vector<double> seg;
      if (c.f32) {
        for (float v : download<float>(outs[s2].get(), std::size_t(c.rows * wd))) seg.push_back(v);
      } else {
        seg = to_double(download<bf16>(outs[s2].get(), std::size_t(c.rows * wd)));
      }
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < wd; ++j) got[std::size_t(r * c.n + col0 + j)] = seg[std::size_t(r * wd + j)];
      col0 += wd;
    }
    if (var.kernel == gpu::GemvKernel::balanced) {
      if (balanced_bits.empty())
        balanced_bits = bits_now;
      else
        CHECK(bits_now == balanced_bits);  // same grid, same order: the same bits
    }
    if (c.rows == 0) continue;
    REQUIRE(all_finite(got));
    CHECK(norm(ref) > 0);
    const double err = rel_error(at_columns(got, c.rows, c.n, cols), ref);
    INFO("rel error " << err << " over " << cols.size() << " of " << c.n << " columns");
    CHECK(err <= (c.f32 ? kTolGemvF32 : kTolBf16Out));
  }
}

TEST_CASE("gemv (plain): float64 reference, fused q|k|v segments, bias, fp32 out, awkward sizes, both kernels") {
  const std::vector<PlainGemvCase> cases = {
      {"qwen3 q|k|v b=1", 1, 5120, 2048, {4096, 512, 512}, false, false},
      {"qwen3 q|k|v b=8", 8, 5120, 2048, {4096, 512, 512}, false, false},
      {"qwen3 o_proj b=1", 1, 2048, 4096, {2048}, false, false},
      {"qwen3 o_proj b=8", 8, 2048, 4096, {2048}, false, false},
      {"qwen3 router b=1 fp32", 1, 128, 2048, {128}, false, true},
      {"qwen3 router b=8 fp32", 8, 128, 2048, {128}, false, true},
      {"router b=64 fp32 (8 row chunks)", 64, 128, 2048, {128}, false, true},
      {"lm-head-like b=2 (wide n: several tiles per block)", 2, 20000, 2048, {20000}, false, false},
      {"n=100003 (prime), k=8: many tiles per block", 1, 100003, 8, {100003}, false, false},
      {"k=8, n=1000, 3 rows", 3, 1000, 8, {1000}, false, false},
      {"qwen2 qkv bias, 7 rows, odd segments", 7, 37, 264, {30, 5, 2}, true, false},
      {"n=1 fp32 (shared gate), 5 rows", 5, 1, 16, {1}, false, true},
      {"n=1, 64 rows (8 row-chunk slots of one column)", 64, 1, 2048, {1}, false, false},
      {"6 rows (row tile 8), k=8192", 6, 24, 8192, {24}, true, false},
      {"8 rows, k=8192, n=300: 1 block per SM", 8, 300, 8192, {300}, false, false},
      {"k=8184 (last segment partial), 2 rows, n=19", 2, 19, 8184, {19}, false, true},
      {"k=136 (17 vectors: one partial segment), 13 rows (2 chunks), n=997", 13, 997, 136, {500, 497}, true, false},
      {"no rows", 0, 16, 16, {16}, false, false},
      {"SwiGLU input (shared expert down b=3)", 3, 2048, 768, {2048}, false, false, true},
      {"SwiGLU input, k=8, n=5, 8 rows", 8, 5, 8, {5}, false, false, true},
      {"SwiGLU input, 17 rows, k=1544, n=31", 17, 31, 1544, {31}, true, false, true},
  };
  uint64_t seed = 9100;
  for (const auto& c : cases) run_plain_gemv_case(c, seed += 3);
}

TEST_CASE("gemv (plain), k up to 32768: float64 reference, row chunks below 8, SwiGLU input, both kernels, pdl") {
  // k = 14336 (Mixtral expert down), 20480 (Qwen2-57B shared expert down), 32768 (kGemvMaxK); rows
  // 1, 2, 3, 5, 8 against the row chunk R the shared memory allows (H200: by_column 8 / 4 / 2,
  // balanced 4 / 4 / 2): 5 and 8 rows take two or more chunks wherever R < 8.
  std::vector<PlainGemvCase> cases = {
      {"Mixtral expert down shape, 1 row, SwiGLU input", 1, 4096, 14336, {4096}, false, false, true},
      {"Mixtral expert down shape, 2 rows, SwiGLU input", 2, 4096, 14336, {4096}, false, false, true},
      {"Qwen2-57B shared expert down, 1 row, SwiGLU input", 1, 3584, 20480, {3584}, false, false, true},
      {"Qwen2-57B shared expert down, 8 rows, SwiGLU input", 8, 3584, 20480, {3584}, false, false, true},
      {"k=32760 (last segment partial), 3 rows, fp32 out, bias", 3, 19, 32760, {19}, true, true},
      {"k=32768, 64 rows (chunks of 2), n=24, fp32 out", 64, 24, 32768, {24}, false, true},
      {"k=32768, 2 segments, bias, 7 rows", 7, 130, 32768, {100, 30}, true, false},
  };
  for (int64_t k : {int64_t(14336), int64_t(20480), int64_t(32768)})
    for (int64_t rows : {1, 2, 3, 5, 8}) {
      cases.push_back({"k sweep, SwiGLU input", rows, 136, k, {136}, false, false, true});
      cases.push_back({"k sweep, bias", rows, 72, k, {72}, true, false});
    }
  uint64_t seed = 9300;
  for (const auto& c : cases) run_plain_gemv_case(c, seed += 3);
}

TEST_CASE("gemv, grouped gemv, qk_norm_rope_kv: unsupported parameters are rejected naming the legal values") {
  Dev buf(1 << 16);
  gpu::GemvParams p;
  p.act = buf.as<bf16>();
  p.weights = buf.as<bf16>();
  p.seg[0] = {buf.get(), 16};
  p.num_rows = 1;
  p.n = 16;
  p.k = 12;
  check_rejects([&] { gpu::launch_gemv(p, nullptr); }, "a multiple of 8");
  // k: a multiple of 8 up to kGroupedGemvMaxK = 32768 (core/expert_path.hpp kGemvMaxK), every
  // kernel; the message names the range.
  static_assert(gpu::kGroupedGemvMaxK == 32768);
  for (int64_t k : {int64_t(32776), int64_t(65536), int64_t(14340), int64_t(0)}) {
    INFO("k=" << k);
    p.k = k;
    for (auto kernel : {gpu::GemvKernel::by_column, gpu::GemvKernel::balanced}) {
      p.kernel = kernel;
      check_rejects([&] { gpu::launch_gemv(p, nullptr); }, "a multiple of 8 in 8..32768");
    }
  }
  p.kernel = gpu::GemvKernel::automatic;
  p.k = 16;
  p.seg[0].width = 15;
  check_rejects([&] { gpu::launch_gemv(p, nullptr); }, "sum to 15");
  p.seg[0].width = 16;
  p.out_fp32 = p.swiglu_act = true;
  check_rejects([&] { gpu::launch_gemv(p, nullptr); }, "at most one");
  p.out_fp32 = p.swiglu_act = false;
  p.act = reinterpret_cast<const bf16*>(buf.as<char>() + 2);
  check_rejects([&] { gpu::launch_gemv(p, nullptr); }, "16-byte aligned");
  gpu::GroupedGemvParams g;
  g.act = g.weights = buf.as<bf16>();
  g.out = buf.as<bf16>();
  g.expert_offsets = buf.as<int32_t>();
  g.num_experts = 0;
  g.n = 16;
  g.k = 16;
  check_rejects([&] { gpu::launch_grouped_gemv_v2(g, nullptr); }, "legal: 1..65535");
  g.num_experts = 2;
  for (int64_t k : {int64_t(32776), int64_t(20484)}) {
    INFO("k=" << k);
    g.k = k;
    g.swiglu_act = true;
    check_rejects([&] { gpu::launch_grouped_gemv_v2(g, nullptr); }, "a multiple of 8 in 8..32768");
    g.swiglu_act = false;
    g.n = 32;
    check_rejects([&] { gpu::launch_grouped_gemv(g, nullptr); }, "a multiple of 8 in 8..32768");
    g.n = 16;
  }
  g.k = 16;
  g.n = 24;
  check_rejects([&] { gpu::launch_grouped_gemv(g, nullptr); }, "multiple of 16");
  g.n = 32;
  g.swiglu_act = true;
  check_rejects([&] { gpu::launch_grouped_gemv(g, nullptr); }, "swiglu_act");
  gpu::QkNormRopeKvParams q;
  q.num_tokens = 1;
  q.q_heads = q.kv_heads = 1;
  q.head_dim = 96;
  check_rejects([&] { gpu::launch_qk_norm_rope_kv(q, nullptr); }, "legal: 64, 128");
}

struct GroupedGemvCase {
  const char* name;
  int E;
  int64_t n, k;
  std::vector<int> counts;  // rows per expert (size E); empty: `tokens` tokens routed top_k at random
  int tokens, top_k;
  bool pass_bounds;  // pass max_rows / max_rows_per_expert (else 0: unknown)
  bool v1;           // the previous kernel
  bool swiglu = false;
};

// One case on v1 or every v2 kernel variant (kGemvVariants) against the float64 reference.
void run_grouped_gemv_case(const GroupedGemvCase& c, uint64_t seed) {
  INFO(c.name << " E=" << c.E << " n=" << c.n << " k=" << c.k);
  std::mt19937_64 rng(seed);
  std::vector<int> counts = c.counts;
  int max_per_expert = 0;
  if (counts.empty()) {  // tokens x top_k distinct experts per token
    counts.assign(c.E, 0);
    std::vector<int> pool(c.E);
    for (int t = 0; t < c.tokens; ++t) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int j = 0; j < c.top_k; ++j) {
        std::swap(pool[j], pool[j + int(rng() % uint64_t(c.E - j))]);
        ++counts[pool[j]];
      }
    }
  }
  std::vector<int32_t> off(c.E + 1, 0);
  for (int e = 0; e < c.E; ++e) {
    off[e + 1] = off[e] + counts[e];
    max_per_expert = std::max(max_per_expert, counts[e]);
  }
  const int64_t rows = off[c.E], alloc_rows = rows + 3;  // 3 rows past the routed ones
  const auto act = rand_bf16(alloc_rows * c.k * (c.swiglu ? 2 : 1), seed + 1, -2, 2);
  const auto w = rand_bf16(int64_t(c.E) * c.n * c.k, seed + 2, -1, 1);
  Dev da(act.size() * 2), dw(w.size() * 2), doff(off.size() * 4), dout(alloc_rows * c.n * 2);
  upload(da.as<bf16>(), act);
  upload(dw.as<bf16>(), w);
  upload(doff.as<int32_t>(), off);
  const auto cols = ref_columns(rows, c.n, c.k);
  std::vector<double> ref;  // [rows, cols]
  for (int e = 0; e < c.E; ++e) {
    const auto r = ref_gemv(act, off[e], w, int64_t(e) * c.n * c.k, nullptr, counts[e], cols, c.k, c.swiglu);
    ref.insert(ref.end(), r.begin(), r.end());
  }
  // v1: its one kernel; v2: every variant (kGemvVariants), the pdl one also reading the offsets
  // before its wait (valid here: they were uploaded before the launch).
  std::vector<uint16_t> balanced_bits;
  for (const auto& var : kGemvVariants) {
    if (c.v1 && var.kernel != gpu::GemvKernel::by_column) continue;
    INFO("kernel " << (c.v1 ? "v1" : var.name));
    dout.poison();
    gpu::GroupedGemvParams p;
    p.act = da.as<bf16>();
    p.weights = dw.as<bf16>();
    p.out = dout.as<bf16>();
    p.expert_offsets = doff.as<int32_t>();
    p.num_experts = c.E;
    p.n = c.n;
    p.k = c.k;
    p.swiglu_act = c.swiglu;
    p.kernel = var.kernel;
    p.pdl = !c.v1 && var.pdl;
    p.offsets_before_previous = p.pdl;
    if (c.pass_bounds) {
      p.max_rows = std::max<int64_t>(rows, 1);
      p.max_rows_per_expert = std::max(max_per_expert, 1);
    }
    REQUIRE((c.v1 ? gpu::grouped_gemv_unsupported_reason(p) : gpu::grouped_gemv_v2_unsupported_reason(p)).empty());
    if (c.v1)
      gpu::launch_grouped_gemv(p, nullptr);
    else
      gpu::launch_grouped_gemv_v2(p, nullptr);
    sync();
    const auto raw = download<bf16>(dout.get(), std::size_t(alloc_rows * c.n));
    if (!c.v1 && var.kernel == gpu::GemvKernel::balanced) {
      std::vector<uint16_t> b(raw.size());
      for (std::size_t i = 0; i < raw.size(); ++i) b[i] = bits(raw[i]);
      if (balanced_bits.empty())
        balanced_bits = b;
      else
        CHECK(b == balanced_bits);  // same grid, same order: the same bits
    }
    const auto got_all = to_double(raw);
    std::vector<double> got(got_all.begin(), got_all.begin() + std::ptrdiff_t(rows * c.n));
    int64_t touched_past_end = 0;
    for (int64_t i = rows * c.n; i < alloc_rows * c.n; ++i) touched_past_end += !std::isnan(got_all[std::size_t(i)]);
    CHECK(touched_past_end == 0);
    if (rows == 0) continue;
    REQUIRE(all_finite(got));
    CHECK(norm(ref) > 0);
    const double err = rel_error(at_columns(got, rows, c.n, cols), ref);
    INFO("rel error " << err << " over " << cols.size() << " of " << c.n << " columns, rows " << rows
                      << " max rows per expert " << max_per_expert);
    CHECK(err <= kTolBf16Out);
  }
}

TEST_CASE("grouped gemv: float64 reference over device offsets, empty experts, chunks, rows past the end untouched, both v2 kernels") {
  std::vector<GroupedGemvCase> cases = {
      {"qwen3 gate|up b=1", 128, 1536, 2048, {}, 1, 8, true, false},
      {"qwen3 down b=1", 128, 2048, 768, {}, 1, 8, true, false},
      {"qwen3 down b=64", 128, 2048, 768, {}, 64, 8, true, false},
      {"qwen3 gate|up b=64, bounds unknown", 128, 1536, 2048, {}, 64, 8, false, false},
      {"one expert with 37 rows (5 chunks), n=24, k=40", 4, 24, 40, {0, 37, 0, 2}, 0, 0, true, false},
      {"n=1, k=8, E=3", 3, 1, 8, {2, 0, 1}, 0, 0, true, false},
      {"all empty", 5, 32, 64, {0, 0, 0, 0, 0}, 0, 0, true, false},
      {"E=300 (ballot scan over 10 words), 3 tokens", 300, 40, 16, {}, 3, 8, true, false},
      {"v1 kernel, qwen3 down b=4", 128, 2048, 768, {}, 4, 8, true, true},
      {"v1 kernel, 37 rows", 4, 32, 40, {0, 37, 0, 2}, 0, 0, false, true},
      {"qwen3 down b=1 with the SwiGLU input", 128, 2048, 768, {}, 1, 8, true, false, true},
      {"qwen3 down b=64 with the SwiGLU input", 128, 2048, 768, {}, 64, 8, true, false, true},
      {"SwiGLU input, 37 rows, k=40", 4, 24, 40, {0, 37, 0, 2}, 0, 0, true, false, true},
      {"qwen3 gate|up b=8", 128, 1536, 2048, {}, 8, 8, true, false},
      {"qwen3 down b=8 with the SwiGLU input", 128, 2048, 768, {}, 8, 8, true, false, true},
      {"n=1, k=8, 64 tokens top-8 of 128 (a block spans many experts)", 128, 1, 8, {}, 64, 8, true, false},
      {"k=8192, 64 + 9 + 1 rows, n=70 (1 block per SM, 8-row chunks)", 5, 70, 8192, {64, 0, 9, 1, 0}, 0, 0, false, false},
      {"k=8184 (partial segment), n=13, rows 1..5", 6, 13, 8184, {1, 2, 0, 3, 4, 5}, 0, 0, true, false},
      {"k=136 SwiGLU, n=997 (prime), 3 experts", 7, 997, 136, {0, 1, 0, 6, 0, 2, 0}, 0, 0, true, false, true},
  };
  uint64_t seed = 9500;
  for (const auto& c : cases) run_grouped_gemv_case(c, seed += 7);
}

TEST_CASE("grouped gemv, k up to 32768: float64 reference, row chunks below 8, SwiGLU input, v1 and both v2 kernels, pdl") {
  // k = 14336 (Mixtral expert down), 20480 (Qwen2-57B's shared width), 32768 (kGemvMaxK); experts
  // with 1, 2, 3, 5 and 8 rows against the row chunk R the shared memory allows (H200: by_column
  // 8 / 4 / 2, balanced 4 / 4 / 2, v1 8 / 4 / 2): 5- and 8-row experts loop over chunks where R < 8.
  const std::vector<GroupedGemvCase> cases = {
      {"Mixtral down b=1 (top-2 of 8), n=512, SwiGLU input", 8, 512, 14336, {}, 1, 2, true, false, true},
      {"Mixtral down b=8 (top-2 of 8), n=512, SwiGLU input", 8, 512, 14336, {}, 8, 2, true, false, true},
      {"Mixtral gate|up shape b=1 (k=4096 unchanged), E=8, n=2048", 8, 2048, 4096, {}, 1, 2, true, false},
      {"k=14336, rows 1,2,3,5,8 + an empty expert, n=136", 6, 136, 14336, {1, 2, 0, 3, 5, 8}, 0, 0, true, false},
      {"k=14336, rows 1,2,3,5,8, n=72, SwiGLU input", 5, 72, 14336, {1, 2, 3, 5, 8}, 0, 0, true, false, true},
      {"k=20480, rows 1,2,3,5,8, n=40, SwiGLU input", 5, 40, 20480, {8, 5, 3, 2, 1}, 0, 0, true, false, true},
      {"k=20480, rows 1,2,3,5,8, n=40, bounds unknown", 5, 40, 20480, {3, 8, 1, 5, 2}, 0, 0, false, false},
      {"k=32768, rows 1,2,3,5,8, n=24, SwiGLU input", 6, 24, 32768, {1, 2, 3, 0, 5, 8}, 0, 0, true, false, true},
      {"k=32768, rows 1,2,3,5,8, n=33, bounds unknown", 5, 33, 32768, {5, 1, 8, 2, 3}, 0, 0, false, false},
      {"k=32768, 1 row per expert (b=1), n=100", 4, 100, 32768, {0, 1, 0, 1}, 0, 0, true, false},
      {"k=32760 (partial segment), rows 3 and 8, n=19, SwiGLU input", 3, 19, 32760, {3, 0, 8}, 0, 0, true, false, true},
      {"v1 kernel, k=14336, rows 1,2,3,5,8, n=32", 5, 32, 14336, {1, 2, 3, 5, 8}, 0, 0, true, true},
      {"v1 kernel, k=20480, rows 8 and 5, n=16", 3, 16, 20480, {8, 0, 5}, 0, 0, false, true},
      {"v1 kernel, k=32768, rows 1,2,3,5,8, n=16", 5, 16, 32768, {1, 2, 3, 5, 8}, 0, 0, true, true},
  };
  uint64_t seed = 9700;
  for (const auto& c : cases) run_grouped_gemv_case(c, seed += 7);
}

// ---------------------------------------------------------------------------------------------
// Fused QK-norm + RoPE + KV write (model_forward_kernels.hpp) against float64: norm and rotation
// without intermediate rounding (the GPU rounds to bf16 after each: ~2 roundings, kTolBf16Out);
// the cache rows must hold exactly the returned k and the input v; other slots stay poisoned.
TEST_CASE("qk_norm_rope_kv: float64 reference, per-head norm or none, paged cache slots, padding tokens") {
  struct Case {
    const char* name;
    int tokens, q_heads, kv_heads, head_dim;
    bool norm;
    int block_tokens;
  };
  const std::vector<Case> cases = {
      {"qwen3-30b-a3b decode b=1", 1, 32, 4, 128, true, 16},
      {"qwen3 b=5 (one padding token)", 5, 32, 4, 128, true, 16},
      {"mixtral-like head_dim 64, no norm, 37 tokens", 37, 8, 2, 64, false, 8},
      {"MHA 3 heads, block 32", 9, 3, 3, 128, true, 32},
  };
  uint64_t seed = 9900;
  for (const auto& c : cases)
    for (bool use_table : {false, true}) {
    INFO(c.name << (use_table ? " (angles from launch_rope_table)" : " (angles in the kernel)"));
    std::mt19937_64 rng(seed += 5);
    const int D = c.head_dim, T = c.tokens;
    const int num_seqs = 3, max_blocks = 8, num_blocks = num_seqs * max_blocks;
    std::vector<int32_t> pos(T), seq(T), table(num_seqs * max_blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), rng);
    std::set<std::pair<int, int>> used;
    for (int t = 0; t < T; ++t) {  // distinct (sequence, position) pairs
      do {
        seq[t] = int(rng() % num_seqs);
        pos[t] = int(rng() % uint64_t(max_blocks * c.block_tokens));
      } while (!used.insert({seq[t], pos[t]}).second);
    }
    if (T > 1) pos[T / 2] = -1;  // padding: rotated with position -1, not written to the cache
    const auto q = rand_bf16(std::size_t(T) * c.q_heads * D, seed + 1, -2, 2);
    const auto k = rand_bf16(std::size_t(T) * c.kv_heads * D, seed + 2, -2, 2);
    const auto v = rand_bf16(std::size_t(T) * c.kv_heads * D, seed + 3, -2, 2);
    const auto qn = rand_bf16(D, seed + 4, 0.5f, 1.5f), kn = rand_bf16(D, seed + 5, 0.5f, 1.5f);
    const std::size_t cache_elems = std::size_t(num_blocks) * c.block_tokens * c.kv_heads * D;
    Dev dq(q.size() * 2), dk(k.size() * 2), dv(v.size() * 2), dqn(D * 2), dkn(D * 2), dpos(T * 4), dseq(T * 4),
        dtab(table.size() * 4), dkc(cache_elems * 2), dvc(cache_elems * 2);
    upload(dq.as<bf16>(), q);
    upload(dk.as<bf16>(), k);
    upload(dv.as<bf16>(), v);
    upload(dqn.as<bf16>(), qn);
    upload(dkn.as<bf16>(), kn);
    upload(dpos.as<int32_t>(), pos);
    upload(dseq.as<int32_t>(), seq);
    upload(dtab.as<int32_t>(), table);
    dkc.poison();
    dvc.poison();
    gpu::QkNormRopeKvParams p;
    p.q = dq.as<bf16>();
    p.k = dk.as<bf16>();
    p.v = dv.as<bf16>();
    p.q_norm = c.norm ? dqn.as<bf16>() : nullptr;
    p.k_norm = c.norm ? dkn.as<bf16>() : nullptr;
    p.positions = dpos.as<int32_t>();
    p.token_seq = dseq.as<int32_t>();
    p.k_cache = dkc.as<bf16>();
    p.v_cache = dvc.as<bf16>();
    p.block_table = dtab.as<int32_t>();
    p.block_tokens = c.block_tokens;
    p.max_blocks_per_seq = max_blocks;
    p.num_tokens = T;
    p.q_heads = c.q_heads;
    p.kv_heads = c.kv_heads;
    p.head_dim = D;
    p.theta = 1e6f;
    p.eps = 1e-6f;
    Dev dcs(std::size_t(T) * D * 4);
    if (use_table) {
      gpu::launch_rope_table(dpos.as<int32_t>(), dcs.as<float>(), T, D, p.theta, nullptr);
      p.rope_cs = dcs.as<float>();
    }
    REQUIRE(gpu::qk_norm_rope_kv_unsupported_reason(p).empty());
    gpu::launch_qk_norm_rope_kv(p, nullptr);
    sync();
    auto ref_heads = [&](const std::vector<bf16>& x, int heads, const std::vector<bf16>& w) {
      std::vector<double> out(x.size());
      for (int t = 0; t < T; ++t)
        for (int h = 0; h < heads; ++h) {
          const std::size_t b = (std::size_t(t) * heads + h) * D;
          double ss = 0;
          std::vector<double> y(D);
          for (int i = 0; i < D; ++i) {
            y[i] = double(__bfloat162float(x[b + i]));
            ss += y[i] * y[i];
          }
          if (c.norm) {
            const double inv = 1.0 / std::sqrt(ss / D + 1e-6);
            for (int i = 0; i < D; ++i) y[i] *= inv * double(__bfloat162float(w[i]));
          }
          for (int i = 0; i < D / 2; ++i) {
            const double ang = double(pos[t]) * std::pow(1e6, -2.0 * i / D);
            const double x1 = y[i], x2 = y[i + D / 2];
            out[b + i] = x1 * std::cos(ang) - x2 * std::sin(ang);
            out[b + i + D / 2] = x2 * std::cos(ang) + x1 * std::sin(ang);
          }
        }
      return out;
    };
    const auto gq = download<bf16>(dq.get(), q.size()), gk = download<bf16>(dk.get(), k.size());
    const double eq = rel_error(to_double(gq), ref_heads(q, c.q_heads, qn));
    const double ek = rel_error(to_double(gk), ref_heads(k, c.kv_heads, kn));
    INFO("rel error q " << eq << " k " << ek);
    CHECK(eq <= kTolBf16Out);
    CHECK(ek <= kTolBf16Out);
    const auto kc = download<bf16>(dkc.get(), cache_elems), vc = download<bf16>(dvc.get(), cache_elems);
    std::vector<bool> written(cache_elems, false);
    int64_t wrong = 0;
    for (int t = 0; t < T; ++t) {
      if (pos[t] < 0) continue;
      const int64_t blk = table[seq[t] * max_blocks + pos[t] / c.block_tokens];
      const std::size_t row = std::size_t((blk * c.block_tokens + pos[t] % c.block_tokens) * c.kv_heads) * D;
      for (std::size_t i = 0; i < std::size_t(c.kv_heads) * D; ++i) {
        written[row + i] = true;
        wrong += bits(kc[row + i]) != bits(gk[std::size_t(t) * c.kv_heads * D + i]);
        wrong += bits(vc[row + i]) != bits(v[std::size_t(t) * c.kv_heads * D + i]);
      }
    }
    int64_t touched = 0;
    for (std::size_t i = 0; i < cache_elems; ++i)
      if (!written[i]) touched += !is_nan_bits(kc[i]) || !is_nan_bits(vc[i]);
    CHECK(wrong == 0);
    CHECK(touched == 0);
    }
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("swiglu: float64 reference (gate = first half), awkward sizes, device row count") {
  struct Case {
    int64_t rows, inter;
    int misalign;
    int32_t device_rows;  // < 0: no device row count
  };
  const std::vector<Case> cases = {{0, 768, 0, -1},    {1, 768, 0, -1},     {7, 768, 0, -1},   {131 * 8, 768, 0, -1},
                                   {3, 14336, 0, -1},  {5, 7, 0, -1},       {13, 1, 0, -1},    {17, 768, 1, -1},
                                   {100, 768, 0, 37},  {100, 129, 0, 0},    {64, 1408, 0, 64}, {131, 2048, 0, -1}};
  uint64_t seed = 5000;
  for (const auto& c : cases) {
    INFO("rows=" << c.rows << " inter=" << c.inter << " misalign=" << c.misalign << " device_rows=" << c.device_rows);
    const std::size_t nin = c.rows * 2 * c.inter, nout = c.rows * c.inter, pad = c.misalign;
    const auto gu = rand_bf16(nin, ++seed, -4, 4);
    Dev dgu((nin + pad) * 2), dout((nout + pad) * 2), dn(4);
    upload(dgu.as<bf16>() + pad, gu);
    upload(dn.as<int32_t>(), std::vector<int32_t>{c.device_rows});
    dout.poison();
    kernels::SwigluParams p;
    p.gate_up = dgu.as<bf16>() + pad;
    p.out = dout.as<bf16>() + pad;
    p.num_rows = c.rows;
    p.inter = c.inter;
    p.num_rows_device = c.device_rows >= 0 ? dn.as<int32_t>() : nullptr;
    REQUIRE(kernels::is_supported(p, device()));
    kernels::launch_swiglu(p, nullptr);
    sync();
    if (nout == 0) continue;
    const int64_t live = c.device_rows >= 0 ? std::min<int64_t>(c.rows, c.device_rows) : c.rows;
    const auto got_all = download<bf16>(p.out, nout);
    int64_t touched = 0;
    for (std::size_t i = live * c.inter; i < nout; ++i) touched += !is_nan_bits(got_all[i]);
    INFO("rows past the device count written: " << touched);
    CHECK(touched == 0);
    if (live == 0) continue;
    const auto ref = moe_ref::swiglu(to_double(gu), live, c.inter);
    const auto got = to_double(std::vector<bf16>(got_all.begin(), got_all.begin() + live * c.inter));
    REQUIRE(norm(ref) > 0);
    CHECK(all_finite(got));
    const double err = rel_error(got, ref);
    INFO("rel error " << err);
    CHECK(err < kTolBf16Out);
  }
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("combine: float64 reference, shared expert with and without gate, dropped slots, deterministic") {
  struct Case {
    int64_t tokens;
    int k;
    int64_t hidden;
    bool shared, gate, drop;
    int misalign;
  };
  const std::vector<Case> cases = {
      {0, 8, 2048, false, false, false, 0}, {1, 8, 2048, true, false, false, 0}, {7, 2, 4096, false, false, false, 0},
      {131, 8, 2048, true, true, false, 0}, {5, 8, 7, true, true, true, 0},      {64, 2, 4096, false, false, true, 0},
      {13, 1, 129, false, false, false, 0}, {31, 8, 2048, true, true, false, 1}, {1, 32, 64, false, false, false, 0},
      {257, 6, 2048, true, false, false, 0}};
  uint64_t seed = 6000;
  for (const auto& c : cases) {
    INFO("tokens=" << c.tokens << " k=" << c.k << " hidden=" << c.hidden << " shared=" << c.shared << " gate=" << c.gate
                   << " drop=" << c.drop << " misalign=" << c.misalign);
    const int64_t rows = c.tokens * c.k + 3;  // a few spare rows nobody reads
    const std::size_t pad = c.misalign;
    std::mt19937_64 rng(++seed);
    std::vector<int32_t> slot(c.tokens * c.k);
    std::iota(slot.begin(), slot.end(), 0);
    std::shuffle(slot.begin(), slot.end(), rng);
    if (c.drop)
      for (auto& s : slot)
        if (rng() % 3 == 0) s = -1;
    const auto eo = rand_bf16(rows * c.hidden, ++seed, -2, 2);
    const auto w = rand_f32(c.tokens * c.k, ++seed, 0.0f, 1.0f);
    const auto sh = c.shared ? rand_bf16(c.tokens * c.hidden, ++seed, -2, 2) : std::vector<bf16>{};
    const auto g = c.gate ? rand_f32(c.tokens, ++seed, -3, 3) : std::vector<float>{};
    Dev deo((eo.size() + pad) * 2), dslot(slot.size() * 4), dw(w.size() * 4), dsh((sh.size() + pad) * 2), dg(g.size() * 4),
        dout((c.tokens * c.hidden + pad) * 2);
    upload(deo.as<bf16>() + pad, eo);
    upload(dslot.as<int32_t>(), slot);
    upload(dw.as<float>(), w);
    upload(dsh.as<bf16>() + pad, sh);
    upload(dg.as<float>(), g);
    dout.poison();
    kernels::CombineParams p;
    p.expert_out = deo.as<bf16>() + pad;
    p.slot_row = dslot.as<int32_t>();
    p.topk_weights = dw.as<float>();
    p.shared_out = c.shared ? dsh.as<bf16>() + pad : nullptr;
    p.shared_gate = c.gate ? dg.as<float>() : nullptr;
    p.out = dout.as<bf16>() + pad;
    p.num_tokens = c.tokens;
    p.top_k = c.k;
    p.hidden = c.hidden;
    REQUIRE(kernels::is_supported(p, device()));
    kernels::launch_combine(p, nullptr);
    sync();
    if (c.tokens == 0) continue;
    const auto first = download<bf16>(p.out, c.tokens * c.hidden);
    const auto ref = moe_ref::combine(to_double(eo), slot, w, c.shared ? to_double(sh) : std::vector<double>{}, g,
                                      c.tokens, c.k, c.hidden);
    const auto got = to_double(first);
    REQUIRE(norm(ref) > 0);
    CHECK(all_finite(got));
    const double err = rel_error(got, ref);
    INFO("rel error " << err);
    CHECK(err < kTolBf16Out);
    // Deterministic: a second run gives the same bits.
    dout.poison();
    kernels::launch_combine(p, nullptr);
    sync();
    const auto second = download<bf16>(p.out, c.tokens * c.hidden);
    int64_t differ = 0;
    for (std::size_t i = 0; i < first.size(); ++i) differ += bits(first[i]) != bits(second[i]);
    CHECK(differ == 0);
  }
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("router -> permute -> combine round trip: renormalised weights give x back (Qwen3 and Mixtral shapes)") {
  struct Case {
    int64_t tokens;
    int E, k;
    int64_t hidden;
  };
  uint64_t seed = 7000;
  for (const auto& c : std::vector<Case>{{131, 128, 8, 2048}, {7, 8, 2, 4096}, {1, 128, 8, 2048}, {4099, 128, 8, 64}}) {
    INFO("tokens=" << c.tokens << " E=" << c.E << " k=" << c.k << " hidden=" << c.hidden);
    const int64_t pairs = c.tokens * c.k;
    const auto logits = rand_f32(c.tokens * c.E, ++seed, -4, 4);
    const auto x = rand_bf16(c.tokens * c.hidden, ++seed, -2, 2);
    Dev dl(logits.size() * 4), dx(x.size() * 2), dids(pairs * 4), dw(pairs * 4), dpx(pairs * c.hidden * 2), dcnt(c.E * 4),
        doff((c.E + 1) * 4), dslot(pairs * 4), dtok(pairs * 4), dws(kernels::permute_workspace_bytes(c.tokens, c.k, c.E)),
        dout(x.size() * 2);
    upload(dl.as<float>(), logits);
    upload(dx.as<bf16>(), x);
    dout.poison();
    gpu::Stream s;
    kernels::RouterParams rp;
    rp.logits = dl.as<float>();
    rp.topk_ids = dids.as<int32_t>();
    rp.topk_weights = dw.as<float>();
    rp.num_tokens = c.tokens;
    rp.num_experts = c.E;
    rp.top_k = c.k;
    rp.renormalize = true;
    kernels::PermuteParams pp;
    pp.topk_ids = dids.as<int32_t>();
    pp.x = dx.as<bf16>();
    pp.permuted_x = dpx.as<bf16>();
    pp.expert_counts = dcnt.as<int32_t>();
    pp.expert_offsets = doff.as<int32_t>();
    pp.slot_row = dslot.as<int32_t>();
    pp.permuted_token = dtok.as<int32_t>();
    pp.workspace = dws.as<void>();
    pp.workspace_bytes = dws.buf.bytes();
    pp.num_tokens = c.tokens;
    pp.top_k = c.k;
    pp.num_experts = c.E;
    pp.hidden = c.hidden;
    kernels::CombineParams cp;
    cp.expert_out = dpx.as<bf16>();
    cp.slot_row = dslot.as<int32_t>();
    cp.topk_weights = dw.as<float>();
    cp.out = dout.as<bf16>();
    cp.num_tokens = c.tokens;
    cp.top_k = c.k;
    cp.hidden = c.hidden;
    kernels::launch_router(rp, s.get());  // no host sync between the three
    kernels::launch_permute(pp, s.get());
    kernels::launch_combine(cp, s.get());
    s.synchronize();
    const auto got = to_double(download<bf16>(dout.get(), x.size()));
    const auto ref = to_double(x);
    REQUIRE(norm(ref) > 0);
    CHECK(all_finite(got));
    const double err = rel_error(got, ref);
    INFO("rel error " << err);
    CHECK(err < kTolBf16Out);
  }
}

// ---------------------------------------------------------------------------------------------
TEST_CASE("launch_* reject unsupported parameters with a message listing the legal values; is_supported agrees") {
  const int dev = device();
  Dev buf(1 << 20);
  auto* b = buf.as<bf16>();
  auto* f = buf.as<float>();
  auto* i32 = buf.as<int32_t>();

  kernels::RmsNormParams rn{b, nullptr, nullptr, b, b, 4, kernels::kRmsNormMaxWidth + 1, 1e-6f};
  CHECK_FALSE(kernels::is_supported(rn, dev));
  check_rejects([&] { kernels::launch_rmsnorm(rn, nullptr); }, "legal: 1..16384");
  rn.width = 7;  // not a multiple of the vector width: supported through the scalar path
  CHECK(kernels::is_supported(rn, dev));
  rn.residual = b;
  CHECK_FALSE(kernels::is_supported(rn, dev));
  check_rejects([&] { kernels::launch_rmsnorm(rn, nullptr); }, "residual_out is null");

  kernels::RopeParams ro;
  ro.q = b;
  ro.positions = i32;
  ro.num_tokens = 3;
  ro.num_q_heads = 1;
  ro.head_dim = 512;
  ro.rotary_dim = 128;
  CHECK_FALSE(kernels::is_supported(ro, dev));
  check_rejects([&] { kernels::launch_rope(ro, nullptr); }, "legal: 1..256");
  ro.head_dim = 128;
  ro.rotary_dim = 33;
  check_rejects([&] { kernels::launch_rope(ro, nullptr); }, "legal: even, 2..head_dim=128");
  ro.rotary_dim = 64;
  CHECK(kernels::is_supported(ro, dev));

  kernels::RouterParams rt;
  rt.logits = f;
  rt.topk_ids = i32;
  rt.topk_weights = f;
  rt.num_tokens = 2;
  rt.num_experts = 300;
  rt.top_k = 8;
  CHECK_FALSE(kernels::is_supported(rt, dev));
  check_rejects([&] { kernels::launch_router(rt, nullptr); }, "legal: 1..256");
  rt.num_experts = 128;
  rt.top_k = 9;
  check_rejects([&] { kernels::launch_router(rt, nullptr); }, "legal: 1..min(8");
  rt.top_k = 8;
  rt.scoring = RouterScoring::sigmoid;
  rt.num_groups = 3;
  check_rejects([&] { kernels::launch_router(rt, nullptr); }, "dividing num_experts=128");
  rt.num_groups = 8;
  rt.topk_groups = 0;
  check_rejects([&] { kernels::launch_router(rt, nullptr); }, "legal: 1..num_groups=8");
  rt.topk_groups = 4;
  CHECK(kernels::is_supported(rt, dev));
  rt.scoring = RouterScoring::softmax_topk;
  check_rejects([&] { kernels::launch_router(rt, nullptr); }, "legal only with sigmoid");

  kernels::PermuteParams pe;
  pe.topk_ids = i32;
  pe.expert_counts = i32;
  pe.expert_offsets = i32;
  pe.slot_row = i32;
  pe.permuted_token = i32;
  pe.num_tokens = 100;
  pe.top_k = 8;
  pe.num_experts = 2000;
  CHECK_FALSE(kernels::is_supported(pe, dev));
  check_rejects([&] { kernels::launch_permute(pe, nullptr); }, "legal: 1..1024");
  pe.num_experts = 128;
  pe.workspace = buf.get();
  pe.workspace_bytes = 16;
  check_rejects([&] { kernels::launch_permute(pe, nullptr); }, "permute_workspace_bytes");
  pe.workspace_bytes = kernels::permute_workspace_bytes(100, 8, 128);
  CHECK(kernels::is_supported(pe, dev));

  kernels::SwigluParams sw{b, b, 5, 0, nullptr};
  CHECK_FALSE(kernels::is_supported(sw, dev));
  check_rejects([&] { kernels::launch_swiglu(sw, nullptr); }, "inter=0 (need >= 1)");
  sw.inter = 7;
  CHECK(kernels::is_supported(sw, dev));

  kernels::CombineParams co;
  co.expert_out = b;
  co.slot_row = i32;
  co.topk_weights = f;
  co.out = b;
  co.num_tokens = 3;
  co.top_k = 40;
  co.hidden = 7;
  CHECK_FALSE(kernels::is_supported(co, dev));
  check_rejects([&] { kernels::launch_combine(co, nullptr); }, "legal: 1..32");
  co.top_k = 8;
  CHECK(kernels::is_supported(co, dev));
  co.shared_gate = f;
  check_rejects([&] { kernels::launch_combine(co, nullptr); }, "shared_gate is set without shared_out");
}

// ---------------------------------------------------------------------------------------------
// Benchmark (skipped by default; run with --no-skip -tc="bench*"): achieved bandwidth of the
// memory-bound kernels at a decode and a prefill size of Qwen3-30B-A3B (and Mixtral's SwiGLU),
// against a device-to-device copy timed in the same run and the profile's 4244.8 GB/s
// (docs/profile-h200.md). Bytes are the fewest the op must move: each input read once, each output
// written once. Timing: gpu::time_op, cold L2 (flushed before every run), CUDA graph, median of 50.
TEST_CASE("bench: rmsnorm, swiglu, combine (and router, permute) achieved GB/s vs device copy" * doctest::skip()) {
  const gpu::DeviceInfo info = gpu::query_device(device());
  gpu::Stream s;
  gpu::L2Flusher flusher(device());
  gpu::TimingOptions opt;
  opt.cuda_graph = true;
  opt.flush_l2 = true;
  constexpr double kProfileCopyGBps = 4244.8;
  // Copy baseline: 1 GiB device to device (read + write counted).
  const std::size_t copy_bytes = std::size_t(1) << 30;
  Dev ca(copy_bytes), cb(copy_bytes);
  MIXSERVE_CUDA_CHECK(cudaMemset(ca.buf.get(), 1, copy_bytes));
  gpu::TimingOptions copt = opt;
  copt.flush_l2 = false;
  const auto ct = gpu::time_op(
      [&](cudaStream_t st) { MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(cb.buf.get(), ca.buf.get(), copy_bytes, cudaMemcpyDeviceToDevice, st)); },
      s.get(), copt, nullptr);
  const double copy_GBps = 2.0 * copy_bytes / (ct.time_us.median * 1e3);
  std::printf("# test_gpu_kernels bench  device %s (%d SMs)  cuda_runtime %s\n", info.name.c_str(), info.sm_count,
              info.versions.count("cuda_runtime") ? info.versions.at("cuda_runtime").c_str() : "?");
  std::printf("# timing: median of %d, cold L2, CUDA graph; copy 1 GiB D2D this run: %.1f GB/s (noise %.3f); profile: %.1f GB/s\n",
              opt.timed_iters, copy_GBps, ct.time_us.noise(), kProfileCopyGBps);
  std::printf("# %-10s %-34s %12s | %10s %9s %7s %8s %6s\n", "kernel", "shape", "bytes", "time(us)", "GB/s", "%copy",
              "%profile", "noise");
  auto report = [&](const char* kernel, const std::string& shape, double bytes, const std::function<void(cudaStream_t)>& op) {
    const auto r = gpu::time_op(op, s.get(), opt, &flusher);
    const double gbps = bytes / (r.time_us.median * 1e3);
    std::printf("  %-10s %-34s %12.0f | %10.2f %9.1f %6.1f%% %7.1f%% %6.3f\n", kernel, shape.c_str(), bytes,
                r.time_us.median, gbps, 100.0 * gbps / copy_GBps, 100.0 * gbps / kProfileCopyGBps, r.time_us.noise());
    CHECK(r.time_us.median > 0);
  };
  const int H = 2048, E = 128, K = 8, I = 768;  // Qwen3-30B-A3B
  for (const int64_t T : {int64_t(64), int64_t(8192)}) {
    const char* phase = T == 64 ? "decode" : "prefill";
    Dev x(T * H * 2), r(T * H * 2), ro(T * H * 2), w(H * 2), out(T * H * 2);
    for (const Dev* d : {&x, &r, &w}) upload(d->as<bf16>(), rand_bf16(d->buf.bytes() / 2, 9000 + T, -1, 1));
    kernels::RmsNormParams rn{x.as<bf16>(), nullptr, nullptr, w.as<bf16>(), out.as<bf16>(), T, H, 1e-6f};
    report("rmsnorm", std::string(phase) + " T=" + std::to_string(T) + " h=2048", 2.0 * T * H * 2 + H * 2,
           [&](cudaStream_t st) { kernels::launch_rmsnorm(rn, st); });
    kernels::RmsNormParams rr = rn;
    rr.residual = r.as<bf16>();
    rr.residual_out = ro.as<bf16>();
    report("rmsnorm+r", std::string(phase) + " T=" + std::to_string(T) + " h=2048", 4.0 * T * H * 2 + H * 2,
           [&](cudaStream_t st) { kernels::launch_rmsnorm(rr, st); });
    // SwiGLU over the T*K routed rows.
    const int64_t rows = T * K;
    Dev gu(rows * 2 * I * 2), so(rows * I * 2);
    upload(gu.as<bf16>(), rand_bf16(rows * 2 * I, 9100 + T, -4, 4));
    kernels::SwigluParams sp{gu.as<bf16>(), so.as<bf16>(), rows, I, nullptr};
    report("swiglu", std::string(phase) + " rows=T*8=" + std::to_string(rows) + " I=768", 3.0 * rows * I * 2,
           [&](cudaStream_t st) { kernels::launch_swiglu(sp, st); });
    // Combine: T tokens, k=8 rows each from a shuffled expert-contiguous buffer.
    Dev eo(rows * H * 2), slot(rows * 4), wt(rows * 4), co(T * H * 2);
    upload(eo.as<bf16>(), rand_bf16(rows * H, 9200 + T, -1, 1));
    std::vector<int32_t> perm(rows);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937_64(9300 + T));
    upload(slot.as<int32_t>(), perm);
    upload(wt.as<float>(), rand_f32(rows, 9400 + T, 0, 1));
    kernels::CombineParams cp;
    cp.expert_out = eo.as<bf16>();
    cp.slot_row = slot.as<int32_t>();
    cp.topk_weights = wt.as<float>();
    cp.out = co.as<bf16>();
    cp.num_tokens = T;
    cp.top_k = K;
    cp.hidden = H;
    report("combine", std::string(phase) + " T=" + std::to_string(T) + " k=8 h=2048", double(rows) * H * 2 + T * H * 2 + rows * 8.0,
           [&](cudaStream_t st) { kernels::launch_combine(cp, st); });
    // Router and permute (latency-bound at decode; bytes: logits in, ids + weights out / ids in, maps + rows).
    Dev lg(T * E * 4), ids(rows * 4), tw(rows * 4), px(rows * H * 2), cnt(E * 4), off((E + 1) * 4), sr(rows * 4), tok(rows * 4),
        ws(kernels::permute_workspace_bytes(T, K, E));
    upload(lg.as<float>(), rand_f32(T * E, 9500 + T, -4, 4));
    kernels::RouterParams rp;
    rp.logits = lg.as<float>();
    rp.topk_ids = ids.as<int32_t>();
    rp.topk_weights = tw.as<float>();
    rp.num_tokens = T;
    rp.num_experts = E;
    rp.top_k = K;
    rp.renormalize = true;
    report("router", std::string(phase) + " T=" + std::to_string(T) + " E=128 k=8", T * E * 4.0 + rows * 8.0,
           [&](cudaStream_t st) { kernels::launch_router(rp, st); });
    kernels::launch_router(rp, s.get());
    kernels::PermuteParams pp;
    pp.topk_ids = ids.as<int32_t>();
    pp.x = x.as<bf16>();
    pp.permuted_x = px.as<bf16>();
    pp.expert_counts = cnt.as<int32_t>();
    pp.expert_offsets = off.as<int32_t>();
    pp.slot_row = sr.as<int32_t>();
    pp.permuted_token = tok.as<int32_t>();
    pp.workspace = ws.as<void>();
    pp.workspace_bytes = ws.buf.bytes();
    pp.num_tokens = T;
    pp.top_k = K;
    pp.num_experts = E;
    pp.hidden = H;
    report("permute", std::string(phase) + " T=" + std::to_string(T) + " k=8 h=2048", double(T) * H * 2 + rows * H * 2.0 + rows * 12.0,
           [&](cudaStream_t st) { kernels::launch_permute(pp, st); });
  }
  // Mixtral-8x7B SwiGLU at prefill: 4096 tokens * k=2 rows, I = 14336.
  {
    const int64_t rows = 4096 * 2, I2 = 14336;
    Dev gu(rows * 2 * I2 * 2), so(rows * I2 * 2);
    upload(gu.as<bf16>(), rand_bf16(rows * 2 * I2, 9600, -4, 4));
    kernels::SwigluParams sp{gu.as<bf16>(), so.as<bf16>(), rows, I2, nullptr};
    report("swiglu", "mixtral prefill rows=8192 I=14336", 3.0 * rows * I2 * 2, [&](cudaStream_t st) { kernels::launch_swiglu(sp, st); });
  }
  std::printf("# end of bench\n");
}

// ---------------------------------------------------------------------------------------------
// Fused router logits + top-k + permute (kernels/moe_route.cuh).
namespace {

// fp32 logits of <= 16384 bf16 products: each product exact in fp32, the sum's rounding error
// <= k * 2^-24 * sum|terms| in the worst case (~1e-4 of sum|terms| at k = 2048, which is ~sqrt(k)
// times the logit's size for random signs: ~3e-6 relative); 1e-4 norm-wise is far above that and
// far below the O(1) of any indexing error.
constexpr double kTolRouteLogits = 1e-4;

struct MoeRouteCase {
  int E, k;
  int64_t hidden;
  bool renorm;
};

// Runs the fused launch against the float64 logits and, bit for bit, against launch_router +
// launch_permute run on the fused kernel's own logits; with `graph`, also two replays of a CUDA
// graph of the fused launch (outputs poisoned before each; the ticket must be zero after each).
void run_moe_route_case(int64_t T, const MoeRouteCase& c, uint64_t seed, bool graph) {
  INFO("moe_route tokens=" << T << " E=" << c.E << " top_k=" << c.k << " hidden=" << c.hidden << " renorm=" << c.renorm
                           << " seed=" << seed << " graph=" << graph);
  const int64_t H = c.hidden, pairs = T * c.k;
  const auto x = rand_bf16(T * H, seed, -2, 2);
  const auto w = rand_bf16(int64_t(c.E) * H, seed + 1, -0.1f, 0.1f);
  Dev dx(x.size() * 2), dw(w.size() * 2), tick(4);
  upload(dx.as<bf16>(), x);
  upload(dw.as<bf16>(), w);
  MIXSERVE_CUDA_CHECK(cudaMemset(tick.get(), 0, 4));
  // Two sets of outputs: the fused launch's and the unfused kernels'.
  struct Out {
    Dev logits, ids, weights, px, cnt, off, slot, tok, ws;
    Out(int64_t T, int E, int k, int64_t H)
        : logits(T * E * 4), ids(T * k * 4), weights(T * k * 4), px(T * k * H * 2), cnt(E * 4), off((E + 1) * 4),
          slot(T * k * 4), tok(T * k * 4), ws(kernels::permute_workspace_bytes(T, k, E)) {}
    void poison() const {
      for (const Dev* d : {&logits, &weights, &px}) d->poison();
      for (const Dev* d : {&ids, &cnt, &off, &slot, &tok, &ws}) d->poison_int();
    }
  };
  Out fo(T, c.E, c.k, H), uo(T, c.E, c.k, H);
  auto router_of = [&](const Out& o) {
    kernels::RouterParams r;
    r.logits = o.logits.as<float>();
    r.topk_ids = o.ids.as<int32_t>();
    r.topk_weights = o.weights.as<float>();
    r.num_tokens = T;
    r.num_experts = c.E;
    r.top_k = c.k;
    r.scoring = RouterScoring::softmax_topk;
    r.renormalize = c.renorm;
    return r;
  };
  auto permute_of = [&](const Out& o) {
    kernels::PermuteParams q;
    q.topk_ids = o.ids.as<int32_t>();
    q.x = dx.as<bf16>();
    q.permuted_x = o.px.as<bf16>();
    q.expert_counts = o.cnt.as<int32_t>();
    q.expert_offsets = o.off.as<int32_t>();
    q.slot_row = o.slot.as<int32_t>();
    q.permuted_token = o.tok.as<int32_t>();
    q.workspace = o.ws.get();
    q.workspace_bytes = o.ws.buf.bytes();
    q.num_tokens = T;
    q.top_k = c.k;
    q.num_experts = c.E;
    q.hidden = H;
    return q;
  };
  kernels::MoeRouteParams p;
  p.weights = dw.as<bf16>();
  p.logits = fo.logits.as<float>();
  p.router = router_of(fo);
  p.router.logits = nullptr;  // ignored
  p.permute = permute_of(fo);
  p.permute.workspace = nullptr;  // not used by the fused form
  p.permute.workspace_bytes = 0;
  p.ticket = tick.as<int32_t>();
  REQUIRE(kernels::is_supported(p, device()));
  fo.poison();
  kernels::launch_moe_route(p, nullptr);
  sync();

  // Logits against float64.
  const auto got_logits = download<float>(fo.logits.get(), T * c.E);
  std::vector<double> ref(T * c.E), got(got_logits.begin(), got_logits.end());
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < c.E; ++e) {
      double s = 0;
      for (int64_t h = 0; h < H; ++h)
        s += double(__bfloat162float(x[t * H + h])) * double(__bfloat162float(w[int64_t(e) * H + h]));
      ref[t * c.E + e] = s;
    }
  REQUIRE(norm(ref) > 0);
  CHECK(all_finite(got));
  const double err = rel_error(got, ref);
  INFO("logits rel error " << err);
  CHECK(err < kTolRouteLogits);

  // The unfused kernels on the same logits.
  uo.poison();
  MIXSERVE_CUDA_CHECK(cudaMemcpy(uo.logits.get(), fo.logits.get(), T * c.E * 4, cudaMemcpyDeviceToDevice));
  kernels::launch_router(router_of(uo), nullptr);
  kernels::launch_permute(permute_of(uo), nullptr);
  sync();
  auto compare = [&](const char* what) {
    auto same = [&](const Dev& a, const Dev& b, std::size_t bytes, const char* name) {
      const auto va = download<uint8_t>(a.get(), bytes), vb = download<uint8_t>(b.get(), bytes);
      int64_t diff = 0;
      for (std::size_t i = 0; i < bytes; ++i) diff += va[i] != vb[i];
      CHECK_MESSAGE(diff == 0, what << ": " << name << " differs from router + permute in " << diff << " bytes");
    };
    same(fo.ids, uo.ids, pairs * 4, "topk_ids");
    same(fo.weights, uo.weights, pairs * 4, "topk_weights");
    same(fo.cnt, uo.cnt, c.E * 4, "expert_counts");
    same(fo.off, uo.off, (c.E + 1) * 4, "expert_offsets");
    same(fo.slot, uo.slot, pairs * 4, "slot_row");
    same(fo.tok, uo.tok, pairs * 4, "permuted_token");
    same(fo.px, uo.px, pairs * H * 2, "permuted_x (rows past the routed ones: untouched)");
    CHECK_MESSAGE(download<int32_t>(tick.get(), 1)[0] == 0, what << ": ticket left non-zero");
  };
  compare("eager");
  if (!graph) return;
  gpu::Stream st(0);
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  p.pdl = true;  // as the executor launches it (a plain edge in a graph without a kernel before)
  MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(st.get(), cudaStreamCaptureModeThreadLocal));
  kernels::launch_moe_route(p, st.get());
  MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(st.get(), &g));
  MIXSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  for (const char* what : {"graph replay 1", "graph replay 2"}) {
    fo.poison();
    MIXSERVE_CUDA_CHECK(cudaGraphLaunch(exec, st.get()));
    st.synchronize();
    // The logits are recomputed identically (the same kernel and order).
    const auto again = download<float>(fo.logits.get(), T * c.E);
    CHECK_MESSAGE(std::memcmp(again.data(), got_logits.data(), again.size() * 4) == 0, what << ": logits changed");
    compare(what);
  }
  MIXSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MIXSERVE_CUDA_CHECK(cudaGraphDestroy(g));
}
}  // namespace

TEST_CASE("moe_route (fused router logits + top-k + permute): float64 logits, bit-identical to router + permute, graph replays") {
  const MoeRouteCase cases[] = {
      {128, 8, 2048, true},  // Qwen3-30B-A3B
      {60, 4, 2048, false},  // Qwen2-MoE-A2.7B
      {8, 2, 4096, true},    // Mixtral
      {64, 8, 2048, false},  // OLMoE
      {256, 8, 512, true},   // the most experts the router takes
      {8, 1, 296, false},    // hidden 8 * 37, top-1
      {60, 2, 64, true},     // a short row
  };
  uint64_t seed = 9000;
  for (const auto& c : cases)
    for (int64_t T = 1; T <= kernels::kMoeRouteMaxTokens; ++T) run_moe_route_case(T, c, seed++, T == 1 || T == 8 || T == 5);
}

TEST_CASE("moe_route: unsupported parameters are rejected naming the legal values") {
  Dev any(1 << 16);
  kernels::MoeRouteParams p;
  p.weights = any.as<bf16>();
  p.logits = any.as<float>();
  p.ticket = any.as<int32_t>();
  p.router.topk_ids = any.as<int32_t>();
  p.permute.topk_ids = p.router.topk_ids;
  p.router.topk_weights = any.as<float>();
  p.permute.permuted_x = any.as<bf16>();
  p.permute.x = p.permute.permuted_x;
  p.permute.expert_counts = p.permute.expert_offsets = p.permute.slot_row = p.permute.permuted_token =
      any.as<int32_t>();
  p.router.num_tokens = p.permute.num_tokens = 2;
  p.router.num_experts = p.permute.num_experts = 8;
  p.router.top_k = p.permute.top_k = 2;
  p.permute.hidden = 64;
  CHECK(kernels::moe_route_unsupported_reason(p).empty());
  auto bad = p;
  bad.router.num_tokens = bad.permute.num_tokens = 9;
  check_rejects([&] { kernels::launch_moe_route(bad, nullptr); }, "num_tokens=9 (legal: 0..8");
  bad = p;
  bad.permute.hidden = 60;
  check_rejects([&] { kernels::launch_moe_route(bad, nullptr); }, "hidden=60");
  bad = p;
  bad.permute.top_k = 3;
  check_rejects([&] { kernels::launch_moe_route(bad, nullptr); }, "differ from the router's");
  bad = p;
  bad.ticket = nullptr;
  check_rejects([&] { kernels::launch_moe_route(bad, nullptr); }, "ticket");
  bad = p;
  bad.router.num_experts = bad.permute.num_experts = 300;
  check_rejects([&] { kernels::launch_moe_route(bad, nullptr); }, "num_experts=300");
}

// ---------------------------------------------------------------------------------------------
// Benchmark (skipped by default; run with --no-skip -tc="bench: gemv*"): the two GEMV kernels
// (GemvKernel::by_column, the previous one, and GemvKernel::balanced) over the Qwen3-30B-A3B decode
// shapes at 1 and 8 tokens, each timed in a CUDA graph and launched alone on the stream, L2 flushed
// before every run (gpu::time_op: median of 50 after 10 warm-up runs). Bytes: the weights the step
// must read (grouped: the experts that got rows) plus the activations in and the outputs out, once.
// GB/s is reported against a 1 GiB device-to-device copy timed in the same run; "new/old" is the
// time ratio (< 1: the balanced kernel is faster). The check: both kernels' outputs agree within
// kTolBf16Out / kTolGemvF32 (they differ only in the fp32 summation order).
// The device's copy bandwidth this run (1 GiB D2D in a graph, read + write bytes), the GEMV
// benches' yardstick.
gpu::TimingResult time_device_copy(cudaStream_t s, double& copy_GBps) {
  const std::size_t copy_bytes = std::size_t(1) << 30;
  Dev ca(copy_bytes), cb(copy_bytes);
  MIXSERVE_CUDA_CHECK(cudaMemset(ca.buf.get(), 1, copy_bytes));
  gpu::TimingOptions copt;
  copt.cuda_graph = true;
  copt.flush_l2 = false;
  const auto ct = gpu::time_op(
      [&](cudaStream_t st) {
        MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(cb.buf.get(), ca.buf.get(), copy_bytes, cudaMemcpyDeviceToDevice, st));
      },
      s, copt, nullptr);
  copy_GBps = 2.0 * copy_bytes / (ct.time_us.median * 1e3);
  return ct;
}

TEST_CASE("bench: gemv by_column vs balanced, Qwen3-30B-A3B decode shapes, GB/s vs device copy" * doctest::skip()) {
  const gpu::DeviceInfo info = gpu::query_device(device());
  gpu::Stream s;
  gpu::L2Flusher flusher(device());
  double copy_GBps = 0;
  const auto ct = time_device_copy(s.get(), copy_GBps);
  gpu::TimingOptions graph_opt;
  graph_opt.cuda_graph = true;
  graph_opt.flush_l2 = true;
  gpu::TimingOptions alone_opt = graph_opt;
  alone_opt.cuda_graph = false;
  std::printf("# test_gpu_kernels bench: gemv  device %s (%d SMs, L2 %.0f MB)  cuda_runtime %s\n", info.name.c_str(),
              info.sm_count, info.l2_bytes / 1e6,
              info.versions.count("cuda_runtime") ? info.versions.at("cuda_runtime").c_str() : "?");
  std::printf("# timing: median of %d after %d warm-up, L2 flushed before each run; copy 1 GiB D2D this run: %.1f GB/s "
              "(noise %.3f)\n",
              graph_opt.timed_iters, graph_opt.warmup_iters, copy_GBps, ct.time_us.noise());
  std::printf("# %-22s %2s %10s | %-6s %9s %8s %7s %6s | %-6s %9s %8s %7s %6s | %7s %7s\n", "op", "T", "bytes", "mode",
              "old(us)", "GB/s", "%copy", "noise", "", "new(us)", "GB/s", "%copy", "noise", "new/old", "");
  std::printf("# %-22s %2s %10s | %-6s %9s %8s %7s %6s | %-6s %9s %8s %7s %6s | %7s\n", "", "", "(B)", "", "(us)",
              "(GB/s)", "(%)", "", "", "(us)", "(GB/s)", "(%)", "", "");
  // op(kernel, stream) launches one GEMV with the given kernel; check() compares the two kernels.
  auto report = [&](const char* op_name, int T, double bytes,
                    const std::function<void(gpu::GemvKernel, cudaStream_t)>& op) {
    for (const bool graph : {true, false}) {
      const gpu::TimingOptions& o = graph ? graph_opt : alone_opt;
      const auto old_t = gpu::time_op([&](cudaStream_t st) { op(gpu::GemvKernel::by_column, st); }, s.get(), o, &flusher);
      const auto new_t = gpu::time_op([&](cudaStream_t st) { op(gpu::GemvKernel::balanced, st); }, s.get(), o, &flusher);
      const double og = bytes / (old_t.time_us.median * 1e3), ng = bytes / (new_t.time_us.median * 1e3);
      std::printf("  %-22s %2d %10.0f | %-6s %9.2f %8.1f %6.1f%% %6.3f | %-6s %9.2f %8.1f %6.1f%% %6.3f | %7.3f\n", op_name,
                  T, bytes, graph ? "graph" : "alone", old_t.time_us.median, og, 100.0 * og / copy_GBps,
                  old_t.time_us.noise(), "", new_t.time_us.median, ng, 100.0 * ng / copy_GBps, new_t.time_us.noise(),
                  new_t.time_us.median / old_t.time_us.median);
      CHECK(old_t.time_us.median > 0);
      CHECK(new_t.time_us.median > 0);
    }
  };
  // Runs both kernels once and compares their outputs (bf16 or fp32 [count] at out).
  auto agree = [&](const char* op_name, int T, const void* out, std::size_t count, bool f32,
                   const std::function<void(gpu::GemvKernel, cudaStream_t)>& op) {
    std::vector<double> res[2];
    for (int i = 0; i < 2; ++i) {
      op(i == 0 ? gpu::GemvKernel::by_column : gpu::GemvKernel::balanced, s.get());
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s.get()));
      if (f32) {
        for (float v : download<float>(out, count)) res[i].push_back(v);
      } else {
        res[i] = to_double(download<bf16>(out, count));
      }
    }
    INFO(op_name << " T=" << T);
    REQUIRE(all_finite(res[0]));
    CHECK(norm(res[0]) > 0);
    CHECK(rel_error(res[1], res[0]) <= (f32 ? kTolGemvF32 : kTolBf16Out));
  };
  const int64_t H = 2048, E = 128, K = 8, I = 768, Q = 4096, KV = 512;  // Qwen3-30B-A3B
  Dev w_qkv((Q + 2 * KV) * H * 2), w_o(H * Q * 2), w_r(E * H * 2), w13(E * 2 * I * H * 2), w2(E * H * I * 2);
  uint64_t seed = 9900;
  for (const Dev* d : {&w_qkv, &w_o, &w_r, &w13, &w2})
    upload(d->as<bf16>(), rand_bf16(d->buf.bytes() / 2, seed += 1, -0.05f, 0.05f));
  for (const int T : {1, 8}) {
    const int64_t rows = int64_t(T) * K;
    Dev x(T * Q * 2), q(T * Q * 2), k(T * KV * 2), v(T * KV * 2), o(T * H * 2), logits(T * E * 4);
    Dev px(rows * H * 2), gu(rows * 2 * I * 2), eo(rows * H * 2), off((E + 1) * 4);
    upload(x.as<bf16>(), rand_bf16(T * Q, seed += 1, -1, 1));
    upload(px.as<bf16>(), rand_bf16(rows * H, seed += 1, -1, 1));
    upload(gu.as<bf16>(), rand_bf16(rows * 2 * I, seed += 1, -2, 2));
    // T tokens, top-8 distinct experts each, drawn at random: expert offsets of the permuted rows.
    std::mt19937_64 rng(seed += 1);
    std::vector<int> counts(E, 0), pool(E);
    for (int t = 0; t < T; ++t) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int j = 0; j < K; ++j) {
        std::swap(pool[j], pool[j + int(rng() % uint64_t(E - j))]);
        ++counts[pool[j]];
      }
    }
    std::vector<int32_t> offs(E + 1, 0);
    int64_t active = 0;
    for (int64_t e = 0; e < E; ++e) {
      offs[e + 1] = offs[e] + counts[e];
      active += counts[e] > 0;
    }
    upload(off.as<int32_t>(), offs);

    auto plain = [&](const void* act, const Dev& w, std::vector<gpu::GemvOutSegment> segs, int64_t n, int64_t kk,
                     bool f32) {
      return [=, &w](gpu::GemvKernel kern, cudaStream_t st) {
        gpu::GemvParams p;
        p.act = static_cast<const bf16*>(act);
        p.weights = w.as<bf16>();
        p.num_segments = static_cast<int>(segs.size());
        for (std::size_t i = 0; i < segs.size(); ++i) p.seg[i] = segs[i];
        p.out_fp32 = f32;
        p.num_rows = T;
        p.n = n;
        p.k = kk;
        p.kernel = kern;
        gpu::launch_gemv(p, st);
      };
    };
    auto grouped = [&](const Dev& act, const Dev& w, const Dev& out, int64_t n, int64_t kk, bool swiglu) {
      return [=, &act, &w, &out, &off](gpu::GemvKernel kern, cudaStream_t st) {
        gpu::GroupedGemvParams p;
        p.act = act.as<bf16>();
        p.weights = w.as<bf16>();
        p.out = out.as<bf16>();
        p.expert_offsets = off.as<int32_t>();
        p.num_experts = static_cast<int>(E);
        p.n = n;
        p.k = kk;
        p.max_rows = rows;
        p.max_rows_per_expert = T;
        p.swiglu_act = swiglu;
        p.kernel = kern;
        gpu::launch_grouped_gemv_v2(p, st);
      };
    };
    const auto qkv = plain(x.get(), w_qkv, {{q.get(), Q}, {k.get(), KV}, {v.get(), KV}}, Q + 2 * KV, H, false);
    report("q|k|v", T, double(Q + 2 * KV) * H * 2 + T * H * 2.0 + T * (Q + 2 * KV) * 2.0, qkv);
    agree("q|k|v", T, q.get(), std::size_t(T * Q), false, qkv);
    const auto oproj = plain(x.get(), w_o, {{o.get(), H}}, H, Q, false);
    report("o_proj", T, double(H) * Q * 2 + T * Q * 2.0 + T * H * 2.0, oproj);
    agree("o_proj", T, o.get(), std::size_t(T * H), false, oproj);
    const auto router = plain(x.get(), w_r, {{logits.get(), E}}, E, H, true);
    report("router logits (fp32)", T, double(E) * H * 2 + T * H * 2.0 + T * E * 4.0, router);
    agree("router logits", T, logits.get(), std::size_t(T * E), true, router);
    const auto gate_up = grouped(px, w13, gu, 2 * I, H, false);
    report("experts gate|up", T, double(active) * 2 * I * H * 2 + rows * H * 2.0 + rows * 2 * I * 2.0, gate_up);
    agree("experts gate|up", T, gu.get(), std::size_t(rows * 2 * I), false, gate_up);
    upload(gu.as<bf16>(), rand_bf16(rows * 2 * I, seed += 1, -2, 2));  // bounded SwiGLU input for down
    const auto down = grouped(gu, w2, eo, H, I, true);
    report("experts down (SwiGLU)", T, double(active) * H * I * 2 + rows * 2 * I * 2.0 + rows * H * 2.0, down);
    agree("experts down", T, eo.get(), std::size_t(rows * H), false, down);
  }
  std::printf("# end of bench: gemv\n");
}

// Mixtral-8x7B's expert down projection (n = 4096, k = 14336: the GEMV's k limit was 8192 until
// session 5, so the executor ran it on the tensor-core grouped GEMM: 211 us per layer at b=1 on the
// H200, ncu). Plain launch_gemv on one expert's weights with 1 and 2 rows, and the grouped v2 GEMV
// over 8 experts for T = 1 and 2 tokens routed top-2 at random, each with the SwiGLU input
// (gate | up [rows, 2k]) as the executor runs it; the grouped GEMM on the same rows (its input
// already SwiGLU'd, as the executor's separate SwiGLU launch leaves it) for comparison. Bytes:
// the weights of the experts with rows plus the activations in and out.
TEST_CASE("bench: gemv Mixtral-8x7B expert down (k=14336), by_column / balanced / grouped GEMM, GB/s vs device copy" *
          doctest::skip()) {
  const gpu::DeviceInfo info = gpu::query_device(device());
  gpu::Stream s;
  gpu::L2Flusher flusher(device());
  double copy_GBps = 0;
  const auto ct = time_device_copy(s.get(), copy_GBps);
  gpu::TimingOptions graph_opt;
  graph_opt.cuda_graph = true;
  graph_opt.flush_l2 = true;
  gpu::TimingOptions alone_opt = graph_opt;
  alone_opt.cuda_graph = false;
  std::printf("# test_gpu_kernels bench: gemv Mixtral down  device %s (%d SMs, L2 %.0f MB)  cuda_runtime %s\n",
              info.name.c_str(), info.sm_count, info.l2_bytes / 1e6,
              info.versions.count("cuda_runtime") ? info.versions.at("cuda_runtime").c_str() : "?");
  std::printf("# timing: median of %d after %d warm-up, L2 flushed before each run; copy 1 GiB D2D this run: %.1f GB/s "
              "(noise %.3f)\n",
              graph_opt.timed_iters, graph_opt.warmup_iters, copy_GBps, ct.time_us.noise());
  std::printf("# %-24s %2s %4s %10s | %-6s | %9s %8s %7s | %9s %8s %7s | %9s %8s %7s\n", "op", "T", "rows", "bytes",
              "mode", "bycol(us)", "GB/s", "%copy", "bal(us)", "GB/s", "%copy", "gemm(us)", "GB/s", "%copy");
  const int64_t H = 4096, I = 14336, E = 8, K = 2;  // Mixtral-8x7B
  // One expert's random weights copied into all 8 (distinct addresses: the L2 flush makes every
  // run read them from HBM).
  Dev w2(E * H * I * 2);
  {
    const auto one = rand_bf16(std::size_t(H * I), 9950, -0.05f, 0.05f);
    for (int64_t e = 0; e < E; ++e) upload(w2.as<bf16>() + e * H * I, one);
  }
  // op(kernel, stream); kernel automatic: the tensor-core grouped GEMM (plain rows: not timed).
  auto report = [&](const char* op_name, int T, int64_t rows, double bytes, bool with_gemm,
                    const std::function<void(gpu::GemvKernel, cudaStream_t)>& op) {
    for (const bool graph : {true, false}) {
      const gpu::TimingOptions& o = graph ? graph_opt : alone_opt;
      double us[3] = {0, 0, 0};
      const gpu::GemvKernel kerns[3] = {gpu::GemvKernel::by_column, gpu::GemvKernel::balanced,
                                        gpu::GemvKernel::automatic};
      for (int i = 0; i < (with_gemm ? 3 : 2); ++i) {
        us[i] = gpu::time_op([&](cudaStream_t st) { op(kerns[i], st); }, s.get(), o, &flusher).time_us.median;
        CHECK(us[i] > 0);
      }
      std::printf("  %-24s %2d %4lld %10.0f | %-6s", op_name, T, static_cast<long long>(rows), bytes,
                  graph ? "graph" : "alone");
      for (int i = 0; i < 3; ++i) {
        if (us[i] > 0) {
          const double gbps = bytes / (us[i] * 1e3);
          std::printf(" | %9.2f %8.1f %6.1f%%", us[i], gbps, 100.0 * gbps / copy_GBps);
        } else {
          std::printf(" | %9s %8s %7s", "-", "-", "-");
        }
      }
      std::printf("\n");
    }
  };
  uint64_t seed = 9960;
  for (const int rows : {1, 2}) {  // plain GEMV, SwiGLU input
    Dev gu(rows * 2 * I * 2), out(rows * H * 2);
    upload(gu.as<bf16>(), rand_bf16(std::size_t(rows * 2 * I), seed += 1, -2, 2));
    auto op = [&](gpu::GemvKernel kern, cudaStream_t st) {
      gpu::GemvParams p;
      p.act = gu.as<bf16>();
      p.weights = w2.as<bf16>();
      p.seg[0] = {out.get(), H};
      p.swiglu_act = true;
      p.num_rows = rows;
      p.n = H;
      p.k = I;
      p.kernel = kern;
      gpu::launch_gemv(p, st);
    };
    report("down plain (SwiGLU)", rows, rows, double(H) * I * 2 + rows * 2 * I * 2.0 + rows * H * 2.0, false, op);
  }
  for (const int T : {1, 2}) {  // grouped over 8 experts, T tokens top-2
    const int64_t rows = int64_t(T) * K;
    std::mt19937_64 rng(seed += 1);
    std::vector<int> counts(E, 0), pool(E);
    for (int t = 0; t < T; ++t) {
      std::iota(pool.begin(), pool.end(), 0);
      for (int j = 0; j < K; ++j) {
        std::swap(pool[j], pool[j + int(rng() % uint64_t(E - j))]);
        ++counts[pool[j]];
      }
    }
    std::vector<int32_t> offs(E + 1, 0);
    int64_t active = 0;
    for (int64_t e = 0; e < E; ++e) {
      offs[e + 1] = offs[e] + counts[e];
      active += counts[e] > 0;
    }
    Dev gu(rows * 2 * I * 2), act(rows * I * 2), out(rows * H * 2), off((E + 1) * 4);
    upload(gu.as<bf16>(), rand_bf16(std::size_t(rows * 2 * I), seed += 1, -2, 2));
    upload(act.as<bf16>(), rand_bf16(std::size_t(rows * I), seed += 1, -1, 1));
    upload(off.as<int32_t>(), offs);
    auto op = [&](gpu::GemvKernel kern, cudaStream_t st) {
      if (kern == gpu::GemvKernel::automatic) {  // the path before: tensor-core grouped GEMM
        kernels::GroupedGemmParams g;
        g.act = act.as<bf16>();
        g.weights = w2.as<bf16>();
        g.out = out.as<bf16>();
        g.expert_offsets = off.as<int32_t>();
        g.num_experts = static_cast<int>(E);
        g.n = H;
        g.k = I;
        kernels::launch_grouped_gemm(g, st);
        return;
      }
      gpu::GroupedGemvParams p;
      p.act = gu.as<bf16>();
      p.weights = w2.as<bf16>();
      p.out = out.as<bf16>();
      p.expert_offsets = off.as<int32_t>();
      p.num_experts = static_cast<int>(E);
      p.n = H;
      p.k = I;
      p.max_rows = rows;
      p.max_rows_per_expert = T;
      p.swiglu_act = true;
      p.kernel = kern;
      gpu::launch_grouped_gemv_v2(p, st);
    };
    const double bytes = double(active) * H * I * 2 + rows * 2 * I * 2.0 + rows * H * 2.0;
    report("experts down (SwiGLU)", T, rows, bytes, true, op);
  }
  std::printf("# end of bench: gemv Mixtral down (the executor's automatic kernel: by_column at T=1, balanced "
              "at T=2)\n");
}
