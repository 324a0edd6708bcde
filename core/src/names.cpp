// String forms of the enums whose X-macro tables live in the headers (STYLE.md §2).
#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"

namespace mixserve {

std::string_view to_string(AttentionType t) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(AttentionType, MIXSERVE_ATTENTION_TYPES);
  return enum_to_string(kNames, t);
}

std::string_view to_string(Scoring s) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(Scoring, MIXSERVE_SCORING);
  return enum_to_string(kNames, s);
}

std::string_view to_string(CostSource s) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(CostSource, MIXSERVE_COST_SOURCES);
  return enum_to_string(kNames, s);
}

std::string_view to_string(CollOp op) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(CollOp, MIXSERVE_COLL_OPS);
  return enum_to_string(kNames, op);
}

}  // namespace mixserve
