// CPU tests (label unit) of the GPU side's host logic: rank-map groups for communicators, the
// profiler's shapes and token distributions, and the GEMV's parameter checks and row tile.
// Expected values are derived by hand in comments.
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "mixserve/core/error.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/gpu/groups.hpp"
#include "mixserve/profiler/shapes.hpp"

using namespace mixserve;

namespace {
// 2 nodes x 4 GPUs, attention TP4 x DP2, MoE TP4 x EP2 (the MixServe hybrid on 8 GPUs):
// TP inside the node, DP / EP across nodes.
std::vector<RankInfo> hybrid_2x4() {
  std::vector<RankInfo> m(8);
  for (int r = 0; r < 8; ++r) {
    m[r].rank = r;
    m[r].node = r / 4;
    m[r].local_gpu = r % 4;
    m[r].attn_tp_rank = r % 4;
    m[r].attn_dp_rank = r / 4;
    m[r].moe_tp_rank = r % 4;
    m[r].moe_ep_rank = r / 4;
  }
  return m;
}
}  // namespace

TEST_CASE("gemv k limit: 8..32768 in multiples of 8 for every GEMV, the rule the executor and cost model read") {
  static_assert(gpu::kGroupedGemvMaxK == kGemvMaxK);
  const auto* p16 = reinterpret_cast<const __nv_bfloat16*>(16);
  gpu::GroupedGemvParams g;
  g.act = g.weights = p16;
  g.out = reinterpret_cast<__nv_bfloat16*>(16);
  g.expert_offsets = reinterpret_cast<const int32_t*>(16);
  g.num_experts = 8;
  g.n = 4096;
  gpu::GemvParams d;
  d.act = d.weights = p16;
  d.seg[0] = {reinterpret_cast<void*>(16), 4096};
  d.num_rows = 1;
  d.n = 4096;
  d.swiglu_act = true;
  // Mixtral expert down, Qwen2-57B shared expert down, the limit; then past it / not a multiple of 8.
  for (int64_t k : {int64_t(14336), int64_t(20480), int64_t(32768), int64_t(32760)}) {
    INFO("k=" << k);
    g.k = d.k = k;
    CHECK(gpu::grouped_gemv_v2_unsupported_reason(g) == "");
    CHECK(gpu::grouped_gemv_unsupported_reason(g) == "");
    CHECK(gpu::gemv_unsupported_reason(d) == "");
    CHECK(gemv_k_fits(k));
  }
  for (int64_t k : {int64_t(32776), int64_t(65536), int64_t(14340), int64_t(4)}) {
    INFO("k=" << k);
    g.k = d.k = k;
    const std::string want = "k=" + std::to_string(k) + " (legal: a multiple of 8 in 8..32768)";
    CHECK(gpu::grouped_gemv_v2_unsupported_reason(g) == want);
    CHECK(gpu::grouped_gemv_unsupported_reason(g) == want);
    CHECK(gpu::gemv_unsupported_reason(d) == want);
    CHECK_FALSE(gemv_k_fits(k));
  }
}

TEST_CASE("gemv row tile: the chunk R fits the opt-in shared memory, H200 values") {
  // 227 KiB per block (H100/H200): R x k x 2 bytes of rows (+ 2 KiB of partials per row, balanced;
  // + 12 static bytes, by_column).
  constexpr int64_t kH200 = 232448;
  using gpu::GemvKernel;
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 8192, kH200) == 8);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 8, 8192, kH200) == 8);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 3, 2048, kH200) == 4);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 0, 2048, kH200) == 1);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 14336, kH200) == 8);  // 224 KiB
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 8, 14336, kH200) == 4);   // 8 rows: 240 KiB
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 1, 14336, kH200) == 1);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 2, 14336, kH200) == 2);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 3, 14336, kH200) == 4);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 20480, kH200) == 4);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 5, 20480, kH200) == 4);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 32768, kH200) == 2);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 8, 32768, kH200) == 2);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 1, 32768, kH200) == 1);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 32768, 101376) == 1);     // 99 KiB (sm_86/89)
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 1, 32768, 48 * 1024) == 0);  // no row fits
  // The largest k whose 8 rows fit: by_column 14528 - 1 vector (12 static bytes), balanced 13504.
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 14520, kH200) == 8);
  CHECK(gpu::gemv_rows_tile(GemvKernel::by_column, 8, 14528, kH200) == 4);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 8, 13504, kH200) == 8);
  CHECK(gpu::gemv_rows_tile(GemvKernel::balanced, 8, 13512, kH200) == 4);
  CHECK_THROWS_AS(gpu::gemv_rows_tile(GemvKernel::automatic, 1, 4096, kH200), InputError);
}

TEST_CASE("communicator groups of the 2x4 hybrid rank map") {
  const auto m = hybrid_2x4();
  using G = std::vector<std::vector<int>>;
  CHECK(gpu::groups_of(m, gpu::GroupKind::world) == G{{0, 1, 2, 3, 4, 5, 6, 7}});
  CHECK(gpu::groups_of(m, gpu::GroupKind::attn_tp) == G{{0, 1, 2, 3}, {4, 5, 6, 7}});
  CHECK(gpu::groups_of(m, gpu::GroupKind::attn_dp) == G{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  CHECK(gpu::groups_of(m, gpu::GroupKind::moe_tp) == G{{0, 1, 2, 3}, {4, 5, 6, 7}});
  CHECK(gpu::groups_of(m, gpu::GroupKind::moe_ep) == G{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  CHECK(gpu::groups_of(m, gpu::GroupKind::rail) == G{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
  CHECK(gpu::group_colors(m, gpu::GroupKind::rail) == std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3});
  auto bad = m;
  bad[3].rank = 5;
  CHECK_THROWS_AS(gpu::group_colors(bad, gpu::GroupKind::world), InputError);
  for (auto k : {gpu::GroupKind::world, gpu::GroupKind::attn_tp, gpu::GroupKind::rail})
    CHECK(gpu::parse_group_kind(gpu::to_string(k)) == k);
  CHECK(!gpu::parse_group_kind("tensor"));
}

TEST_CASE("tokens per expert: sums, uniform spread, skew, empty experts") {
  using profiler::tokens_per_expert;
  for (const char* d : {"uniform", "zipf:1.2", "empty:0.5"})
    for (int64_t rows : {int64_t(0), int64_t(1), int64_t(7), int64_t(1000), int64_t(65536)}) {
      const auto c = tokens_per_expert(d, 12, rows);
      INFO(d << " rows " << rows);
      CHECK(std::accumulate(c.begin(), c.end(), int64_t(0)) == rows);
    }
  // 10 rows over 4 experts: 3, 3, 2, 2.
  CHECK(tokens_per_expert("uniform", 4, 10) == std::vector<int64_t>{3, 3, 2, 2});
  // zipf:1 over 3 experts with 11 rows: shares 1, 1/2, 1/3 of 11/(11/6) = 6, 3, 2.
  CHECK(tokens_per_expert("zipf:1", 3, 11) == std::vector<int64_t>{6, 3, 2});
  // empty:0.5 over 8 experts: the first 4 get nothing, 8 rows over the other 4.
  CHECK(tokens_per_expert("empty:0.5", 8, 8) == std::vector<int64_t>{0, 0, 0, 0, 2, 2, 2, 2});
  CHECK_THROWS_AS(tokens_per_expert("normal", 4, 10), InputError);
}

TEST_CASE("tokens per expert, routed:K: distinct experts per token, reproducible, scattered like a router's") {
  using profiler::tokens_per_expert;
  for (int64_t rows : {int64_t(0), int64_t(1), int64_t(7), int64_t(1024), int64_t(16384)}) {
    const auto c = tokens_per_expert("routed:8", 128, rows);
    INFO("rows " << rows);
    CHECK(std::accumulate(c.begin(), c.end(), int64_t(0)) == rows);
    CHECK(c == tokens_per_expert("routed:8", 128, rows));  // fixed seed
    // K distinct experts per token: no expert has more rows than there are tokens.
    CHECK(*std::max_element(c.begin(), c.end()) <= (rows + 7) / 8);
  }
  // Top-2 of 2 experts: every token reaches both, so the split is exact.
  CHECK(tokens_per_expert("routed:2", 2, 10) == std::vector<int64_t>{5, 5});
  // K above E is capped at E (still distinct experts per token).
  CHECK(tokens_per_expert("routed:4", 2, 6) == std::vector<int64_t>{3, 3});
  // 16384 rows of top-8 over 128 experts: mean 128 per expert, binomial spread (sd ~11): some
  // experts above 128 (a second 128-row tile in the grouped GEMM), none empty; "uniform" gives 128 each.
  const auto c = tokens_per_expert("routed:8", 128, 16384);
  const auto above = std::count_if(c.begin(), c.end(), [](int64_t x) { return x > 128; });
  CHECK(above > 30);
  CHECK(above < 98);
  CHECK(*std::min_element(c.begin(), c.end()) > 64);
  CHECK(*std::max_element(c.begin(), c.end()) < 200);
  const auto u = tokens_per_expert("uniform", 128, 16384);
  CHECK(*std::max_element(u.begin(), u.end()) == 128);
  CHECK_THROWS_AS(tokens_per_expert("routed:0", 4, 10), InputError);
  CHECK_THROWS_AS(tokens_per_expert("routed:x", 4, 10), InputError);
  CHECK_THROWS_AS(tokens_per_expert("routed:8x", 4, 10), InputError);
  CHECK_THROWS_AS(tokens_per_expert("routed:", 4, 10), InputError);
}

TEST_CASE("geometric sizes follow nccl-tests -b -e -f") {
  CHECK(profiler::geometric_sizes(8, 64, 2) == std::vector<int64_t>{8, 16, 32, 64});
  CHECK(profiler::geometric_sizes(8, 100, 4) == std::vector<int64_t>{8, 32});
  CHECK(profiler::geometric_sizes(1, int64_t(1) << 30, 2).size() == 31u);
  CHECK_THROWS_AS(profiler::geometric_sizes(0, 8, 2), InputError);
}

TEST_CASE("GEMM families of DeepSeek-V3 at TP8 follow its config") {
  const ModelSpec m = load_model("deepseek-v3");
  const auto f = profiler::model_gemm_families(m, 8);
  auto find = [&](const std::string& op) {
    for (const auto& g : f)
      if (g.label.find(op) != std::string::npos) return g;
    FAIL("no family " << op);
    return f.front();
  };
  // o_proj: out hidden 7168, in 128 heads x 128 v_head_dim / 8 = 2048.
  CHECK(find("attn.o_proj").n == 7168);
  CHECK(find("attn.o_proj").k == 2048);
  // q_b: 128 heads x (128 + 64) / 8 = 3072 out, q_lora 1536 in.
  CHECK(find("attn.q_b").n == 3072);
  CHECK(find("attn.q_b").k == 1536);
  // fused q_a + kv_a: 1536 + 512 + 64 = 2112 out, replicated.
  CHECK(find("attn.qkv_a").n == 2112);
  // dense FFN 18432 / 8 = 2304: gate_up 4608 x 7168, down 7168 x 2304.
  CHECK(find("dense.gate_up").n == 4608);
  CHECK(find("dense.down").k == 2304);
  // lm_head: 129280 / 8 = 16160 x 7168, bf16.
  CHECK(find("lm_head").n == 16160);
  CHECK(find("lm_head").dtype == DType::bf16);
  CHECK(find("attn.o_proj").dtype == m.weight_dtype);
  const auto e = profiler::model_expert_families(m, 1, 8);
  REQUIRE(e.size() == 2u);
  // 256 experts / EP8 = 32 local; gate_up 2 x 2048 = 4096 x 7168; down 7168 x 2048.
  CHECK(e[0].num_experts == 32);
  CHECK(e[0].n == 4096);
  CHECK(e[1].k == 2048);
  CHECK(e[0].dtype == DType::fp8_block);
}

#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#include "mixserve/kernels/comm_check.cuh"

TEST_CASE("collective sizes and bus factors follow nccl-tests") {
  // nccl-tests PERFORMANCE.md: busbw = algbw * 2(n-1)/n for all-reduce, (n-1)/n for all-gather,
  // reduce-scatter and all-to-all, 1 for send/recv.
  CHECK(gpu::bus_factor(CollOp::all_reduce, 8) == doctest::Approx(1.75));
  CHECK(gpu::bus_factor(CollOp::all_gather, 2) == doctest::Approx(0.5));
  CHECK(gpu::bus_factor(CollOp::all_to_all, 4) == doctest::Approx(0.75));
  CHECK(gpu::bus_factor(CollOp::send_recv, 8) == doctest::Approx(1.0));
  // 64 bytes = 16 floats on 2 ranks: all-gather output 16 = 2 chunks of 8; reduce-scatter input 16.
  const auto ag = gpu::coll_counts(CollOp::all_gather, 64, 2);
  CHECK(ag.chunk_elems == 8u);
  CHECK(ag.send_elems == 8u);
  CHECK(ag.recv_elems == 16u);
  const auto rs = gpu::coll_counts(CollOp::reduce_scatter, 64, 2);
  CHECK(rs.send_elems == 16u);
  CHECK(rs.recv_elems == 8u);
  // 8 bytes over 4 ranks: not one whole float per rank.
  CHECK(gpu::coll_counts(CollOp::all_to_all, 8, 4).chunk_elems == 0u);
  CHECK_THROWS_AS(gpu::coll_counts(CollOp::fused_rs_combine, 64, 2), InputError);
}

TEST_CASE("exact-valued collective data: the documented expected values") {
  kernels::CommCheckParams p;
  p.nranks = 2;
  p.rank = 1;
  p.chunk_elements = 5;
  // input(r, g) = (r + 1) * 1000 + g % 977
  CHECK(kernels::comm_input_value(0, 980) == 1003.0f);
  p.op = CollOp::all_reduce;  // 1000 + 2000 + 2 * (j % 977)
  CHECK(kernels::comm_expected_value(p, 3) == 3006.0f);
  p.op = CollOp::all_gather;  // j = 7: from rank 1, index 2
  CHECK(kernels::comm_expected_value(p, 7) == 2002.0f);
  p.op = CollOp::reduce_scatter;  // rank 1 owns indices 5..9: j = 1 -> g = 6: 3000 + 12
  CHECK(kernels::comm_expected_value(p, 1) == 3012.0f);
  p.op = CollOp::all_to_all;  // j = 2 from rank 0's chunk for rank 1: g = 5 + 2
  CHECK(kernels::comm_expected_value(p, 2) == 1007.0f);
  p.op = CollOp::send_recv;  // from rank 0
  CHECK(kernels::comm_expected_value(p, 4) == 1004.0f);
}
#endif
