// String forms of the enums whose X-macro tables live in the headers (STYLE.md §2).
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"

namespace mixserve {

#define MIXSERVE_X(e, s) \
  case T::e:             \
    return s;

std::string_view to_string(AttentionType t) {
  using T = AttentionType;
  switch (t) { MIXSERVE_ATTENTION_TYPES(MIXSERVE_X) }
  return "?";
}

std::string_view to_string(Scoring s) {
  using T = Scoring;
  switch (s) { MIXSERVE_SCORING(MIXSERVE_X) }
  return "?";
}

std::string_view to_string(CostSource s) {
  using T = CostSource;
  switch (s) { MIXSERVE_COST_SOURCES(MIXSERVE_X) }
  return "?";
}

std::string_view to_string(CollOp op) {
  using T = CollOp;
  switch (op) { MIXSERVE_COLL_OPS(MIXSERVE_X) }
  return "?";
}

#undef MIXSERVE_X

}  // namespace mixserve
