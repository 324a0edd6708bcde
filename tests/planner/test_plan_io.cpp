// Plan file: YAML round trip of a plan built here by hand, and validate_plan catching each
// tampered field with a message that names the key.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

using namespace mixserve;

namespace {

// A plan assembled field by field (no search, no cost model): Qwen3-235B-A22B on 2 x 8 GPUs,
// the MixServe hybrid attn TP8xDP2 / MoE TP8xEP2 with the fused schedules.
Plan hand_plan() {
  Plan p;
  p.provenance.tool = "mixserve-plan test";
  p.provenance.created = "2026-01-01T00:00:00Z";
  p.provenance.inputs = {{"model:qwen3-235b-a22b", std::string(64, 'a')}};
  p.model = load_model("qwen3-235b-a22b");
  p.cluster.name = "test-2x8";
  p.cluster.num_nodes = 2;
  p.cluster.gpus_per_node = 8;
  p.cluster.gpu_model = "H20";
  p.cluster.gpu_memory_GiB = 96;
  p.cluster.intra = {"nvlink4", 450, 2};
  p.cluster.inter = {"infiniband-ndr", 50, 5};
  p.cluster.nics_per_node = 8;
  p.cluster.profile = "h20-datasheet";
  p.workload = load_workload("sharegpt-paper");
  p.profile_name = "h20-datasheet";
  p.profile_source = "datasheet";
  p.cost_model = "mixserve";
  p.objective = "throughput";
  PlanCandidate& c = p.chosen;
  c.layout = Layout{8, 2, 8, 2, 1, MoeComm::fused};
  c.label = "chosen";
  c.rank = 1;
  c.limits.max_num_seqs = 16;
  c.limits.max_num_batched_tokens = 4096;
  c.limits.kv_blocks = 12345;
  c.limits.max_model_len = 4096;
  c.metrics = {123.25, 45.5, 45.5, 1000.125, 250.0625, 4};
  c.memory.weights = 29.5e9;
  c.memory.kv_cache = 50e9;
  c.memory.capacity = 96.0 * 1024 * 1024 * 1024;
  c.memory.kv_tokens = 197520;
  c.memory.fits = true;
  c.breakdown = {{"attn.core", "prefill", 1234.5, CostSource::roofline},
                 {"moe.dispatch", "decode", 0.1, CostSource::alpha_beta},
                 {"moe.experts", "decode", 77.0, CostSource::measured}};
  p.rank_map = build_rank_map(p.cluster, p.model, c.layout);
  PlanCandidate alt = c;
  alt.rank = 2;
  alt.label = "";
  alt.layout.moe_comm = MoeComm::rs_a2a_ag;
  alt.metrics.throughput_tok_s = 900;
  p.alternatives.push_back(alt);
  PlanCandidate base = c;
  base.rank = 0;
  base.label = "baseline: vllm-tp-pp";
  base.layout = Layout{8, 1, 8, 1, 2, MoeComm::tp_allreduce};
  base.metrics.ttft_ms = std::numeric_limits<double>::infinity();  // saturated at the rate
  p.alternatives.push_back(base);
  return p;
}

// Replaces the first occurrence of `from` at or after the first occurrence of `anchor`.
std::string tamper(std::string text, const std::string& anchor, const std::string& from,
                   const std::string& to) {
  const size_t a = text.find(anchor);
  REQUIRE_MESSAGE(a != std::string::npos, anchor);
  const size_t f = text.find(from, a);
  REQUIRE_MESSAGE(f != std::string::npos, from);
  return text.replace(f, from.size(), to);
}

// Parse and validate; returns the InputError's message ("" when it passed).
std::string problem(const std::string& text) {
  try {
    validate_plan(parse_plan_yaml(text, "plan.yaml"), "plan.yaml");
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("plan YAML round trip keeps every field") {
  const Plan p = hand_plan();
  CHECK_NOTHROW(validate_plan(p, "hand"));
  const std::string text = plan_to_yaml(p);
  const Plan q = parse_plan_yaml(text, "plan.yaml");
  CHECK_NOTHROW(validate_plan(q, "plan.yaml"));
  CHECK(q.version == 1);
  CHECK(q.provenance.tool == p.provenance.tool);
  CHECK(q.provenance.inputs == p.provenance.inputs);
  CHECK(q.model.name == "qwen3-235b-a22b");
  CHECK(q.model.hidden_size == p.model.hidden_size);
  CHECK(q.model.moe.num_experts == 128);
  CHECK(q.cluster.world_size() == 16);
  CHECK(q.cluster.inter.bandwidth_GBps == p.cluster.inter.bandwidth_GBps);
  CHECK(q.workload.name == p.workload.name);
  CHECK(q.profile_source == "datasheet");
  CHECK(q.chosen.layout == p.chosen.layout);
  CHECK(q.chosen.limits.kv_blocks == 12345);
  CHECK(q.chosen.limits.max_model_len == 4096);
  // Doubles are written in their shortest round-trip form: equal, not merely close.
  CHECK(q.chosen.metrics.ttft_ms == p.chosen.metrics.ttft_ms);
  CHECK(q.chosen.metrics.throughput_tok_s == p.chosen.metrics.throughput_tok_s);
  CHECK(q.chosen.memory.weights == p.chosen.memory.weights);
  CHECK(q.chosen.memory.kv_tokens == p.chosen.memory.kv_tokens);
  REQUIRE(q.chosen.breakdown.size() == 3);
  CHECK(q.chosen.breakdown[1].op == "moe.dispatch");
  CHECK(q.chosen.breakdown[1].time_us == 0.1);
  CHECK(q.chosen.breakdown[2].source == CostSource::measured);
  REQUIRE(q.rank_map.size() == 16);
  CHECK(q.rank_map[11].moe_ep_rank == 1);
  CHECK(q.rank_map[11].expert_begin == 64);
  REQUIRE(q.alternatives.size() == 2);
  CHECK(q.alternatives[0].layout.moe_comm == MoeComm::rs_a2a_ag);
  CHECK(q.alternatives[1].label == "baseline: vllm-tp-pp");
  CHECK(q.alternatives[1].layout.pp == 2);
  CHECK(std::isinf(q.alternatives[1].metrics.ttft_ms));
  // Writing what was read gives the same text (nothing lost, nothing invented).
  CHECK(plan_to_yaml(q) == text);
  // Which costs are measured and which estimated is stated.
  CHECK(text.find("measured: [moe.experts]") != std::string::npos);
}

TEST_CASE("validate_plan names each tampered key") {
  const std::string text = plan_to_yaml(hand_plan());
  REQUIRE(problem(text).empty());
  struct Case {
    const char* what;
    std::string text;
    const char* expect;
  };
  const Case cases[] = {
      {"rank map EP coordinate", tamper(text, "{rank: 3,", "moe_ep_rank: 0", "moe_ep_rank: 1"),
       "plan.yaml: key 'rank_map[3].moe_ep_rank': expected 0, got '1'"},
      {"rank map node", tamper(text, "{rank: 9,", "node: 1", "node: 0"),
       "key 'rank_map[9].node': expected 1, got '0'"},
      {"rank map experts", tamper(text, "{rank: 12,", "expert_begin: 64", "expert_begin: 0"),
       "key 'rank_map[12].expert_begin': expected 64"},
      {"rank map layers", tamper(text, "{rank: 0,", "layer_end: 94", "layer_end: 93"),
       "key 'rank_map[0].layer_end': expected 94"},
      {"rank map missing a rank", tamper(text, "{rank: 15,", "{rank: 15,", "{rank: 15, x: 1,"),
       "rank_map[15]"},
      {"non-power-of-two degree", tamper(text, "chosen:", "attn_tp: 8", "attn_tp: 6"),
       "key 'chosen.layout.attn_tp': expected a power of two"},
      {"degrees do not fold", tamper(text, "chosen:", "moe_ep: 2", "moe_ep: 4"),
       "key 'chosen.layout.moe_ep'"},
      {"world size", tamper(tamper(text, "chosen:", "attn_dp: 2", "attn_dp: 1"), "chosen:",
                             "moe_ep: 2", "moe_ep: 1"),
       "key 'chosen.layout"},
      {"comm does not match degrees", tamper(text, "chosen:", "moe_comm: fused", "moe_comm: allreduce"),
       "key 'chosen.layout.moe_comm'"},
      {"unknown comm", tamper(text, "chosen:", "moe_comm: fused", "moe_comm: ring"),
       "key 'chosen.layout.moe_comm': expected one of"},
      {"alternative layout", tamper(text, "alternatives:", "pp: 2", "pp: 4"),
       "key 'alternatives[1].layout.pp'"},
      {"objective", tamper(text, "objective:", "throughput", "fastest"), "key 'objective'"},
      {"version", tamper(text, "version:", "1", "2"), "key 'version': expected 1"},
      {"negative prediction", tamper(text, "chosen:", "ttft_ms: 123.25", "ttft_ms: -1"),
       "key 'chosen.predicted.ttft_ms'"},
      {"zero batch limit", tamper(text, "chosen:", "max_num_seqs: 16", "max_num_seqs: 0"),
       "key 'chosen.limits.max_num_seqs'"},
      {"does not fit", tamper(text, "chosen:", "fits: true", "fits: false"),
       "key 'chosen.memory.fits'"},
      {"truncated file", text.substr(0, text.size() / 3), "plan.yaml"},
      {"missing key", tamper(text, "rank_map:", "rank_map:", "rank_mapx:"), "rank_map"},
      {"malformed YAML", tamper(text, "chosen:", "layout: {", "layout: {{]"), "plan.yaml"},
  };
  for (const Case& c : cases) {
    const std::string what = c.what;
    CAPTURE(what);
    const std::string msg = problem(c.text);
    CAPTURE(msg);
    CHECK(msg.find(c.expect) != std::string::npos);
  }
}

TEST_CASE("validate_plan: the rank map must hold one entry per GPU") {
  Plan p = hand_plan();
  p.rank_map.pop_back();
  CHECK_THROWS_WITH_AS(validate_plan(p, "p.yaml"),
                       doctest::Contains("key 'rank_map': expected 16 entries"), InputError);
  p = hand_plan();
  p.rank_map[5].expert_end = 65;  // rank 5 now overlaps with rank 13's experts
  CHECK_THROWS_WITH_AS(validate_plan(p, "p.yaml"), doctest::Contains("rank_map[5].expert_end"),
                       InputError);
}
