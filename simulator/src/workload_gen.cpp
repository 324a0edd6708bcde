#include "mixserve/sim/workload_gen.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

namespace mixserve::sim {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Stream ids mixed into the seed so arrivals and lengths are independent streams.
constexpr uint64_t kArrivalStream = 0xA5A5'0001ULL;
constexpr uint64_t kInputStream = 0xA5A5'0002ULL;
constexpr uint64_t kOutputStream = 0xA5A5'0003ULL;

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(line);
  while (std::getline(in, cur, ',')) {
    const auto b = cur.find_first_not_of(" \t\r");
    const auto e = cur.find_last_not_of(" \t\r");
    out.push_back(b == std::string::npos ? std::string() : cur.substr(b, e - b + 1));
  }
  return out;
}

[[noreturn]] void trace_error(const std::string& path, int line_no, const std::string& what) {
  throw InputError(fmt::format("{}: line {}: {}", path, line_no, what));
}

}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (auto& s : s_) s = splitmix64(x);
}

// xoshiro256** (Blackman & Vigna).
uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::exponential(double rate) { return -std::log1p(-uniform()) / rate; }

double Rng::normal() {  // Marsaglia polar method
  if (have_spare_) {
    have_spare_ = false;
    return spare_;
  }
  double u, v, s;
  do {
    u = 2 * uniform() - 1;
    v = 2 * uniform() - 1;
    s = u * u + v * v;
  } while (s >= 1 || s == 0);
  const double f = std::sqrt(-2 * std::log(s) / s);
  spare_ = v * f;
  have_spare_ = true;
  return u * f;
}

double Rng::gamma(double shape) {  // Marsaglia & Tsang; shape < 1 via the boost U^(1/shape)
  if (shape < 1) {
    const double g = gamma(shape + 1);
    double u = uniform();
    while (u == 0) u = uniform();
    return g * std::pow(u, 1.0 / shape);
  }
  const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9 * d);
  for (;;) {
    double x, v;
    do {
      x = normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = uniform();
    if (u < 1 - 0.0331 * x * x * x * x) return d * v;
    if (u > 0 && std::log(u) < 0.5 * x * x + d * (1 - v + std::log(v))) return d * v;
  }
}

int64_t sample_length(const LengthDist& d, Rng& rng) {
  double x = 0;
  switch (d.kind) {
    case LengthKind::fixed:
      x = d.value;
      break;
    case LengthKind::uniform: {  // integers min..max, each equally likely
      const auto lo = static_cast<int64_t>(std::llround(d.min));
      const auto hi = static_cast<int64_t>(std::llround(d.max));
      return std::max<int64_t>(1, lo + static_cast<int64_t>(rng.uniform() * double(hi - lo + 1)));
    }
    case LengthKind::normal:
      x = d.mean + d.stddev * rng.normal();
      break;
    case LengthKind::lognormal:
    case LengthKind::sharegpt: {
      const double cv = d.stddev / d.mean;
      const double s2 = std::log1p(cv * cv);
      x = std::exp(std::log(d.mean) - 0.5 * s2 + std::sqrt(s2) * rng.normal());
      break;
    }
    case LengthKind::histogram: {
      double total = 0;
      for (const auto& b : d.histogram) total += b.second;
      double u = rng.uniform() * total;
      for (const auto& [len, w] : d.histogram) {
        if (u < w) return std::max<int64_t>(1, len);
        u -= w;
      }
      return std::max<int64_t>(1, d.histogram.back().first);
    }
  }
  x = std::max(x, std::max(1.0, d.min));
  if (d.max > 0) x = std::min(x, d.max);
  return std::max<int64_t>(1, std::llround(x));
}

std::vector<Request> read_trace(const std::string& path, int64_t max_rows) {
  const std::string text = read_text_file(path);
  std::vector<Request> out;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  const bool jsonl = path.ends_with(".jsonl") || path.ends_with(".json");
  int col_t = -1, col_in = -1, col_out = -1, col_rep = -1;
  auto bad = [&](const std::string& what) { trace_error(path, line_no, what); };
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
    Request r;
    if (jsonl) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        bad(std::string("malformed JSON: ") + e.what());
      }
      auto num = [&](const char* key, bool required) -> double {
        if (!j.contains(key)) {
          if (required) bad(fmt::format("missing key '{}' (expected a number)", key));
          return -1;
        }
        if (!j[key].is_number()) bad(fmt::format("key '{}': expected a number", key));
        return j[key].get<double>();
      };
      r.arrival_s = j.contains("timestamp_s") && !j.contains("arrival_s") ? num("timestamp_s", true)
                                                                          : num("arrival_s", true);
      r.input_tokens = std::llround(num("input_tokens", true));
      r.output_tokens = std::llround(num("output_tokens", true));
      r.replica = static_cast<int>(num("replica", false));
    } else {
      const auto cols = split_csv(line);
      if (col_t < 0) {  // header
        for (int i = 0; i < static_cast<int>(cols.size()); ++i) {
          if (cols[i] == "arrival_s" || cols[i] == "timestamp_s") col_t = i;
          if (cols[i] == "input_tokens") col_in = i;
          if (cols[i] == "output_tokens") col_out = i;
          if (cols[i] == "replica") col_rep = i;
        }
        if (col_t < 0 || col_in < 0 || col_out < 0)
          bad("expected a header naming the columns arrival_s, input_tokens, output_tokens");
        continue;
      }
      auto field = [&](int col) -> double {
        if (col >= static_cast<int>(cols.size()))
          trace_error(path, line_no, fmt::format("missing column {}", col + 1));
        try {
          size_t used = 0;
          const double v = std::stod(cols[col], &used);
          if (used != cols[col].size()) throw std::invalid_argument("trailing");
          return v;
        } catch (const std::exception&) {
          trace_error(path, line_no,
                      fmt::format("column {}: expected a number, got '{}'", col + 1, cols[col]));
        }
      };
      r.arrival_s = field(col_t);
      r.input_tokens = std::llround(field(col_in));
      r.output_tokens = std::llround(field(col_out));
      r.replica = col_rep >= 0 ? static_cast<int>(field(col_rep)) : -1;
    }
    if (!(r.arrival_s >= 0) || r.input_tokens < 1 || r.output_tokens < 1)
      bad("expected arrival_s >= 0, input_tokens >= 1, output_tokens >= 1");
    r.id = static_cast<int64_t>(out.size());
    out.push_back(r);
    if (max_rows > 0 && static_cast<int64_t>(out.size()) >= max_rows) break;
  }
  if (out.empty()) throw InputError(fmt::format("{}: no requests in the trace", path));
  std::stable_sort(out.begin(), out.end(),
                   [](const Request& a, const Request& b) { return a.arrival_s < b.arrival_s; });
  for (size_t i = 0; i < out.size(); ++i) out[i].id = static_cast<int64_t>(i);
  return out;
}

RequestStream generate_requests(const WorkloadSpec& w) {
  RequestStream s;
  if (w.arrival == ArrivalKind::trace) {
    s.requests = read_trace(w.trace_file, w.num_requests);
  } else {
    if (w.num_requests < 1)
      throw InputError(fmt::format("workload '{}': num_requests must be >= 1", w.name));
    Rng arr(w.seed ^ (kArrivalStream * 0x9e3779b97f4a7c15ULL));
    Rng in(w.seed ^ (kInputStream * 0x9e3779b97f4a7c15ULL));
    Rng out(w.seed ^ (kOutputStream * 0x9e3779b97f4a7c15ULL));
    s.requests.resize(static_cast<size_t>(w.num_requests));
    double t = 0;
    for (int64_t i = 0; i < w.num_requests; ++i) {
      Request& r = s.requests[static_cast<size_t>(i)];
      r.id = i;
      switch (w.arrival) {
        case ArrivalKind::poisson:
          t += arr.exponential(w.rate);
          break;
        case ArrivalKind::gamma:  // shape = burstiness, scale = 1 / (rate * burstiness)
          t += arr.gamma(w.burstiness) / (w.rate * w.burstiness);
          break;
        default:
          break;  // burst and closed loop: all at t = 0
      }
      r.arrival_s = t;
      r.input_tokens = sample_length(w.input, in);
      r.output_tokens = sample_length(w.output, out);
    }
    if (w.arrival == ArrivalKind::closed_loop) s.closed_loop_users = w.concurrency;
  }
  if (w.max_seq_len > 0) {  // clamp like a server capping max_tokens at the context length
    for (auto& r : s.requests) {
      r.input_tokens = std::min(r.input_tokens, w.max_seq_len - 1);
      r.output_tokens = std::min(r.output_tokens, w.max_seq_len - r.input_tokens);
    }
  }
  return s;
}

RoutingModel routing_from_workload(const WorkloadSpec& w) {
  RoutingModel r;
  r.kind = w.routing;
  if (w.routing == "zipf") r.skew = w.routing_skew;
  if (w.routing != "histogram") return r;
  const std::string text = read_text_file(w.routing_file);
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  std::vector<double> sum;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
    std::replace(line.begin(), line.end(), ',', ' ');
    std::istringstream ls(line);
    std::vector<double> row;
    double v = 0;
    while (ls >> v) row.push_back(v);
    if (!ls.eof() || row.empty() || std::any_of(row.begin(), row.end(), [](double x) { return x < 0; }))
      throw InputError(fmt::format("{}: line {}: expected non-negative expert token counts, one "
                                   "column per expert", w.routing_file, line_no));
    if (sum.empty()) sum.assign(row.size(), 0.0);
    if (row.size() != sum.size())
      throw InputError(fmt::format("{}: line {}: expected {} expert counts (as on the first row), "
                                   "got {}", w.routing_file, line_no, sum.size(), row.size()));
    for (size_t e = 0; e < row.size(); ++e) sum[e] += row[e];
    double row_total = 0;
    for (double x : row) row_total += x;
    if (row_total > 0)
      for (double& x : row) x /= row_total;
    r.layer_expert_share.push_back(std::move(row));
  }
  double total = 0;
  for (double x : sum) total += x;
  if (total <= 0)
    throw InputError(fmt::format("{}: expected at least one positive expert count", w.routing_file));
  for (double& x : sum) x /= total;
  r.expert_share = std::move(sum);
  return r;
}

}  // namespace mixserve::sim
