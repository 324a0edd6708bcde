// GPU model forward (executor/model_forward.hpp) against the float64 CPU reference
// (model/reference.hpp), layer by layer (the residual stream after every attention block and every
// layer) and on the logits, for small configurations of the four architectures (Qwen3-MoE,
// Qwen2-MoE, Mixtral, OLMoE) over a scenario of steps sharing one paged cache: two sequences
// prefilling (one in two chunks, one in one shot), decode after prefill, a mixed step (a new
// sequence prefilling while the others decode) and a plain decode step, all with shuffled
// (non-contiguous) block tables. Plus one full-width Qwen3-30B-A3B layer, bad input, and a
// benchmarks skipped by default:
//   test_gpu_forward --test-case='bench: Qwen3*' --no-skip
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <cuda_profiler_api.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/decode_layer.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/model/bf16.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/weights.hpp"
#include "forward_ties.hpp"

using namespace mixserve;
using mixserve::gpu::GpuModel;
using mixserve::gpu::GpuModelConfig;
using mixserve::gpu::StepOptions;
using mixserve::model::SequenceStep;
using mixserve::test::near_ties;

namespace {

// Tolerances. The GPU keeps the residual stream and every activation in bf16 (unit roundoff
// 2^-9 = 2e-3; a rounding adds ~1.1e-3 RMS relative error), accumulates in fp32, and per layer
// rounds the residual twice, the normed input, q/k/v, the attention output, the o projection, the
// gate|up, SwiGLU and down outputs and the combine: about ten roundings, partly averaging out,
// which give ~3-6e-3 relative error per layer; errors carried into the next layer are passed on
// (the norms rescale them, they do not shrink). kTolHiddenPerLayer = 2e-2 per layer, growing
// linearly with depth (tolerance at layer l = (l + 1) * 2e-2), leaves 3x margin and still fails on
// a real bug (a missing bias, norm, rope or a wrong expert gives 0.1-1).
constexpr double kTolHiddenPerLayer = 2e-2;
// Logits: the final hidden state's error plus the final norm and the LM head's bf16 output.
constexpr double kTolLogitsExtra = 1e-2;
// Router near-ties (kTieMargin): forward_ties.hpp.
// Top-1 token ids must agree wherever the reference's top-2 logit gap exceeds kTop1GapRel times
// the RMS of that row's logits (an element's GPU error stays near the norm-wise logits error,
// <= ~7e-2 of that RMS, twice over for two elements; tied embeddings give logits of RMS ~sqrt(hidden)).
constexpr double kTop1GapRel = 0.25;

// Small configurations of the four architectures with head_dim 64 (the attention kernel supports
// 64 and 128) and widths that are multiples of 8 (cuBLASLt), imported from config.json text.
ModelSpec small_qwen3() {  // GQA 4/2, q width 256 != hidden 64, per-head QK-norm, dense layer 0
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 96, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "mlp_only_layers": [0],
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                          "small-qwen3/config.json");
}
ModelSpec small_qwen2() {  // MHA, QKV bias, shared expert with sigmoid gate, tied embeddings
  return import_hf_config(R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "vocab_size": 88, "intermediate_size": 128, "moe_intermediate_size": 16, "num_experts": 5,
    "num_experts_per_tok": 2, "norm_topk_prob": false, "shared_expert_intermediate_size": 40,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true})",
                          "small-qwen2/config.json");
}
ModelSpec small_mixtral() {  // GQA 2/1, renormalised top-2
  return import_hf_config(R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": 104, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})",
                          "small-mixtral/config.json");
}
ModelSpec small_olmoe() {  // MHA, QK-norm over the whole projection, top-3 of 8, no renorm
  return import_hf_config(R"({"architectures": ["OlmoeForCausalLM"], "hidden_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "vocab_size": 72, "intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 3,
    "norm_topk_prob": false, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": false})",
                          "small-olmoe/config.json");
}

struct CompareStats {
  int rows_total = 0;
  int rows_excluded = 0;
  int top1_checked = 0;
};

// Compares one step: residual stream per layer (attention block and whole layer) and logits of
// every token, leaving out rows after a reference near-tie (see kTieMargin). `excluded` carries
// the rows (by sequence and position) already diverged from earlier steps' ties: a row whose own
// routing flipped in an earlier step is not re-run, so only its K/V (diluted by attention) is
// carried; it needs no exclusion in later steps.
void compare_step(const std::string& what, const model::WeightSet& w, const model::StepOutput& ref,
                  const gpu::GpuStepOutput& got, CompareStats& st) {
  const ModelSpec& m = w.spec();
  const int64_t H = m.hidden_size, T = ref.num_tokens, V = m.vocab_size;
  INFO(what);
  REQUIRE(got.num_tokens == T);
  REQUIRE(got.layer_hidden.size() == std::size_t(m.num_layers));
  const auto tie = near_ties(w, ref);
  std::vector<bool> diverged(T, false);
  auto rel = [&](const std::vector<float>& g, const std::vector<double>& r, int64_t width, const char* name, int l,
                 double tol) {
    double num = 0, den = 0;
    int64_t used = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (diverged[t]) continue;
      ++used;
      for (int64_t c = 0; c < width; ++c) {
        const double d = double(g[t * width + c]) - r[t * width + c];
        num += d * d;
        den += r[t * width + c] * r[t * width + c];
      }
    }
    if (used == 0) {
      std::printf("  %-44s %-6s layer %d: every row left out (router near-ties)\n", what.c_str(), name, l);
      return;
    }
    CHECK_MESSAGE(den > 0.0, what << " " << name << " layer " << l << ": reference all zeros");
    const double e = std::sqrt(num / std::max(den, 1e-300));
    std::printf("  %-44s %-6s layer %d: rel err %.2e (tol %.1e, %lld/%lld rows)\n", what.c_str(), name, l, e, tol,
                (long long)used, (long long)T);
    CHECK_MESSAGE(e <= tol, what << " " << name << " layer " << l << " rel err " << e << " > " << tol);
  };
  for (int l = 0; l < m.num_layers; ++l) {
    const double tol = kTolHiddenPerLayer * (l + 1);
    rel(got.attn_hidden[l], ref.attn_hidden[l], H, "attn", l, tol);
    for (int64_t t = 0; t < T; ++t) diverged[t] = diverged[t] || tie[l][t];
    rel(got.layer_hidden[l], ref.layer_hidden[l], H, "layer", l, tol);
  }
  st.rows_total += static_cast<int>(T);
  for (int64_t t = 0; t < T; ++t) st.rows_excluded += diverged[t];
  REQUIRE(got.logits.size() == std::size_t(T * V));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < V; ++c)
      REQUIRE_MESSAGE(std::isfinite(got.logits[t * V + c]), what << " logit (" << t << ", " << c << ") not finite");
  }
  rel(got.logits, ref.logits, V, "logits", m.num_layers, kTolHiddenPerLayer * m.num_layers + kTolLogitsExtra);
  for (int64_t t = 0; t < T; ++t) {
    if (diverged[t]) continue;
    std::vector<int64_t> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    const double* r = &ref.logits[t * V];
    std::partial_sort(idx.begin(), idx.begin() + 2, idx.end(), [&](int64_t a, int64_t b) { return r[a] > r[b]; });
    double ss = 0;
    for (int64_t c = 0; c < V; ++c) ss += r[c] * r[c];
    if (r[idx[0]] - r[idx[1]] < kTop1GapRel * std::sqrt(ss / double(V))) continue;
    const float* g = &got.logits[t * V];
    const int64_t gtop = std::max_element(g, g + V) - g;
    CHECK_MESSAGE(gtop == idx[0], what << " row " << t << ": GPU top-1 " << gtop << ", reference " << idx[0]);
    ++st.top1_checked;
  }
}

// Runs the same steps on the GPU and on the reference and compares each.
struct Pair {
  model::WeightSet w;
  model::ReferenceModel ref;
  GpuModel gpu;
  Pair(const ModelSpec& m, uint64_t seed, int block_size, int num_blocks, int max_tokens,
       gpu::ExpertPath path = gpu::ExpertPath::automatic, int expert_streams = kExpertGemmStreams,
       double padded_capacity = GpuModelConfig{}.expert_padded_capacity,
       int64_t bucket_align = GpuModelConfig{}.expert_bucket_row_align)
      : w(model::synthetic_weights(m, seed)),
        ref(w, model::KVCacheConfig{block_size, num_blocks}),
        gpu(w, [&] {
          GpuModelConfig c;
          c.block_size = block_size;
          c.num_blocks = num_blocks;
          c.max_tokens_per_step = max_tokens;
          c.max_seqs_per_step = 8;
          c.max_blocks_per_seq = 64;
          c.expert_path = path;
          c.expert_gemm_streams = expert_streams;
          c.expert_padded_capacity = padded_capacity;
          c.expert_bucket_row_align = bucket_align;
          return c;
        }()) {}
  void run(const std::string& what, const std::vector<SequenceStep>& batch, CompareStats& st) {
    const auto r = ref.step(batch);
    StepOptions o;
    o.all_logits = true;
    o.record_hidden = true;
    const auto g = gpu.step(batch, o);
    compare_step(what, w, r, g, st);
    // The same step again without recording (so with the programmatic dependent launches of
    // decode-sized steps; it rewrites the same KV slots with the same values): bit-identical logits.
    StepOptions o2;
    o2.all_logits = true;
    const auto g2 = gpu.step(batch, o2);
    REQUIRE(g2.logits.size() == g.logits.size());
    int differ = 0;
    for (std::size_t i = 0; i < g.logits.size(); ++i) differ += g2.logits[i] != g.logits[i];
    CHECK_MESSAGE(differ == 0, what << ": " << differ << " logits differ between the recorded and the plain step");
  }
};

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

// The scenario: sequences A (prefill in two chunks), C (one-shot prefill), then decodes, then
// B joins (prefill while A and C decode), then everyone decodes. Blocks are a shuffled pool
// handed out per sequence, so every block table is non-contiguous.
// expert_streams: the per-expert cuBLASLt path's streams (1: serial on the step's stream; more:
// forked over streams, each expert on the least-loaded one; kExpertGemmGroupedCall: one cuBLAS
// grouped call per projection; kExpertGemmPaddedBatch: one strided-batched GEMM per projection
// over the padded layout, with padded_capacity kPaddedAlwaysFits (every layer padded) or 0
// (every layer falls back to the streams)); kExpertGemmBucketed / kExpertGemmBucketedBatched: the
// bucketed padded layout with bucket_align rows (small alignments give several buckets at these
// 64-token steps; 128 puts every expert with rows in one bucket of 128).
// The small models' padded layout is at most E x round_up(64 tokens, 16) rows = 8 x 64 = 4x the
// routed rows (64 tokens x top-2), so 4 always fits.
constexpr double kPaddedAlwaysFits = 4.0;
void run_scenario(const ModelSpec& m, uint64_t seed, gpu::ExpertPath path, int expert_streams = kExpertGemmStreams,
                  double padded_capacity = GpuModelConfig{}.expert_padded_capacity,
                  int64_t bucket_align = GpuModelConfig{}.expert_bucket_row_align) {
  const int block = 8, num_blocks = 40;
  Pair p(m, seed, block, num_blocks, 64, path, expert_streams, padded_capacity, bucket_align);
  std::mt19937_64 rng(seed * 7919 + 1);
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  auto take = [&](int n) {
    std::vector<int32_t> t(pool.end() - n, pool.end());
    pool.resize(pool.size() - n);
    return t;
  };
  const auto a_tok = random_tokens(rng, 23, m.vocab_size);
  const auto c_tok = random_tokens(rng, 19, m.vocab_size);
  const auto b_tok = random_tokens(rng, 13, m.vocab_size);
  const auto a_blocks = take(5), c_blocks = take(4), b_blocks = take(4);  // room for 40/32/32 tokens
  CompareStats st;
  const std::string name =
      m.name +
      (path == gpu::ExpertPath::cublaslt
           ? (expert_streams == kExpertGemmGroupedCall ? std::string(" cuBLAS grouped call")
              : expert_streams == kExpertGemmPaddedBatch
                  ? " padded batch (capacity " + std::to_string(padded_capacity) + ")"
              : is_bucketed_expert_gemm(expert_streams)
                  ? std::string(expert_streams == kExpertGemmBucketed ? " bucketed grouped call"
                                                                      : " bucketed batched calls") +
                        " (align " + std::to_string(bucket_align) + ")"
                  : " cublaslt x" + std::to_string(expert_streams) + " streams")
       : path == gpu::ExpertPath::grouped_gemm ? std::string(" grouped")
                                               : std::string(" gemv")) +
      " seed " + std::to_string(seed);
  auto seq = [](std::vector<int32_t> tok, int64_t pos, std::vector<int32_t> bt) {
    SequenceStep s;
    s.tokens = std::move(tok);
    s.position = pos;
    s.block_table = std::move(bt);
    return s;
  };
  auto slice = [](const std::vector<int32_t>& v, int a, int b) {
    return std::vector<int32_t>(v.begin() + a, v.begin() + b);
  };
  // Step 1: A's first chunk (11 tokens) and C's whole prompt (19).
  p.run(name + " prefill A[0,11) + C[0,19)", {seq(slice(a_tok, 0, 11), 0, a_blocks), seq(c_tok, 0, c_blocks)}, st);
  // Step 2: A's second chunk (12 tokens, context 11) and C's first decode.
  std::vector<int32_t> c_next = random_tokens(rng, 1, m.vocab_size);
  p.run(name + " prefill A[11,23) + decode C@19", {seq(slice(a_tok, 11, 23), 11, a_blocks), seq(c_next, 19, c_blocks)},
        st);
  // Step 3: A decodes alone.
  p.run(name + " decode A@23", {seq(random_tokens(rng, 1, m.vocab_size), 23, a_blocks)}, st);
  // Step 4: mixed: B prefills 13 tokens while A and C decode.
  p.run(name + " mixed B[0,13) + decode A@24, C@20",
        {seq(random_tokens(rng, 1, m.vocab_size), 24, a_blocks), seq(b_tok, 0, b_blocks),
         seq(random_tokens(rng, 1, m.vocab_size), 20, c_blocks)},
        st);
  // Step 5: everyone decodes.
  p.run(name + " decode A@25, B@13, C@21",
        {seq(random_tokens(rng, 1, m.vocab_size), 25, a_blocks), seq(random_tokens(rng, 1, m.vocab_size), 13, b_blocks),
         seq(random_tokens(rng, 1, m.vocab_size), 21, c_blocks)},
        st);
  std::printf("%s: %d rows left out after router near-ties, %d top-1 ids checked\n", name.c_str(), st.rows_excluded,
              st.top1_checked);
  CHECK_MESSAGE(st.top1_checked > 0, name << ": no row had a clear top-1 (check kTop1GapRel)");
  CHECK_MESSAGE(2 * st.rows_excluded <= st.rows_total,
                name << ": too many near-tie rows left out (" << st.rows_excluded << "/" << st.rows_total << ")");
  if (expert_streams == kExpertGemmPaddedBatch) {
    // The path under test ran: every MoE layer padded, or every one fell back.
    const auto& pc = p.gpu.padded_batch_counts();
    INFO(name << ": " << pc.padded << " layers padded, " << pc.fallback << " fell back");
    if (padded_capacity >= kPaddedAlwaysFits) {
      CHECK(pc.padded > 0);
      CHECK(pc.fallback == 0);
    } else if (padded_capacity == 0.0) {
      CHECK(pc.padded == 0);
      CHECK(pc.fallback > 0);
    }
  }
  if (is_bucketed_expert_gemm(expert_streams) && path == gpu::ExpertPath::cublaslt) {
    // The path under test ran: every MoE layer run has routed rows, so at least one bucket.
    const auto& pc = p.gpu.padded_batch_counts();
    INFO(name << ": " << pc.bucketed << " layer runs bucketed, " << pc.buckets << " buckets");
    CHECK(pc.bucketed > 0);
    CHECK(pc.buckets >= pc.bucketed);
  }
}

}  // namespace

TEST_CASE("forward: Qwen3-MoE (GQA, per-head QK-norm, dense first layer) vs the float64 reference") {
  SUBCASE("experts: device GEMV") { run_scenario(small_qwen3(), 11, gpu::ExpertPath::device_gemv); }
  SUBCASE("experts: cuBLASLt per expert, 1 stream") { run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, 1); }
  SUBCASE("experts: cuBLASLt per expert, 3 streams") { run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, 3); }
  SUBCASE("experts: per expert, one cuBLAS grouped call") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmGroupedCall);
  }
  SUBCASE("experts: padded batched GEMM") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, kPaddedAlwaysFits);
  }
  SUBCASE("experts: padded batched GEMM, capacity 0: every layer falls back") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, 0.0);
  }
  SUBCASE("experts: bucketed padded layout, one cuBLAS grouped call, align 16") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmBucketed, 0.0, 16);
  }
  SUBCASE("experts: bucketed padded layout, one batched call per bucket, align 8") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, 0.0, 8);
  }
  SUBCASE("experts: bucketed padded layout, one cuBLAS grouped call, align 128 (one bucket)") {
    run_scenario(small_qwen3(), 11, gpu::ExpertPath::cublaslt, kExpertGemmBucketed, 0.0, 128);
  }
  SUBCASE("experts: grouped GEMM") { run_scenario(small_qwen3(), 11, gpu::ExpertPath::grouped_gemm); }
}
TEST_CASE("forward: Qwen2-MoE (QKV bias, gated shared expert, tied embeddings) vs the float64 reference") {
  SUBCASE("experts: device GEMV") { run_scenario(small_qwen2(), 12, gpu::ExpertPath::device_gemv); }
  SUBCASE("experts: cuBLASLt per expert, 1 stream") { run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, 1); }
  SUBCASE("experts: cuBLASLt per expert, 3 streams") { run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, 3); }
  SUBCASE("experts: per expert, one cuBLAS grouped call") {
    run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, kExpertGemmGroupedCall);
  }
  SUBCASE("experts: padded batched GEMM") {
    run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, kPaddedAlwaysFits);
  }
  SUBCASE("experts: padded batched GEMM, capacity 0: every layer falls back") {
    run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, 0.0);
  }
  SUBCASE("experts: bucketed padded layout, one cuBLAS grouped call, align 16") {
    run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, kExpertGemmBucketed, 0.0, 16);
  }
  SUBCASE("experts: bucketed padded layout, one batched call per bucket, align 8") {
    run_scenario(small_qwen2(), 12, gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, 0.0, 8);
  }
  SUBCASE("experts: grouped GEMM") { run_scenario(small_qwen2(), 12, gpu::ExpertPath::grouped_gemm); }
}
TEST_CASE("forward: Mixtral (GQA 2/1, renormalised top-2) vs the float64 reference") {
  SUBCASE("experts: device GEMV") { run_scenario(small_mixtral(), 13, gpu::ExpertPath::device_gemv); }
  SUBCASE("experts: cuBLASLt per expert, 1 stream") { run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, 1); }
  SUBCASE("experts: cuBLASLt per expert, 3 streams") { run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, 3); }
  SUBCASE("experts: per expert, one cuBLAS grouped call") {
    run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, kExpertGemmGroupedCall);
  }
  SUBCASE("experts: padded batched GEMM") {
    run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, kPaddedAlwaysFits);
  }
  SUBCASE("experts: padded batched GEMM, capacity 0: every layer falls back") {
    run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, 0.0);
  }
  SUBCASE("experts: bucketed padded layout, one cuBLAS grouped call, align 16") {
    run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, kExpertGemmBucketed, 0.0, 16);
  }
  SUBCASE("experts: bucketed padded layout, one batched call per bucket, align 8") {
    run_scenario(small_mixtral(), 13, gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, 0.0, 8);
  }
  SUBCASE("experts: grouped GEMM") { run_scenario(small_mixtral(), 13, gpu::ExpertPath::grouped_gemm); }
}
TEST_CASE("forward: OLMoE (full-width QK-norm, top-3 of 8) vs the float64 reference") {
  SUBCASE("experts: device GEMV") { run_scenario(small_olmoe(), 14, gpu::ExpertPath::device_gemv); }
  SUBCASE("experts: cuBLASLt per expert, 1 stream") { run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, 1); }
  SUBCASE("experts: cuBLASLt per expert, 3 streams") { run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, 3); }
  SUBCASE("experts: per expert, one cuBLAS grouped call") {
    run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, kExpertGemmGroupedCall);
  }
  SUBCASE("experts: padded batched GEMM") {
    run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, kPaddedAlwaysFits);
  }
  SUBCASE("experts: padded batched GEMM, capacity 0: every layer falls back") {
    run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, kExpertGemmPaddedBatch, 0.0);
  }
  SUBCASE("experts: bucketed padded layout, one cuBLAS grouped call, align 16") {
    run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, kExpertGemmBucketed, 0.0, 16);
  }
  SUBCASE("experts: bucketed padded layout, one batched call per bucket, align 8") {
    run_scenario(small_olmoe(), 14, gpu::ExpertPath::cublaslt, kExpertGemmBucketedBatched, 0.0, 8);
  }
  SUBCASE("experts: grouped GEMM") { run_scenario(small_olmoe(), 14, gpu::ExpertPath::grouped_gemm); }
}

// The LM head GEMM has another row count in the two runs (cuBLASLt may pick another kernel), so
// the logits may differ by a bf16 rounding: kTolSameRows = 2^-7 of the row's largest logit.
constexpr double kTolSameRows = 1.0 / 128;

// The fused batch-1 decode layer (gpu/decode_layer.hpp): one sequence decoding at contexts that
// span one and several attention tiles of 32 positions and several context chunks, against the
// float64 reference (per-layer residual stream and logits), and the unfused kernels of the same
// steps (fused off) within the same tolerances. head_dim 64 (small Qwen3, Mixtral) and 128.
ModelSpec small_qwen3_d128() {  // GQA 8/2 (group 4), head_dim 128, per-head QK-norm, top-4 of 16
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
    "vocab_size": 136, "intermediate_size": 128, "moe_intermediate_size": 72, "num_experts": 16,
    "num_experts_per_tok": 4, "norm_topk_prob": true,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                          "small-qwen3-d128/config.json");
}
// Hidden 16 with top-7 of 8 on the H200's 132 blocks: the down rows' slot j goes to blocks
// [j 132 / 7, (j + 1) 132 / 7), 18-19 of them for 16 rows, so some blocks have no down rows; and the
// gate|up rows (7 x 32 over 132 blocks) give slot 5 one writer more than slot 0 (20 vs 19). A block
// without down rows that waited for its slot's writers on slot 0's counter never finished (the
// counted SwiGLU before session 13's fix).
ModelSpec small_qwen3_top7_h16() {
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
    "vocab_size": 40, "intermediate_size": 32, "moe_intermediate_size": 16, "num_experts": 8,
    "num_experts_per_tok": 7, "norm_topk_prob": true,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                          "small-qwen3-top7-h16/config.json");
}
// A 2-layer Qwen3-MoE with 32 / 4 heads of 128 (q width 4096) and the given hidden and expert
// widths, expert count and top-k (vocabulary 136).
ModelSpec small_qwen3_q4096(int hidden, int moe_inter, int experts, int top_k, const std::string& name) {
  const std::string json = R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": )" + std::to_string(hidden) +
                           R"(, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "vocab_size": 136, "intermediate_size": 256, "moe_intermediate_size": )" +
                           std::to_string(moe_inter) + R"(, "num_experts": )" + std::to_string(experts) +
                           R"(, "num_experts_per_tok": )" + std::to_string(top_k) + R"(, "norm_topk_prob": true,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})";
  return import_hf_config(json, name + "/config.json");
}
// Qwen3-30B-A3B's widths (hidden 2048, expert inter 768): the fused layer's specialised kernel
// (decode_layer.cu kSpecialisedH / kSpecialisedI), with 8 experts (top-4) and 2 layers.
ModelSpec small_qwen3_30b_widths() { return small_qwen3_q4096(2048, 768, 8, 4, "small-qwen3-30b-widths"); }
// Row lengths of Qwen3-30B-A3B's kind (hidden 768 = 3 x 256, expert inter 2048 = 8 x 256, q width
// 4096): the fused layer's register multi-row sums for 3 and 8 vectors per lane (with 16 KB stages
// 10 and 4 rows a stage), o_proj's 8 KB rows on the per-row path (the general kernel).
ModelSpec small_qwen3_wide() { return small_qwen3_q4096(768, 2048, 4, 2, "small-qwen3-wide"); }
// MIXSERVE_FUSED_PHASE_TIMING: one fused launch's per-block stamps (decode_layer.hpp diag), as
// microseconds after the earliest block start: median and max over the blocks of each event.
void print_fused_diag(const std::vector<unsigned long long>& d) {
  constexpr int kStamps = gpu::kFusedDecodeDiagStamps;
  const std::size_t blocks = d.size() / kStamps;
  if (blocks == 0 || d[0] == 0) return;
  unsigned long long t0 = ~0ull;
  for (std::size_t b = 0; b < blocks; ++b) t0 = std::min(t0, d[b * kStamps]);
  static const char* names[gpu::kFusedDecodeDiagNamed] = {"start",   "pdl wait", "qkv in", "routed(prod)", "gu in",   "gu done",
                                       "down in", "end",      "qkv done", "attn read",    "logits read", "routed",
                                       "gu first in", "down first in", "down issued", "gu issued",
                                       "gu done2",    "staged",      "partials",  "o read",
                                       "oproj in",    "oproj done",  "oproj first in", "combined", "normed",
                                       "qkv first in", "",            "",            "",            "last red",    "last red done"};
  std::printf("#   fused layer stamps (us after the first block start, median / max over %zu blocks):", blocks);
  for (int e = 0; e < gpu::kFusedDecodeDiagNamed; ++e) {
    if (!*names[e]) continue;
    std::vector<double> v;
    for (std::size_t b = 0; b < blocks; ++b)
      v.push_back(d[b * kStamps + e] >= t0 ? double(d[b * kStamps + e] - t0) / 1e3 : -1.0);
    std::sort(v.begin(), v.end());
    std::printf(" %s %.2f/%.2f", names[e], v[v.size() / 2], v.back());
  }
  std::printf("\n");
  // Trace builds: each ring stage of the stamped layer (the block's stage index), median over the
  // blocks that have it: issued by the producer, seen landed by its consumer, summed; its kind.
  if constexpr (gpu::kFusedDecodeTraceStages > 0) {
    static const char* kinds[] = {"qkv", "oproj", "router", "gateup", "down"};
    constexpr int base = gpu::kFusedDecodeDiagNamed;
    std::printf("#   fused layer stage trace (us after the first block start, median over the blocks; n blocks):\n");
    for (int gi = 0; gi < gpu::kFusedDecodeTraceStages; ++gi) {
      std::vector<double> f[3];
      int kind = -1;
      for (std::size_t b = 0; b < blocks; ++b) {
        const unsigned long long* r = d.data() + b * kStamps + base;
        if (unsigned(gi) >= r[0]) continue;  // the block's stage count in this layer
        const unsigned long long* st = r + 4 + 4 * gi;
        for (int k = 0; k < 3; ++k) f[k].push_back(st[k] >= t0 ? double(st[k] - t0) / 1e3 : -1.0);
        kind = int(st[3]);
      }
      if (f[0].empty()) break;
      for (auto& v : f) std::sort(v.begin(), v.end());
      std::printf("#   stage %2d %-6s issue %7.2f land %7.2f done %7.2f (n %zu)\n", gi, kind >= 0 && kind < 5 ? kinds[kind] : "?",
                  f[0][f[0].size() / 2], f[1][f[1].size() / 2], f[2][f[2].size() / 2], f[0].size());
    }
  }
}

void run_fused_decode(const ModelSpec& m, uint64_t seed) {
  const int block = 8, num_blocks = 64, prompt = 300;
  Pair p(m, seed, block, num_blocks, 512, gpu::ExpertPath::device_gemv);
  p.gpu.set_fused_decode_layer(true);
  std::mt19937_64 rng(seed * 31 + 5);
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  const std::vector<int32_t> bt(pool.begin(), pool.begin() + 40);  // 320 positions, shuffled blocks
  CompareStats st;
  const std::string name = m.name + " fused decode seed " + std::to_string(seed);
  // Contexts 1..3 (one partial tile) from a short first prompt, then a long one.
  p.run(name + " prefill 2", {SequenceStep{random_tokens(rng, 2, m.vocab_size), 0, bt}}, st);
  const int64_t before = p.gpu.fused_layers_run();
  for (int pos = 2; pos < 4; ++pos)
    p.run(name + " decode @" + std::to_string(pos), {SequenceStep{random_tokens(rng, 1, m.vocab_size), pos, bt}}, st);
  p.run(name + " prefill 4.." + std::to_string(prompt),
        {SequenceStep{random_tokens(rng, prompt - 4, m.vocab_size), 4, bt}}, st);
  for (int pos = prompt; pos < prompt + 3; ++pos)
    p.run(name + " decode @" + std::to_string(pos), {SequenceStep{random_tokens(rng, 1, m.vocab_size), pos, bt}}, st);
  const int moe_layers = m.num_moe_layers();
  // Every decode step ran the fused layer on every MoE layer, twice (recorded and plain: Pair::run).
  CHECK(p.gpu.fused_layers_run() - before == int64_t(5) * 2 * moe_layers);
  // The unfused kernels on the same model give the same tokens within the tolerances.
  p.gpu.set_fused_decode_layer(false);
  const int64_t off = p.gpu.fused_layers_run();
  p.run(name + " decode @" + std::to_string(prompt + 3) + " unfused",
        {SequenceStep{random_tokens(rng, 1, m.vocab_size), prompt + 3, bt}}, st);
  CHECK(p.gpu.fused_layers_run() == off);
  std::printf("%s: %d rows left out after router near-ties, %d top-1 ids checked\n", name.c_str(), st.rows_excluded,
              st.top1_checked);
  CHECK(st.top1_checked > 0);
}
// Environment variables set for a scope (the model reads the MIXSERVE_FUSED_* switches at allocation).
struct ScopedEnv {
  std::vector<std::string> names;
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const auto& [name, value] : vars) {
      setenv(name, value, 1);
      names.emplace_back(name);
    }
  }
  ~ScopedEnv() {
    for (const auto& name : names) unsetenv(name.c_str());
  }
};

TEST_CASE("forward: fused batch-1 decode layer vs the float64 reference") {
  SUBCASE("Qwen3 head_dim 64, dense first layer") { run_fused_decode(small_qwen3(), 41); }
  SUBCASE("Mixtral head_dim 64, GQA 2/1") { run_fused_decode(small_mixtral(), 42); }
  SUBCASE("Qwen3 head_dim 128, GQA 8/2, top-4 of 16") { run_fused_decode(small_qwen3_d128(), 43); }
  SUBCASE("Qwen3 hidden 16, top-7 of 8: blocks without down rows, slots with unequal gate|up writers") {
    run_fused_decode(small_qwen3_top7_h16(), 50);
  }
  SUBCASE("Qwen3 head_dim 128, a 2-stage weight ring with one copy in flight") {
    // The ring wraps on every phase and the producer waits for each copy before the next: the
    // slot / parity bookkeeping under the tightest schedule.
    ScopedEnv env{{"MIXSERVE_FUSED_STAGES", "2"}, {"MIXSERVE_FUSED_INFLIGHT_KB", "1"}, {"MIXSERVE_FUSED_EVICT_FIRST", "0"}};
    run_fused_decode(small_qwen3_d128(), 44);
  }
  SUBCASE("Qwen3 hidden 768, expert inter 2048: tensor-core sums of rows of 768 and 2048") {
    run_fused_decode(small_qwen3_wide(), 45);
  }
  SUBCASE("Qwen3 hidden 768, expert inter 2048, tensor cores off: rows of 3 and 8 vectors per lane") {
    ScopedEnv env{{"MIXSERVE_FUSED_MMA", "0"}};
    run_fused_decode(small_qwen3_wide(), 48);
  }
  SUBCASE("Qwen3 hidden 2048, expert inter 768: the kernel specialised for these widths") {
    run_fused_decode(small_qwen3_30b_widths(), 47);
  }
  SUBCASE("Qwen3 hidden 2048, expert inter 768, tensor cores off: the specialised kernel's per-row sums") {
    ScopedEnv env{{"MIXSERVE_FUSED_MMA", "0"}};
    run_fused_decode(small_qwen3_30b_widths(), 49);
  }
  SUBCASE("the switches off: per-row sums, an ordinary (not cooperative) launch, a grid barrier a layer") {
    ScopedEnv env{{"MIXSERVE_FUSED_MMA", "0"},
                  {"MIXSERVE_FUSED_MULTIROW", "0"},
                  {"MIXSERVE_FUSED_COOP", "0"},
                  {"MIXSERVE_FUSED_TAGGED_PART", "0"}};
    run_fused_decode(small_qwen3_wide(), 46);
  }
}

TEST_CASE("forward: last-token logits equal the all-token logits' last rows") {
  const ModelSpec m = small_qwen3();
  const auto w = model::synthetic_weights(m, 21);
  GpuModelConfig c;
  c.block_size = 16;
  c.num_blocks = 8;
  c.max_tokens_per_step = 32;
  GpuModel g(w, c);
  std::mt19937_64 rng(5);
  SequenceStep a{random_tokens(rng, 9, m.vocab_size), 0, {3}};
  SequenceStep b{random_tokens(rng, 4, m.vocab_size), 0, {1}};
  StepOptions all;
  all.all_logits = true;
  const auto full = g.step({a, b}, all);
  g.reset_cache();
  const auto last = g.step({a, b});
  REQUIRE(last.logit_rows == std::vector<int64_t>{8, 12});
  for (int i = 0; i < 2; ++i) {
    double big = 0, diff = 0;
    for (int v = 0; v < m.vocab_size; ++v) {
      const double a = last.logits[std::size_t(i) * m.vocab_size + v];
      const double b = full.logits[std::size_t(last.logit_rows[i]) * m.vocab_size + v];
      REQUIRE(std::isfinite(a));
      big = std::max(big, std::fabs(b));
      diff = std::max(diff, std::fabs(a - b));
    }
    CHECK(big > 0.0);
    CHECK_MESSAGE(diff <= kTolSameRows * big, "sequence " << i << ": max diff " << diff << " of max " << big);
  }
}

TEST_CASE("forward: a decode step captured in a CUDA graph (device GEMV experts) replays to the same logits") {
  const ModelSpec m = small_olmoe();
  const auto w = model::synthetic_weights(m, 31);
  GpuModelConfig c;
  c.block_size = 16;
  c.num_blocks = 8;
  c.max_tokens_per_step = 32;
  c.expert_path = gpu::ExpertPath::device_gemv;
  GpuModel g(w, c);
  std::mt19937_64 rng(6);
  g.step({SequenceStep{random_tokens(rng, 20, m.vocab_size), 0, {5, 2}}, SequenceStep{random_tokens(rng, 7, m.vocab_size), 0, {0}}});
  const std::vector<SequenceStep> dec{SequenceStep{random_tokens(rng, 1, m.vocab_size), 20, {5, 2}},
                                      SequenceStep{random_tokens(rng, 1, m.vocab_size), 7, {0}}};
  const auto eager = g.step(dec);
  g.prepare(dec, StepOptions{});
  cudaStream_t s = g.stream();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  g.enqueue(s);
  MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  MIXSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 3; ++i) MIXSERVE_CUDA_CHECK(cudaGraphLaunch(exec, s));
  const auto replay = g.collect(s);
  MIXSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MIXSERVE_CUDA_CHECK(cudaGraphDestroy(graph));
  REQUIRE(replay.logits.size() == eager.logits.size());
  int differ = 0;
  for (std::size_t i = 0; i < eager.logits.size(); ++i) differ += replay.logits[i] != eager.logits[i];
  CHECK_MESSAGE(differ == 0, differ << " logits differ between the eager step and the graph replay");
}

TEST_CASE("forward: bad batches and unsupported models throw InputError") {
  const ModelSpec m = small_mixtral();
  const auto w = model::synthetic_weights(m, 3);
  GpuModelConfig c;
  c.block_size = 8;
  c.num_blocks = 4;
  c.max_tokens_per_step = 16;
  c.max_seqs_per_step = 2;
  c.max_blocks_per_seq = 4;
  GpuModel g(w, c);
  CHECK_THROWS_AS(g.step({}), InputError);
  CHECK_THROWS_AS(g.step({SequenceStep{{}, 0, {0}}}), InputError);                 // no tokens
  CHECK_THROWS_AS(g.step({SequenceStep{{1, m.vocab_size}, 0, {0}}}), InputError);  // id out of range
  CHECK_THROWS_AS(g.step({SequenceStep{{1}, -1, {0}}}), InputError);               // negative position
  CHECK_THROWS_AS(g.step({SequenceStep{std::vector<int32_t>(9, 1), 0, {0}}}), InputError);  // table too short
  CHECK_THROWS_AS(g.step({SequenceStep{{1}, 0, {4}}}), InputError);                          // block out of range
  CHECK_THROWS_AS(g.step({SequenceStep{{1}, 0, {2}}, SequenceStep{{2}, 0, {2}}}), InputError);  // shared block
  CHECK_THROWS_AS(g.step({SequenceStep{std::vector<int32_t>(17, 1), 0, {0, 1, 2}}}), InputError);  // > max tokens
  // head_dim 4 (the model tests' tiny Mixtral) is outside the attention kernel's 64/128.
  const ModelSpec tiny = import_hf_config(R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 32, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2})",
                                          "tiny-mixtral/config.json");
  CHECK_THROWS_AS(GpuModel(model::synthetic_weights(tiny, 1), c), InputError);
}

// The default expert_gemm_streams is the bucketed layout (kExpertGemmDefault); a model built for
// the automatic path at decode sizes gets no room for it, so a step switched to the cuBLASLt path
// falls back to the streams, and must still match the float64 reference.
TEST_CASE("forward: the bucketed default without room falls back to the streams") {
  const ModelSpec m = small_mixtral();
  Pair p(m, 51, 8, 40, 64, gpu::ExpertPath::automatic, kExpertGemmDefault);
  REQUIRE(is_bucketed_expert_gemm(p.gpu.config().expert_gemm_streams));
  p.gpu.set_expert_path(gpu::ExpertPath::cublaslt);
  std::mt19937_64 rng(52);
  CompareStats st;
  p.run("mixtral bucketed default, no room: prefill 40",
        {SequenceStep{random_tokens(rng, 40, m.vocab_size), 0, {3, 1, 4, 0, 2}}}, st);
  const auto& pc = p.gpu.padded_batch_counts();
  INFO(pc.bucketed << " bucketed, " << pc.fallback << " fell back");
  CHECK(pc.bucketed == 0);
  CHECK(pc.fallback > 0);
}

TEST_CASE("forward: the expert GEMM switch rejects bad values, naming the legal ones") {
  const ModelSpec m = small_mixtral();
  const auto w = model::synthetic_weights(m, 3);
  GpuModelConfig c;
  c.block_size = 8;
  c.num_blocks = 4;
  c.max_tokens_per_step = 16;
  c.max_seqs_per_step = 2;
  c.max_blocks_per_seq = 4;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("(no InputError)");
  };
  auto bad = c;
  bad.expert_gemm_streams = kExpertGemmStreamsMin - 1;
  CHECK(message([&] { GpuModel g(w, bad); }).find(std::string(kExpertGemmStreamsLegal)) != std::string::npos);
  bad = c;
  bad.expert_bucket_row_align = 0;
  CHECK(message([&] { GpuModel g(w, bad); }).find("expert_bucket_row_align") != std::string::npos);
  // Built without the bucketed buffers: switching to the bucketed layout does not fit (16 routed
  // rows x top-2 = 32 rows; the layout can need 32 + 8 experts x 127).
  GpuModel plain(w, c);
  CHECK(message([&] { plain.set_expert_gemm_streams(kExpertGemmStreamsMin - 1); }).find(std::string(kExpertGemmStreamsLegal)) !=
        std::string::npos);
  plain.set_expert_gemm_streams(kExpertGemmBucketed);  // allowed: steps without room fall back
  plain.set_expert_gemm_streams(kExpertGemmDefault);
  CHECK_THROWS_AS(plain.set_expert_bucket_row_align(0), InputError);
  plain.set_expert_bucket_row_align(64);  // allowed: a step without room falls back to the streams
  // Built for the bucketed layout at align 16 (the cuBLASLt path, where the layout is reachable):
  // switching between the two bucketed values fits; a larger align is accepted (steps that do not
  // fit fall back to the streams).
  auto bucketed = c;
  bucketed.expert_path = gpu::ExpertPath::cublaslt;
  bucketed.expert_gemm_streams = kExpertGemmBucketed;
  bucketed.expert_bucket_row_align = 16;
  GpuModel b(w, bucketed);
  b.set_expert_bucket_row_align(8);
  b.set_expert_gemm_streams(kExpertGemmBucketedBatched);
  CHECK(b.config().expert_bucket_row_align == 8);
  b.set_expert_bucket_row_align(32);
  CHECK(b.config().expert_bucket_row_align == 32);
}

// One Qwen3-30B-A3B layer at full width (hidden 2048, 32/4 heads x 128, 128 experts x 768,
// top-8) for shape coverage: compared with the reference on a few tokens (prefill of 5 and 3
// tokens, then a decode of both). The vocabulary is cut to 4096 so that the float64 reference's
// LM head stays small; the layer itself is the model's.
TEST_CASE("forward: one full-width Qwen3-30B-A3B layer (vocab cut to 4096) vs the float64 reference") {
  ModelSpec m = model::with_num_layers(load_model("qwen3-30b-a3b"), 1);
  m.vocab_size = 4096;
  const uint64_t seed = 30;
  Pair p(m, seed, 16, 8, 16);
  std::mt19937_64 rng(seed);
  CompareStats st;
  p.gpu.set_expert_path(gpu::ExpertPath::cublaslt);
  p.run("qwen3-30b-a3b L1 prefill 5 + 3 (cuBLASLt)",
        {SequenceStep{random_tokens(rng, 5, m.vocab_size), 0, {6}}, SequenceStep{random_tokens(rng, 3, m.vocab_size), 0, {2}}},
        st);
  p.gpu.set_expert_path(gpu::ExpertPath::device_gemv);
  p.run("qwen3-30b-a3b L1 decode @5, @3 (GEMV)",
        {SequenceStep{random_tokens(rng, 1, m.vocab_size), 5, {6}}, SequenceStep{random_tokens(rng, 1, m.vocab_size), 3, {2}}},
        st);
  std::printf("qwen3-30b-a3b L1: %d rows left out after router near-ties, %d top-1 ids checked\n", st.rows_excluded,
              st.top1_checked);
}

// Decode and prefill step latency of Qwen3-30B-A3B (device-drawn weights), with the bytes the
// step must read (weights it touches, KV context, LM head) against the device's measured copy
// bandwidth, for the decode kernels (GpuModelConfig::decode_kernels) and the previous kernels in
// the same run. Not a test: prints only.
static void run_bench(int num_layers, bool all_rows) {
  const ModelSpec m = model::with_num_layers(load_model("qwen3-30b-a3b"), num_layers);
  GpuModelConfig c;
  c.block_size = 16;
  c.num_blocks = 8192;
  c.max_tokens_per_step = 2048;
  c.max_seqs_per_step = 64;
  c.max_blocks_per_seq = 160;
  GpuModel g(m, 7, c);
  // Copy bandwidth (read + write bytes over time) of a 1 GiB device-to-device copy.
  const std::size_t copy_bytes = std::size_t(1) << 30;
  gpu::DeviceBuffer src(copy_bytes), dst(copy_bytes);
  gpu::TimingOptions topt;
  topt.warmup_iters = 3;
  topt.timed_iters = 10;
  topt.flush_l2 = false;
  const auto copy = gpu::time_op(
      [&](cudaStream_t s) { MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), copy_bytes, cudaMemcpyDeviceToDevice, s)); },
      g.stream(), topt, nullptr);
  const double copy_GBs = 2.0 * double(copy_bytes) / (copy.time_us.median * 1e3);
  std::printf("# device copy bandwidth: %.0f GB/s (read + write of %zu MiB, median of %d)\n", copy_GBs,
              copy_bytes >> 20, topt.timed_iters);
  std::printf("# model %s, %d layers, weights %.2f GB, KV blocks %d x %d tokens\n", m.name.c_str(), m.num_layers,
              g.weight_bytes() / 1e9, g.num_blocks(), c.block_size);
  std::printf("%-62s %10s %10s %10s %12s %10s %9s\n", "case", "time(us)", "noise", "min GB", "GB/s", "% copy",
              "TFLOP/s");
  std::mt19937_64 rng(1);
  // Bytes from a cuBLASLt-path run (it counts the experts with tokens), then the timed runs.
  auto bench = [&](const std::string& name, const std::vector<SequenceStep>& batch, gpu::ExpertPath path, bool graph,
                   bool decode_kernels, int grouped = 0, bool pdl = true,
                   bool fused = kFusedAttentionMergeDefault) {
    try {
      g.set_decode_kernels(decode_kernels);
      g.set_programmatic_launch(pdl);
      // fused: the split merge inside the attention launch and the one-launch router + top-k + permute
      g.set_fused_attention_merge(fused);
      g.set_fused_moe_route(fused);
      // grouped expert GEMV: 0 the default switch (v2 up to kGemvMaxRows tokens), 1 v1, 2 v2
      g.set_grouped_gemv_v2_max_tokens(grouped == 0 ? gpu::kGemvMaxRows : grouped == 1 ? 0 : int64_t(1) << 30);
      g.set_expert_path(gpu::ExpertPath::cublaslt);
      const bool fused = g.config().fused_decode_layer;
      g.set_fused_decode_layer(false);  // the cuBLASLt path counts the experts touched
      g.prepare(batch, StepOptions{});
      g.enqueue(g.stream());
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
      const double gb = g.prepared_min_bytes() / 1e9;
      g.set_fused_decode_layer(fused);
      g.set_expert_path(path);
      topt.cuda_graph = graph;
      const auto r = gpu::time_op([&](cudaStream_t s) { g.enqueue(s); }, g.stream(), topt, nullptr);
      const double gbs = gb / (r.time_us.median * 1e-6);
      // Matrix FLOPs: per token and layer q/k/v/o, router and top_k experts; causal attention
      // (QK^T and PV over the context, half the square for a prefill); the LM head per sequence.
      const auto& a = m.attention;
      const double H = m.hidden_size, QW = double(m.q_width()), KVW = double(a.num_kv_heads) * a.head_dim;
      double flops = 0;
      for (const auto& q : batch) {
        const double n = double(q.tokens.size()), ctx = double(q.position) + n / 2.0;
        flops += m.num_layers * (2 * n * (2 * H * QW + 2 * H * KVW + H * m.moe.num_experts +
                                          3.0 * m.moe.top_k * H * m.moe.expert_intermediate_size) +
                                 4 * n * ctx * QW);
        flops += 2 * H * m.vocab_size;
      }
      std::printf("%-62s %10.1f %10.3f %10.3f %12.0f %9.1f%% %9.1f\n", name.c_str(), r.time_us.median,
                  r.time_us.noise(), gb, gbs, 100.0 * gbs / copy_GBs, flops / (r.time_us.median * 1e6));
    } catch (const std::runtime_error& e) {  // one failed row (e.g. a capture error) must not hide the others
      FAIL_CHECK(name << ": " << e.what());
    }
  };
  auto decode = [&](int batch, int ctx) {
    std::vector<SequenceStep> b;
    const int blocks = (ctx + 1 + c.block_size - 1) / c.block_size;
    for (int s = 0; s < batch; ++s) {
      SequenceStep q;
      q.tokens = random_tokens(rng, 1, m.vocab_size);
      q.position = ctx;
      for (int k = 0; k < blocks; ++k) q.block_table.push_back(s * blocks + k);
      b.push_back(q);
    }
    return b;
  };
  const std::string layers = std::to_string(num_layers) + "L ";
  // The GEMV kernel (expert_gemm.hpp gemv_kernel_for) forced either way, then back to automatic.
  auto with_gemv = [&](gpu::GemvKernel k, const std::string& name, const std::vector<SequenceStep>& batch) {
    g.set_gemv_kernel(k);
    bench(name + ", GEMV kernel " + gpu::gemv_kernel_name(k), batch, gpu::ExpertPath::device_gemv, true, true);
    g.set_gemv_kernel(gpu::GemvKernel::automatic);
  };
  for (int b : {1, 8, 64}) {
    const auto batch = decode(b, 1024);
    const std::string n = layers + "decode b=" + std::to_string(b) + " ctx=1024";
    bench(n + " GEMV, graph, decode kernels", batch, gpu::ExpertPath::device_gemv, true, true);
    if (b == 8) {
      with_gemv(gpu::GemvKernel::by_column, n + " GEMV, graph, decode kernels", batch);
      with_gemv(gpu::GemvKernel::balanced, n + " GEMV, graph, decode kernels", batch);
      continue;
    }
    if (b == 1) {
      // The fused decode layer (default at b=1) against the unfused decode kernels, same run.
      // The fused decode layer (gpu/decode_layer.hpp, off by default) in the same run; with
      // MIXSERVE_FUSED_PHASE_TIMING set, the mean time of its phases.
      const bool fused_default = g.config().fused_decode_layer;
      g.set_fused_decode_layer(true);
      g.take_fused_phase_us();
      bench(n + " GEMV, graph, fused decode layer", batch, gpu::ExpertPath::device_gemv, true, true);
      if (const auto ph = g.take_fused_phase_us(); !ph.empty()) {
        std::printf("#   fused layer phases (us, block 0, mean per layer):");
        for (double v : ph) std::printf(" %.2f", v);
        std::printf("\n");
        print_fused_diag(g.fused_layer_diag());
      }
      // The fused step against the unfused decode kernels on the same inputs, layer by layer (the
      // residual stream after each layer) and on the logits: a check of the fused layer on the full
      // model. fp32 sums in another order make them close, not equal, and the differences grow
      // through the layers; the unfused previous kernels against the decode kernels show how much
      // (the same growth). A wrong expert or a stale input in one layer would jump above it.
      if (!std::getenv("MIXSERVE_FUSED_SKIP_DOT")) {
        StepOptions rec;
        rec.record_hidden = true;
        const auto fo = g.step(batch, rec);
        g.set_fused_decode_layer(false);
        const auto uo = g.step(batch, rec);
        g.set_decode_kernels(false);
        const auto po = g.step(batch, rec);
        g.set_decode_kernels(true);
        auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
          double num = 0, den = 0;
          for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
            num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
            den += double(b[i]) * b[i];
          }
          return a.size() == b.size() ? std::sqrt(num / std::max(den, 1e-30)) : 1e30;
        };
        REQUIRE(fo.layer_hidden.size() == uo.layer_hidden.size());
        REQUIRE(po.layer_hidden.size() == uo.layer_hidden.size());
        std::printf("# fused vs unfused decode kernels, relative L2 difference after layer l (previous kernels vs "
                    "decode kernels in brackets):");
        for (std::size_t l = 0; l < uo.layer_hidden.size(); ++l) {
          const double f = rel(fo.layer_hidden[l], uo.layer_hidden[l]), q = rel(po.layer_hidden[l], uo.layer_hidden[l]);
          if (l % 6 == 0 || l + 1 == uo.layer_hidden.size()) std::printf(" %zu: %.1e (%.1e)", l, f, q);
          CHECK_MESSAGE(f <= std::max(0.02, 4 * q), "layer " << l << ": fused " << f << ", previous kernels " << q);
        }
        const double fl = rel(fo.logits, uo.logits), ql = rel(po.logits, uo.logits);
        std::printf("; logits %.1e (%.1e)\n", fl, ql);
        CHECK(fl <= std::max(0.02, 4 * ql));
      }
      g.set_fused_decode_layer(fused_default);
      with_gemv(gpu::GemvKernel::balanced, n + " GEMV, graph, decode kernels", batch);
      bench(n + " GEMV, graph, decode kernels but v1 expert GEMV", batch, gpu::ExpertPath::device_gemv, true, true, 1);
      bench(n + " GEMV, graph, decode kernels without PDL", batch, gpu::ExpertPath::device_gemv, true, true, 0, false);
      bench(n + " GEMV, graph, decode kernels, attn merge + router fused", batch, gpu::ExpertPath::device_gemv, true,
            true, 0, true, true);
    } else {
      bench(n + " GEMV, graph, decode kernels but v2 expert GEMV", batch, gpu::ExpertPath::device_gemv, true, true, 2);
    }
    bench(n + " GEMV, graph, previous kernels", batch, gpu::ExpertPath::device_gemv, true, false);
    if (!all_rows) continue;
    bench(n + " GEMV, eager, decode kernels", batch, gpu::ExpertPath::device_gemv, false, true);
    bench(n + " GEMV, eager, previous kernels", batch, gpu::ExpertPath::device_gemv, false, false);
    bench(n + " cuBLASLt experts, eager, previous kernels", batch, gpu::ExpertPath::cublaslt, false, false);
  }
  if (!all_rows) return;
  SequenceStep pre;
  pre.tokens = random_tokens(rng, 2048, m.vocab_size);
  for (int k = 0; k < 2048 / c.block_size; ++k) pre.block_table.push_back(k);
  bench(layers + "prefill 1 x 2048 cuBLASLt experts, decode kernels", {pre}, gpu::ExpertPath::cublaslt, false, true);
  bench(layers + "prefill 1 x 2048 cuBLASLt experts, previous kernels", {pre}, gpu::ExpertPath::cublaslt, false, false);
}

TEST_CASE("bench: Qwen3-30B-A3B --num-layers 4 decode b=1/64 and prefill 1x2048" * doctest::skip()) {
  run_bench(4, true);
}

TEST_CASE("bench: Qwen3-30B-A3B all 48 layers decode b=1/64" * doctest::skip()) { run_bench(48, false); }

// One eager decode step of each kind between cudaProfilerStart/Stop, for a per-kernel breakdown:
//   ncu --profile-from-start off --clock-control none --cache-control none
//       --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv
//       test_gpu_forward -tc='bench: profile*' --no-skip
// (2 layers: the first dense-free MoE layer is representative; every kernel of a step appears.)
TEST_CASE("bench: profile one decode step per configuration (run under ncu)" * doctest::skip()) {
  const ModelSpec m = model::with_num_layers(load_model("qwen3-30b-a3b"), 2);
  GpuModelConfig c;
  c.block_size = 16;
  c.num_blocks = 4096 + 64;
  c.max_tokens_per_step = 64;
  c.max_seqs_per_step = 64;
  c.max_blocks_per_seq = 80;
  c.expert_path = gpu::ExpertPath::device_gemv;
  GpuModel g(m, 7, c);
  std::mt19937_64 rng(1);
  for (int b : {1, 64})
    for (bool dk : {false, true}) {
      std::vector<SequenceStep> batch;
      const int ctx = 1024, blocks = (ctx + 1 + c.block_size - 1) / c.block_size;
      for (int s = 0; s < b; ++s) {
        SequenceStep q;
        q.tokens = random_tokens(rng, 1, m.vocab_size);
        q.position = ctx;
        for (int k = 0; k < blocks; ++k) q.block_table.push_back(s * blocks + k);
        batch.push_back(q);
      }
      g.set_decode_kernels(dk);
      g.prepare(batch, StepOptions{});
      g.enqueue(g.stream());  // warm: cuBLASLt plans, attributes
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
      std::printf("# profiled step: b=%d decode_kernels=%d\n", b, int(dk));
      MIXSERVE_CUDA_CHECK(cudaProfilerStart());
      g.enqueue(g.stream());
      MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
      MIXSERVE_CUDA_CHECK(cudaProfilerStop());
    }
}
