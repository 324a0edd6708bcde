// The online benchmark's setup without a device (executor/online.hpp online_setup): the request
// list is the serving simulator's draw for the same workload, rate, count and seed; the engine
// config follows the plan, the workload and the options as `mixserve-plan simulate` does, with
// the KV blocks capped at what max_num_seqs of the longest request need; bad inputs are
// InputErrors before any device work.
#include <doctest/doctest.h>

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/online.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/scheduler.hpp"

using namespace mixserve;

namespace {

Plan one_gpu_plan(const std::string& cluster = "configs/clusters/h200-1x1.yaml") {
  Plan p;
  p.model = load_model("qwen3-30b-a3b");
  p.cluster = load_cluster(std::string(MIXSERVE_SOURCE_DIR) + "/" + cluster);
  p.workload = load_workload("sharegpt-paper");
  p.profile_name = "h200";
  p.cost_model = "mixserve";
  p.chosen.limits.max_num_seqs = 64;
  p.chosen.limits.max_num_batched_tokens = 1024;
  p.chosen.limits.max_model_len = 4096;
  return p;
}

gpu::OnlineConfig config() {
  gpu::OnlineConfig c;
  c.workload = "sharegpt-paper";
  c.overrides.num_requests = 50;
  c.overrides.rate = 8;
  c.overrides.seed = 3;
  c.num_layers = 8;
  return c;
}

std::string error_of(const Plan& p, const gpu::OnlineConfig& c) {
  try {
    (void)gpu::online_setup(p, "plan.yaml", c);
  } catch (const InputError& e) {
    return e.what();
  }
  return "no InputError";
}

}  // namespace

TEST_CASE("online setup: the simulator's requests and engine config") {
  const Plan plan = one_gpu_plan();
  const auto s = gpu::online_setup(plan, "plan.yaml", config());
  WorkloadSpec w = load_workload("sharegpt-paper");
  w.num_requests = 50;
  w.rate = 8;
  w.seed = 3;
  const sim::RequestStream want = sim::generate_requests(w);
  REQUIRE(s.requests.requests.size() == 50);
  int64_t longest = 0;
  for (size_t i = 0; i < 50; ++i) {
    CHECK(s.requests.requests[i].arrival_s == want.requests[i].arrival_s);
    CHECK(s.requests.requests[i].input_tokens == want.requests[i].input_tokens);
    CHECK(s.requests.requests[i].output_tokens == want.requests[i].output_tokens);
    longest = std::max(longest, want.requests[i].input_tokens + want.requests[i].output_tokens);
  }
  CHECK(s.model.num_layers == 8);
  CHECK(s.workload.rate == 8);
  // sharegpt-paper asks for 16 sequences and 4096 tokens per request.
  CHECK(s.serving.limits.max_num_seqs == 16);
  CHECK(s.serving.limits.max_model_len == 4096);
  CHECK(s.serving.limits.decode_first);
  CHECK(s.serving.num_replicas == 1);
  CHECK(s.max_blocks_per_seq == sim::blocks_for(longest, 16));
  // The memory model's blocks (for the 8 layers that run), capped at 16 x the longest request.
  const auto cm = sim::make_cost_model("mixserve", model::with_num_layers(plan.model, 8), plan.cluster,
                                       load_profile("h200"), plan.chosen.layout, sim::CostModelOptions{});
  const int64_t mem_blocks = sim::serving_config_for(*cm, plan.chosen.layout, plan.chosen.limits, w).limits.kv_blocks;
  CHECK(s.serving.limits.kv_blocks == std::min(mem_blocks, 16 * sim::blocks_for(longest, 16)));

  auto c = config();
  c.policy = "prefill-first";
  c.max_num_seqs = 4;
  c.max_num_batched_tokens = 256;
  c.no_chunked_prefill = false;
  c.kv_blocks = 500;
  const auto t = gpu::online_setup(plan, "plan.yaml", c);
  CHECK(!t.serving.limits.decode_first);
  CHECK(t.serving.limits.max_num_seqs == 4);
  CHECK(t.serving.limits.max_num_batched_tokens == 256);
  CHECK(t.serving.limits.kv_blocks == 500);
}

TEST_CASE("online setup: bad inputs are InputErrors naming the reason") {
  const Plan plan = one_gpu_plan();
  auto c = config();
  c.workload = "closed-loop-64";
  c.overrides.rate = 0;
  CHECK(error_of(plan, c).find("closed-loop") != std::string::npos);
  c = config();
  c.workload = "tiny-trace";
  CHECK(error_of(plan, c).find("--request-rate") != std::string::npos);
  c = config();
  c.kv_blocks = 2;
  CHECK(error_of(plan, c).find("KV blocks") != std::string::npos);
  c = config();
  c.num_layers = 1000;
  CHECK(error_of(plan, c).find("--num-layers") != std::string::npos);
  c = config();
  c.policy = "random";
  CHECK(error_of(plan, c).find("--policy") != std::string::npos);
  const std::string multi = error_of(one_gpu_plan("configs/clusters/h200-2x8.yaml"), config());
  CHECK(multi.find("--emulate-ranks") != std::string::npos);
  CHECK(multi.find("16 GPUs") != std::string::npos);
}

TEST_CASE("online setup: a multi-GPU plan with --emulate-ranks, one scheduler per attention-DP replica; PP refused") {
  Plan plan = one_gpu_plan("configs/clusters/h200-1x8.yaml");
  plan.chosen.layout.attn_dp = 4;
  plan.chosen.layout.attn_tp = 2;
  plan.chosen.layout.moe_ep = 4;
  plan.chosen.layout.moe_tp = 2;
  plan.chosen.layout.moe_comm = MoeComm::fused;
  auto c = config();
  CHECK(error_of(plan, c).find("--emulate-ranks") != std::string::npos);
  c.emulate_ranks = true;
  const auto s = gpu::online_setup(plan, "plan.yaml", c);
  CHECK(s.serving.num_replicas == 4);
  CHECK(s.serving.pp == 1);
  CHECK_FALSE(s.serving.sample_moe_load);  // the run predicts each step with the expected load
  c.gpu_per_rank = true;
  CHECK(error_of(plan, c).find("exclude each other") != std::string::npos);
  c.gpu_per_rank = false;
  plan.chosen.layout = Layout{};
  plan.chosen.layout.attn_tp = 4;
  plan.chosen.layout.moe_tp = 4;
  plan.chosen.layout.pp = 2;
  const std::string pp = error_of(plan, c);
  INFO(pp);
  CHECK(pp.find("pipeline-parallel (PP2)") != std::string::npos);
  CHECK(pp.find("offline") != std::string::npos);
}

TEST_CASE("online host phases: JSON keys, statistics and the profile's host overhead") {
  std::vector<gpu::HostPhases> ph(4);
  std::vector<double> gpu_ms = {1.0, 2.0, 3.0, 10.0};
  for (int i = 0; i < 4; ++i) {
    ph[i].schedule_ms = 0.1 * (i + 1);
    ph[i].prepare_ms = 0.2;
    ph[i].enqueue_ms = 0.3;
    ph[i].wait_ms = gpu_ms[i] + 0.05;
    ph[i].sample_ms = 0.01;
    ph[i].bookkeep_ms = 0.04 * (i + 1);
  }
  const nlohmann::json j = gpu::host_phases_json(ph, gpu_ms);
  for (const char* k : gpu::kHostPhaseNames) {
    REQUIRE(j.contains(k));
    CHECK(j[k].contains("mean"));
    CHECK(j[k].contains("median"));
    CHECK(j[k].contains("p90"));
  }
  CHECK(j.size() == 6 + 3);  // phases, total, overhead, steps
  CHECK(j["steps"] == 4);
  CHECK(j["schedule"]["mean"].get<double>() == doctest::Approx(0.25));
  CHECK(j["schedule"]["median"].get<double>() == doctest::Approx(0.25));
  CHECK(j["schedule"]["p90"].get<double>() == doctest::Approx(0.4));
  // total - gpu = 0.1i + 0.2 + 0.3 + 0.05 + 0.01 + 0.04i for i = 1..4: 0.70, 0.84, 0.98, 1.12.
  CHECK(j["overhead"]["median"].get<double>() == doctest::Approx(0.91));
  CHECK(j["total"]["mean"].get<double>() == doctest::Approx((1 + 2 + 3 + 10) / 4.0 + 0.91));
  const std::string text = gpu::format_host_phases(ph, gpu_ms);
  for (const char* k : gpu::kHostPhaseNames) CHECK(text.find(k) != std::string::npos);
  CHECK(text.find("host overhead") != std::string::npos);
  CHECK_THROWS_AS(gpu::host_phases_json(ph, {1.0}), InputError);

  HardwareProfile base = load_profile("h200");
  base.host_overhead = {};  // the shipped profile carries a measured one: start from none
  CHECK(base.host_overhead.step_us == 0);
  const HardwareProfile p = gpu::with_host_overhead(base, ph, gpu_ms, "cmd | dev | date");
  CHECK(p.host_overhead.step_us == doctest::Approx(910.0));
  CHECK(p.host_overhead.steps == 4);
  CHECK(p.host_overhead.measured_with == "cmd | dev | date");
  CHECK_THROWS_AS(gpu::with_host_overhead(base, {}, {}, "x"), InputError);

  // The cost model adds it once per step, whatever the batch.
  const Plan plan = one_gpu_plan();
  const ModelSpec m = model::with_num_layers(plan.model, 8);
  auto with = sim::make_cost_model("mixserve", m, plan.cluster, p, plan.chosen.layout, {});
  auto without = sim::make_cost_model("mixserve", m, plan.cluster, base, plan.chosen.layout, {});
  for (int64_t d : {1, 7, 64}) {
    sim::ReplicaBatch b;
    b.num_decode = static_cast<int>(d);
    b.decode_context = d * 500;
    const sim::ReplicaBatch one[] = {b};
    const sim::StepCost a = with->step(std::span<const sim::ReplicaBatch>(one), true);
    const sim::StepCost z = without->step(std::span<const sim::ReplicaBatch>(one), true);
    CHECK(a.time_us - z.time_us == doctest::Approx(910.0));
    bool labelled = false, absent = true;
    for (const auto& op : a.ops) labelled |= op.op == "host.step_overhead" && op.time_us == doctest::Approx(910.0);
    for (const auto& op : z.ops) absent &= op.op != "host.step_overhead";
    CHECK(labelled);
    CHECK(absent);  // no profile value: no term
  }
  sim::ReplicaBatch empty;
  const sim::ReplicaBatch none[] = {empty};
  CHECK(with->step(std::span<const sim::ReplicaBatch>(none), false).time_us == 0.0);  // no step, no overhead
}
