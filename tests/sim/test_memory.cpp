// Memory model (StepCostModel::memory, cost_shapes.hpp) against independent parameter counts.
#include <doctest/doctest.h>

#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/cost_shapes.hpp"
#include "sim_fixtures.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

// DeepSeek-R1 written out from its config.json, independently of rank_weights():
// elements per component, and bytes with fp8 projections/experts, bf16 embeddings/norms/router.
struct Count {
  double elems = 0, bytes = 0;
};
Count deepseek_total() {
  const double h = 7168, V = 129280;
  const double attn = h * 1536 + 1536 * 128 * 192 + h * 576 + 512 * 128 * 256 + 128 * 128 * h;
  const double norms = 2 * h + 512 + 1536;
  const double expert = 3 * h * 2048;
  const double dense = 3 * h * 18432;
  const double router = h * 256;
  Count c;
  c.elems = 2 * V * h + 61 * (attn + norms) + 58 * (256 * expert + expert + router) + 3 * dense;
  c.bytes = 2 * 2 * V * h + 61 * (attn + 2 * norms) + 58 * (257 * expert + 2 * router) + 3 * dense;
  return c;
}

}  // namespace

TEST_CASE("hand count of DeepSeek-R1 matches the published 671B parameters") {
  // 671B excludes the MTP module (DeepSeek-V3 report: 671B + 14B MTP). Norms and router are
  // ~0.1%; 0.5% covers the rounding of the published figure.
  CHECK(deepseek_total().elems == doctest::Approx(671e9).epsilon(0.005));
}

TEST_CASE("per-GPU weights x GPUs >= total weights, for every layout on 8 x 8 H200") {
  const ModelSpec m = test::deepseek_r1();
  const ClusterSpec c = test::h200_cluster(8);
  const double total = deepseek_total().bytes;
  RuntimeLimits lim;
  int n = 0;
  for (const Layout& l : test::all_layouts(m, 64)) {
    CAPTURE(l.name());
    auto cm = make_cost_model("mixserve", m, c, test::h200_datasheet(), l, {});
    const MemoryBreakdown mb = cm->memory(lim);
    CHECK(mb.weights * 64 >= total * (1 - 1e-12));
    ++n;
  }
  CHECK(n > 50);
  // No replication but the MLA down-projections, norms and router: TP8 on one node holds
  // about 1/8 each (the replicated parts are ~1.5% of the total).
  auto tp8 = make_cost_model("mixserve", m, test::h200_cluster(1), test::h200_datasheet(),
                             test::layout(8, 1, 8, 1, 1, MoeComm::tp_allreduce), {});
  const double w8 = tp8->memory(lim).weights;
  CHECK(w8 * 8 >= total);
  CHECK(w8 * 8 <= total * 1.03);
}

TEST_CASE("KV capacity: DeepSeek-R1 fits on one 8 x H200 node, not on two GPUs") {
  const ModelSpec m = test::deepseek_r1();
  RuntimeLimits lim;
  lim.max_num_batched_tokens = 8192;
  lim.max_num_seqs = 256;
  lim.max_model_len = 32768;
  auto cm = make_cost_model("mixserve", m, test::h200_cluster(1), test::h200_datasheet(),
                            test::layout(8, 1, 8, 1, 1, MoeComm::tp_allreduce), {});
  const MemoryBreakdown mb = cm->memory(lim);
  CHECK(mb.fits);
  // Hand estimate: 0.9 x 141 GB - ~86 GB of weights - 3 GiB reserved - ~2 GB of activations
  // leaves ~35 GB; MLA keeps 576 bf16 values per token per layer (70,272 B over 61 layers) on
  // every TP rank: ~0.5 M tokens. The range allows for the estimate's roundings.
  CHECK(mb.kv_tokens > 350000);
  CHECK(mb.kv_tokens < 650000);
  CHECK(mb.kv_cache == doctest::Approx(mb.capacity * 0.9 - mb.weights - mb.reserved -
                                       mb.activations - mb.comm_buffers));
  lim.gpu_memory_utilization = 0.95;
  CHECK(cm->memory(lim).kv_tokens > mb.kv_tokens);

  ClusterSpec two = test::h200_cluster(1, 2);
  auto small = make_cost_model("mixserve", m, two, test::h200_datasheet(),
                               test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce), {});
  CHECK_FALSE(small->memory(lim).fits);
  CHECK(small->memory(lim).kv_tokens == 0);
  auto paper = make_cost_model("paper", m, two, test::h200_datasheet(),
                               test::layout(2, 1, 2, 1, 1, MoeComm::tp_allreduce), {});
  CHECK_FALSE(paper->memory(lim).fits);
}

TEST_CASE("KV bytes per token: GQA sharded up to the KV heads, MLA latent replicated") {
  const ModelSpec q = test::qwen3_235b();  // 4 KV heads x 128, bf16
  CHECK(kv_bytes_per_token_layer(q, test::layout(1, 8, 1, 8, 1, MoeComm::nccl_a2a)) == 2048.0);
  CHECK(kv_bytes_per_token_layer(q, test::layout(4, 2, 8, 1, 1, MoeComm::tp_allreduce)) == 512.0);
  CHECK(kv_bytes_per_token_layer(q, test::layout(8, 1, 8, 1, 1, MoeComm::tp_allreduce)) == 512.0);
  const ModelSpec d = test::deepseek_r1();  // (512 + 64) bf16 whatever the TP degree
  CHECK(kv_bytes_per_token_layer(d, test::layout(1, 8, 1, 8, 1, MoeComm::nccl_a2a)) == 1152.0);
  CHECK(kv_bytes_per_token_layer(d, test::layout(8, 1, 8, 1, 1, MoeComm::tp_allreduce)) == 1152.0);
}

TEST_CASE("comm_group: which nodes a TP or EP group spans") {
  CHECK(comm_group(1, 8, 8).nodes == 1);
  CHECK(comm_group(1, 16, 8).nodes == 2);
  CHECK(comm_group(8, 4, 8).nodes == 4);   // rails: one rank per node
  CHECK(comm_group(8, 4, 8).per_node() == 1);
  CHECK(comm_group(2, 8, 8).nodes == 2);   // EP 8 at stride 2: 4 ranks in each of 2 nodes
  CHECK(comm_group(16, 2, 8).nodes == 2);
  CHECK(comm_group(1, 4, 8).nodes == 1);
}
