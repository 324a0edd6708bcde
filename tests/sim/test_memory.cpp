// Memory model (StepCostModel::memory, cost_shapes.hpp) against independent parameter counts.
#include <doctest/doctest.h>

#include <algorithm>

#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/sim/comm_schedule.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/cost_constants.hpp"
#include "mixserve/sim/executor_buffers.hpp"
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

// ----------------------------------------------------------------------------- executor MoE buffers
// memory() counts the MoE buffers the executor preallocates (worst case), not the expected rows:
// byte counts below come from the shared capacity functions (ep_capacity_rows,
// fused_capacity_rows, expert_bucket_capacity / uses_expert_streams) times the buffers the
// executor allocates per rank (model_forward.cpp GpuModel::allocate, moe_comm.cpp EpMoeComm /
// FusedMoeComm, shard.cpp TransportComm), written out per case.

namespace {

constexpr double kB16 = 2, kF32 = 4, kI32 = 4, kI64 = 8;

// memory()'s estimate of the non-MoE activations (attention widths, hidden buffers, logits).
double generic_activations(const ModelSpec& m, const Layout& l, const RuntimeLimits& lim) {
  const CostConstants K;
  const auto& a = m.attention;
  const double heads = a.num_heads / l.attn_tp;
  const double widest = a.type == AttentionType::mla
                            ? double(a.q_lora_rank + a.kv_lora_rank) + heads * (a.qk_nope_head_dim + a.v_head_dim)
                            : (heads + 2.0 * std::max(1, a.num_kv_heads / l.attn_tp)) * a.head_dim;
  return double(lim.max_num_batched_tokens) * 2 * (K.activation_hidden_buffers * m.hidden_size + widest) +
         double(lim.max_num_seqs) * m.vocab_size / l.attn_tp * K.logits_bytes_per_element;
}

struct Case {
  ModelSpec m;
  ClusterSpec c;
  Layout l;
  RuntimeLimits lim;
  MemoryBreakdown mb;
  CommGeometry geo;
};

Case run_case(const char* model, const char* cluster, Layout l, int64_t tokens) {
  Case k{load_model(model), load_cluster(cluster), l, {}, {}, {}};
  k.lim.max_num_batched_tokens = tokens;
  k.lim.max_num_seqs = 256;
  auto cm = make_cost_model("mixserve", k.m, k.c, test::h200_datasheet(), l, {});
  k.mb = cm->memory(k.lim);
  if (l.stage_size() > 1) {
    k.geo = make_comm_geometry(k.c, k.m, l);
    k.geo.elem_bytes = 2;
  }
  return k;
}

}  // namespace

TEST_CASE("memory: DeepSeek-V3 EP 8 fused counts the executor's worst-case MoE buffers") {
  Case k = run_case("deepseek-v3", "h200-1x8", test::layout(1, 8, 1, 8, 1, MoeComm::fused), 8192);
  const double T = 8192, H = 7168, E = 256, K = 8, I = 2048;
  const int64_t C = fused_capacity_rows(k.geo, 8192);  // every replica's tokens: 8 x 8192
  CHECK(C == 65536);
  // Gathered mode (attn DP 8): Tm = 8 T = C rows, R = Tm x K routed rows; bucketed room.
  const int64_t Tm = 8 * 8192, R = Tm * 8;
  REQUIRE(uses_expert_streams(R, 32));
  const double X = double(expert_bucket_capacity(R, 32, kExpertBucketRowAlign));
  CHECK(X == double(R) + 32 * 127);
  // permuted_x + expert_out [X, H], gate|up [X, 2I], SwiGLU [X, I], shared_out + moe_in + moe_out
  // [Tm, H]; router logits [Tm, E], topk_w [R], shared_gate [Tm]; topk_ids, slot_row,
  // permuted_token [R], padded_token [X].
  const double expert = kB16 * (2 * X * H + X * 2 * I + X * I + 3 * double(Tm) * H) +
                        kF32 * (double(Tm) * E + double(R) + double(Tm)) + kI32 * (3 * double(R) + X);
  CHECK(k.mb.activations == doctest::Approx(generic_activations(k.m, k.l, k.lim) + expert).epsilon(1e-12));
  // FusedMoeComm (Q = 8, moe TP 1): x, y [T, H]; xr, partial [C, H]; send_pack 7 T, red 8 T,
  // crecv 8 T, y_gather T rows of H; idx_own T, idx_send 7 T, idx_home 8 T int32; block_off 9,
  // pair_off C + 1 int64; C x min(K, El) + T (shared expert) pairs of int32 + f64. Plus the
  // [T, H] all-reduce scratch.
  const double Cd = double(C);
  const double comm = kB16 * (2 * T * H + 2 * Cd * H + (7 + 8 + 8 + 1) * T * H) + kI32 * 16 * T +
                      kI64 * (9 + Cd + 1) + (Cd * K + T) * (kI32 + kI64) + kB16 * T * H;
  CHECK(k.mb.comm_buffers == doctest::Approx(comm).epsilon(1e-12));
  // Several GiB more than the expected-rows estimate it replaces (2.8 + 1.7 GiB before).
  CHECK(k.mb.activations + k.mb.comm_buffers > 20.0 * 1073741824.0);
}

TEST_CASE("memory: DeepSeek-V3 EP 8 a2a counts EpMoeComm's ep_capacity_rows buffers") {
  Case k = run_case("deepseek-v3", "h200-1x8", test::layout(1, 8, 1, 8, 1, MoeComm::nccl_a2a), 8192);
  const double T = 8192, H = 7168, E = 256, K = 8, I = 2048;
  const int64_t C = ep_capacity_rows(k.geo, 8192, EpSource::split);
  CHECK(C == 8 * 8192 * 8 + 8192);  // 8 replicas x min(K, 32) rows per token + the shared rows
  // Tm: the larger of the gathered 8 T and ceil(C / K).
  const int64_t Tm = std::max<int64_t>(8 * 8192, (C + 7) / 8), R = Tm * 8;
  CHECK(Tm == 66560);
  const double X = double(expert_bucket_capacity(R, 32, kExpertBucketRowAlign));
  const double expert = kB16 * (2 * X * H + X * 2 * I + X * I + 3 * double(Tm) * H) +
                        kF32 * (double(Tm) * E + double(R) + double(Tm)) + kI32 * (3 * double(R) + X);
  CHECK(k.mb.activations == doctest::Approx(generic_activations(k.m, k.l, k.lim) + expert).epsilon(1e-12));
  // EpMoeComm (moe TP 1: no rsbuf/redbuf): x T, sendbuf T K, recvbuf + outbuf 2 C, backbuf
  // T (K + 1), y T rows of H; send/recv counts 2 x 8 x 32 int64, send_token T K int32, comb_off
  // T + 1, comb_row + comb_w 2 T (K + 1), pair_off C + 1 8-byte; pair_expert C int32, pair_w C f64.
  const double Cd = double(C);
  const double comm = kB16 * (T + T * K + 2 * Cd + T * (K + 1) + T) * H + kI64 * 2 * 8 * 32 +
                      kI32 * T * K + kI64 * (T + 1 + 2 * T * (K + 1) + Cd + 1) + (kI32 + kI64) * Cd +
                      kB16 * T * H;
  CHECK(k.mb.comm_buffers == doctest::Approx(comm).epsilon(1e-12));
}

TEST_CASE("memory: Qwen3-235B TP 8 all-reduce: replicated rows, bucketed room, scratch only") {
  Case k = run_case("qwen3-235b-a22b", "h200-1x8", test::layout(8, 1, 8, 1, 1, MoeComm::tp_allreduce), 8192);
  const double T = 8192, H = 4096, E = 128, I = 1536 / 8;
  const int64_t R = 8192 * 8;  // Tm = T (attention DP 1: every rank holds the replica's tokens)
  REQUIRE(uses_expert_streams(R, 128));  // 65536 rows >= 512 x 128 local experts
  const double X = double(expert_bucket_capacity(R, 128, kExpertBucketRowAlign));
  const double expert = kB16 * (2 * X * H + X * 3 * I + T * H) + kF32 * (T * E + double(R) + T) +
                        kI32 * (3 * double(R) + X);
  CHECK(k.mb.activations == doctest::Approx(generic_activations(k.m, k.l, k.lim) + expert).epsilon(1e-12));
  CHECK(k.mb.comm_buffers == doctest::Approx(kB16 * T * H).epsilon(1e-12));  // all-reduce scratch
}

TEST_CASE("memory: Qwen3-30B-A3B on one GPU: bucketed room at 16384 tokens, none at 2048") {
  for (int64_t tokens : {int64_t(16384), int64_t(2048)}) {
    CAPTURE(tokens);
    Case k = run_case("qwen3-30b-a3b", "h200-1x1", test::layout(1, 1, 1, 1, 1, MoeComm::tp_allreduce), tokens);
    const double T = double(tokens), H = 2048, E = 128, I = 768;
    const int64_t R = tokens * 8;
    const bool room = uses_expert_streams(R, 128);
    CHECK(room == (tokens == 16384));  // 131072 rows >= 65536; 16384 < 65536
    const double X = room ? double(R + 128 * 127) : double(R);
    CHECK(X == double(room ? expert_bucket_capacity(R, 128, kExpertBucketRowAlign) : R));
    const double expert = kB16 * (2 * X * H + X * 3 * I + T * H) + kF32 * (T * E + double(R) + T) +
                          kI32 * (3 * double(R) + X);
    CHECK(k.mb.activations == doctest::Approx(generic_activations(k.m, k.l, k.lim) + expert).epsilon(1e-12));
    CHECK(k.mb.comm_buffers == 0.0);  // one rank: no exchange, no all-reduce scratch
  }
}

TEST_CASE("memory: the executor's T is max(max_num_batched_tokens, max_num_seqs)") {
  RuntimeLimits lim;
  lim.max_num_batched_tokens = 128;
  lim.max_num_seqs = 256;
  CHECK(executor_max_tokens_per_step(lim) == 256);
  lim.max_num_batched_tokens = 8192;
  CHECK(executor_max_tokens_per_step(lim) == 8192);
}
