#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "model_compare.hpp"

using namespace mixserve;

namespace {

// A figure published as X with last digit u (e.g. "3.3B": X = 3.3e9, u = 0.1e9) comes from a true
// value in [X - u/2, X + u) whether the publisher rounded or truncated. The count must be within
// 1% of X or inside that interval; the cases that need the interval are named in the table.
bool matches_published(double count, double x, double unit) {
  return std::fabs(count - x) <= 0.01 * x || (count >= x - unit / 2 && count < x + unit);
}

struct Published {
  const char* model;
  double total, total_unit;
  double active, active_unit;
  bool active_excludes_embedding;  // the publisher's "active" leaves out the embedding lookup
  const char* source;
};

// Published totals and active counts, main model only (DeepSeek MTP modules excluded).
const Published kPublished[] = {
    // DeepSeek-V3 technical report (arXiv 2412.19437) and README_WEIGHTS.md: 671B main model,
    // 37B activated. Exact active is 36.63B without the embedding (37.55B with it): DeepSeek
    // counts without the embedding lookup; 36.63 is 1.01% below 37, inside the rounding interval.
    {"deepseek-v3", 671e9, 1e9, 37e9, 1e9, true, "arXiv 2412.19437; README_WEIGHTS.md"},
    {"deepseek-r1", 671e9, 1e9, 37e9, 1e9, true, "HF deepseek-ai/DeepSeek-R1 model card"},
    // HF deepseek-ai/DeepSeek-V2-Lite card: 15.7B total, 2.4B activated. Exact active without the
    // embedding is 2.4514B: 2.1% above 2.4 and just outside [2.35, 2.5) -> known discrepancy,
    // checked separately below.
    {"deepseek-v2-lite", 15.7e9, 0.1e9, 0, 0, true, "HF deepseek-ai/DeepSeek-V2-Lite card"},
    // HF Qwen/Qwen3-235B-A22B card: 235B total, 22B activated (0.9% off: within 1%).
    {"qwen3-235b-a22b", 235e9, 1e9, 22e9, 1e9, false, "HF Qwen/Qwen3-235B-A22B card"},
    // HF Qwen/Qwen3-30B-A3B card: 30.5B total, 3.3B activated. Exact 3.353B: 1.6% above, a
    // truncated "3.3" (inside [3.25, 3.4)).
    {"qwen3-30b-a3b", 30.5e9, 0.1e9, 3.3e9, 0.1e9, false, "HF Qwen/Qwen3-30B-A3B card"},
    // Mistral AI "Mixtral of experts" (arXiv 2401.04088): 46.7B total, 12.9B active.
    {"mixtral-8x7b", 46.7e9, 0.1e9, 12.9e9, 0.1e9, false, "arXiv 2401.04088"},
    // Qwen2 technical report / HF Qwen/Qwen2-57B-A14B card: 57B total (57.4B), 14B activated.
    // Exact 14.25B: 1.8% above 14, inside [13.5, 15).
    {"qwen2-57b-a14b", 57.4e9, 0.1e9, 14e9, 1e9, false, "HF Qwen/Qwen2-57B-A14B card"},
    // OLMoE paper (arXiv 2409.02060): 6.9B total, 1.3B active. Exact 1.282B: 1.4% below 1.3,
    // inside [1.25, 1.4).
    {"olmoe-1b-7b", 6.9e9, 0.1e9, 1.3e9, 0.1e9, false, "arXiv 2409.02060"},
    // OpenAI gpt-oss model card (arXiv 2508.10925): 20.9B total, 3.6B active per token, counted
    // without the embedding (4.19B with it).
    {"gpt-oss-20b", 20.9e9, 0.1e9, 3.6e9, 0.1e9, true, "gpt-oss model card, arXiv 2508.10925"},
};

}  // namespace

TEST_CASE("parameter counts of the shipped models match the published figures") {
  for (const auto& pub : kPublished) {
    const ModelSpec m = load_model(pub.model);
    const ParamBreakdown p = count_params(m);
    const double total = double(p.total());
    const double active = double(p.active - (pub.active_excludes_embedding ? p.embedding : 0));
    INFO(pub.model << " total " << total / 1e9 << "B active " << active / 1e9 << "B (source: "
                   << pub.source << ")");
    CHECK(matches_published(total, pub.total, pub.total_unit));
    if (pub.active > 0) CHECK(matches_published(active, pub.active, pub.active_unit));
    CHECK(p.active < p.total());
  }
  // DeepSeek-V2-Lite active: the card's 2.4B is 2.1% below our exact 2.4514B (see the report);
  // the check pins the exact count instead, derived by hand below, so a regression still fails.
  const ParamBreakdown lite = count_params(load_model("deepseek-v2-lite"));
  // Non-expert part: attention 27 * (2048*3072 + 2048*576 + 512*16*256 + 2048*2048) = 371,589,120;
  // norms 27*(2*2048 + 512) + 2048 = 126,464; dense FFN 3*2048*10944 = 67,239,936;
  // shared 26 * 3*2048*2816 = 449,839,104; router 26*64*2048 = 3,407,872; LM head 209,715,200;
  // routed active 26 * 6 * 3*2048*1408 = 1,349,517,312. Sum = 2,451,435,008.
  CHECK(lite.active - lite.embedding == 2451435008LL);
}

TEST_CASE("exact per-tensor counts derived by hand") {
  // DeepSeek-V3 MLA per layer: q_a 7168*1536 + q_b 1536*128*192 + kv_a 7168*(512+64)
  // + kv_b 512*128*(128+128) + o 128*128*7168 = 187,105,280.
  const ModelSpec v3 = load_model("deepseek-v3");
  const ParamBreakdown p = count_params(v3);
  CHECK(p.attention == 61LL * 187105280LL);
  CHECK(p.per_expert == 3LL * 7168 * 2048);
  // Router: 58 MoE layers * (256*7168 weights + 256 correction biases).
  CHECK(p.router == 58LL * (256 * 7168 + 256));
  CHECK(p.dense_ffn == 3LL * 3 * 7168 * 18432);
  CHECK(v3.q_width() == 128 * 192);
  // MLA caches kv_lora_rank + rope dims per layer: 576 * 61 layers * 2 bytes.
  CHECK(kv_bytes_per_token(v3) == 576.0 * 61 * 2);

  // Mixtral: one expert = 3 * 4096 * 14336; GQA KV = 2 * 8 * 128 per layer.
  const ModelSpec mix = load_model("mixtral-8x7b");
  CHECK(count_params(mix).per_expert == 176160768LL);
  CHECK(kv_bytes_per_token(mix) == 2.0 * 8 * 128 * 32 * 2);
  CHECK(weight_bytes(mix) == 2.0 * double(count_params(mix).total()));

  // gpt-oss: expert with biases 3*2880*2880 + 2*2880 + 2880; sinks 64 per layer;
  // q width 64*64 = 4096 != hidden 2880.
  const ModelSpec oss = load_model("gpt-oss-20b");
  const ParamBreakdown po = count_params(oss);
  CHECK(po.per_expert == 3LL * 2880 * 2880 + 3 * 2880);
  CHECK(oss.q_width() == 4096);
  const int64_t attn_layer = 2880LL * 4096 * 2 + 2880LL * 512 * 2 + (4096 + 2 * 512) + 2880 + 64;
  CHECK(po.attention == 24 * attn_layer);
  CHECK(po.router == 24LL * (32 * 2880 + 32));
  // MXFP4 experts (4.25 bits), everything else bf16.
  const double expected_bytes = 4.25 / 8 * double(po.routed_experts) +
                                2.0 * double(po.total() - po.routed_experts);
  CHECK(weight_bytes(oss) == doctest::Approx(expected_bytes).epsilon(1e-12));

  // Qwen3-235B: q width 64*128 = 8192 vs hidden 4096.
  CHECK(load_model("qwen3-235b-a22b").q_width() == 8192);
  // Qwen2-57B: shared expert 3*3584*20480 plus its 3584-wide gate, in all 28 layers.
  CHECK(count_params(load_model("qwen2-57b-a14b")).shared_experts == 28LL * (3 * 3584 * 20480 + 3584));
}

TEST_CASE("every shipped model round-trips through model_to_yaml") {
  const auto names = shipped_models();
  CHECK(names.size() >= 9);
  for (const auto& n : names) {
    INFO(n);
    const ModelSpec m = load_model(n);
    CHECK(m.name == n);
    CHECK_FALSE(m.source.empty());
    CHECK(static_cast<int>(m.layers.size()) == m.num_layers);
    const ModelSpec back = parse_model_yaml(model_to_yaml(m), n + " (rewritten)");
    check_same_model(m, back);
    CHECK(back.name == m.name);
    CHECK(back.source == m.source);
  }
}

TEST_CASE("layer patterns: first-k dense, every S from O, explicit lists, sliding layers") {
  const ModelSpec v3 = load_model("deepseek-v3");
  CHECK(v3.num_dense_layers() == 3);
  CHECK(v3.num_moe_layers() == 58);
  CHECK_FALSE(v3.layers[2].moe);
  CHECK(v3.layers[3].moe);

  const ModelSpec oss = load_model("gpt-oss-20b");
  CHECK(oss.layers[0].sliding);
  CHECK_FALSE(oss.layers[1].sliding);
  CHECK(oss.layers[22].sliding);

  std::string y = model_to_yaml(load_model("mixtral-8x7b"));
  const auto pos = y.find("num_dense_layers: 0");
  REQUIRE(pos != std::string::npos);
  y.replace(pos, 19, "moe_layers: every 2 from 1");
  y.replace(y.find("dense_intermediate_size: 0"), 26, "dense_intermediate_size: 14336");
  const ModelSpec inter = parse_model_yaml(y, "interleaved.yaml");
  CHECK(inter.num_moe_layers() == 16);
  CHECK_FALSE(inter.layers[0].moe);
  CHECK(inter.layers[1].moe);
  // Interleaved patterns are written back as "every 2 from 1" and read the same.
  check_same_model(inter, parse_model_yaml(model_to_yaml(inter), "again.yaml"));
  CHECK(model_to_yaml(inter).find("every 2 from 1") != std::string::npos);

  std::string y2 = y;
  y2.replace(y2.find("every 2 from 1"), 14, "[1, 5, 31]");
  const ModelSpec listed = parse_model_yaml(y2, "listed.yaml");
  CHECK(listed.num_moe_layers() == 3);
  CHECK(listed.layers[31].moe);
  check_same_model(listed, parse_model_yaml(model_to_yaml(listed), "again.yaml"));
}
