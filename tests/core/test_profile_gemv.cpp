// The decode kernels' profile tables (core/decode_path.hpp): tables.gemv round-trips, is written
// only when it has points (a profile without it reads and writes as before), and bad rows name the
// key; the shared decision rules the executor and the cost model both call.
#include <doctest/doctest.h>

#include <string>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/io.hpp"

using namespace mixserve;

namespace {

HardwareProfile small_profile() {
  HardwareProfile p;
  p.name = "h200";
  p.gpu = "H200";
  p.source = "measured";
  p.sm_count = 132;
  p.memory_GiB = 139.8;
  p.peak_tflops_bf16 = 700;
  p.peak_tflops_fp8 = 1300;
  p.peak_tflops_fp32 = 50;
  p.mem_bw_GBps = 4200;
  return p;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("profile gemv table: round trip, absent when empty, gemv2 expert tag kept") {
  HardwareProfile p = small_profile();
  SUBCASE("no GEMV points: no gemv key, reads back empty") {
    const std::string y = profile_to_yaml(p);
    CHECK_FALSE(contains(y, "gemv"));
    CHECK(parse_profile_yaml(y, "p.yaml").gemv.empty());
  }
  SUBCASE("points of the three kinds and a v2 expert point") {
    p.gemv.push_back({std::string(kGemvImplPlain), 1, 5120, 2048, DType::bf16, 7.25});
    p.gemv.push_back({std::string(kGemvImplSwiglu), 8, 2048, 6144, DType::bf16, 11.5});
    p.gemv.push_back({std::string(kGemvImplFp32), 3, 128, 2048, DType::bf16, 3.125});
    ExpertGemmPoint e;
    e.num_experts = 128;
    e.tokens = 16;
    e.max_tokens = 1;
    e.active_experts = 16;
    e.n = 2048;
    e.k = 768;
    e.distribution = std::string(kExpertGemvV2Tag) + "uniform";
    e.time_us = 9.5;
    p.experts.push_back(e);
    const HardwareProfile q = parse_profile_yaml(profile_to_yaml(p), "p.yaml");
    REQUIRE(q.gemv.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      CHECK(q.gemv[i].impl == p.gemv[i].impl);
      CHECK(q.gemv[i].m == p.gemv[i].m);
      CHECK(q.gemv[i].n == p.gemv[i].n);
      CHECK(q.gemv[i].k == p.gemv[i].k);
      CHECK(q.gemv[i].time_us == doctest::Approx(p.gemv[i].time_us));
    }
    REQUIRE(q.experts.size() == 1);
    CHECK(q.experts[0].distribution == "gemv2:uniform");
  }
}

TEST_CASE("profile gemv table: bad rows name the file and the key") {
  const std::string head = profile_to_yaml(small_profile());
  const auto with_row = [&](const std::string& row) {
    std::string y = head;
    const auto pos = y.find("tables:");
    REQUIRE(pos != std::string::npos);
    const auto eol = y.find('\n', pos);
    return y.insert(eol + 1, "  gemv:\n    - " + row + "\n");
  };
  CHECK(parse_profile_yaml(with_row("{impl: gemv, m: 2, n: 64, k: 64, dtype: bf16, time_us: 3}"), "ok.yaml").gemv.size() ==
        1);
  for (const auto& [row, key] : {std::pair{"{impl: gemm, m: 2, n: 64, k: 64, dtype: bf16, time_us: 3}", "impl"},
                                 std::pair{"{impl: gemv, m: 0, n: 64, k: 64, dtype: bf16, time_us: 3}", "m"},
                                 std::pair{"{impl: gemv, m: 2, n: 64, k: 64, dtype: bf16, time_us: -1}", "time_us"},
                                 std::pair{"{impl: gemv, m: 2, n: 64, k: 64, dtype: bf16, time_us: 3, x: 1}", "x"}}) {
    CAPTURE(row);
    try {
      parse_profile_yaml(with_row(row), "bad.yaml");
      FAIL("no InputError");
    } catch (const InputError& e) {
      CHECK(contains(e.what(), "bad.yaml"));
      CHECK(contains(e.what(), key));
    }
  }
}

TEST_CASE("decode path rules: the executor's switches at their bounds") {
  // Sharded models keep the previous kernels.
  CHECK(decode_kernels_enabled(true, false));
  CHECK_FALSE(decode_kernels_enabled(true, true));
  CHECK_FALSE(decode_kernels_enabled(false, false));
  // Dense GEMV, router GEMV, grouped GEMV v2 and PDL up to 8 tokens.
  for (int64_t t : {1, 4, 8}) {
    CAPTURE(t);
    CHECK(uses_dense_gemv(true, t));
    CHECK(router_uses_gemv(true, t));
    CHECK(uses_grouped_gemv_v2(true, t));
    CHECK(uses_programmatic_launch(true, true, t));
  }
  CHECK_FALSE(uses_dense_gemv(true, 9));
  CHECK_FALSE(router_uses_gemv(true, 9));
  CHECK_FALSE(uses_grouped_gemv_v2(true, 9));
  CHECK_FALSE(uses_dense_gemv(false, 1));
  CHECK_FALSE(uses_programmatic_launch(true, false, 1));
  CHECK(uses_grouped_gemv_v2(true, 64, 64));  // the executor's configurable bound
  // Fused QK-norm/RoPE/KV write: decode kernels at any size, per-head or no q/k norm.
  CHECK(uses_fused_qk_rope_kv(true, true));
  CHECK_FALSE(uses_fused_qk_rope_kv(true, false));
  CHECK_FALSE(uses_fused_qk_rope_kv(false, true));
  CHECK_FALSE(qk_norm_per_head("OlmoeForCausalLM"));
  CHECK(qk_norm_per_head("Qwen3MoeForCausalLM"));
  // Permute: one launch up to 128 pairs with the decode kernels, else four; none without pairs.
  CHECK(permute_launches(true, 128) == 1);
  CHECK(permute_launches(true, 129) == 4);
  CHECK(permute_launches(false, 8) == 4);
  CHECK(permute_launches(true, 0) == 0);
}

TEST_CASE("expert path: the bucketed layout's row counts and the switch's values") {
  // Each count rounded up to the alignment; 0 stays 0 (an empty expert gets no rows, no bucket).
  CHECK(expert_bucket_rows(0, 128) == 0);
  CHECK(expert_bucket_rows(1, 128) == 128);
  CHECK(expert_bucket_rows(128, 128) == 128);
  CHECK(expert_bucket_rows(129, 128) == 256);
  CHECK(expert_bucket_rows(1031, 64) == 1088);
  CHECK(expert_bucket_rows(7, 1) == 7);
  // The buffers' bound holds for every count split: brute force over small cases.
  for (int64_t align : {1, 3, 16, 128})
    for (int64_t experts : {1, 2, 5})
      for (int64_t rows = 0; rows <= 12; ++rows) {
        // Every split of `rows` over the experts: the counts as the digits of code in base rows + 1.
        int64_t splits = 1;
        for (int64_t e = 0; e < experts; ++e) splits *= rows + 1;
        int64_t worst = 0;
        for (int64_t code = 0; code < splits; ++code) {
          int64_t c = code, sum = 0, padded = 0;
          for (int64_t e = 0; e < experts; ++e, c /= rows + 1) {
            sum += c % (rows + 1);
            padded += expert_bucket_rows(c % (rows + 1), align);
          }
          if (sum == rows) worst = std::max(worst, padded);
        }
        CAPTURE(align);
        CAPTURE(experts);
        CAPTURE(rows);
        CHECK(worst <= expert_bucket_capacity(rows, experts, align));
      }
  CHECK(expert_bucket_capacity(131072, 128, 128) == 131072 + 128 * 127);
  CHECK(expert_bucket_capacity(3, 128, 128) == 3 * 128);  // at most 3 experts have rows
  CHECK(is_bucketed_expert_gemm(kExpertGemmBucketed));
  CHECK(is_bucketed_expert_gemm(kExpertGemmBucketedBatched));
  CHECK_FALSE(is_bucketed_expert_gemm(kExpertGemmPaddedBatch));
  CHECK_FALSE(is_bucketed_expert_gemm(kExpertGemmStreams));
  CHECK(kExpertGemmStreamsMin == kExpertGemmBucketedBatched);
  // Every special value stays distinct and >= the minimum the validation takes.
  for (int v : {kExpertGemmGroupedCall, kExpertGemmPaddedBatch, kExpertGemmBucketed, kExpertGemmBucketedBatched})
    CHECK(v >= kExpertGemmStreamsMin);
  CHECK(kExpertBucketRowAlign >= 1);
  CHECK(kExpertBucketRowAlign <= kExpertBucketRowAlignMax);
}
