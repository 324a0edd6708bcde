// Private helpers of core's YAML readers and writers (not installed, not a shared contract).
// A YamlMap wraps one mapping node with the file name and the key path that lead to it, so every
// error names the file, the full key ("attention.num_heads", "tables.gemm[3].m") and the form
// that was expected.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "mixserve/core/types.hpp"

namespace mixserve::detail {

// Parses text; syntax errors become InputError "<origin>: line L, column C: <reason>".
YAML::Node yaml_parse(const std::string& text, const std::string& origin);

// "a map", "a list", "null", or the scalar text itself.
std::string yaml_describe(const YAML::Node& n);

class YamlMap {
 public:
  // Throws InputError naming `path` unless `node` is a map (path "" = the document root).
  YamlMap(const YAML::Node& node, std::string origin, std::string path);

  const std::string& origin() const { return origin_; }
  std::string key_path(std::string_view key) const;
  [[noreturn]] void fail(std::string_view key, const std::string& expected,
                         const std::string& got = "") const;

  // Present and not null.
  bool has(std::string_view key) const;
  YAML::Node node(std::string_view key) const { return node_[std::string(key)]; }
  // Unknown keys are errors; the message lists the accepted ones.
  void allow_keys(std::initializer_list<std::string_view> keys) const;

  YamlMap map(std::string_view key) const;  // required map
  // Required list (an absent or null key gives an empty list when `required` is false).
  std::vector<YAML::Node> list(std::string_view key, bool required = true) const;

  std::string str(std::string_view key) const;
  std::string str(std::string_view key, const std::string& def) const;
  int64_t i64(std::string_view key) const;
  int64_t i64(std::string_view key, int64_t def) const;
  int integer(std::string_view key) const;
  int integer(std::string_view key, int def) const;
  double num(std::string_view key) const;
  double num(std::string_view key, double def) const;
  bool boolean(std::string_view key) const;
  bool boolean(std::string_view key, bool def) const;

  // Sizes: > 0 (positive_*) or >= 0 (nonneg_*), with the range in the error message.
  int positive_int(std::string_view key) const;
  int nonneg_int(std::string_view key, int def) const;
  int64_t positive_i64(std::string_view key) const;
  int64_t nonneg_i64(std::string_view key, int64_t def) const;
  double positive_num(std::string_view key) const;
  double positive_num(std::string_view key, double def) const;
  double nonneg_num(std::string_view key, double def) const;
  DType dtype(std::string_view key, DType def) const;
  DType dtype(std::string_view key) const;

  // Converters for list elements and other nodes read outside a map.
  int64_t as_i64(const YAML::Node& n, const std::string& path) const;
  double as_num(const YAML::Node& n, const std::string& path) const;
  std::string as_str(const YAML::Node& n, const std::string& path) const;

 private:
  YAML::Node required(std::string_view key, const std::string& expected) const;
  YAML::Node node_;
  std::string origin_;
  std::string path_;
};

// Shortest text that reads back as the same double ("0.7", "1e-06", "989.5").
std::string fmt_num(double v);

// Provenance block {tool, created, inputs: [{name, sha256}]}.
void emit_provenance(YAML::Emitter& out, const Provenance& p);
Provenance read_provenance(const YamlMap& parent, std::string_view key);

// Shipped files: <data_dir>/<subdir>/<name>.yaml, sorted names.
std::vector<std::string> list_shipped(const std::string& subdir);
// A path (contains '/' or ends in .yaml/.yml/.json) is returned as is; otherwise the shipped file
// of that name, or InputError "<what> '<name>': not a shipped <what> (a, b, ...) and not a path".
std::filesystem::path resolve_shipped(const std::string& name_or_path, const std::string& subdir,
                                      const std::string& what);

}  // namespace mixserve::detail
