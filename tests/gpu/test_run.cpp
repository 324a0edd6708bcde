// mixserve-run bench (executor/bench.hpp) through the library entry point, on a small Qwen3-MoE
// (head_dim 64, three layers, eight experts): the greedy decode tokens are the same in two runs,
// every step has a positive measured and predicted latency, the JSON carries bench_one_batch's
// keys and the per-step predictions; a plan of two GPUs (without --emulate-ranks), a plan for
// another GPU model and a model outside the GPU forward's family are rejected with InputError
// before any device work; with emulate_ranks a TP2 and a DP2 x EP2 plan run as logical ranks. The step
// batches the cost model is given are checked against the chunking rule by counting.
// Online mode (executor/online.hpp) on the same model: Poisson arrivals at a high rate, every
// request completes exactly once with the workload's token counts, the metrics keys are there,
// every step is measured and predicted; with all requests at t = 0 (burst) the schedule does not
// depend on timing, so it must equal the serving simulator's step for step (same scheduler), and
// two runs give the same tokens; a small KV cache forces preemptions by recompute. Online with a
// TP2 and a DP2 x EP2 plan as emulated ranks (one scheduler per attention-DP replica): every
// request completes, routed round-robin, and its greedy tokens are the float64 reference's where
// the reference's choice is clear, as are the single-GPU run's.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/online.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/safetensors.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/workload_gen.hpp"
#include "forward_ties.hpp"

using namespace mixserve;

namespace {

ModelSpec small_qwen3(int head_dim = 64) {  // the configuration of test_forward.cpp
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": )" +
                              std::to_string(head_dim) + R"(,
    "vocab_size": 96, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "mlp_only_layers": [0],
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
    "max_position_embeddings": 4096})",
                          "small-qwen3/config.json");
}

// The GPU model word of this device's name ("NVIDIA H200" -> "H200").
std::string device_gpu_model() {
  const std::string name = gpu::query_device(0).name;
  return name.substr(name.find_last_of(' ') + 1);
}

// A plan that passes validate_plan: `gpus` GPUs of one node, attention and MoE TP over them.
Plan make_plan(const ModelSpec& m, int gpus, const std::string& gpu_model) {
  Plan p;
  p.model = m;
  p.cluster.name = "test-1x" + std::to_string(gpus);
  p.cluster.gpus_per_node = gpus;
  p.cluster.gpu_model = gpu_model;
  p.cluster.gpu_memory_GiB = 140.4;
  p.cluster.intra = {"nvlink4", 450, 2};
  p.cluster.profile = "h200";
  p.objective = "throughput";
  p.cost_model = "mixserve";
  p.profile_name = "h200";
  p.profile_source = "measured";
  p.chosen.layout.attn_tp = gpus;
  p.chosen.layout.moe_tp = gpus;
  p.chosen.memory.fits = true;
  p.chosen.limits.max_num_seqs = 16;
  p.chosen.limits.max_num_batched_tokens = 32;  // 3 x 20 prompt tokens: two chunks, one prompt split
  p.rank_map = build_rank_map(p.cluster, p.model, p.chosen.layout);
  return p;
}

gpu::BenchConfig small_config() {
  gpu::BenchConfig c;
  c.batch = 3;
  c.input_len = 20;
  c.output_len = 6;
  c.seed = 5;
  c.warmup = 1;
  return c;
}

}  // namespace

TEST_CASE("run bench: step batches follow the plan's chunk size (no device work)") {
  const auto c = small_config();
  const auto b = gpu::bench_step_batches(c, 32);
  REQUIRE(b.size() == 2 + 5);  // 60 prompt tokens in chunks of 32, then output_len - 1 decodes
  CHECK(b[0].prefill_tokens == 32);
  CHECK(b[0].num_prefill_seqs == 2);  // 20 + the first 12 of the second prompt
  CHECK(b[1].prefill_tokens == 28);
  CHECK(b[1].num_prefill_seqs == 2);
  // Second prompt: 12 tokens from 0 (12 * 6.5 pairs) in chunk 0, 8 tokens from 12 in chunk 1.
  CHECK(b[0].prefill_attn_pairs == doctest::Approx(20 * 10.5 + 12 * 6.5));
  CHECK(b[1].prefill_attn_pairs == doctest::Approx(8 * (12 + 4.5) + 20 * 10.5));
  for (int d = 0; d < 5; ++d) {
    CHECK(b[2 + d].num_decode == 3);
    CHECK(b[2 + d].prefill_tokens == 0);
    CHECK(b[2 + d].decode_context == 3 * (20 + d + 1));  // the new token attends to itself
  }
}

TEST_CASE("run bench: small Qwen3-MoE, deterministic greedy tokens, timed and predicted steps, JSON keys") {
  const Plan plan = make_plan(small_qwen3(), 1, device_gpu_model());
  const auto c = small_config();
  const gpu::BenchResult a = gpu::run_bench(plan, "test-plan", c);
  const gpu::BenchResult b = gpu::run_bench(plan, "test-plan", c);
  REQUIRE(a.output_ids.size() == 3);
  for (std::size_t s = 0; s < a.output_ids.size(); ++s) {
    INFO("sequence " << s);
    REQUIRE(a.output_ids[s].size() == std::size_t(c.output_len));
    CHECK(a.output_ids[s] == b.output_ids[s]);
    for (int t : a.output_ids[s]) CHECK((t >= 0 && t < 96));
  }
  REQUIRE(a.steps.size() == 7);
  int graphs = 0;
  for (const auto& s : a.steps) {
    INFO(s.kind << " " << s.index);
    CHECK(s.measured_ms > 0.0);
    CHECK(s.predicted_ms > 0.0);
    graphs += s.cuda_graph;
  }
  CHECK(graphs == 5);  // every decode step replays a graph (3 x top-2 rows: the GEMV path)
  CHECK(a.prefill_latency > 0.0);
  CHECK(a.median_decode_latency > 0.0);
  CHECK(a.total_latency >= a.prefill_latency);

  const auto j = gpu::bench_json(a);
  for (const char* k : {"prefill_latency", "prefill_throughput", "median_decode_latency", "median_decode_throughput",
                        "total_latency", "overall_throughput", "batch_size", "input_len", "output_len", "steps",
                        "prefill_latencies_ms", "decode_latencies_ms", "median_prefill_error_pct",
                        "median_decode_error_pct", "plan", "device", "versions", "prediction", "memory_estimate_bytes"}) {
    INFO("key " << k);
    CHECK(j.contains(k));
  }
  REQUIRE(j["steps"].size() == 7);
  for (const char* k : {"kind", "measured_ms", "predicted_ms", "error_pct", "batch", "cuda_graph"})
    CHECK(j["steps"][0].contains(k));
  CHECK(j["decode_latencies_ms"].size() == 5);
  const std::string report = gpu::format_bench_report(a);
  for (const char* k : {"Prefill. latency:", "Decode.  median latency:", "Total. latency:", "predicted(ms)",
                        "median error"}) {
    INFO("report line " << k);
    CHECK(report.find(k) != std::string::npos);
  }

  // Eager decode gives the same tokens as the graph replays.
  auto eager = c;
  eager.cuda_graph = false;
  const gpu::BenchResult e = gpu::run_bench(plan, "test-plan", eager);
  CHECK(e.output_ids == a.output_ids);
}

TEST_CASE("run bench --fused-decode-layer: batch-1 decode steps through the fused layer, labelled, one GPU only") {
  const Plan plan = make_plan(small_qwen3(), 1, device_gpu_model());
  auto c = small_config();
  c.batch = 1;
  const gpu::BenchResult a = gpu::run_bench(plan, "test-plan", c);
  auto f = c;
  f.fused_decode_layer = true;
  const gpu::BenchResult b = gpu::run_bench(plan, "test-plan", f);
  REQUIRE(b.output_ids.size() == 1);
  REQUIRE(b.output_ids[0].size() == std::size_t(c.output_len));
  for (int t : b.output_ids[0]) CHECK((t >= 0 && t < 96));
  // The fused layer sums in another order, so a near-tie may pick another token: reported, not checked.
  MESSAGE("greedy tokens equal to the unfused run's: " << std::string(b.output_ids == a.output_ids ? "yes" : "no"));
  for (const auto& s : b.steps) CHECK(s.measured_ms > 0.0);
  const std::string report = gpu::format_bench_report(b);
  CHECK(report.find("# --fused-decode-layer: the decode steps run the MoE layers it supports") != std::string::npos);
  CHECK(gpu::format_bench_report(a).find("--fused-decode-layer") == std::string::npos);
  CHECK(gpu::bench_json(b)["args"]["fused_decode_layer"].get<bool>());
  CHECK(a.fused_layers_run == 0);
  CHECK(b.fused_layers_run > 0);
  // The plan's profile has no fused_decode_layer point of this shape: the unfused prediction, said.
  CHECK_FALSE(b.fused_predicted);
  CHECK(report.find("the profile has no fused_decode_layer point of this layer shape") != std::string::npos);
  CHECK_FALSE(gpu::bench_json(b)["prediction"]["fused_decode_layer"].get<bool>());
  // With points of the shape (an invented 1000 us a layer, two contexts around the run's): the
  // decode steps' prediction is the MoE layers' points plus the rest of the step.
  HardwareProfile prof = load_profile(b.profile_name);
  FusedLayerPoint lo = sim::fused_layer_shape(b.model), hi = lo;
  lo.context = 1, lo.time_us = 1000;
  hi.context = 100, hi.time_us = 1000;
  prof.fused_decode_layer = {{lo, hi}, "test_gpu_run (invented points)"};
  const auto path = std::filesystem::temp_directory_path() / "mixserve-test-run-fused-profile.yaml";
  write_file_atomic(path, profile_to_yaml(prof));
  auto fp = f;
  fp.profile = path.string();
  const gpu::BenchResult bp = gpu::run_bench(plan, "test-plan", fp);
  std::filesystem::remove(path);
  CHECK(bp.fused_predicted);
  CHECK(gpu::format_bench_report(bp).find("the prediction takes their time from the profile's fused_decode_layer") !=
        std::string::npos);
  CHECK(gpu::bench_json(bp)["prediction"]["fused_decode_layer"].get<bool>());
  const int moe_layers = bp.model.num_moe_layers();
  REQUIRE(moe_layers > 0);
  int decodes = 0;
  for (std::size_t i = 0; i < bp.steps.size(); ++i) {
    if (bp.steps[i].kind != "decode") continue;
    ++decodes;
    CHECK(bp.steps[i].predicted_ms >= moe_layers * 1.0);  // moe_layers x 1000 us and the rest
    CHECK(bp.steps[i].predicted_ms < b.steps[i].predicted_ms + moe_layers * 1.0);
  }
  CHECK(decodes == c.output_len - 1);
  // Batch > 1: accepted, said unused.
  auto f3 = small_config();
  f3.fused_decode_layer = true;
  CHECK(gpu::format_bench_report(gpu::run_bench(plan, "test-plan", f3)).find("--fused-decode-layer: not used") !=
        std::string::npos);
  // Not with the multi-GPU launches.
  auto e = f;
  e.emulate_ranks = true;
  CHECK_THROWS_AS((void)gpu::run_bench(make_plan(small_qwen3(), 2, device_gpu_model()), "test-plan", e), InputError);
}

TEST_CASE("run bench: a plan of two GPUs, another GPU model, an unsupported model raise InputError") {
  const auto c = small_config();
  auto message = [&](const Plan& p) -> std::string {
    try {
      (void)gpu::run_bench(p, "test-plan", c);
    } catch (const InputError& e) {
      return e.what();
    }
    return "no InputError";
  };
  const std::string dev = device_gpu_model();
  const std::string multi = message(make_plan(small_qwen3(), 2, dev));
  INFO(multi);
  CHECK(multi.find("--emulate-ranks") != std::string::npos);
  CHECK(multi.find("2 GPUs") != std::string::npos);

  const std::string other = dev == "H20" ? "MI300X" : "H20";  // "H20" is not the word "H200"
  const std::string wrong = message(make_plan(small_qwen3(), 1, other));
  INFO(wrong);
  CHECK(wrong.find("'" + other + "'") != std::string::npos);
  CHECK(wrong.find(gpu::query_device(0).name) != std::string::npos);

  const std::string hd = message(make_plan(small_qwen3(32), 1, dev));
  INFO(hd);
  CHECK(hd.find("head_dim 32") != std::string::npos);
  CHECK(hd.find("Qwen3MoeForCausalLM") != std::string::npos);
  CHECK(hd.find("supported") != std::string::npos);

  auto too_many = c;
  too_many.batch = 17;  // the plan's max_num_seqs is 16
  CHECK_THROWS_AS((void)gpu::run_bench(make_plan(small_qwen3(), 1, dev), "test-plan", too_many), InputError);
  auto bad_weights = c;
  bad_weights.weights_dir = "/nonexistent/weights";
  CHECK_THROWS_AS((void)gpu::run_bench(make_plan(small_qwen3(), 1, dev), "test-plan", bad_weights), InputError);
}

namespace {

// Online: the plan's workload, 12 requests of 5-40 prompt and 1-8 output tokens; 4 sequences and
// 32 tokens per step, so prompts are chunked and requests queue.
Plan online_plan(ArrivalKind arrival) {
  Plan p = make_plan(small_qwen3(), 1, device_gpu_model());
  p.chosen.limits.max_num_seqs = 4;
  p.chosen.limits.max_num_batched_tokens = 32;
  WorkloadSpec& w = p.workload;
  w.name = "test-online";
  w.arrival = arrival;
  w.rate = 2000;  // req/s: the 12 arrive within a few ms, while the first steps run
  w.input.kind = LengthKind::uniform;
  w.input.min = 5;
  w.input.max = 40;
  w.output.kind = LengthKind::uniform;
  w.output.min = 1;
  w.output.max = 8;
  w.num_requests = 12;
  w.seed = 11;
  return p;
}

gpu::OnlineConfig online_config() {
  gpu::OnlineConfig c;
  c.progress_every_s = 0;
  return c;
}

}  // namespace

TEST_CASE("run bench online: Poisson arrivals, every request once, token counts, metrics keys, steps") {
  const Plan plan = online_plan(ArrivalKind::poisson);
  const gpu::OnlineResult r = gpu::run_online(plan, "test-plan", online_config());
  const sim::RequestStream want = sim::generate_requests(plan.workload);  // the simulator's draw
  REQUIRE(r.setup.requests.requests.size() == 12);
  REQUIRE(r.result.requests.size() == 12);
  REQUIRE(r.output_ids.size() == 12);
  int64_t out_tokens = 0, in_tokens = 0, step_tokens = 0;
  for (size_t i = 0; i < 12; ++i) {
    INFO("request " << i);
    const auto& q = r.result.requests[i];
    CHECK(q.input_tokens == want.requests[i].input_tokens);
    CHECK(q.output_tokens == want.requests[i].output_tokens);
    CHECK(q.arrival_s == want.requests[i].arrival_s);
    CHECK(q.first_token_s > q.arrival_s);
    CHECK(q.finish_s >= q.first_token_s);
    CHECK(r.output_ids[i].size() == size_t(q.output_tokens));  // each token produced exactly once
    for (int t : r.output_ids[i]) CHECK((t >= 0 && t < 96));
    out_tokens += q.output_tokens;
    in_tokens += q.input_tokens;
  }
  const auto& m = r.result.metrics;
  CHECK(m.completed == 12);
  CHECK(m.total_output_tokens == out_tokens);
  CHECK(m.total_input_tokens == in_tokens);
  CHECK(m.num_steps == int64_t(r.steps.size()));
  for (const auto& s : r.steps) {
    CHECK(s.measured_ms > 0.0);
    CHECK(s.predicted_ms > 0.0);
    CHECK(s.num_tokens <= 32);
    CHECK(s.num_prefill_seqs + s.num_decode <= 4);
    step_tokens += s.num_tokens;
  }
  // Every prompt token and every output token but the last goes through the model once (plus
  // recomputed ones after a preemption).
  if (m.num_preemptions == 0) CHECK(step_tokens == in_tokens + out_tokens - 12);

  const auto j = gpu::online_json(r);
  for (const char* k : {"completed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
                        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                        "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
                        "median_e2el_ms", "p99_e2el_ms", "request_goodput", "requests", "steps", "serving_config",
                        "step_error_pct", "output_ids", "plan", "device", "versions", "prediction", "mode"}) {
    INFO("key " << k);
    CHECK(j.contains(k));
  }
  CHECK(j["mode"] == "online");
  CHECK(j["plan"].contains("sha256"));
  CHECK(j["requests"].size() == 12);
  for (const char* k : {"measured_ms", "predicted_ms", "error_pct", "batch", "num_decode", "num_prefill_seqs"})
    CHECK(j["steps"][0].contains(k));
  const std::string report = gpu::format_online_report(r);
  for (const char* k : {"Serving Benchmark Result (measured)", "Mean TTFT (ms):", "P99 ITL (ms):",
                        "Request throughput (req/s):", "step error"}) {
    INFO("report line " << k);
    CHECK(report.find(k) != std::string::npos);
  }
}

TEST_CASE("run bench online: burst arrivals follow the simulator's schedule step for step; preemption") {
  for (const int64_t kv_blocks : {int64_t(0), int64_t(6)}) {
    INFO("kv_blocks " << kv_blocks);
    const Plan plan = online_plan(ArrivalKind::burst);
    auto c = online_config();
    c.kv_blocks = kv_blocks;  // 6 blocks of 16 tokens for up to 4 sequences of up to 48: preemptions
    const gpu::OnlineResult a = gpu::run_online(plan, "test-plan", c);
    const gpu::OnlineResult b = gpu::run_online(plan, "test-plan", c);
    CHECK(a.output_ids == b.output_ids);
    for (size_t i = 0; i < a.output_ids.size(); ++i)
      CHECK(a.output_ids[i].size() == size_t(a.result.requests[i].output_tokens));
    // The serving simulator on the same requests and engine config forms the same steps.
    sim::ServingConfig cfg = a.setup.serving;
    cfg.record_steps = true;
    const auto cm = sim::make_cost_model("mixserve", a.setup.model, plan.cluster, load_profile("h200"),
                                         plan.chosen.layout, sim::CostModelOptions{});
    const sim::SimResult s = sim::simulate(*cm, cfg, a.setup.requests);
    REQUIRE(s.steps.size() == a.steps.size());
    for (size_t k = 0; k < s.steps.size(); ++k) {
      INFO("step " << k);
      const auto& x = s.steps[k].batches[0];
      const auto& y = a.steps[k].batch;
      CHECK(x.prefill_tokens == y.prefill_tokens);
      CHECK(x.num_prefill_seqs == y.num_prefill_seqs);
      CHECK(x.num_decode == y.num_decode);
      CHECK(x.decode_context == y.decode_context);
      CHECK(x.prefill_attn_pairs == y.prefill_attn_pairs);
    }
    CHECK(s.metrics.num_preemptions == a.result.metrics.num_preemptions);
    if (kv_blocks > 0) CHECK(a.result.metrics.num_preemptions > 0);
    else CHECK(a.result.metrics.num_preemptions == 0);
  }
}

TEST_CASE("run bench online: decode steps as CUDA graphs give the eager run's tokens; host phases") {
  const Plan plan = online_plan(ArrivalKind::burst);  // schedule independent of timing
  auto c = online_config();
  c.cuda_graph = false;
  const gpu::OnlineResult eager = gpu::run_online(plan, "test-plan", c);
  c.cuda_graph = true;
  const gpu::OnlineResult graphed = gpu::run_online(plan, "test-plan", c);
  CHECK(graphed.output_ids == eager.output_ids);
  REQUIRE(graphed.steps.size() == eager.steps.size());
  int64_t graphs = 0;
  for (size_t k = 0; k < graphed.steps.size(); ++k) {
    INFO("step " << k);
    const auto& s = graphed.steps[k];
    CHECK(!eager.steps[k].cuda_graph);
    if (s.cuda_graph) CHECK(s.num_prefill_seqs == 0);  // decode-only steps only
    graphs += s.cuda_graph ? 1 : 0;
    CHECK(s.host.wait_ms >= 0.0);
    CHECK(s.host.total() >= s.host.wait_ms);
    CHECK(s.wall_ms > 0.0);
  }
  // Graphs exactly where a decode-only step's token count ran eagerly before (the eager run has
  // the same schedule: burst arrivals).
  std::vector<int64_t> seen;
  int64_t expected = 0;
  for (size_t k = 0; k < eager.steps.size(); ++k) {
    const auto& s = eager.steps[k];
    const bool again = s.num_prefill_seqs == 0 && std::find(seen.begin(), seen.end(), s.num_tokens) != seen.end();
    if (s.num_prefill_seqs == 0 && !again) seen.push_back(s.num_tokens);
    CHECK(graphed.steps[k].cuda_graph == again);
    expected += again ? 1 : 0;
  }
  CHECK(graphs == expected);
  const auto j = gpu::online_json(graphed);
  REQUIRE(j.contains("host_phases_ms"));
  for (const char* k : {"schedule", "prepare", "enqueue", "wait", "sample", "bookkeep", "total", "overhead"})
    CHECK(j["host_phases_ms"].contains(k));
  for (const char* k : {"host_ms", "cuda_graph", "wall_ms"}) CHECK(j["steps"][0].contains(k));
  CHECK(j["prediction"].contains("host_overhead_ms"));
  const std::string report = gpu::format_online_report(graphed);
  CHECK(report.find("host overhead") != std::string::npos);

  // 4 requests of 5 prompt tokens and 8 output tokens at once: one prefill step of 20 tokens, then
  // 7 decode steps of 4 sequences, the first eager and 6 as graphs; same tokens as eager.
  Plan fixed = plan;
  fixed.workload.num_requests = 4;
  fixed.workload.input = LengthDist{};
  fixed.workload.input.value = 5;
  fixed.workload.output = LengthDist{};
  fixed.workload.output.value = 8;
  c.cuda_graph = false;
  const gpu::OnlineResult fe = gpu::run_online(fixed, "test-plan", c);
  c.cuda_graph = true;
  const gpu::OnlineResult fg = gpu::run_online(fixed, "test-plan", c);
  REQUIRE(fg.steps.size() == 8);
  CHECK(fg.output_ids == fe.output_ids);
  int64_t fixed_graphs = 0;
  for (const auto& s : fg.steps) fixed_graphs += s.cuda_graph ? 1 : 0;
  CHECK(fixed_graphs == 6);
}

TEST_CASE("run bench online: closed-loop workloads and a KV cache too small for a request are InputError") {
  Plan plan = online_plan(ArrivalKind::closed_loop);
  plan.workload.concurrency = 2;
  CHECK_THROWS_AS((void)gpu::run_online(plan, "test-plan", online_config()), InputError);
  auto c = online_config();
  c.kv_blocks = 1;  // 16 tokens: the longest request needs more
  CHECK_THROWS_AS((void)gpu::run_online(online_plan(ArrivalKind::poisson), "test-plan", c), InputError);
}
TEST_CASE("run bench --emulate-ranks: two-GPU plans (TP2; DP2 x EP2) run as logical ranks on this GPU") {
  auto c = small_config();
  c.emulate_ranks = true;
  Plan tp = make_plan(small_qwen3(), 2, device_gpu_model());
  Plan dp = tp;
  dp.chosen.layout = Layout{};
  dp.chosen.layout.attn_dp = 2;
  dp.chosen.layout.moe_ep = 2;
  dp.chosen.layout.moe_comm = MoeComm::nccl_a2a;
  dp.rank_map = build_rank_map(dp.cluster, dp.model, dp.chosen.layout);
  for (const Plan* p : {&tp, &dp}) {
    INFO(p->chosen.layout.name());
    const gpu::BenchResult a = gpu::run_bench(*p, "test-plan", c);
    CHECK(a.ranks == 2);
    REQUIRE(a.output_ids.size() == 3);
    for (const auto& ids : a.output_ids) {
      CHECK(ids.size() == 6);
      for (int32_t id : ids) CHECK((id >= 0 && id < 96));
    }
    REQUIRE(a.steps.size() == 7);
    for (const auto& s : a.steps) {
      CHECK(s.measured_ms > 0);
      CHECK(s.predicted_ms > 0);
      CHECK_FALSE(s.cuda_graph);
    }
    const auto j = gpu::bench_json(a);
    CHECK(j["ranks"] == 2);
    CHECK(j["emulated_ranks"] == true);
    // The ranks' sums run in a fixed order: a second run gives the same greedy tokens.
    const gpu::BenchResult b = gpu::run_bench(*p, "test-plan", c);
    CHECK(b.output_ids == a.output_ids);
  }
}

namespace {

// The weights of small_qwen3() as a safetensors file, so that a single-GPU run and a run of
// sharded ranks hold the same model (device-drawn weights are drawn per shard).
std::string write_small_weights(const model::WeightSet& w) {
  const auto path = std::filesystem::temp_directory_path() / "mixserve-test-run-online-ranks.safetensors";
  std::vector<model::StTensorData> all;
  for (const auto& t : w.tensors()) {
    model::StTensorData d{t.name, model::StDType::bf16, t.shape, std::vector<uint8_t>(t.bf16.size() * 2)};
    std::memcpy(d.bytes.data(), t.bf16.data(), d.bytes.size());
    all.push_back(std::move(d));
  }
  model::write_safetensors(path, all, {{"format", "pt"}});
  return path.string();
}

struct GreedyCheck {
  int64_t positions = 0, clear = 0, agree = 0, ties = 0;
};

// Every request's greedy tokens against the float64 reference, teacher-forced on the run's own
// tokens: at each generated position the reference's top-1 must be the run's token where its gap
// to the second is clear (> kGapOfRms x the logits row's RMS: twice the distributed forward's
// logits tolerance of docs/distributed.md, (layers + 0.5) x 2e-2 relative L2) and no MoE layer
// routed that row near a tie (forward_ties.hpp: the GPU may legitimately pick another expert).
constexpr double kGapOfRms = 0.15;
GreedyCheck check_greedy(const model::WeightSet& w, const gpu::OnlineResult& r) {
  const auto prompts = gpu::online_prompts(r.setup);
  const int64_t V = w.spec().vocab_size;
  GreedyCheck c;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& out = r.output_ids[i];
    model::SequenceStep q;
    q.tokens = prompts[i];
    q.tokens.insert(q.tokens.end(), out.begin(), out.end() - 1);  // the last token is never fed
    q.position = 0;
    const int64_t n = int64_t(q.tokens.size());
    for (int64_t b = 0; b < (n + 15) / 16; ++b) q.block_table.push_back(int32_t(b));
    model::ReferenceModel ref(w, model::KVCacheConfig{16, int((n + 15) / 16)});
    const model::StepOutput o = ref.step({q});
    const auto tie = test::near_ties(w, o);
    for (size_t g = 0; g < out.size(); ++g) {
      const int64_t row = int64_t(prompts[i].size()) - 1 + int64_t(g);
      const double* l = &o.logits[size_t(row * V)];
      int64_t best = 0;
      double ss = 0;
      for (int64_t v = 0; v < V; ++v) {
        ss += l[v] * l[v];
        if (l[v] > l[best]) best = v;
      }
      double second = -1e300;
      for (int64_t v = 0; v < V; ++v)
        if (v != best) second = std::max(second, l[v]);
      ++c.positions;
      bool tied = false;
      for (const auto& layer : tie) tied = tied || layer[size_t(row)];
      c.ties += tied;
      if (tied || l[best] - second <= kGapOfRms * std::sqrt(ss / double(V))) continue;
      ++c.clear;
      c.agree += out[g] == int32_t(best);
    }
  }
  return c;
}

}  // namespace

TEST_CASE("run bench online --emulate-ranks: TP2 and DP2 x EP2 plans serve every request with the greedy tokens "
          "of the single GPU") {
  const model::WeightSet w = model::synthetic_weights(small_qwen3(), 21);
  auto c = online_config();
  c.weights_dir = write_small_weights(w);
  c.cuda_graph = false;
  const Plan one = online_plan(ArrivalKind::poisson);
  Plan tp = make_plan(small_qwen3(), 2, device_gpu_model());
  tp.chosen.limits = one.chosen.limits;
  tp.workload = one.workload;
  Plan dp = tp;
  dp.chosen.layout = Layout{};
  dp.chosen.layout.attn_dp = 2;
  dp.chosen.layout.moe_ep = 2;
  dp.chosen.layout.moe_comm = MoeComm::nccl_a2a;  // the EP schedule (moe_comm.hpp)
  dp.rank_map = build_rank_map(dp.cluster, dp.model, dp.chosen.layout);

  // A multi-GPU plan without a flag is refused before any device work, naming the flags.
  try {
    (void)gpu::run_online(dp, "test-plan", c);
    FAIL("a 2-GPU plan ran online without --emulate-ranks");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("--emulate-ranks") != std::string::npos);
  }

  const gpu::OnlineResult base = gpu::run_online(one, "test-plan", c);
  const GreedyCheck gb = check_greedy(w, base);
  INFO("single GPU: " << gb.agree << " of " << gb.clear << " clear positions agree (" << gb.positions
                      << " positions, " << gb.ties << " near ties)");
  CHECK(gb.agree == gb.clear);
  c.emulate_ranks = true;
  for (const Plan* p : {&tp, &dp}) {
    const int dp_degree = p->chosen.layout.attn_dp;
    INFO(p->chosen.layout.name());
    const gpu::OnlineResult r = gpu::run_online(*p, "test-plan", c);
    CHECK(r.ranks == 2);
    CHECK(r.emulated);
    REQUIRE(r.result.requests.size() == 12);
    REQUIRE(r.output_ids.size() == 12);
    for (size_t i = 0; i < 12; ++i) {
      INFO("request " << i);
      CHECK(r.result.requests[i].finish_s >= r.result.requests[i].first_token_s);
      CHECK(r.output_ids[i].size() == size_t(r.result.requests[i].output_tokens));
      CHECK(r.result.requests[i].replica == int(i % size_t(dp_degree)));  // round-robin, as the simulator
    }
    CHECK(r.result.metrics.completed == 12);
    CHECK(r.result.metrics.total_output_tokens == base.result.metrics.total_output_tokens);
    for (const auto& s : r.steps) {
      CHECK(s.measured_ms > 0);
      CHECK(s.predicted_ms > 0);
      CHECK_FALSE(s.cuda_graph);
      REQUIRE(s.replicas.size() == size_t(dp_degree));
      int64_t tokens = 0;
      for (const auto& b : s.replicas) {
        tokens += b.tokens();
        CHECK(b.tokens() <= 32);  // each replica's own token budget
      }
      CHECK(tokens == s.num_tokens);
    }
    const GreedyCheck g = check_greedy(w, r);
    INFO(g.agree << " of " << g.clear << " clear positions agree (" << g.positions << " positions, " << g.ties
                 << " near ties)");
    CHECK(g.clear >= 10);  // of about 50 generated positions (12 requests of 1-8 tokens)
    CHECK(g.agree == g.clear);
    const auto j = gpu::online_json(r);
    CHECK(j["ranks"] == 2);
    CHECK(j["emulated_ranks"] == true);
    CHECK(j["num_gpus"] == 2);
    CHECK(j["serving_config"]["num_replicas"] == dp_degree);
    if (dp_degree > 1) {
      CHECK(j["steps"][0]["replicas"].size() == 2);
      CHECK(j["moe_schedule"] == "ep");
    }
    CHECK(gpu::format_online_report(r).find("2 ranks emulated on this one GPU") != std::string::npos);
  }
}
