// Private helpers shared by the model YAML reader and the HF config importer.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mixserve/core/model.hpp"

namespace mixserve::detail {

std::optional<AttentionType> parse_attention_type(std::string_view s);
std::optional<Scoring> parse_scoring(std::string_view s);
// "every S from O" -> flags of n layers (i >= O and (i - O) % S == 0); nullopt if malformed.
std::optional<std::vector<bool>> parse_every(const std::string& text, int n);
// The "every S from O" that reproduces flags, or "" if none does.
std::string describe_every(const std::vector<bool>& flags);
// Cross-field checks (head divisibility, top_k <= experts, MLA dims, ...). Throws InputError
// naming `origin` and the schema key.
void validate_model(const ModelSpec& m, const std::string& origin);

}  // namespace mixserve::detail
