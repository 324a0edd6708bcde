// The cost model mirrors the executor's launch structure (core/decode_path.hpp): launches per
// layer counted by hand from executor/src/model_forward.cpp for each path, and the profile
// timer's GEMV and grouped GEMV v2 tables (exact, interpolated, fallbacks labelled).
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/op_timer.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

// Qwen3-MoE-like: GQA 32/4 heads of 128 (group 8), per-head q/k norms, 128 experts top-8.
ModelSpec small_qwen3(int layers) {
  ModelSpec m = test::qwen3_235b();
  m.name = "small-qwen3";
  m.architecture = "Qwen3MoeForCausalLM";
  m.hidden_size = 2048;
  m.num_layers = layers;
  m.attention.num_heads = 32;
  m.attention.num_kv_heads = 4;
  m.moe.expert_intermediate_size = 768;
  m.layers.assign(size_t(layers), LayerSpec{});
  return m;
}

ReplicaBatch decodes(int n, int64_t ctx) {
  ReplicaBatch b;
  b.num_decode = n;
  b.decode_context = n * ctx;
  return b;
}

ReplicaBatch prefill(int64_t tokens) {
  ReplicaBatch b;
  b.prefill_tokens = tokens;
  b.num_prefill_seqs = 1;
  b.prefill_attn_pairs = double(tokens) * (tokens + 1) / 2;
  return b;
}

StepCost run(const ModelSpec& m, const Layout& l, const ReplicaBatch& b, bool decode_kernels = true) {
  CostModelOptions opt;
  opt.decode_kernels = decode_kernels;
  auto cm = make_cost_model("mixserve", m, test::h200_cluster(1, l.world_size()), test::h200_datasheet(), l, opt);
  std::vector<ReplicaBatch> v(size_t(l.attn_dp), b);
  return cm->step(v, false);
}

const Layout kOne = test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce);

}  // namespace

// Per MoE layer, decode kernels (unsharded, <= 8 tokens): input norm (+ previous residual), q|k|v
// GEMV, QK-norm/RoPE/KV write, attention (+ split merge), o GEMV, post norm, router GEMV, top-k,
// one-launch permute, grouped GEMV v2 up and down, combine = 12 (+1). Per step: RoPE table, the
// last layer's residual add, embedding gather, LM head (row gather, final norm, GEMM) = 6.
TEST_CASE("launch count: decode kernels at 1 and 4 tokens") {
  for (int layers : {1, 3}) {
    const ModelSpec m = small_qwen3(layers);
    for (int n : {1, 4, 8}) {
      CAPTURE(layers);
      CAPTURE(n);
      const StepCost s = run(m, kOne, decodes(n, 32));  // 32 keys: one split
      CHECK(s.moe_layer_launches == 12);
      CHECK(s.launches == 12 * layers + 6);
    }
  }
  // 1 sequence of 1000 keys: 8 query rows per KV head, 4 CTAs < 2 per SM: the keys are split
  // and merged (a second attention launch).
  CHECK(run(small_qwen3(2), kOne, decodes(1, 1000)).moe_layer_launches == 13);
  CHECK(run(small_qwen3(2), kOne, decodes(1, 1000), false).moe_layer_launches == 23);
}

// Above 8 tokens the dense projections are cuBLASLt again (q, k, v: 3 launches, o: 1), the router
// its fp32 GEMM, the experts the v1 GEMV (up, SwiGLU, down) up to 512 routed rows; the fused
// QK-norm/RoPE/KV write, the fused residual and (<= 128 pairs) the one-launch permute remain.
TEST_CASE("launch count: decode kernels above 8 tokens and a 40-token prefill") {
  const ModelSpec m = small_qwen3(2);
  // 16 decodes, 128 pairs: 1 + 3 + 1 + 1 + 1 + 1 + 1 + 1 + 1 (permute) + 3 + 1 = 15.
  const StepCost d16 = run(m, kOne, decodes(16, 32));
  CHECK(d16.moe_layer_launches == 15);
  CHECK(d16.launches == 15 * 2 + 6);
  // Device greedy sampling: one argmax launch more per step.
  CostModelOptions g;
  g.device_greedy = true;
  auto cm = make_cost_model("mixserve", m, test::h200_cluster(1, 1), test::h200_datasheet(), kOne, g);
  const std::vector<ReplicaBatch> v{decodes(16, 32)};
  CHECK(cm->step(v, false).launches == 15 * 2 + 7);
  // 40 tokens, 320 pairs: permute in 4 launches -> 18; one attention launch (40 keys).
  const StepCost p40 = run(m, kOne, prefill(40));
  CHECK(p40.moe_layer_launches == 18);
  CHECK(p40.launches == 18 * 2 + 6);
}

// The previous kernels (sharded, or decode_kernels off): input norm, q, k, v, q-norm, k-norm,
// RoPE, KV write, attention, o, residual add, post norm, router, top-k, permute (4), v1 GEMV up,
// SwiGLU, down, combine = 22 per layer; per step embedding + LM head (3) = 4.
TEST_CASE("launch count: previous kernels when sharded or switched off") {
  const ModelSpec m = small_qwen3(2);
  const StepCost off = run(m, kOne, decodes(1, 32), false);
  CHECK(off.moe_layer_launches == 22);
  CHECK(off.launches == 22 * 2 + 4);
  const Layout tp2 = test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce);
  const StepCost sh = run(m, tp2, decodes(1, 32), true);
  CHECK(sh.moe_layer_launches == 22);
  // OLMoE's whole-width q/k norms keep the separate norm, RoPE and KV-write launches.
  ModelSpec o = small_qwen3(2);
  o.architecture = "OlmoeForCausalLM";
  CHECK(run(o, kOne, decodes(1, 32)).moe_layer_launches == 12 + 3);
}

TEST_CASE("launch count: dense layers and shared experts") {
  ModelSpec m = small_qwen3(2);
  m.layers[0].moe = false;
  m.dense_intermediate_size = 4096;
  m.moe.num_shared_experts = 1;
  m.moe.shared_intermediate_size = 2048;
  m.moe.shared_expert_gate = true;
  // Dense layer at 1 token: norm, qkv, qk-rope-kv, attention, o, post norm, FFN GEMV x2 = 8.
  const StepCost s = run(m, kOne, decodes(1, 32));
  CHECK(s.dense_layer_launches == 8);
  // MoE layer: 12 + shared GEMV x2 + shared gate = 15.
  CHECK(s.moe_layer_launches == 15);
  CHECK(s.launches == 8 + 15 + 6);
  // Above 8 tokens the FFNs are GEMM + SwiGLU + GEMM.
  const StepCost b16 = run(m, kOne, decodes(16, 32));
  CHECK(b16.dense_layer_launches == 1 + 3 + 1 + 1 + 1 + 1 + 3);
}

// The GEMV kernels take k up to kGemvMaxK (core/expert_path.hpp gemv_k_fits); a wider projection
// runs on the GEMM, in the executor (GpuModel::linear / ffn_dense / moe_block) and here alike.
TEST_CASE("expert path: per-expert cuBLASLt on streams for large steps only") {
  // Qwen3-30B-A3B (128 experts, top-8): the 2048-token chunk (128 rows per expert) stays on the
  // grouped GEMM, the 8 x 2048 step (1024 rows per expert) takes the streams.
  CHECK_FALSE(uses_expert_streams(2048 * 8, 128));
  CHECK(uses_expert_streams(16384 * 8, 128));
  CHECK(uses_expert_streams(kExpertStreamsMinRowsPerExpert * 128, 128));
  CHECK_FALSE(uses_expert_streams(kExpertStreamsMinRowsPerExpert * 128 - 1, 128));
  // Never where the device GEMV runs, whatever the expert count.
  CHECK_FALSE(uses_expert_streams(kDeviceGemvMaxRows, 1));
  CHECK(uses_expert_streams(kDeviceGemvMaxRows + 1, 1));
  CHECK_FALSE(uses_expert_streams(1 << 20, 0));
  CHECK(kExpertGemmStreams >= 1);
}

TEST_CASE("GEMV k limit: wide projections fall back to the GEMM") {
  CHECK(gemv_k_fits(8192));
  CHECK(gemv_k_fits(14336));  // Mixtral expert down (on the GEMM before session 5: k <= 8192)
  CHECK(gemv_k_fits(20480));  // Qwen2-57B shared expert down
  CHECK(gemv_k_fits(kGemvMaxK));
  CHECK(kGemvMaxK == 32768);
  CHECK_FALSE(gemv_k_fits(kGemvMaxK + 8));
  CHECK_FALSE(gemv_k_fits(65536));
  CHECK_FALSE(gemv_k_fits(20));     // not a multiple of 8
  CHECK_FALSE(gemv_k_fits(14340));  // not a multiple of 8
  CHECK_FALSE(gemv_k_fits(0));
  CHECK(dense_gemv_for(true, 1, 4096));
  CHECK(dense_gemv_for(true, 1, 20480));  // Qwen2-57B shared expert down
  CHECK_FALSE(dense_gemv_for(true, 1, 40960));
  CHECK_FALSE(dense_gemv_for(true, 9, 4096));
  CHECK(uses_device_gemv(8, 4096, 8192));
  // Mixtral-8x7B decode (b=1: 2 routed rows; up to 256 tokens x top-2) takes the GEMV for both
  // projections, the tensor-core grouped GEMM above kDeviceGemvMaxRows.
  CHECK(uses_device_gemv(2, 4096, 14336));
  CHECK(uses_device_gemv(kDeviceGemvMaxRows, 4096, 14336));
  CHECK(uses_grouped_gemm(kDeviceGemvMaxRows + 1, 4096, 14336));
  CHECK_FALSE(uses_device_gemv(8, 4096, 40960));
  CHECK(uses_grouped_gemm(8, 4096, 40960));
  CHECK_FALSE(uses_device_gemv(1024, 2048, 768));
  // A shared expert wider than kGemvMaxK at 1 token: gate|up GEMV, then SwiGLU + GEMM (one launch
  // more than the fused GEMV down projection of a width that fits, 20480 included).
  ModelSpec narrow = small_qwen3(2), wide = small_qwen3(2), qwen2 = small_qwen3(2);
  for (ModelSpec* m : {&narrow, &wide, &qwen2}) {
    m->moe.num_shared_experts = 1;
    m->moe.shared_expert_gate = false;
  }
  narrow.moe.shared_intermediate_size = 2048;
  qwen2.moe.shared_intermediate_size = 20480;
  wide.moe.shared_intermediate_size = 40960;
  const int narrow_launches = run(narrow, kOne, decodes(1, 32)).moe_layer_launches;
  CHECK(run(wide, kOne, decodes(1, 32)).moe_layer_launches == narrow_launches + 1);
  CHECK(run(qwen2, kOne, decodes(1, 32)).moe_layer_launches == narrow_launches);
}

TEST_CASE("profile timer: GEMV table and grouped GEMV v2 points, fallbacks labelled") {
  HardwareProfile p = test::h200_datasheet();
  p.source = "measured";
  p.gemm.push_back({1, 5120, 2048, DType::bf16, 20.0});
  p.gemm.push_back({16, 5120, 2048, DType::bf16, 24.0});
  p.gemv.push_back({std::string(kGemvImplPlain), 1, 5120, 2048, DType::bf16, 8.0});
  p.gemv.push_back({std::string(kGemvImplPlain), 4, 5120, 2048, DType::bf16, 10.0});
  p.gemv.push_back({std::string(kGemvImplSwiglu), 1, 2048, 768, DType::bf16, 5.0});
  auto t = make_profile_timer(p, test::h200_cluster(1));
  // Exact and interpolated (log-log) inside the curve.
  OpTime a = t->gemv(1, 5120, 2048, DType::bf16, GemvKind::plain);
  CHECK(a.time_us == doctest::Approx(8.0));
  CHECK(a.source == CostSource::measured);
  OpTime b = t->gemv(2, 5120, 2048, DType::bf16, GemvKind::plain);
  CHECK(b.time_us == doctest::Approx(8.0 * std::pow(10.0 / 8.0, 0.5)));
  CHECK(b.source == CostSource::interpolated);
  // Another kind, another family: not this table.
  CHECK(t->gemv(1, 2048, 768, DType::bf16, GemvKind::swiglu).time_us == doctest::Approx(5.0));
  // Outside the curve (m = 8 > 4) or no family (fp32 kind): the cuBLASLt table, extrapolated.
  OpTime c = t->gemv(8, 5120, 2048, DType::bf16, GemvKind::plain);
  CHECK(c.time_us == doctest::Approx(t->gemm(8, 5120, 2048, DType::bf16).time_us));
  CHECK(c.source == CostSource::extrapolated);
  OpTime d = t->gemv(1, 5120, 2048, DType::bf16, GemvKind::fp32_out);
  CHECK(d.time_us == doctest::Approx(20.0));
  CHECK(d.source == CostSource::extrapolated);

  // Grouped GEMV: v2 points serve v2 shapes; without them v1's, extrapolated; v1 shapes ignore v2.
  auto expert = [](int64_t rows, double t_us, const char* tag) {
    ExpertGemmPoint e;
    e.num_experts = 128;
    e.tokens = rows;
    e.n = 1536;
    e.k = 2048;
    e.distribution = std::string(tag) + "uniform";
    e.time_us = t_us;
    return e;
  };
  p.experts = {expert(8, 30.0, "gemv:"), expert(64, 90.0, "gemv:"), expert(8, 12.0, "gemv2:"),
               expert(64, 60.0, "gemv2:")};
  auto t2 = make_profile_timer(p, test::h200_cluster(1));
  ExpertGemmShape s{128, 8, 8, 1536, 2048, DType::bf16, true, false, true};
  OpTime v2 = t2->expert_gemm(s);
  CHECK(v2.time_us == doctest::Approx(12.0));
  CHECK(v2.source == CostSource::measured);
  s.gemv_v2 = false;
  CHECK(t2->expert_gemm(s).time_us == doctest::Approx(30.0));
  p.experts = {expert(8, 30.0, "gemv:"), expert(64, 90.0, "gemv:")};
  auto t3 = make_profile_timer(p, test::h200_cluster(1));
  s.gemv_v2 = true;
  OpTime fb = t3->expert_gemm(s);
  CHECK(fb.time_us == doctest::Approx(30.0));
  CHECK(fb.source == CostSource::extrapolated);
}

TEST_CASE("cost model: the decode step takes the GEMV table when the profile has it") {
  const ModelSpec m = small_qwen3(2);
  HardwareProfile p = test::h200_datasheet();
  auto cm0 = make_cost_model("mixserve", m, test::h200_cluster(1, 1), p, kOne, {});
  // A GEMV table with the q|k|v shape only: the attention block's qkv slot changes to it.
  const int64_t qkv_n = (32 + 2 * 4) * 128;
  p.gemv.push_back({std::string(kGemvImplPlain), 1, qkv_n, 2048, DType::bf16, 1000.0});
  p.gemv.push_back({std::string(kGemvImplPlain), 8, qkv_n, 2048, DType::bf16, 1000.0});
  auto cm1 = make_cost_model("mixserve", m, test::h200_cluster(1, 1), p, kOne, {});
  const std::vector<ReplicaBatch> b1{decodes(1, 32)};
  const double d1 = cm1->step(b1, false).time_us - cm0->step(b1, false).time_us;
  // Two layers, each 1000 us instead of the roofline's GEMV estimate.
  auto roof = make_roofline_timer(test::h200_datasheet(), test::h200_cluster(1, 1));
  const double r = roof->gemm(1, qkv_n, 2048, DType::bf16).time_us;
  CHECK(d1 == doctest::Approx(2 * (1000.0 - r)));
  // Above 8 tokens the table is not used (cuBLASLt GEMMs).
  const std::vector<ReplicaBatch> b16{decodes(16, 32)};
  CHECK(cm1->step(b16, false).time_us == doctest::Approx(cm0->step(b16, false).time_us));
}

// The models of tests/gpu/test_launches.cpp (top-2 of 8 experts, GQA 4/2 heads of 64; Qwen2-MoE:
// MHA with QKV bias, shared expert with its gate), counted by hand here; the GPU test compares
// the same predictions with a captured step.
TEST_CASE("launch count: the GPU test's models") {
  const auto qwen3 = import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": false})",
                                      "launch-qwen3/config.json");
  const auto qwen2 = import_hf_config(R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "vocab_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": false, "shared_expert_intermediate_size": 128,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                                      "launch-qwen2/config.json");
  REQUIRE(qwen2.moe.shared_expert_gate);
  // Qwen3, decode kernels: 12 per layer at <= 8 tokens, 13 with the split merge (301 keys), 15
  // at 16 tokens and for the 40-token prefill (80 pairs: one-launch permute).
  CHECK(run(qwen3, kOne, decodes(1, 21)).launches == 2 * 12 + 6);
  CHECK(run(qwen3, kOne, decodes(4, 21)).launches == 2 * 12 + 6);
  CHECK(run(qwen3, kOne, decodes(1, 301)).launches == 2 * 13 + 6);
  CHECK(run(qwen3, kOne, decodes(16, 21)).launches == 2 * 15 + 6);
  CHECK(run(qwen3, kOne, prefill(40)).launches == 2 * 15 + 6);
  // Previous kernels: 22 per layer (23 with the merge).
  CHECK(run(qwen3, kOne, decodes(1, 21), false).launches == 2 * 22 + 4);
  CHECK(run(qwen3, kOne, decodes(1, 301), false).launches == 2 * 23 + 4);
  // Qwen2: + shared GEMV x2 + gate = 15; previous kernels 22 + 3 bias - 2 q/k norms + 3 + 1 = 27.
  CHECK(run(qwen2, kOne, decodes(1, 21)).launches == 2 * 15 + 6);
  CHECK(run(qwen2, kOne, decodes(1, 21), false).launches == 2 * 27 + 4);
}
