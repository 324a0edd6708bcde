#include <doctest/doctest.h>

#include "mixserve/core/types.hpp"

using namespace mixserve;

TEST_CASE("dtype table round-trips names and sizes") {
  for (DType d : {DType::fp32, DType::bf16, DType::fp16, DType::fp8_e4m3, DType::fp8_block, DType::mxfp4}) {
    auto parsed = parse_dtype(to_string(d));
    REQUIRE(parsed.has_value());
    CHECK(*parsed == d);
  }
  CHECK(dtype_bytes(DType::bf16) == 2.0);
  CHECK(dtype_bytes(DType::fp8_block) == 1.0);
  CHECK(compute_class(DType::fp8_block) == DType::fp8_e4m3);
  CHECK_FALSE(parse_dtype("int3").has_value());
  CHECK(is_pow2(8));
  CHECK_FALSE(is_pow2(6));
  CHECK_FALSE(is_pow2(0));
}
