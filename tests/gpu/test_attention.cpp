// GPU tests of the paged KV cache writer and of causal GQA attention over the paged cache
// (kernels/attention.cuh) against the float64 CPU reference of ref_attention.hpp: decode, chunked
// prefill with and without prior context, mixed batches, shuffled block tables, GQA ratios 1-16,
// head_dim 64/128, block_tokens 8/16/32, forced and automatic context splits, both
// implementations and the three prefill kernels of the tensor-core one (sequences of more than 64
// query rows), the split merge fused into the attention launch (every split case, bit-identical
// to the merge kernel, eager and two CUDA-graph replays), 0 sequences, bad parameters.
// The benchmark is a test case skipped by default; run it with
//   test_gpu_attention --test-case='bench*' --no-skip      (env MIXSERVE_BENCH_JSON: JSON path)
#include <doctest/doctest.h>

#include <chrono>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <tuple>

#include <nlohmann/json.hpp>

#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/kernels/attention.cuh"
#include "mixserve/kernels/fill.cuh"
#include "mixserve/kernels/kv_cache.cuh"
#include "ref_attention.hpp"
#include "reference.hpp"

using namespace mixserve;
using namespace mixserve::test;
using kernels::AttentionImpl;
using kernels::AttentionPrefillKernel;

namespace {

// Norm-wise relative error of the bf16 output against float64. Error sources: the output's bf16
// rounding (unit roundoff 2^-9 ~ 2e-3, ~1e-3 RMS), the probabilities rounded to bf16 before the
// P.V product on the tensor cores (relative 2^-9 per weight, averaging out over the context), and
// fp32 accumulation (~1e-6). Expected ~1.5e-3; 1e-2 leaves margin over those and still fails on
// any indexing, masking or softmax error, which give O(0.1-1).
constexpr double kTolAttnRel = 1e-2;
// Largest absolute error of one output row over the norm of that row: the same sources on a
// single element are below 2^-8 of the row norm; 2e-2 catches one wrong row hidden in a large step.
constexpr double kTolAttnRow = 2e-2;

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16_rn(v[i]);
  return o;
}
std::vector<uint16_t> bits_of(const std::vector<__nv_bfloat16>& v) {
  std::vector<uint16_t> o(v.size());
  std::memcpy(o.data(), v.data(), v.size() * 2);
  return o;
}

struct AttnCase {
  std::string name;
  int q_heads = 32, kv_heads = 4, head_dim = 128, block_tokens = 16;
  std::vector<SeqSpec> seqs;
  AttentionImpl impl = AttentionImpl::tensor_core;
  AttentionPrefillKernel prefill = AttentionPrefillKernel::pipelined;  // sequences of > 64 rows
  int num_splits = 0;
  float scale = 0.0f;  // 0: 1/sqrt(head_dim)
  uint64_t seed = 1;
};

const char* prefill_name(AttentionPrefillKernel k) {
  switch (k) {
    case AttentionPrefillKernel::pipelined: return "pipelined";
    case AttentionPrefillKernel::pipelined_m32: return "pipelined_m32";
    case AttentionPrefillKernel::registers: return "registers";
  }
  return "?";
}
constexpr AttentionPrefillKernel kPrefillKernels[] = {AttentionPrefillKernel::pipelined,
                                                      AttentionPrefillKernel::pipelined_m32,
                                                      AttentionPrefillKernel::registers};

std::string describe(const AttnCase& c) {
  std::ostringstream o;
  o << c.name << ": q_heads=" << c.q_heads << " kv_heads=" << c.kv_heads << " head_dim=" << c.head_dim
    << " block_tokens=" << c.block_tokens << " impl=" << (c.impl == AttentionImpl::simple ? "simple" : "tensor_core")
    << " prefill_kernel=" << prefill_name(c.prefill)
    << " num_splits=" << c.num_splits << " scale=" << c.scale << " seed=" << c.seed << " seqs(ctx_before+q_len)=";
  for (const auto& s : c.seqs) o << " " << s.ctx_before << "+" << s.q_len;
  return o.str();
}

struct AttnResult {
  double rel = 0, worst_row = 0;
  int splits_used = 0;
};

// The fused split merge (AttentionParams::merge_tickets) against the two-launch output of the same
// parameters (p.out holds it): bit-identical (the same arithmetic), eagerly and in two replays of a
// CUDA graph (the last CTA of each group resets its ticket: a counter left non-zero would make the
// next launch merge early or never), with the output and the partials poisoned before every run;
// the tickets are zero after each. Too few tickets are refused.
void check_fused_merge(const kernels::AttentionParams& p, const gpu::DeviceBuffer& ws, std::size_t out_elems) {
  const auto want = bits_of(download<__nv_bfloat16>(p.out, out_elems));
  const std::size_t n = kernels::attention_merge_tickets(p, 0);
  REQUIRE(n > 0);
  gpu::DeviceBuffer tickets(n * 4);
  MIXSERVE_CUDA_CHECK(cudaMemset(tickets.get(), 0, n * 4));
  kernels::AttentionParams f = p;
  f.merge_tickets = tickets.as<int32_t>();
  f.merge_tickets_count = n - 1;
  CHECK_THROWS_AS(kernels::launch_attention(f, nullptr), InputError);
  f.merge_tickets_count = n;
  gpu::Stream st(0);
  auto poison = [&] {
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(p.out, 0xff, out_elems * 2, st.get()));
    if (ws.bytes()) MIXSERVE_CUDA_CHECK(cudaMemsetAsync(ws.get(), 0xff, ws.bytes(), st.get()));
  };
  auto check_run = [&](const char* what) {
    st.synchronize();
    const auto got = bits_of(download<__nv_bfloat16>(p.out, out_elems));
    int64_t diff = 0;
    for (std::size_t i = 0; i < got.size(); ++i) diff += got[i] != want[i];
    CHECK_MESSAGE(diff == 0, "fused merge (" << what << "): " << diff << " elements differ from the merge kernel's");
    const auto t = download<int32_t>(tickets.get(), n);
    int64_t nonzero = 0;
    for (int32_t v : t) nonzero += v != 0;
    CHECK_MESSAGE(nonzero == 0, "fused merge (" << what << "): " << nonzero << " of " << n << " tickets left non-zero");
  };
  poison();
  kernels::launch_attention(f, st.get());
  check_run("eager");
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(st.get(), cudaStreamCaptureModeThreadLocal));
  kernels::launch_attention(f, st.get());
  MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(st.get(), &g));
  MIXSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  for (const char* what : {"graph replay 1", "graph replay 2"}) {
    poison();
    MIXSERVE_CUDA_CHECK(cudaGraphLaunch(exec, st.get()));
    check_run(what);
  }
  MIXSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MIXSERVE_CUDA_CHECK(cudaGraphDestroy(g));
  // Leave the two-launch output in place for the reference comparison that follows.
  upload(p.out, want);
}

// Writes the step's K/V with launch_kv_write (checked bit-exact against the expected pool), runs
// the attention (and, when it splits, the fused merge: check_fused_merge) and compares with the
// float64 reference.
AttnResult run_attention_case(const AttnCase& c) {
  INFO(describe(c));
  const PagedStep s = make_paged_step(c.q_heads, c.kv_heads, c.head_dim, c.block_tokens, c.seqs, c.seed);
  const int D = c.head_dim;
  // The pool before the step: the new tokens' slots still NaN.
  std::vector<float> k_before = s.k_pool, v_before = s.v_pool;
  for (int t = 0; t < s.num_tokens; ++t)
    for (int h = 0; h < c.kv_heads; ++h) {
      const int64_t row = s.cache_row(s.token_seq[t], s.token_pos[t], h);
      for (int d = 0; d < D; ++d) k_before[std::size_t(row + d)] = v_before[std::size_t(row + d)] = NAN;
    }
  const std::size_t pool = s.k_pool.size();
  gpu::DeviceBuffer k_dev(pool * 2 + 16), v_dev(pool * 2 + 16);
  gpu::DeviceBuffer kn(s.k_new.size() * 2 + 16), vn(s.v_new.size() * 2 + 16);
  gpu::DeviceBuffer tseq(s.token_seq.size() * 4 + 4), tpos(s.token_pos.size() * 4 + 4);
  gpu::DeviceBuffer table(s.block_table.size() * 4), qs(s.q_start.size() * 4), lens(s.seq_lens.size() * 4 + 4);
  gpu::DeviceBuffer q(s.q.size() * 2 + 16), out(s.q.size() * 2 + 16);
  upload(k_dev.get(), to_bf16(k_before));
  upload(v_dev.get(), to_bf16(v_before));
  upload(kn.get(), to_bf16(s.k_new));
  upload(vn.get(), to_bf16(s.v_new));
  upload(tseq.get(), s.token_seq);
  upload(tpos.get(), s.token_pos);
  upload(table.get(), s.block_table);
  upload(qs.get(), s.q_start);
  upload(lens.get(), s.seq_lens);
  upload(q.get(), to_bf16(s.q));
  MIXSERVE_CUDA_CHECK(cudaMemset(out.get(), 0xff, s.q.size() * 2));  // poison: bf16 NaN

  kernels::PagedKvCache cache;
  cache.k = k_dev.as<__nv_bfloat16>();
  cache.v = v_dev.as<__nv_bfloat16>();
  cache.block_table = table.as<int32_t>();
  cache.num_blocks = s.num_blocks;
  cache.block_tokens = c.block_tokens;
  cache.kv_heads = c.kv_heads;
  cache.head_dim = D;
  cache.max_blocks_per_seq = s.max_blocks_per_seq;

  kernels::KvWriteParams w;
  w.cache = cache;
  w.k_new = kn.as<__nv_bfloat16>();
  w.v_new = vn.as<__nv_bfloat16>();
  w.token_seq = tseq.as<int32_t>();
  w.token_pos = tpos.as<int32_t>();
  w.num_tokens = s.num_tokens;
  REQUIRE(kernels::is_supported(w, 0));
  kernels::launch_kv_write(w, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto k_after = bits_of(download<__nv_bfloat16>(k_dev.get(), pool));
  const auto v_after = bits_of(download<__nv_bfloat16>(v_dev.get(), pool));
  const auto k_want = bits_of(to_bf16(s.k_pool)), v_want = bits_of(to_bf16(s.v_pool));
  int64_t wrong = 0;
  for (std::size_t i = 0; i < pool; ++i) wrong += (k_after[i] != k_want[i]) + (v_after[i] != v_want[i]);
  CHECK_MESSAGE(wrong == 0, "kv_write: " << wrong << " wrong cache elements");

  kernels::AttentionParams p;
  p.q = q.as<__nv_bfloat16>();
  p.out = out.as<__nv_bfloat16>();
  p.cache = cache;
  p.q_start = qs.as<int32_t>();
  p.seq_lens = lens.as<int32_t>();
  p.num_seqs = int(c.seqs.size());
  p.num_tokens = s.num_tokens;
  p.q_heads = c.q_heads;
  p.max_q_len = s.max_q_len;
  p.max_seq_len = s.max_seq_len;
  p.softmax_scale = c.scale;
  p.impl = c.impl;
  p.prefill_kernel = c.prefill;
  p.num_splits = c.num_splits;
  REQUIRE(kernels::is_supported(p, 0));
  const std::size_t ws_bytes = kernels::attention_workspace_bytes(p, 0);
  gpu::DeviceBuffer ws(ws_bytes);
  if (ws_bytes) MIXSERVE_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws_bytes));  // poison partials too
  p.workspace = ws.get();
  p.workspace_bytes = ws_bytes;
  AttnResult r;
  r.splits_used = kernels::attention_num_splits(p, 0);
  kernels::launch_attention(p, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  if (c.impl == AttentionImpl::tensor_core && r.splits_used > 1) check_fused_merge(p, ws, s.q.size());

  const double scale = c.scale > 0 ? double(c.scale) : 1.0 / std::sqrt(double(D));
  const auto ref = ref_paged_attention(s, scale);
  const auto got = to_double(download<__nv_bfloat16>(out.get(), s.q.size()));
  INFO("splits used: " << r.splits_used);
  REQUIRE(norm(ref) > 0);
  CHECK(all_finite(got));
  r.rel = rel_error(got, ref);
  for (std::size_t row = 0; row < got.size() / D; ++row) {
    double rn = 0, mx = 0;
    for (int d = 0; d < D; ++d) {
      rn += ref[row * D + d] * ref[row * D + d];
      mx = std::max(mx, std::abs(got[row * D + d] - ref[row * D + d]));
    }
    const double e = mx / std::max(std::sqrt(rn), 1e-30);
    if (!(e <= r.worst_row)) r.worst_row = std::isfinite(e) ? e : INFINITY;
  }
  CHECK_MESSAGE(r.rel < kTolAttnRel, "relative error " << r.rel);
  CHECK_MESSAGE(r.worst_row < kTolAttnRow, "worst row max-abs/row-norm " << r.worst_row);
  std::printf("  %-44s %-13s splits=%-3d rel=%.2e worst_row=%.2e\n", c.name.c_str(),
              c.impl == AttentionImpl::simple ? "simple" : prefill_name(c.prefill), r.splits_used, r.rel,
              r.worst_row);
  return r;
}

// Every case for both implementations (and the tensor-core one with automatic and forced splits,
// with every prefill kernel: they differ only where a sequence has more than 64 query rows).
void run_all(AttnCase c, std::initializer_list<int> splits = {0, 1, 3}) {
  for (int n : splits)
    for (AttentionPrefillKernel k : kPrefillKernels) {
      c.impl = AttentionImpl::tensor_core;
      c.prefill = k;
      c.num_splits = n;
      run_attention_case(c);
    }
  c.impl = AttentionImpl::simple;
  c.num_splits = 0;
  run_attention_case(c);
}

}  // namespace

TEST_CASE("attention: decode with contexts 1, 2, 17, 1000, 4097 (Qwen3-30B-A3B heads 32/4 x 128)") {
  uint64_t seed = 100;
  for (int ctx : {1, 2, 17, 1000, 4097}) {
    AttnCase c;
    c.name = "decode ctx=" + std::to_string(ctx);
    c.seqs = {{ctx - 1, 1}};
    c.seed = seed++;
    run_all(c);
  }
  AttnCase batch;
  batch.name = "decode batch of 5 contexts";
  batch.seqs = {{0, 1}, {1, 1}, {16, 1}, {999, 1}, {4096, 1}};
  batch.seed = seed++;
  run_all(batch, {0, 1, 7});
}

TEST_CASE("attention: prefill chunks 1, 7, 128, 300 with and without prior context") {
  uint64_t seed = 200;
  for (int chunk : {1, 7, 128, 300})
    for (int ctx : {0, 333}) {
      AttnCase c;
      c.name = "prefill chunk=" + std::to_string(chunk) + " ctx_before=" + std::to_string(ctx);
      c.seqs = {{ctx, chunk}};
      c.seed = seed++;
      run_all(c);
    }
}

TEST_CASE("attention: mixed batch (prefills, chunked prefills, decodes, an idle sequence)") {
  AttnCase c;
  c.name = "mixed batch";
  c.seqs = {{0, 300}, {77, 128}, {4096, 1}, {0, 1}, {2048, 7}, {50, 0}, {999, 1}, {16, 1}, {5, 33}};
  c.seed = 300;
  run_all(c, {0, 1, 5});
}

TEST_CASE("attention: GQA ratios 1, 4, 8, 16, head_dim 64/128, block_tokens 8/16/32, explicit scale") {
  struct Shape {
    const char* model;
    int qh, kvh, d;
  };
  const Shape shapes[] = {{"OLMoE 16/16x128", 16, 16, 128}, {"Qwen3-30B 32/4x128", 32, 4, 128},
                          {"Mixtral 32/8x128", 32, 8, 128}, {"gpt-oss 64/8x64", 64, 8, 64},
                          {"Qwen3-235B 64/4x128", 64, 4, 128}, {"MHA 8/8x64", 8, 8, 64}};
  uint64_t seed = 400;
  for (const auto& sh : shapes)
    for (int bt : {8, 16, 32}) {
      AttnCase c;
      c.name = std::string(sh.model) + " bt=" + std::to_string(bt);
      c.q_heads = sh.qh;
      c.kv_heads = sh.kvh;
      c.head_dim = sh.d;
      c.block_tokens = bt;
      c.seqs = {{0, 37}, {130, 1}, {61, 19}, {513, 1}};
      c.seed = seed++;
      // Default scale (flat softmax), 1.0 (peaked: the running max moves a lot), 0.3 (between).
      c.scale = bt == 8 ? 0.0f : bt == 16 ? 1.0f : 0.3f;
      run_all(c, {0, 2});
    }
}

// The pipelined prefill kernel's own paths: the tiles it skips (wholly after a warp's rows), the
// tiles it leaves unmasked (wholly before the warp's first row and inside the range), the
// diagonal and range-end tiles, partly filled CTAs and warps (just over the 4-warp kernel's 64
// rows), contexts that are not multiples of the 64-position tile, a two-stage ring that
// wraps many times, head_dim 64 and 128, GQA 1, 4, 8 and 16, forced splits whose ranges end
// mid-tile.
TEST_CASE("attention: prefill kernels, long chunks with context, partial tiles, GQA, head_dim 64/128") {
  struct Shape {
    const char* model;
    int qh, kvh, d;
  };
  const Shape shapes[] = {{"Qwen3-30B 32/4x128", 32, 4, 128}, {"MHA 4/4x64", 4, 4, 64},
                          {"GQA 16/1x64", 16, 1, 64}, {"GQA 8/2x128", 8, 2, 128}};
  uint64_t seed = 500;
  for (const auto& sh : shapes) {
    const int group = sh.qh / sh.kvh;
    AttnCase c;
    c.name = std::string(sh.model) + " long prefill + rows 65";
    c.q_heads = sh.qh;
    c.kv_heads = sh.kvh;
    c.head_dim = sh.d;
    c.block_tokens = 16;
    // (65 + group - 1) / group tokens: the fewest rows past 64 (65 .. 80 here), the smallest
    // sequence the prefill kernel takes; its CTA has one partly filled warp.
    c.seqs = {{0, 600 / group + 1}, {1000, 333 / group + 2}, {0, (65 + group - 1) / group}, {77, 1}, {129, 250 / group}};
    c.seed = seed++;
    c.scale = sh.d == 64 ? 1.0f : 0.0f;  // peaked softmax on one head size, flat on the other
    run_all(c, {0, 1, 3});
  }
}

TEST_CASE("attention: 0 sequences and 0 tokens launch nothing; bad parameters throw") {
  kernels::AttentionParams p;
  p.q_heads = 32;
  p.cache.kv_heads = 4;
  p.cache.head_dim = 128;
  CHECK(kernels::is_supported(p, 0));
  CHECK_NOTHROW(kernels::launch_attention(p, nullptr));
  CHECK(kernels::attention_workspace_bytes(p, 0) == 0);
  kernels::KvWriteParams w;
  w.cache = p.cache;
  CHECK_NOTHROW(kernels::launch_kv_write(w, nullptr));
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());

  auto bad = p;
  bad.cache.head_dim = 96;
  CHECK_FALSE(kernels::is_supported(bad, 0));
  CHECK_THROWS_AS(kernels::launch_attention(bad, nullptr), InputError);
  bad = p;
  bad.cache.block_tokens = 12;
  CHECK_THROWS_AS(kernels::launch_attention(bad, nullptr), InputError);
  bad = p;
  bad.q_heads = 30;  // not a multiple of kv_heads
  CHECK_THROWS_AS(kernels::launch_attention(bad, nullptr), InputError);
  auto wbad = w;
  wbad.cache.block_tokens = 64;
  CHECK_FALSE(kernels::is_supported(wbad, 0));
  CHECK_THROWS_AS(kernels::launch_kv_write(wbad, nullptr), InputError);

  // A decode step with splits but no workspace is refused before anything runs.
  gpu::DeviceBuffer any(1 << 20);
  auto dec = p;
  dec.q = dec.out = any.as<__nv_bfloat16>();
  dec.cache.k = dec.cache.v = any.as<__nv_bfloat16>();
  dec.cache.block_table = dec.q_start = dec.seq_lens = any.as<int32_t>();
  dec.cache.num_blocks = 4;
  dec.cache.max_blocks_per_seq = 256;
  dec.num_seqs = 1;
  dec.num_tokens = 1;
  dec.max_q_len = 1;
  dec.max_seq_len = 4096;
  REQUIRE(kernels::attention_num_splits(dec, 0) > 1);
  CHECK_THROWS_AS(kernels::launch_attention(dec, nullptr), InputError);
  dec.max_seq_len = 5000;  // beyond max_blocks_per_seq * block_tokens
  CHECK_THROWS_AS(kernels::launch_attention(dec, nullptr), InputError);
}

TEST_CASE("kv_write: padding tokens (position < 0) write nothing; other slots untouched") {
  const int kvh = 8, D = 64, bt = 16, blocks = 6, max_blocks = 3;
  const std::vector<int32_t> table = {4, 1, 5, 0, 3, 2};  // 2 sequences x 3 blocks
  const std::vector<int32_t> tseq = {0, 1, 0, 1, 1}, tpos = {0, 47, -1, 16, -5};
  const int64_t pool = int64_t(blocks) * bt * kvh * D;
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> dist(-1, 1);
  std::vector<float> kn(tseq.size() * kvh * D), vn(kn.size());
  for (auto& x : kn) x = round_bf16(dist(rng));
  for (auto& x : vn) x = round_bf16(dist(rng));
  gpu::DeviceBuffer k(pool * 2), v(pool * 2), knd(kn.size() * 2), vnd(vn.size() * 2), td(24), sd(20), pd(20);
  MIXSERVE_CUDA_CHECK(cudaMemset(k.get(), 0x5a, pool * 2));
  MIXSERVE_CUDA_CHECK(cudaMemset(v.get(), 0xa5, pool * 2));
  upload(knd.get(), to_bf16(kn));
  upload(vnd.get(), to_bf16(vn));
  upload(td.get(), table);
  upload(sd.get(), tseq);
  upload(pd.get(), tpos);
  kernels::KvWriteParams w;
  w.cache.k = k.as<__nv_bfloat16>();
  w.cache.v = v.as<__nv_bfloat16>();
  w.cache.block_table = td.as<int32_t>();
  w.cache.num_blocks = blocks;
  w.cache.block_tokens = bt;
  w.cache.kv_heads = kvh;
  w.cache.head_dim = D;
  w.cache.max_blocks_per_seq = max_blocks;
  w.k_new = knd.as<__nv_bfloat16>();
  w.v_new = vnd.as<__nv_bfloat16>();
  w.token_seq = sd.as<int32_t>();
  w.token_pos = pd.as<int32_t>();
  w.num_tokens = int64_t(tseq.size());
  kernels::launch_kv_write(w, nullptr);
  MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> want_k(std::size_t(pool), 0x5a5a), want_v(std::size_t(pool), 0xa5a5);
  const auto knb = bits_of(to_bf16(kn)), vnb = bits_of(to_bf16(vn));
  for (std::size_t t = 0; t < tseq.size(); ++t) {
    if (tpos[t] < 0) continue;
    const int64_t block = table[std::size_t(tseq[t]) * max_blocks + tpos[t] / bt];
    for (int h = 0; h < kvh; ++h)
      for (int d = 0; d < D; ++d) {
        const std::size_t dst = std::size_t(((block * bt + tpos[t] % bt) * kvh + h) * D + d);
        want_k[dst] = knb[(t * kvh + h) * D + d];
        want_v[dst] = vnb[(t * kvh + h) * D + d];
      }
  }
  const auto got_k = bits_of(download<__nv_bfloat16>(k.get(), pool));
  const auto got_v = bits_of(download<__nv_bfloat16>(v.get(), pool));
  int64_t wrong = 0;
  for (std::size_t i = 0; i < std::size_t(pool); ++i) wrong += (got_k[i] != want_k[i]) + (got_v[i] != want_v[i]);
  CHECK(wrong == 0);
}

// ---------------------------------------------------------------------------------------------
// Benchmark (skipped by default): decode at batch 1/64 x context 1k/8k and prefill 8 x 2048,
// Qwen3-30B-A3B attention shapes (32 q heads, 4 kv heads, head_dim 128, block_tokens 16), against
// the copy bandwidth and the bf16 GEMM rate measured in the same run. No thresholds.
namespace {

struct BenchStep {
  int batch, q_len, ctx_before;
};

struct BenchRow {
  std::string name, impl;
  int splits = 0;
  double time_us = 0, noise = 0, kv_GB = 0, GBps = 0, tflops = 0;
};

BenchRow bench_attention(const BenchStep& b, AttentionImpl impl, int num_splits, gpu::Stream& st,
                         const gpu::L2Flusher& fl,
                         AttentionPrefillKernel prefill = AttentionPrefillKernel::pipelined) {
  const int qh = 32, kvh = 4, D = 128, bt = 16;
  const int seq_len = b.ctx_before + b.q_len;
  const int blocks_per_seq = (seq_len + bt - 1) / bt;
  const int64_t num_blocks = int64_t(blocks_per_seq) * b.batch;
  const int64_t tokens = int64_t(b.batch) * b.q_len;
  const int64_t pool = num_blocks * bt * kvh * D;
  gpu::DeviceBuffer k(pool * 2), v(pool * 2), q(tokens * qh * D * 2), out(tokens * qh * D * 2);
  // Random bf16 in [-1, 1) from the seeded device fill: never time zeros.
  for (auto [buf, n, seed] : {std::tuple{k.get(), pool, 11}, std::tuple{v.get(), pool, 12}, std::tuple{q.get(), tokens * qh * D, 13}}) {
    kernels::FillParams f;
    f.data = buf;
    f.num_elements = n;
    f.dtype = DType::bf16;
    f.seed = uint64_t(seed);
    kernels::launch_fill_uniform(f, st.get());
  }
  st.synchronize();
  std::mt19937_64 rng(9);
  // Shuffled block table, as a serving cache would have after some churn.
  std::vector<int32_t> table(static_cast<std::size_t>(num_blocks));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int32_t> qs(std::size_t(b.batch) + 1), lens(std::size_t(b.batch), seq_len);
  for (int i = 0; i <= b.batch; ++i) qs[std::size_t(i)] = i * b.q_len;
  gpu::DeviceBuffer td(table.size() * 4), qsd(qs.size() * 4), ld(lens.size() * 4);
  upload(td.get(), table);
  upload(qsd.get(), qs);
  upload(ld.get(), lens);
  kernels::AttentionParams p;
  p.q = q.as<__nv_bfloat16>();
  p.out = out.as<__nv_bfloat16>();
  p.cache.k = k.as<__nv_bfloat16>();
  p.cache.v = v.as<__nv_bfloat16>();
  p.cache.block_table = td.as<int32_t>();
  p.cache.num_blocks = num_blocks;
  p.cache.block_tokens = bt;
  p.cache.kv_heads = kvh;
  p.cache.head_dim = D;
  p.cache.max_blocks_per_seq = blocks_per_seq;
  p.q_start = qsd.as<int32_t>();
  p.seq_lens = ld.as<int32_t>();
  p.num_seqs = b.batch;
  p.num_tokens = tokens;
  p.q_heads = qh;
  p.max_q_len = b.q_len;
  p.max_seq_len = seq_len;
  p.impl = impl;
  p.prefill_kernel = prefill;
  p.num_splits = num_splits;
  const std::size_t wsb = kernels::attention_workspace_bytes(p, st.device());
  gpu::DeviceBuffer ws(std::max<std::size_t>(wsb, 16));
  p.workspace = ws.get();
  p.workspace_bytes = ws.bytes();
  gpu::TimingOptions o;
  o.warmup_iters = 5;
  o.timed_iters = 30;
  const auto r = gpu::time_op([&](cudaStream_t s) { kernels::launch_attention(p, s); }, st.get(), o, &fl);
  BenchRow row;
  std::ostringstream name;
  name << (b.q_len == 1 ? "decode" : "prefill") << " b=" << b.batch << " q=" << b.q_len << " ctx=" << seq_len;
  row.name = name.str();
  row.impl = impl == AttentionImpl::simple ? "simple"
             : b.q_len * qh / kvh <= 64           ? "tensor_core"  // the 4-warp kernel
                                                  : std::string("tc-") + prefill_name(prefill);
  row.splits = kernels::attention_num_splits(p, st.device());
  row.time_us = r.time_us.median;
  row.noise = r.time_us.noise();
  // Bytes that must move: every K/V row of the context once, q read, out written.
  row.kv_GB = double(b.batch) * seq_len * kvh * D * 2 * 2 / 1e9;
  const double bytes = row.kv_GB * 1e9 + 2.0 * tokens * qh * D * 2;
  row.GBps = bytes / (row.time_us * 1e-6) / 1e9;
  // QK^T and PV: 2 * 2 * head_dim flops per (query head, visible key).
  double keys = 0;
  for (int i = 0; i < b.q_len; ++i) keys += b.ctx_before + i + 1;
  row.tflops = 4.0 * D * qh * keys * b.batch / (row.time_us * 1e-6) / 1e12;
  return row;
}

}  // namespace

TEST_CASE("bench: attention decode and prefill (Qwen3-30B-A3B shapes)" * doctest::skip()) {
  gpu::Stream st;
  gpu::L2Flusher fl(st.device());
  const auto info = gpu::query_device(st.device());
  gpu::TimingOptions o;
  o.warmup_iters = 5;
  o.timed_iters = 30;
  // Ceilings measured here: a 2 GiB device copy (read + write bytes) and a bf16 8192^3 GEMM.
  const std::size_t copy_bytes = std::size_t(2) << 30;
  gpu::DeviceBuffer a(copy_bytes), bbuf(copy_bytes);
  MIXSERVE_CUDA_CHECK(cudaMemset(a.get(), 0x3c, copy_bytes));
  const auto cr = gpu::time_op(
      [&](cudaStream_t s) { MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(bbuf.get(), a.get(), copy_bytes, cudaMemcpyDeviceToDevice, s)); },
      st.get(), o, &fl);
  const double copy_GBps = 2.0 * copy_bytes / (cr.time_us.median * 1e-6) / 1e9;
  gpu::GemmShape gs{8192, 8192, 8192, DType::bf16};
  gpu::LtHandle lh;
  gpu::DeviceBuffer gws(gpu::LtGemm::kWorkspaceBytes);
  gpu::LtGemm gemm(lh, gs, gws.get(), gws.bytes());
  // Operands: random bf16 (the first 128 MiB of the copy source), not a constant.
  kernels::FillParams gf;
  gf.data = a.get();
  gf.num_elements = int64_t(8192) * 8192;
  gf.dtype = DType::bf16;
  gf.seed = 5;
  kernels::launch_fill_uniform(gf, st.get());
  st.synchronize();
  gpu::DeviceBuffer gout(std::size_t(8192) * 8192 * 2);
  const auto gr = gpu::time_op([&](cudaStream_t s) { gemm.run({a.get(), a.get(), gout.get()}, s); }, st.get(), o, &fl);
  const double gemm_tflops = gemm.flops() / (gr.time_us.median * 1e-6) / 1e12;

  std::vector<BenchRow> rows;
  for (int batch : {1, 64})
    for (int ctx : {1024, 8192}) {
      rows.push_back(bench_attention({batch, 1, ctx - 1}, AttentionImpl::tensor_core, 0, st, fl));
      if (batch == 1) rows.push_back(bench_attention({batch, 1, ctx - 1}, AttentionImpl::tensor_core, 1, st, fl));
    }
  rows.push_back(bench_attention({1, 1, 8191}, AttentionImpl::simple, 0, st, fl));
  // Prefill: the previous kernel (registers) and the two pipelined ones, same shapes, this run. The
  // 8 x 2048 step is the prefill benchmark's attention (docs/prefill.md); the chunk with context
  // is a chunked prefill's second chunk.
  const std::size_t first_prefill = rows.size();
  for (const BenchStep& b : {BenchStep{8, 2048, 0}, BenchStep{1, 2048, 6144}}) {
    rows.push_back(bench_attention(b, AttentionImpl::tensor_core, 0, st, fl, AttentionPrefillKernel::registers));
    rows.push_back(bench_attention(b, AttentionImpl::tensor_core, 0, st, fl, AttentionPrefillKernel::pipelined));
    rows.push_back(bench_attention(b, AttentionImpl::tensor_core, 0, st, fl, AttentionPrefillKernel::pipelined_m32));
  }

  std::printf("# attention benchmark: %s, %d SMs, CUDA runtime %s\n", info.name.c_str(), info.sm_count,
              info.versions.count("cuda_runtime") ? info.versions.at("cuda_runtime").c_str() : "?");
  std::printf("# shapes: 32 q heads, 4 kv heads, head_dim 128, block_tokens 16, bf16; median of 30, L2 flushed\n");
  std::printf("# measured ceilings: copy %.0f GB/s (2 GiB D2D, read+write), bf16 GEMM 8192^3 %.0f TFLOP/s\n",
              copy_GBps, gemm_tflops);
  std::printf("%-30s %-12s %6s | %10s %6s %8s %8s %6s %8s %6s\n", "case", "impl", "splits", "time", "noise", "KV", "GB/s",
              "%copy", "TFLOP/s", "%gemm");
  std::printf("%-30s %-12s %6s | %10s %6s %8s %8s %6s %8s %6s\n", "", "", "", "(us)", "", "(GB)", "", "", "", "");
  nlohmann::json j;
  j["benchmark"] = "attention";
  j["device"] = info.name;
  j["copy_GBps"] = copy_GBps;
  j["gemm_bf16_TFLOPs"] = gemm_tflops;
  j["timestamp_unix"] = int64_t(std::time(nullptr));
  j["args"] = {{"q_heads", 32}, {"kv_heads", 4}, {"head_dim", 128}, {"block_tokens", 16}, {"timed_iters", 30}};
  for (const auto& r : rows) {
    std::printf("%-30s %-12s %6d | %10.1f %6.3f %8.3f %8.0f %5.1f%% %8.1f %5.1f%%\n", r.name.c_str(), r.impl.c_str(),
                r.splits, r.time_us, r.noise, r.kv_GB, r.GBps, 100.0 * r.GBps / copy_GBps, r.tflops,
                100.0 * r.tflops / gemm_tflops);
    j["rows"].push_back({{"case", r.name}, {"impl", r.impl}, {"splits", r.splits}, {"time_us", r.time_us},
                         {"noise", r.noise}, {"kv_GB", r.kv_GB}, {"GBps", r.GBps}, {"TFLOPs", r.tflops}});
  }
  for (std::size_t i = first_prefill; i + 2 < rows.size(); i += 3)
    std::printf("# %s: vs the registers kernel (time ratio): pipelined %.3fx, pipelined_m32 %.3fx\n",
                rows[i].name.c_str(), rows[i].time_us / rows[i + 1].time_us, rows[i].time_us / rows[i + 2].time_us);
  std::printf("# verdict: measured, no thresholds (see docs/attention.md)\n");
  const char* path = std::getenv("MIXSERVE_BENCH_JSON");
  std::ofstream f(path ? path : "bench_attention.json");
  f << j.dump(2) << "\n";
  CHECK(rows.size() == 13u);
}
