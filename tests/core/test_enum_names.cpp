// The generic {enum, name} tables (enum_names.hpp) and the core enums that read them: every name
// round-trips through to_string and parse, and an unknown name is rejected.
#include <doctest/doctest.h>

#include <set>
#include <string>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/types.hpp"
#include "mixserve/core/workload.hpp"

using namespace mixserve;

namespace {

// Each row: to_string gives the table's name, the name parses back, names are distinct and
// enum_names lists them in table order; an unknown name and an out-of-range value are refused.
template <typename E, std::size_t N>
void check_table(const std::array<EnumName<E>, N>& table) {
  std::set<std::string_view> seen;
  const auto names = enum_names(table);
  REQUIRE(names.size() == N);
  for (std::size_t i = 0; i < N; ++i) {
    const auto& row = table[i];
    CAPTURE(row.name);
    CHECK(to_string(row.value) == row.name);
    CHECK(enum_to_string(table, row.value) == row.name);
    CHECK(enum_parse(table, to_string(row.value)) == row.value);
    CHECK(enum_parse(table, row.spelling, EnumMatch::name_or_spelling) == row.value);
    CHECK(names[i] == row.name);
    CHECK(seen.insert(row.name).second);
  }
  CHECK_FALSE(enum_parse(table, "no-such-name").has_value());
  CHECK_FALSE(enum_parse(table, "").has_value());
  CHECK(enum_to_string(table, static_cast<E>(N + 7)) == "?");
  CHECK(to_string(static_cast<E>(N + 7)) == "?");
}

}  // namespace

TEST_CASE("enum tables: every core enum round-trips through its X-macro list") {
  check_table(MIXSERVE_ENUM_TABLE(DType, MIXSERVE_DTYPES));
  check_table(MIXSERVE_ENUM_TABLE(AttentionType, MIXSERVE_ATTENTION_TYPES));
  check_table(MIXSERVE_ENUM_TABLE(Scoring, MIXSERVE_SCORING));
  check_table(MIXSERVE_ENUM_TABLE(CostSource, MIXSERVE_COST_SOURCES));
  check_table(MIXSERVE_ENUM_TABLE(CollOp, MIXSERVE_COLL_OPS));
  check_table(MIXSERVE_ENUM_TABLE(MoeComm, MIXSERVE_MOE_COMMS));
  check_table(MIXSERVE_ENUM_TABLE(ArrivalKind, MIXSERVE_ARRIVALS));
  check_table(MIXSERVE_ENUM_TABLE(LengthKind, MIXSERVE_LENGTH_DISTS));
}

TEST_CASE("enum tables: the table is built at compile time, in list order") {
  constexpr auto t = MIXSERVE_ENUM_TABLE(MoeComm, MIXSERVE_MOE_COMMS);
  static_assert(t.size() == 4);
  static_assert(t[1].value == MoeComm::nccl_a2a && t[1].name == "a2a" &&
                t[1].spelling == "nccl_a2a");
  static_assert(enum_parse(t, "rs-a2a-ag") == MoeComm::rs_a2a_ag);
  static_assert(!enum_parse(t, "nccl_a2a").has_value());  // a spelling is not a name
  static_assert(enum_parse(t, "nccl_a2a", EnumMatch::name_or_spelling) == MoeComm::nccl_a2a);
  static_assert(enum_to_string(t, MoeComm::fused) == "fused");
  CHECK(enum_names_joined(t) == "allreduce, a2a, rs-a2a-ag, fused");
}

TEST_CASE("dtype names: table names, the long aliases, and the joined list") {
  for (const auto& row : MIXSERVE_ENUM_TABLE(DType, MIXSERVE_DTYPES))
    CHECK(parse_dtype(row.name) == row.value);
  CHECK(parse_dtype("bfloat16") == DType::bf16);
  CHECK(parse_dtype("float16") == DType::fp16);
  CHECK(parse_dtype("float32") == DType::fp32);
  CHECK(parse_dtype("fp8") == DType::fp8_e4m3);
  CHECK_FALSE(parse_dtype("fp8_e4m3").has_value());  // DType parse takes no enum spellings
  CHECK_FALSE(parse_dtype("int3").has_value());
  CHECK_FALSE(parse_dtype("BF16").has_value());
  CHECK(dtype_names() == "fp32, bf16, fp16, fp8, fp8_block128, mxfp4");
}

TEST_CASE("MoE comm names: the printed form and the enum spelling both parse") {
  for (const auto& row : MIXSERVE_ENUM_TABLE(MoeComm, MIXSERVE_MOE_COMMS)) {
    CHECK(parse_moe_comm(row.name) == row.value);
    CHECK(parse_moe_comm(row.spelling) == row.value);
  }
  CHECK(parse_moe_comm("a2a") == MoeComm::nccl_a2a);
  CHECK(parse_moe_comm("nccl_a2a") == MoeComm::nccl_a2a);
  CHECK(parse_moe_comm("tp_allreduce") == MoeComm::tp_allreduce);
  CHECK(parse_moe_comm("rs_a2a_ag") == MoeComm::rs_a2a_ag);
  CHECK_FALSE(parse_moe_comm("ring").has_value());
  CHECK_FALSE(parse_moe_comm("").has_value());
}
