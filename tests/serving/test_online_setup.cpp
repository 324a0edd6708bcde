// The online benchmark's setup without a device (executor/online.hpp online_setup): the request
// list is the serving simulator's draw for the same workload, rate, count and seed; the engine
// config follows the plan, the workload and the options as `mixserve-plan simulate` does, with
// the KV blocks capped at what max_num_seqs of the longest request need; bad inputs are
// InputErrors before any device work.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

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
  CHECK(multi.find("distributed runs are not built yet") != std::string::npos);
}
