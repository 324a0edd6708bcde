#include "yaml_util.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

namespace mixserve::detail {

YAML::Node yaml_parse(const std::string& text, const std::string& origin) {
  try {
    YAML::Node root = YAML::Load(text);
    if (!root || root.IsNull())
      throw InputError(fmt::format("{}: empty document, expected a YAML map", origin));
    return root;
  } catch (const YAML::ParserException& e) {
    throw InputError(fmt::format("{}: malformed YAML at line {}, column {}: {}", origin,
                                 e.mark.line + 1, e.mark.column + 1, e.msg));
  }
}

std::string yaml_describe(const YAML::Node& n) {
  if (!n || n.IsNull()) return "null";
  if (n.IsMap()) return "a map";
  if (n.IsSequence()) return "a list";
  return n.Scalar();
}

YamlMap::YamlMap(const YAML::Node& node, std::string origin, std::string path)
    : node_(node), origin_(std::move(origin)), path_(std::move(path)) {
  if (!node_.IsMap())
    throw_input_error(origin_, path_.empty() ? "(document)" : path_, "a map",
                      yaml_describe(node_));
}

std::string YamlMap::key_path(std::string_view key) const {
  return path_.empty() ? std::string(key) : fmt::format("{}.{}", path_, key);
}

void YamlMap::fail(std::string_view key, const std::string& expected,
                   const std::string& got) const {
  throw_input_error(origin_, key_path(key), expected, got);
}

bool YamlMap::has(std::string_view key) const {
  const YAML::Node n = node_[std::string(key)];
  return n && !n.IsNull();
}

void YamlMap::allow_keys(std::initializer_list<std::string_view> keys) const {
  for (const auto& kv : node_) {
    const std::string k = kv.first.as<std::string>();
    bool ok = false;
    for (auto a : keys) ok = ok || a == k;
    if (!ok) {
      std::string list;
      for (auto a : keys) list += (list.empty() ? "" : ", ") + std::string(a);
      throw_input_error(origin_, key_path(k), fmt::format("one of the known keys ({})", list),
                        "an unknown key");
    }
  }
}

YAML::Node YamlMap::required(std::string_view key, const std::string& expected) const {
  if (!has(key)) fail(key, expected, "missing");
  return node(key);
}

YamlMap YamlMap::map(std::string_view key) const {
  return YamlMap(required(key, "a map"), origin_, key_path(key));
}

std::vector<YAML::Node> YamlMap::list(std::string_view key, bool req) const {
  std::vector<YAML::Node> out;
  if (!has(key)) {
    if (req) fail(key, "a list", "missing");
    return out;
  }
  const YAML::Node n = node(key);
  if (!n.IsSequence()) fail(key, "a list", yaml_describe(n));
  for (const auto& e : n) out.push_back(e);
  return out;
}

std::string YamlMap::as_str(const YAML::Node& n, const std::string& path) const {
  if (!n.IsScalar()) throw_input_error(origin_, path, "a string", yaml_describe(n));
  return n.Scalar();
}

int64_t YamlMap::as_i64(const YAML::Node& n, const std::string& path) const {
  if (!n.IsScalar()) throw_input_error(origin_, path, "an integer", yaml_describe(n));
  try {
    return n.as<long long>();
  } catch (const YAML::Exception&) {
    // Accept integral floats written as "4.0e3"; reject 1.5, "abc".
    try {
      const double d = n.as<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15)
        return static_cast<int64_t>(d);
    } catch (const YAML::Exception&) {
    }
    throw_input_error(origin_, path, "an integer", n.Scalar());
  }
}

double YamlMap::as_num(const YAML::Node& n, const std::string& path) const {
  if (!n.IsScalar()) throw_input_error(origin_, path, "a number", yaml_describe(n));
  double d = 0;
  try {
    d = n.as<double>();
  } catch (const YAML::Exception&) {
    throw_input_error(origin_, path, "a number", n.Scalar());
  }
  if (!std::isfinite(d)) throw_input_error(origin_, path, "a finite number", n.Scalar());
  return d;
}

std::string YamlMap::str(std::string_view key) const {
  return as_str(required(key, "a string"), key_path(key));
}
std::string YamlMap::str(std::string_view key, const std::string& def) const {
  return has(key) ? as_str(node(key), key_path(key)) : def;
}

int64_t YamlMap::i64(std::string_view key) const {
  return as_i64(required(key, "an integer"), key_path(key));
}
int64_t YamlMap::i64(std::string_view key, int64_t def) const {
  return has(key) ? as_i64(node(key), key_path(key)) : def;
}

int YamlMap::integer(std::string_view key) const {
  const int64_t v = i64(key);
  if (v > std::numeric_limits<int>::max() || v < std::numeric_limits<int>::min())
    fail(key, "an integer that fits 32 bits", std::to_string(v));
  return static_cast<int>(v);
}
int YamlMap::integer(std::string_view key, int def) const {
  return has(key) ? integer(key) : def;
}

double YamlMap::num(std::string_view key) const {
  return as_num(required(key, "a number"), key_path(key));
}
double YamlMap::num(std::string_view key, double def) const {
  return has(key) ? as_num(node(key), key_path(key)) : def;
}

bool YamlMap::boolean(std::string_view key) const {
  const YAML::Node n = required(key, "true or false");
  if (!n.IsScalar()) fail(key, "true or false", yaml_describe(n));
  try {
    return n.as<bool>();
  } catch (const YAML::Exception&) {
    fail(key, "true or false", n.Scalar());
  }
}
bool YamlMap::boolean(std::string_view key, bool def) const {
  return has(key) ? boolean(key) : def;
}

int YamlMap::positive_int(std::string_view key) const {
  const int v = integer(key);
  if (v <= 0) fail(key, "an integer > 0", std::to_string(v));
  return v;
}
int YamlMap::nonneg_int(std::string_view key, int def) const {
  const int v = integer(key, def);
  if (v < 0) fail(key, "an integer >= 0", std::to_string(v));
  return v;
}
int64_t YamlMap::positive_i64(std::string_view key) const {
  const int64_t v = i64(key);
  if (v <= 0) fail(key, "an integer > 0", std::to_string(v));
  return v;
}
int64_t YamlMap::nonneg_i64(std::string_view key, int64_t def) const {
  const int64_t v = i64(key, def);
  if (v < 0) fail(key, "an integer >= 0", std::to_string(v));
  return v;
}
double YamlMap::positive_num(std::string_view key) const {
  const double v = num(key);
  if (!(v > 0)) fail(key, "a number > 0", fmt_num(v));
  return v;
}
double YamlMap::positive_num(std::string_view key, double def) const {
  return has(key) ? positive_num(key) : def;
}
double YamlMap::nonneg_num(std::string_view key, double def) const {
  const double v = num(key, def);
  if (v < 0) fail(key, "a number >= 0", fmt_num(v));
  return v;
}

DType YamlMap::dtype(std::string_view key) const {
  const std::string s = str(key);
  const auto d = parse_dtype(s);
  if (!d) fail(key, fmt::format("a dtype ({})", dtype_names()), s);
  return *d;
}
DType YamlMap::dtype(std::string_view key, DType def) const {
  return has(key) ? dtype(key) : def;
}

std::string fmt_num(double v) { return fmt::format("{}", v); }

void emit_provenance(YAML::Emitter& out, const Provenance& p) {
  out << YAML::BeginMap;
  out << YAML::Key << "tool" << YAML::Value << p.tool;
  out << YAML::Key << "created" << YAML::Value << p.created;
  out << YAML::Key << "inputs" << YAML::Value << YAML::BeginSeq;
  for (const auto& [name, sha] : p.inputs) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "name" << YAML::Value << name;
    out << YAML::Key << "sha256" << YAML::Value << sha;
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::EndMap;
}

Provenance read_provenance(const YamlMap& parent, std::string_view key) {
  Provenance p;
  if (!parent.has(key)) return p;
  const YamlMap m = parent.map(key);
  m.allow_keys({"tool", "created", "inputs"});
  p.tool = m.str("tool", "");
  p.created = m.str("created", "");
  const auto inputs = m.list("inputs", false);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const YamlMap e(inputs[i], m.origin(), fmt::format("{}[{}]", m.key_path("inputs"), i));
    e.allow_keys({"name", "sha256"});
    p.inputs.emplace_back(e.str("name"), e.str("sha256"));
  }
  return p;
}

std::vector<std::string> list_shipped(const std::string& subdir) {
  namespace fs = std::filesystem;
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(data_dir() / subdir, ec))
    if (e.path().extension() == ".yaml") names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::filesystem::path resolve_shipped(const std::string& name_or_path, const std::string& subdir,
                                      const std::string& what) {
  namespace fs = std::filesystem;
  const std::string& s = name_or_path;
  if (s.empty()) throw InputError(fmt::format("{}: empty name, expected a shipped name or a path", what));
  const bool is_path = s.find('/') != std::string::npos || s.ends_with(".yaml") ||
                       s.ends_with(".yml") || s.ends_with(".json");
  if (is_path) return fs::path(s);
  const fs::path shipped = data_dir() / subdir / (s + ".yaml");
  std::error_code ec;
  if (fs::is_regular_file(shipped, ec)) return shipped;
  std::string names;
  for (const auto& n : list_shipped(subdir)) names += (names.empty() ? "" : ", ") + n;
  throw InputError(fmt::format("{} '{}': not a shipped {} ({}) and not a file path", what, s, what,
                               names.empty() ? "none found under " + (data_dir() / subdir).string()
                                             : names));
}

}  // namespace mixserve::detail
