// Basic vocabulary: data types and their sizes. One X-macro table feeds the enum, its
// string form and its byte size (STYLE.md §2).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mixserve {

// X(enum, name, bits per element, compute class)
#define MIXSERVE_DTYPES(X)                  \
  X(fp32, "fp32", 32.0, fp32)               \
  X(bf16, "bf16", 16.0, bf16)               \
  X(fp16, "fp16", 16.0, bf16)               \
  X(fp8_e4m3, "fp8", 8.0, fp8_e4m3)              \
  X(fp8_block, "fp8_block128", 8.0, fp8_e4m3)    \
  X(mxfp4, "mxfp4", 4.25, fp8_e4m3)

enum class DType {
#define MIXSERVE_X(e, s, b, c) e,
  MIXSERVE_DTYPES(MIXSERVE_X)
#undef MIXSERVE_X
};

std::string_view to_string(DType d);
std::optional<DType> parse_dtype(std::string_view s);
// Bytes per element (may be fractional: mxfp4 carries a scale byte per 32 values).
double dtype_bytes(DType d);
// The tensor-core peak class a GEMM in this dtype runs at: fp32, bf16 or fp8.
DType compute_class(DType d);
// Comma-separated list of the accepted names, for error messages and CLI help.
std::string dtype_names();

// Powers of two only (DESIGN.md: all parallel degrees are powers of two).
constexpr bool is_pow2(long long x) { return x > 0 && (x & (x - 1)) == 0; }

// Provenance carried by every file MixServe writes (DESIGN.md "Files").
struct Provenance {
  std::string tool;          // e.g. "mixserve-plan 0.1.0"
  std::string created;       // ISO-8601 UTC
  std::vector<std::pair<std::string, std::string>> inputs;  // (path or name, sha256 hex)
};

}  // namespace mixserve
