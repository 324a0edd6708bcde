// Workload files (configs/workloads/*.yaml): arrivals, request lengths, SLOs, engine limits and
// the routing assumption of the simulator. Schema (every key but `name` optional):
//
//   version: 1
//   name: sharegpt-like
//   arrival: {kind: poisson, rate: 4}       # burst | poisson | gamma (burstiness) |
//                                           # closed_loop (concurrency) | trace (file)
//   input:  {kind: sharegpt}                # fixed (value) | uniform (min, max) |
//   output: {kind: fixed, value: 256}       # normal / lognormal (mean, stddev, min, max) |
//                                           # histogram (file, or bins: [[len, weight], ...])
//   num_requests: 1000
//   seed: 0
//   slo: {ttft_ms: 2000, tpot_ms: 100, e2el_ms: 0}
//   limits: {max_num_seqs: 16, max_seq_len: 4096}
//   routing: {kind: zipf, skew: 1.2}        # uniform | zipf (skew) | histogram (file)
//   approximate: false                      # true: the lengths only approximate a data set
//                                           # (always true with kind: sharegpt)
//   notes: "..."
//
// Relative file names (trace, histogram, routing) are resolved against the workload file's folder.
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/workload.hpp"
#include "yaml_util.hpp"

namespace mixserve {

using detail::fmt_num;
using detail::YamlMap;

namespace {

// Built-in "sharegpt" lengths: a lognormal fitted to two published means and an assumed spread.
// It is an approximation, labelled as such wherever it is used (WorkloadSpec::approximate).
// Means: vLLM paper (Kwon et al., SOSP'23, Fig. 11, ShareGPT): input 161.31, output 337.99
// tokens. Coefficients of variation (input 1.5, output 1.0) are OUR assumption, chosen for the
// heavy right tail of chat lengths; they are not published figures. Clamps follow vLLM's ShareGPT
// sampler, which drops prompts or outputs shorter than 4 tokens and prompts longer than 1024.
struct ShareGptParams {
  double mean, cv, min, max;
};
constexpr ShareGptParams kShareGptInput{161.31, 1.5, 4, 1024};
constexpr ShareGptParams kShareGptOutput{337.99, 1.0, 4, 1024};

constexpr auto kArrivalNames = MIXSERVE_ENUM_TABLE(ArrivalKind, MIXSERVE_ARRIVALS);
constexpr auto kLengthNames = MIXSERVE_ENUM_TABLE(LengthKind, MIXSERVE_LENGTH_DISTS);

template <typename Enum, size_t N>
Enum parse_enum(const std::array<EnumName<Enum>, N>& table, const YamlMap& m, std::string_view key,
                const std::string& value) {
  if (const auto e = enum_parse(table, value)) return *e;
  m.fail(key, "one of " + enum_names_joined(table), value);
}

double norm_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }
double norm_pdf(double z) { return std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI); }

double clamp_len(double v, double lo, double hi) {
  v = std::max(v, lo);
  return hi > 0 ? std::min(v, hi) : v;
}

// E[clamp(X, lo, hi)] for X ~ Normal(mu, sigma); hi <= 0 means no upper clamp.
double clamped_normal_mean(double mu, double sigma, double lo, double hi) {
  if (sigma <= 0) return clamp_len(mu, lo, hi);
  const double a = (lo - mu) / sigma;
  const double pa = norm_cdf(a);
  if (hi <= 0) return lo * pa + mu * (1 - pa) + sigma * norm_pdf(a);
  const double b = (hi - mu) / sigma;
  const double pb = norm_cdf(b);
  return lo * pa + hi * (1 - pb) + mu * (pb - pa) + sigma * (norm_pdf(a) - norm_pdf(b));
}

// E[clamp(X, lo, hi)] for ln X ~ Normal(m, s).
double clamped_lognormal_mean(double m, double s, double lo, double hi) {
  const double mean = std::exp(m + 0.5 * s * s);
  if (s <= 0) return clamp_len(mean, lo, hi);
  const double la = lo > 0 ? (std::log(lo) - m) / s : -INFINITY;
  const double pa = norm_cdf(la);
  const double part_a = norm_cdf(la - s);  // P-weighted mass of X below lo: E[X; X<lo]/mean
  if (hi <= 0) return lo * pa + mean * (1 - part_a);
  const double lb = (std::log(hi) - m) / s;
  const double pb = norm_cdf(lb);
  return lo * pa + hi * (1 - pb) + mean * (norm_cdf(lb - s) - part_a);
}

void sharegpt_fill(LengthDist& d, const ShareGptParams& p) {
  d.mean = p.mean;
  d.stddev = p.cv * p.mean;
  d.min = p.min;
  d.max = p.max;
}

// Relative to the workload file's folder, made absolute so that the path survives being written
// into another file (a plan embeds its workload).
std::filesystem::path resolve_relative(const std::string& file, const std::string& origin) {
  namespace fs = std::filesystem;
  fs::path p(file);
  if (p.is_absolute()) return p;
  std::error_code ec;
  const fs::path base = fs::path(origin).parent_path();
  const fs::path joined = !base.empty() && fs::is_directory(base, ec) ? base / p : p;
  const fs::path abs = fs::absolute(joined, ec);
  return ec ? joined : abs.lexically_normal();
}

// CSV "length,weight" rows (a header row and '#' comments are skipped).
std::vector<std::pair<int64_t, double>> read_length_histogram(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  std::vector<std::pair<int64_t, double>> bins;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    std::replace(line.begin(), line.end(), ',', ' ');
    std::istringstream ls(line);
    double len = 0, w = 0;
    if (!(ls >> len >> w)) {
      if (bins.empty() && line_no == 1) continue;  // header
      throw InputError(fmt::format("{}: line {}: expected 'length,weight', got '{}'",
                                   path.string(), line_no, line));
    }
    if (len < 1 || w < 0)
      throw InputError(fmt::format("{}: line {}: expected length >= 1 and weight >= 0",
                                   path.string(), line_no));
    bins.emplace_back(static_cast<int64_t>(std::llround(len)), w);
  }
  return bins;
}

LengthDist parse_length(const YamlMap& parent, std::string_view key, bool input) {
  LengthDist d;
  if (!parent.has(key)) parent.fail(key, "a length distribution map {kind: ...}");
  const YamlMap m = parent.map(key);
  m.allow_keys({"kind", "value", "min", "max", "mean", "stddev", "file", "bins"});
  d.kind = parse_enum(kLengthNames, m, "kind", m.str("kind"));
  switch (d.kind) {
    case LengthKind::fixed:
      d.value = m.positive_num("value");
      break;
    case LengthKind::uniform:
      d.min = m.positive_num("min");
      d.max = m.positive_num("max");
      if (d.max < d.min) m.fail("max", fmt::format("a value >= min ({})", fmt_num(d.min)),
                                fmt_num(d.max));
      break;
    case LengthKind::normal:
    case LengthKind::lognormal:
      d.mean = m.positive_num("mean");
      d.stddev = m.nonneg_num("stddev", 0.0);
      d.min = m.positive_num("min", 1.0);
      d.max = m.nonneg_num("max", 0.0);
      if (d.max > 0 && d.max < d.min)
        m.fail("max", fmt::format("0 (none) or a value >= min ({})", fmt_num(d.min)),
               fmt_num(d.max));
      break;
    case LengthKind::histogram:
      if (m.has("file")) {
        d.file = resolve_relative(m.str("file"), m.origin()).string();
        d.histogram = read_length_histogram(d.file);
      } else {
        for (size_t i = 0; const auto& row : m.list("bins")) {
          const std::string path = fmt::format("{}[{}]", m.key_path("bins"), i++);
          if (!row.IsSequence() || row.size() != 2)
            throw_input_error(m.origin(), path, "a pair [length, weight]", detail::yaml_describe(row));
          const int64_t len = m.as_i64(row[0], path);
          const double w = m.as_num(row[1], path);
          if (len < 1 || w < 0) throw_input_error(m.origin(), path, "length >= 1, weight >= 0");
          d.histogram.emplace_back(len, w);
        }
      }
      {
        double total = 0;
        for (const auto& b : d.histogram) total += b.second;
        if (d.histogram.empty() || total <= 0)
          m.fail(m.has("file") ? "file" : "bins", "at least one bin with a positive weight");
      }
      break;
    case LengthKind::sharegpt:
      sharegpt_fill(d, input ? kShareGptInput : kShareGptOutput);
      break;
  }
  return d;
}

void emit_length(YAML::Emitter& out, const char* key, const LengthDist& d) {
  out << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "kind" << YAML::Value << std::string(to_string(d.kind));
  switch (d.kind) {
    case LengthKind::fixed:
      out << YAML::Key << "value" << YAML::Value << fmt_num(d.value);
      break;
    case LengthKind::uniform:
      out << YAML::Key << "min" << YAML::Value << fmt_num(d.min);
      out << YAML::Key << "max" << YAML::Value << fmt_num(d.max);
      break;
    case LengthKind::normal:
    case LengthKind::lognormal:
      out << YAML::Key << "mean" << YAML::Value << fmt_num(d.mean);
      out << YAML::Key << "stddev" << YAML::Value << fmt_num(d.stddev);
      out << YAML::Key << "min" << YAML::Value << fmt_num(d.min);
      out << YAML::Key << "max" << YAML::Value << fmt_num(d.max);
      break;
    case LengthKind::histogram:
      if (!d.file.empty()) {
        out << YAML::Key << "file" << YAML::Value << d.file;
      } else {
        out << YAML::Key << "bins" << YAML::Value << YAML::BeginSeq;
        for (const auto& [len, w] : d.histogram)
          out << YAML::Flow << YAML::BeginSeq << len << fmt_num(w) << YAML::EndSeq;
        out << YAML::EndSeq;
      }
      break;
    case LengthKind::sharegpt:
      break;  // parameters are built in
  }
  out << YAML::EndMap;
}

}  // namespace

std::string_view to_string(ArrivalKind k) { return enum_to_string(kArrivalNames, k); }

std::string_view to_string(LengthKind k) { return enum_to_string(kLengthNames, k); }

double LengthDist::expected() const {
  switch (kind) {
    case LengthKind::fixed:
      return value;
    case LengthKind::uniform:
      return 0.5 * (min + max);
    case LengthKind::normal:
      return clamped_normal_mean(mean, stddev, min, max);
    case LengthKind::lognormal:
    case LengthKind::sharegpt: {
      // Lognormal with the lengths' own mean and stddev: s^2 = ln(1 + cv^2), m = ln(mean) - s^2/2.
      const double cv = mean > 0 ? stddev / mean : 0;
      const double s2 = std::log1p(cv * cv);
      return clamped_lognormal_mean(std::log(mean) - 0.5 * s2, std::sqrt(s2), min, max);
    }
    case LengthKind::histogram: {
      double sw = 0, swl = 0;
      for (const auto& [len, w] : histogram) {
        sw += w;
        swl += w * static_cast<double>(len);
      }
      return sw > 0 ? swl / sw : 0;
    }
  }
  return 0;
}

WorkloadSpec parse_workload_yaml(const std::string& text, const std::string& origin) {
  const YAML::Node root = detail::yaml_parse(text, origin);
  const YamlMap m(root, origin, "");
  m.allow_keys({"version", "name", "arrival", "input", "output", "num_requests", "seed", "slo",
                "limits", "routing", "notes", "approximate"});
  if (m.has("version") && m.integer("version") != 1)
    m.fail("version", "1", std::to_string(m.integer("version")));
  WorkloadSpec w;
  w.name = m.str("name");

  if (!m.has("arrival")) m.fail("arrival", "a map {kind: poisson|gamma|burst|closed_loop|trace, ...}");
  const YamlMap a = m.map("arrival");
  a.allow_keys({"kind", "rate", "burstiness", "concurrency", "file"});
  w.arrival = parse_enum(kArrivalNames, a, "kind", a.str("kind"));
  switch (w.arrival) {
    case ArrivalKind::poisson:
      w.rate = a.positive_num("rate");
      break;
    case ArrivalKind::gamma:
      w.rate = a.positive_num("rate");
      w.burstiness = a.positive_num("burstiness");
      break;
    case ArrivalKind::closed_loop:
      w.concurrency = a.positive_int("concurrency");
      break;
    case ArrivalKind::trace:
      w.trace_file = resolve_relative(a.str("file"), origin).string();
      break;
    case ArrivalKind::burst:
      break;
  }

  if (w.arrival == ArrivalKind::trace) {
    // Lengths come from the trace; a length map is allowed but unused.
    w.input.kind = w.output.kind = LengthKind::fixed;
  } else {
    w.input = parse_length(m, "input", true);
    w.output = parse_length(m, "output", false);
  }
  // Traces use every row unless num_requests caps them.
  w.num_requests = w.arrival == ArrivalKind::trace ? m.nonneg_int("num_requests", 0)
                                                   : m.positive_int("num_requests");
  if (m.has("seed")) {
    const int64_t seed = m.i64("seed");
    if (seed < 0) m.fail("seed", "an integer >= 0", std::to_string(seed));
    w.seed = static_cast<uint64_t>(seed);
  }
  if (m.has("slo")) {
    const YamlMap s = m.map("slo");
    s.allow_keys({"ttft_ms", "tpot_ms", "e2el_ms"});
    w.slo_ttft_ms = s.nonneg_num("ttft_ms", 0.0);
    w.slo_tpot_ms = s.nonneg_num("tpot_ms", 0.0);
    w.slo_e2el_ms = s.nonneg_num("e2el_ms", 0.0);
  }
  if (m.has("limits")) {
    const YamlMap l = m.map("limits");
    l.allow_keys({"max_num_seqs", "max_seq_len"});
    w.max_num_seqs = l.nonneg_int("max_num_seqs", 0);
    w.max_seq_len = l.nonneg_i64("max_seq_len", 0);
    if (w.max_seq_len == 1) l.fail("max_seq_len", "0 (none) or >= 2 (one input + one output token)", "1");
  }
  if (m.has("routing")) {
    const YamlMap r = m.map("routing");
    r.allow_keys({"kind", "skew", "file"});
    w.routing = r.str("kind");
    if (w.routing == "zipf") {
      w.routing_skew = r.nonneg_num("skew", 0.0);
    } else if (w.routing == "histogram") {
      w.routing_file = resolve_relative(r.str("file"), origin).string();
    } else if (w.routing != "uniform") {
      r.fail("kind", "one of uniform, zipf, histogram", w.routing);
    }
  }
  w.notes = m.str("notes", "");
  // Built-in sharegpt lengths are always an approximation; a file may also say so itself.
  w.approximate = m.boolean("approximate", false) || w.input.kind == LengthKind::sharegpt ||
                  w.output.kind == LengthKind::sharegpt;
  return w;
}

std::string workload_to_yaml(const WorkloadSpec& w) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "version" << YAML::Value << 1;
  out << YAML::Key << "name" << YAML::Value << w.name;
  out << YAML::Key << "arrival" << YAML::Value << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "kind" << YAML::Value << std::string(to_string(w.arrival));
  switch (w.arrival) {
    case ArrivalKind::poisson:
      out << YAML::Key << "rate" << YAML::Value << fmt_num(w.rate);
      break;
    case ArrivalKind::gamma:
      out << YAML::Key << "rate" << YAML::Value << fmt_num(w.rate);
      out << YAML::Key << "burstiness" << YAML::Value << fmt_num(w.burstiness);
      break;
    case ArrivalKind::closed_loop:
      out << YAML::Key << "concurrency" << YAML::Value << w.concurrency;
      break;
    case ArrivalKind::trace:
      out << YAML::Key << "file" << YAML::Value << w.trace_file;
      break;
    case ArrivalKind::burst:
      break;
  }
  out << YAML::EndMap;
  if (w.arrival != ArrivalKind::trace) {
    emit_length(out, "input", w.input);
    emit_length(out, "output", w.output);
  }
  out << YAML::Key << "num_requests" << YAML::Value << w.num_requests;
  out << YAML::Key << "seed" << YAML::Value << w.seed;
  if (w.slo_ttft_ms > 0 || w.slo_tpot_ms > 0 || w.slo_e2el_ms > 0) {
    out << YAML::Key << "slo" << YAML::Value << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "ttft_ms" << YAML::Value << fmt_num(w.slo_ttft_ms);
    out << YAML::Key << "tpot_ms" << YAML::Value << fmt_num(w.slo_tpot_ms);
    out << YAML::Key << "e2el_ms" << YAML::Value << fmt_num(w.slo_e2el_ms);
    out << YAML::EndMap;
  }
  if (w.max_num_seqs > 0 || w.max_seq_len > 0) {
    out << YAML::Key << "limits" << YAML::Value << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "max_num_seqs" << YAML::Value << w.max_num_seqs;
    out << YAML::Key << "max_seq_len" << YAML::Value << w.max_seq_len;
    out << YAML::EndMap;
  }
  out << YAML::Key << "routing" << YAML::Value << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "kind" << YAML::Value << w.routing;
  if (w.routing == "zipf") out << YAML::Key << "skew" << YAML::Value << fmt_num(w.routing_skew);
  if (w.routing == "histogram") out << YAML::Key << "file" << YAML::Value << w.routing_file;
  out << YAML::EndMap;
  if (w.approximate) out << YAML::Key << "approximate" << YAML::Value << true;
  if (!w.notes.empty()) out << YAML::Key << "notes" << YAML::Value << w.notes;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

WorkloadSpec load_workload(const std::string& name_or_path) {
  namespace fs = std::filesystem;
  const bool looks_like_path = name_or_path.find('/') != std::string::npos ||
                               name_or_path.ends_with(".yaml") || name_or_path.ends_with(".yml");
  const fs::path dir = data_dir() / "configs" / "workloads";
  const fs::path path = looks_like_path ? fs::path(name_or_path) : dir / (name_or_path + ".yaml");
  if (!looks_like_path && !fs::exists(path)) {
    std::string names;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".yaml")
        names += (names.empty() ? "" : ", ") + e.path().stem().string();
    throw InputError(fmt::format("workload '{}': not a shipped workload ({}) and not a file path",
                                 name_or_path, names.empty() ? "none found" : names));
  }
  return parse_workload_yaml(read_text_file(path), path.string());
}

}  // namespace mixserve
