#include <doctest/doctest.h>

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

using namespace mixserve;

namespace {
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Expects InputError whose message names the origin and the key.
template <class Fn>
void expect_input_error(Fn fn, const std::string& origin, const std::string& key) {
  try {
    fn();
    FAIL("no InputError for key " << key);
  } catch (const InputError& e) {
    INFO(std::string(e.what()));
    CHECK(contains(e.what(), origin));
    CHECK(contains(e.what(), key));
  }
}
}  // namespace

TEST_CASE("profile round-trips through YAML with every table filled") {
  HardwareProfile p;
  p.name = "h200";
  p.gpu = "H200";
  p.source = "measured";
  p.sm_count = 132;
  p.memory_GiB = 140.4;
  p.peak_tflops_bf16 = 812.25;
  p.peak_tflops_fp8 = 1503.5;
  p.peak_tflops_fp32 = 51.1;
  p.mem_bw_GBps = 4123.7;
  p.gemm_efficiency = 1.0;
  p.mem_efficiency = 1.0;
  p.kernel_launch_us = 2.7;
  p.graph_launch = {4.25, 5.5, 1.5, 64, 0, 0, "mixserve-profile gemv | H200 | 2026-11-29"};
  p.gemm = {{128, 7168, 2048, DType::bf16, 17.3}, {4096, 4096, 4096, DType::fp8_block, 0.1}};
  p.experts = {{32, 4096, 300, 30, 4096, 7168, DType::bf16, "zipf:1.2", 123.456}};
  p.elementwise = {{1e9, 260.5}};
  p.attention = {{"decode", "mla", 64, 1, 4096, 128, 1, 576, 88.0}};
  p.collectives = {{CollOp::fused_ag_dispatch, 16, 2, "rail:2x8", 1048576, 44.25},
                   {CollOp::all_reduce, 8, 1, "1x8", 1.0 / 3.0, 1e-3}};
  p.versions = {{"cuda", "12.8"}, {"nccl", "2.26.2"}};
  p.measured_on = "host-a 2026-11-29";
  p.notes = "collectives: 'quoted', with: colons";
  p.provenance = make_provenance("mixserve-profile", {{"args", "--quick"}});

  const std::string text = profile_to_yaml(p);
  const HardwareProfile q = parse_profile_yaml(text, "roundtrip.yaml");
  CHECK(q.name == p.name);
  CHECK(q.source == "measured");
  CHECK(q.sm_count == 132);
  CHECK(q.memory_GiB == p.memory_GiB);  // shortest round-trip formatting: exact
  CHECK(q.peak_tflops_fp32 == p.peak_tflops_fp32);
  CHECK(q.kernel_launch_us == p.kernel_launch_us);
  CHECK(q.graph_launch.alone_graph_us == 4.25);
  CHECK(q.graph_launch.alone_eager_us == 5.5);
  CHECK(q.graph_launch.chain_us == 1.5);
  CHECK(q.graph_launch.chain_kernels == 64);
  CHECK(q.graph_launch.measured_with == p.graph_launch.measured_with);
  CHECK(q.graph_launch.saving_us() == doctest::Approx(2.75));  // min(alone) - chain
  REQUIRE(q.gemm.size() == 2);
  CHECK(q.gemm[1].dtype == DType::fp8_block);
  CHECK(q.gemm[0].time_us == 17.3);
  REQUIRE(q.experts.size() == 1);
  CHECK(q.experts[0].distribution == "zipf:1.2");
  CHECK(q.experts[0].max_tokens == 300);
  CHECK(q.experts[0].time_us == 123.456);
  REQUIRE(q.collectives.size() == 2);
  CHECK(q.collectives[0].op == CollOp::fused_ag_dispatch);
  CHECK(q.collectives[0].group == "rail:2x8");
  CHECK(q.collectives[1].bytes == 1.0 / 3.0);
  REQUIRE(q.attention.size() == 1);
  CHECK(q.attention[0].head_dim == 576);
  CHECK(q.versions == p.versions);
  CHECK(q.notes == p.notes);
  CHECK(q.provenance.tool == p.provenance.tool);
  CHECK(q.provenance.inputs == p.provenance.inputs);
  // Writing the parsed profile again gives the same text.
  CHECK(profile_to_yaml(q) == text);
}

TEST_CASE("shipped datasheet profiles load and say they are datasheet estimates") {
  for (const char* name : {"h20-datasheet", "h100-datasheet", "h200-datasheet", "ascend910b-datasheet"}) {
    INFO(name);
    const HardwareProfile p = load_profile(name);
    CHECK(p.name == name);
    CHECK(p.is_datasheet());
    CHECK(p.gemm_efficiency < 1.0);
    CHECK(contains(p.notes, "stimate"));
    CHECK(p.gemm.empty());
  }
  const HardwareProfile h200 = load_profile("h200-datasheet");
  CHECK(h200.peak_tflops_bf16 == 989.5);
  CHECK(h200.mem_bw_GBps == 4800);
  CHECK(load_profile("h100-datasheet").mem_bw_GBps == 3350);
  CHECK(load_profile("h20-datasheet").peak_tflops_fp8 == 296);
}

TEST_CASE("profile readers reject bad input naming file and key") {
  const std::string good = profile_to_yaml(load_profile("h100-datasheet"));
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const auto pos = s.find(from);
    REQUIRE(pos != std::string::npos);
    s.replace(pos, from.size(), to);
    return s;
  };
  expect_input_error([&] { parse_profile_yaml(with("sm_count: 132", "sm_count: -4"), "p.yaml"); },
                     "p.yaml", "sm_count");
  expect_input_error([&] { parse_profile_yaml(with("sm_count: 132", "sm_count: many"), "p.yaml"); },
                     "p.yaml", "sm_count");
  expect_input_error([&] { parse_profile_yaml(with("bf16_tflops: 989.5", "bf16_tflops: 0"), "p.yaml"); },
                     "p.yaml", "peaks.bf16_tflops");
  expect_input_error([&] { parse_profile_yaml(with("source: datasheet", "source: guessed"), "p.yaml"); },
                     "p.yaml", "source");
  expect_input_error([&] { parse_profile_yaml(with("sm_count: 132", "sm_cout: 132"), "p.yaml"); },
                     "p.yaml", "sm_cout");
  expect_input_error([&] { parse_profile_yaml(with("gpu: H100\n", ""), "p.yaml"); }, "p.yaml", "gpu");
  expect_input_error(
      [&] { parse_profile_yaml(with("  gemm:\n    []", "  gemm: [{m: 1, n: 2, k: 3, dtype: int3, time_us: 1}]"), "p.yaml"); },
      "p.yaml", "tables.gemm[0].dtype");
  expect_input_error([&] { parse_profile_yaml(good.substr(0, good.find("peaks:")) + "peaks: {bf16_tflops: 98", "cut.yaml"); },
                     "cut.yaml", "line");
  expect_input_error([&] { load_profile("no-such-profile"); }, "no-such-profile", "h200-datasheet");
}

TEST_CASE("profile host_overhead: optional, round-trips, and bad values name the key") {
  HardwareProfile p = load_profile("h200");
  p.host_overhead = {};  // the shipped profile has one (measured): start from none
  const std::string before = profile_to_yaml(p);
  CHECK(before.find("host_overhead") == std::string::npos);  // absent: not written
  CHECK(parse_profile_yaml(before, "h200.yaml").host_overhead.step_us == 0);
  p.host_overhead.step_us = 812.5;
  p.host_overhead.steps = 3021;
  p.host_overhead.measured_with = "mixserve-run bench --plan p.yaml --workload w | NVIDIA H200 | 2026-11-29";
  const std::string text = profile_to_yaml(p);
  const HardwareProfile q = parse_profile_yaml(text, "with.yaml");
  CHECK(q.host_overhead.step_us == 812.5);
  CHECK(q.host_overhead.steps == 3021);
  CHECK(q.host_overhead.measured_with == p.host_overhead.measured_with);
  CHECK(profile_to_yaml(q) == text);
  const std::string head = "version: 1\nname: x\ngpu: H200\nsource: measured\nsm_count: 132\nmemory_GiB: 140\n"
                           "peaks: {bf16_tflops: 800, fp8_tflops: 1500, fp32_tflops: 50, mem_bw_GBps: 4000}\n"
                           "efficiency: {gemm: 1, memory: 1}\n";
  CHECK(parse_profile_yaml(head, "x.yaml").host_overhead.step_us == 0);
  expect_input_error([&] { parse_profile_yaml(head + "host_overhead: {step_us: -1, steps: 3, measured_with: a}\n", "x.yaml"); },
                     "x.yaml", "step_us");
  expect_input_error([&] { parse_profile_yaml(head + "host_overhead: {step_us: 5, steps: 0, measured_with: a}\n", "x.yaml"); },
                     "x.yaml", "steps");
  expect_input_error([&] { parse_profile_yaml(head + "host_overhead: {step_us: 5, steps: 3}\n", "x.yaml"); }, "x.yaml",
                     "measured_with");
  expect_input_error(
      [&] { parse_profile_yaml(head + "host_overhead: {step_us: 5, steps: 3, measured_with: a, per: 1}\n", "x.yaml"); },
      "x.yaml", "per");
}

TEST_CASE("profile graph_launch: optional, no saving when absent, bad values name the key") {
  HardwareProfile p = load_profile("h200");
  p.graph_launch = {};
  const std::string before = profile_to_yaml(p);
  CHECK(before.find("graph_launch") == std::string::npos);
  CHECK(parse_profile_yaml(before, "h200.yaml").graph_launch.saving_us() == 0);
  // A chain slower than the kernel alone saves nothing (never a negative saving).
  p.graph_launch = {2.0, 3.0, 2.5, 32, 0, 0, "m"};
  CHECK(p.graph_launch.saving_us() == 0);
  p.graph_launch = {4.0, 3.0, 1.0, 32, 0, 0, "m"};
  CHECK(p.graph_launch.saving_us() == doctest::Approx(2.0));  // the smaller of the two alone times
  // The norm+GEMV pairs are recorded (mixed_saving_us) but do not change the saving.
  p.graph_launch = {4.0, 3.0, 1.0, 32, 9.0, 4.5, "m"};
  CHECK(p.graph_launch.saving_us() == doctest::Approx(2.0));
  CHECK(p.graph_launch.mixed_saving_us() == doctest::Approx((3.0 + 9.0) / 2 - 4.5));
  const HardwareProfile q = parse_profile_yaml(profile_to_yaml(p), "pairs.yaml");
  CHECK(q.graph_launch.alone_gemv_us == 9.0);
  CHECK(q.graph_launch.mixed_chain_us == 4.5);
  const std::string head = "version: 1\nname: x\ngpu: H200\nsource: measured\nsm_count: 132\nmemory_GiB: 140\n"
                           "peaks: {bf16_tflops: 800, fp8_tflops: 1500, fp32_tflops: 50, mem_bw_GBps: 4000}\n"
                           "efficiency: {gemm: 1, memory: 1}\n";
  expect_input_error(
      [&] {
        parse_profile_yaml(head + "graph_launch: {alone_graph_us: 4, alone_eager_us: 5, chain_us: 0, chain_kernels: 64, "
                                  "measured_with: a}\n",
                           "x.yaml");
      },
      "x.yaml", "chain_us");
  expect_input_error(
      [&] {
        parse_profile_yaml(head + "graph_launch: {alone_graph_us: 4, alone_eager_us: 5, chain_us: 1, chain_kernels: 0, "
                                  "measured_with: a}\n",
                           "x.yaml");
      },
      "x.yaml", "chain_kernels");
}

TEST_CASE("profile fused_decode_layer: optional, round-trips, and bad values name the key") {
  HardwareProfile p = load_profile("h200");
  p.fused_decode_layer = {};
  const std::string before = profile_to_yaml(p);
  CHECK(before.find("fused_decode_layer") == std::string::npos);  // absent: not written
  CHECK(parse_profile_yaml(before, "h200.yaml").fused_decode_layer.points.empty());
  p.fused_decode_layer.measured_with = "mixserve-profile fused-layer --plan one.yaml | NVIDIA H200 | 2026-11-29";
  p.fused_decode_layer.points = {{2048, 32, 4, 128, 768, 128, 8, 1039, 48.25}, {2048, 32, 4, 128, 768, 128, 8, 271, 47.5}};
  const std::string text = profile_to_yaml(p);
  const HardwareProfile q = parse_profile_yaml(text, "with.yaml");
  REQUIRE(q.fused_decode_layer.points.size() == 2);
  CHECK(q.fused_decode_layer.points[0].context == 1039);
  CHECK(q.fused_decode_layer.points[0].top_k == 8);
  CHECK(q.fused_decode_layer.points[1].time_us == 47.5);
  CHECK(q.fused_decode_layer.measured_with == p.fused_decode_layer.measured_with);
  CHECK(profile_to_yaml(q) == text);
  const std::string head = "version: 1\nname: x\ngpu: H200\nsource: measured\nsm_count: 132\nmemory_GiB: 140\n"
                           "peaks: {bf16_tflops: 800, fp8_tflops: 1500, fp32_tflops: 50, mem_bw_GBps: 4000}\n"
                           "efficiency: {gemm: 1, memory: 1}\n";
  const std::string row = "{hidden: 64, q_heads: 4, kv_heads: 2, head_dim: 64, inter: 32, experts: 8, top_k: 2, ";
  expect_input_error([&] { parse_profile_yaml(head + "fused_decode_layer: {measured_with: a, points: [" + row +
                                                  "context: 100, time_us: 0}]}\n", "x.yaml"); },
                     "x.yaml", "time_us");
  expect_input_error([&] { parse_profile_yaml(head + "fused_decode_layer: {measured_with: a, points: [" + row +
                                                  "time_us: 5}]}\n", "x.yaml"); },
                     "x.yaml", "context");
  expect_input_error([&] { parse_profile_yaml(head + "fused_decode_layer: {measured_with: a, points: [" + row +
                                                  "context: 100, time_us: 5}, " + row + "context: 100, time_us: 6}]}\n",
                                              "x.yaml"); },
                     "x.yaml", "context");
  expect_input_error([&] { parse_profile_yaml(head + "fused_decode_layer: {measured_with: a, points: []}\n", "x.yaml"); },
                     "x.yaml", "points");
  expect_input_error([&] { parse_profile_yaml(head + "fused_decode_layer: {points: [" + row +
                                                  "context: 100, time_us: 5}]}\n", "x.yaml"); },
                     "x.yaml", "measured_with");
}
