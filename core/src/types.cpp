#include "mixserve/core/types.hpp"

#include "mixserve/core/enum_names.hpp"

namespace mixserve {

namespace {
constexpr auto kDTypeNames = MIXSERVE_ENUM_TABLE(DType, MIXSERVE_DTYPES);
}  // namespace

std::string_view to_string(DType d) { return enum_to_string(kDTypeNames, d); }

std::optional<DType> parse_dtype(std::string_view s) {
  if (const auto d = enum_parse(kDTypeNames, s)) return d;
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::fp16;
  if (s == "float32") return DType::fp32;
  return std::nullopt;
}

double dtype_bytes(DType d) {
  switch (d) {
#define MIXSERVE_X(e, s, b, c) \
  case DType::e:               \
    return (b) / 8.0;
    MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
  }
  return 0;
}

DType compute_class(DType d) {
  switch (d) {
#define MIXSERVE_X(e, s, b, c) \
  case DType::e:               \
    return DType::c;
    MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
  }
  return d;
}

std::string dtype_names() { return enum_names_joined(kDTypeNames); }

}  // namespace mixserve
