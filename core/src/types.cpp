#include "mixserve/core/types.hpp"

namespace mixserve {

std::string_view to_string(DType d) {
  switch (d) {
#define MIXSERVE_X(e, s, b, c) \
  case DType::e:               \
    return s;
    MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
  }
  return "?";
}

std::optional<DType> parse_dtype(std::string_view s) {
#define MIXSERVE_X(e, str, b, c) \
  if (s == str) return DType::e;
  MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
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

std::string dtype_names() {
  std::string out;
#define MIXSERVE_X(e, s, b, c) \
  if (!out.empty()) out += ", "; \
  out += s;
  MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
  return out;
}

}  // namespace mixserve
