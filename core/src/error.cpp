#include "mixserve/core/error.hpp"

#include <fmt/format.h>

namespace mixserve {

void throw_input_error(const std::string& file, const std::string& key, const std::string& expected,
                       const std::string& got) {
  std::string msg = fmt::format("{}: key '{}': expected {}", file, key, expected);
  if (!got.empty()) msg += fmt::format(", got '{}'", got);
  throw InputError(msg);
}

}  // namespace mixserve
