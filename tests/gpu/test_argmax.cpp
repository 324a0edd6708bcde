// Device greedy sampling (executor/argmax.hpp) against a CPU reference over awkward vocab sizes
// (1 to 151936, Qwen3's) with ties (lowest id wins, as the std::max_element argmax it replaced),
// the maximum first or last, -inf and NaN entries, an all-NaN row; GpuModel's greedy ids equal
// the CPU argmax of its own logits, in the same step, with and without a CUDA graph; the cuBLASLt
// GEMM with fp32 output (the router logits above 8 tokens) against a float64 reference.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "mixserve/core/io.hpp"
#include "mixserve/gpu/argmax.hpp"
#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/graph.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/model/bf16.hpp"
#include "reference.hpp"

using namespace mixserve;
using mixserve::test::download;
using mixserve::test::upload;

namespace {

// The reference: the largest non-NaN value, the lowest index among equals; all NaN: 0.
int32_t argmax_ref(const std::vector<uint16_t>& row) {
  int32_t best = -1;
  float bv = 0;
  for (std::size_t j = 0; j < row.size(); ++j) {
    const float v = model::bf16_to_f32(row[j]);
    if (std::isnan(v)) continue;
    if (best < 0 || v > bv) {
      best = static_cast<int32_t>(j);
      bv = v;
    }
  }
  return best < 0 ? 0 : best;
}

}  // namespace

TEST_CASE("argmax_rows: CPU reference over awkward vocab sizes, ties to the lowest id") {
  std::mt19937 rng(7);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const int64_t vocab : {1, 2, 7, 31, 32, 33, 255, 256, 257, 1000, 4097, 32000, 151936}) {
    for (const int64_t rows : {1, 3, 9}) {
      INFO("vocab " << vocab << " rows " << rows);
      std::vector<uint16_t> h(std::size_t(rows * vocab));
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* row = h.data() + r * vocab;
        // Values from a small set: ties between far-apart indices are common.
        std::uniform_int_distribution<int> level(-8, 8);
        for (int64_t j = 0; j < vocab; ++j) row[j] = model::f32_to_bf16(0.25f * float(level(rng)));
        switch (r % 9) {
          case 0: break;                                                    // random ties
          case 1: row[vocab - 1] = model::f32_to_bf16(100.0f); break;       // the last wins
          case 2: row[0] = model::f32_to_bf16(100.0f); break;               // the first wins
          case 3:                                                           // all equal: id 0
            for (int64_t j = 0; j < vocab; ++j) row[j] = model::f32_to_bf16(-3.0f);
            break;
          case 4:  // two equal maxima far apart
            row[vocab / 3] = model::f32_to_bf16(50.0f);
            row[vocab - 1] = model::f32_to_bf16(50.0f);
            break;
          case 5:  // NaNs and -inf around a finite maximum
            for (int64_t j = 0; j < vocab; j += 3) row[j] = model::f32_to_bf16(nan);
            row[vocab / 2] = model::f32_to_bf16(-inf);
            break;
          case 6:  // all NaN: 0
            for (int64_t j = 0; j < vocab; ++j) row[j] = model::f32_to_bf16(nan);
            break;
          case 7:  // +inf twice
            row[vocab - 1] = model::f32_to_bf16(inf);
            row[vocab / 2] = model::f32_to_bf16(inf);
            break;
          case 8:  // all negative
            for (int64_t j = 0; j < vocab; ++j) row[j] = model::f32_to_bf16(-1.0f - float(j % 5));
            break;
        }
      }
      gpu::DeviceBuffer d(h.size() * 2), out(std::size_t(rows) * 4);
      upload(d.get(), h);
      MIXSERVE_CUDA_CHECK(cudaMemset(out.get(), 0xff, out.bytes()));
      gpu::launch_argmax_rows(static_cast<const __nv_bfloat16*>(d.get()), rows, vocab,
                              static_cast<int32_t*>(out.get()), nullptr);
      MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
      const auto got = download<int32_t>(out.get(), std::size_t(rows));
      for (int64_t r = 0; r < rows; ++r) {
        INFO("row " << r);
        const std::vector<uint16_t> row(h.begin() + r * vocab, h.begin() + (r + 1) * vocab);
        CHECK(got[std::size_t(r)] == argmax_ref(row));
      }
    }
  }
  gpu::DeviceBuffer d(64), out(64);
  CHECK_THROWS_AS(gpu::launch_argmax_rows(static_cast<const __nv_bfloat16*>(d.get()), -1, 8,
                                          static_cast<int32_t*>(out.get()), nullptr),
                  InputError);
  CHECK_THROWS_AS(gpu::launch_argmax_rows(static_cast<const __nv_bfloat16*>(d.get()), 1, 0,
                                          static_cast<int32_t*>(out.get()), nullptr),
                  InputError);
  gpu::launch_argmax_rows(static_cast<const __nv_bfloat16*>(d.get()), 0, 8, static_cast<int32_t*>(out.get()),
                          nullptr);  // no rows: nothing
}

TEST_CASE("cuBLASLt GEMM with fp32 output (router logits above 8 tokens) vs float64") {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  gpu::LtHandle h;
  gpu::DeviceBuffer ws(gpu::LtGemm::kWorkspaceBytes);
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {9, 8, 64}, {16, 128, 2048}, {100, 64, 64}, {2048, 128, 2048}, {513, 40, 96}};
  for (const auto& [m, n, k] : shapes) {
    INFO("m " << m << " n " << n << " k " << k);
    std::vector<uint16_t> a(std::size_t(m * k)), w(std::size_t(n * k));
    for (auto& x : a) x = model::f32_to_bf16(u(rng));
    for (auto& x : w) x = model::f32_to_bf16(u(rng));
    gpu::DeviceBuffer da(a.size() * 2), dw(w.size() * 2), dout(std::size_t(m * n) * 4);
    upload(da.get(), a);
    upload(dw.get(), w);
    gpu::LtGemm g(h, gpu::GemmShape{m, n, k, DType::bf16, true}, ws.get(), ws.bytes());
    gpu::GemmOperands ops;
    ops.act = da.get();
    ops.weight = dw.get();
    ops.out = dout.get();
    g.run(ops, nullptr);
    MIXSERVE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = download<float>(dout.get(), std::size_t(m * n));
    std::vector<double> ref(std::size_t(m * n)), gd(got.begin(), got.end());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p)
          s += double(model::bf16_to_f32(a[std::size_t(i * k + p)])) * model::bf16_to_f32(w[std::size_t(j * k + p)]);
        ref[std::size_t(i * n + j)] = s;
      }
    REQUIRE(test::norm(ref) > 0);
    CHECK(test::rel_error(gd, ref) < 1e-5);  // fp32 accumulation and output, exact bf16 inputs
  }
  CHECK(!gpu::gemm_unsupported_reason(gpu::GemmShape{16, 8, 64, DType::fp8_e4m3, true}).empty());
}

TEST_CASE("GpuModel greedy ids: the argmax of its own logits, eager and in a CUDA graph") {
  const ModelSpec m = import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 1000, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "mlp_only_layers": [0],
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
    "max_position_embeddings": 4096})",
                                       "greedy-qwen3/config.json");
  gpu::GpuModelConfig gc;
  gc.num_blocks = 64;
  gc.max_tokens_per_step = 64;
  gc.max_seqs_per_step = 8;
  gpu::GpuModel g(m, 5, gc);
  std::vector<model::SequenceStep> batch;
  for (int s = 0; s < 5; ++s) {  // 5 prompts of 3..11 tokens: 35 tokens (router on cuBLASLt)
    model::SequenceStep q;
    for (int i = 0; i < 3 + 2 * s; ++i) q.tokens.push_back((s * 131 + i * 17) % 1000);
    q.position = 0;
    q.block_table = {s * 2, s * 2 + 1};
    batch.push_back(q);
  }
  auto check_ids = [&](const gpu::GpuStepOutput& o) {
    REQUIRE(o.token_ids.size() == o.logit_rows.size());
    REQUIRE(o.logits.size() == o.token_ids.size() * 1000);
    for (std::size_t r = 0; r < o.token_ids.size(); ++r) {
      std::vector<uint16_t> row(1000);
      for (int j = 0; j < 1000; ++j) row[std::size_t(j)] = model::f32_to_bf16(o.logits[r * 1000 + std::size_t(j)]);
      CHECK(o.token_ids[r] == argmax_ref(row));  // logits are bf16 widened: exact round trip
    }
  };
  gpu::StepOptions both;
  both.greedy = true;
  const gpu::GpuStepOutput pre = g.step(batch, both);
  check_ids(pre);
  gpu::StepOptions ids_only = both;
  ids_only.copy_logits = false;
  // Decode: every sequence's greedy token, eager then as a graph of the same step.
  std::vector<model::SequenceStep> dec;
  for (int s = 0; s < 5; ++s) {
    model::SequenceStep q;
    q.tokens = {pre.token_ids[std::size_t(s)]};
    q.position = 3 + 2 * s;
    q.block_table = {s * 2, s * 2 + 1};
    dec.push_back(q);
  }
  const gpu::GpuStepOutput eager = g.step(dec, both);
  check_ids(eager);
  g.prepare(dec, ids_only);
  gpu::StepGraph graph;
  graph.capture(g.stream(), [&](cudaStream_t cs) { g.enqueue(cs); });
  graph.launch(g.stream());
  const gpu::GpuStepOutput graphed = g.collect(g.stream());
  CHECK(graphed.logits.empty());
  CHECK(graphed.token_ids == eager.token_ids);
}
