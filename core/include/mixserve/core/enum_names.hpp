// One {enum, name} table per X-macro list, and the to_string / parse / names readers written
// once for every enum (STYLE.md §2). A table comes from the list that defines the enum:
//   constexpr auto kRouterNames = MIXSERVE_ENUM_TABLE(RouterKind, MIXSERVE_ROUTERS);
// The list's rows are X(enum, "name", ...); columns after the name are ignored here.
#pragma once
#include <array>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mixserve {

template <typename E>
struct EnumName {
  E value;
  std::string_view name;      // the printed, YAML and CLI form
  std::string_view spelling;  // the enumerator as written in C++
};

#define MIXSERVE_ENUM_ROW_(e, s, ...) ::mixserve::EnumName<MixserveEnum_>{MixserveEnum_::e, s, #e},
#define MIXSERVE_ENUM_TABLE(Enum, LIST)          \
  [] {                                           \
    using MixserveEnum_ = Enum;                  \
    return std::array{LIST(MIXSERVE_ENUM_ROW_)}; \
  }()

// The name of e; "?" for a value outside the table.
template <typename E, std::size_t N>
constexpr std::string_view enum_to_string(const std::array<EnumName<E>, N>& table, E e) {
  for (const auto& x : table)
    if (x.value == e) return x.name;
  return "?";
}

// What enum_parse compares text with: the name only, or also the C++ enumerator ("nccl_a2a").
enum class EnumMatch { name, name_or_spelling };

// The value of the first row that text matches exactly; nullopt when none does.
template <typename E, std::size_t N>
constexpr std::optional<E> enum_parse(const std::array<EnumName<E>, N>& table,
                                      std::string_view text, EnumMatch match = EnumMatch::name) {
  for (const auto& x : table)
    if (x.name == text || (match == EnumMatch::name_or_spelling && x.spelling == text))
      return x.value;
  return std::nullopt;
}

// The names in table order (CLI choices).
template <typename E, std::size_t N>
std::vector<std::string> enum_names(const std::array<EnumName<E>, N>& table) {
  std::vector<std::string> out;
  for (const auto& x : table) out.emplace_back(x.name);
  return out;
}

// The names in table order, joined by ", " (error messages and help text).
template <typename E, std::size_t N>
std::string enum_names_joined(const std::array<EnumName<E>, N>& table) {
  std::string out;
  for (const auto& x : table) {
    if (!out.empty()) out += ", ";
    out += x.name;
  }
  return out;
}

}  // namespace mixserve
