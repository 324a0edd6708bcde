// Workload files and request generation: schema, bad input, closed-form means against samples,
// arrival statistics, determinism, traces.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/sim/workload_gen.hpp"

using namespace mixserve;
using namespace mixserve::sim;

namespace {

std::string error_of(const std::string& yaml) {
  try {
    parse_workload_yaml(yaml, "w.yaml");
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

std::filesystem::path temp_file(const std::string& name, const std::string& text) {
  const auto p = std::filesystem::temp_directory_path() /
                 ("mixserve_test_serving_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(p) << text;
  return p;
}

double mean_of_samples(const LengthDist& d, int n, uint64_t seed) {
  Rng rng(seed);
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(sample_length(d, rng));
  return s / n;
}

}  // namespace

TEST_CASE("every shipped workload loads, and sharegpt-like is labelled an approximation") {
  for (const char* name :
       {"sharegpt-like", "sharegpt-paper", "sharegpt-skewed", "fixed-1k-1k", "closed-loop-64",
        "tiny-trace"}) {
    CAPTURE(name);
    const WorkloadSpec w = load_workload(name);
    CHECK(w.name == name);
    const RequestStream s = generate_requests(w);
    CHECK(!s.requests.empty());
  }
  const WorkloadSpec sg = load_workload("sharegpt-like");
  CHECK(sg.approximate);
  const WorkloadSpec sk = load_workload("sharegpt-skewed");
  CHECK(sk.approximate);
  CHECK(routing_from_workload(sk).kind == "zipf");
  CHECK(routing_from_workload(sk).skew == 1.0);
  CHECK(!load_workload("fixed-1k-1k").approximate);
  CHECK(parse_workload_yaml(workload_to_yaml(sg), "again.yaml").approximate);
  CHECK(parse_workload_yaml("name: a\narrival: {kind: burst}\ninput: {kind: fixed, value: 3}\n"
                            "output: {kind: fixed, value: 3}\nnum_requests: 1\napproximate: true\n",
                            "a.yaml").approximate);
  const WorkloadSpec paper = load_workload("sharegpt-paper");
  CHECK(paper.max_num_seqs == 16);
  CHECK(paper.max_seq_len == 4096);
  CHECK(paper.rate == 4.0);
  CHECK(load_workload("closed-loop-64").concurrency == 64);
  CHECK(generate_requests(load_workload("tiny-trace")).requests.size() == 8);
  CHECK_THROWS_AS(load_workload("no-such-workload"), InputError);
}

TEST_CASE("workload YAML round-trips through workload_to_yaml") {
  const std::string text = R"(
name: rt
arrival: {kind: gamma, rate: 3.5, burstiness: 0.5}
input: {kind: normal, mean: 500, stddev: 100, min: 10, max: 900}
output: {kind: histogram, bins: [[10, 1], [100, 3]]}
num_requests: 77
seed: 42
slo: {ttft_ms: 200, tpot_ms: 50}
limits: {max_num_seqs: 16, max_seq_len: 4096}
routing: {kind: zipf, skew: 1.2}
)";
  const WorkloadSpec a = parse_workload_yaml(text, "rt.yaml");
  const WorkloadSpec b = parse_workload_yaml(workload_to_yaml(a), "rt2.yaml");
  CHECK(b.arrival == ArrivalKind::gamma);
  CHECK(b.rate == 3.5);
  CHECK(b.burstiness == 0.5);
  CHECK(b.input.kind == LengthKind::normal);
  CHECK(b.input.mean == 500);
  CHECK(b.input.stddev == 100);
  CHECK(b.input.min == 10);
  CHECK(b.input.max == 900);
  REQUIRE(b.output.histogram.size() == 2);
  CHECK(b.output.histogram[1].first == 100);
  CHECK(b.output.histogram[1].second == 3);
  CHECK(b.num_requests == 77);
  CHECK(b.seed == 42);
  CHECK(b.slo_ttft_ms == 200);
  CHECK(b.slo_tpot_ms == 50);
  CHECK(b.max_num_seqs == 16);
  CHECK(b.max_seq_len == 4096);
  CHECK(b.routing == "zipf");
  CHECK(b.routing_skew == 1.2);
}

TEST_CASE("file paths in a workload resolve against its folder and survive re-embedding") {
  const WorkloadSpec w = load_workload("tiny-trace");
  CHECK(std::filesystem::path(w.trace_file).is_absolute());
  // Written into a file elsewhere (as a plan embeds it) and read back: the same trace.
  const WorkloadSpec again = parse_workload_yaml(workload_to_yaml(w), "/elsewhere/plan.yaml");
  CHECK(again.trace_file == w.trace_file);
  CHECK(generate_requests(again).requests.size() == 8);
}

TEST_CASE("bad workload files name the file, the key and the expected form") {
  const std::string ok_lengths = "input: {kind: fixed, value: 10}\noutput: {kind: fixed, value: 10}\n";
  std::string e = error_of("name: x\narrival: {kind: poison, rate: 1}\n" + ok_lengths +
                           "num_requests: 5\n");
  CHECK(e.find("w.yaml") != std::string::npos);
  CHECK(e.find("arrival.kind") != std::string::npos);
  CHECK(e.find("poisson") != std::string::npos);
  e = error_of("name: x\narrival: {kind: poisson}\n" + ok_lengths + "num_requests: 5\n");
  CHECK(e.find("arrival.rate") != std::string::npos);
  e = error_of("name: x\narrival: {kind: poisson, rate: 1}\ninput: {kind: uniform, min: 10, max: 5}\n"
               "output: {kind: fixed, value: 1}\nnum_requests: 5\n");
  CHECK(e.find("input.max") != std::string::npos);
  e = error_of("name: x\narrival: {kind: poisson, rate: 1}\n" + ok_lengths + "num_requests: 0\n");
  CHECK(e.find("num_requests") != std::string::npos);
  e = error_of("name: x\narrival: {kind: poisson, rate: 1}\n" + ok_lengths +
               "num_requests: 5\nrouting: {kind: skewed}\n");
  CHECK(e.find("routing.kind") != std::string::npos);
  e = error_of("name: x\narrival: {kind: poisson, rate: 1}\n" + ok_lengths +
               "num_requests: 5\ntypo_key: 1\n");
  CHECK(e.find("typo_key") != std::string::npos);
}

// expected() is a closed form (clamped normal / lognormal integrals); the sampler is a separate
// code path. 400k samples: the standard error of the mean is < 0.25% for CV <= 1.5, so a 1.5%
// tolerance is > 6 standard errors; rounding to integers moves the mean by < 0.1%.
TEST_CASE("LengthDist::expected matches the mean of sampled lengths") {
  LengthDist d;
  SUBCASE("fixed") {
    d.kind = LengthKind::fixed;
    d.value = 1024;
  }
  SUBCASE("uniform") {
    d.kind = LengthKind::uniform;
    d.min = 100;
    d.max = 301;
  }
  SUBCASE("normal, clamped on both sides") {
    d.kind = LengthKind::normal;
    d.mean = 200;
    d.stddev = 150;
    d.min = 50;
    d.max = 300;
  }
  SUBCASE("lognormal, clamped") {
    d.kind = LengthKind::lognormal;
    d.mean = 300;
    d.stddev = 450;
    d.min = 4;
    d.max = 1024;
  }
  SUBCASE("histogram") {
    d.kind = LengthKind::histogram;
    d.histogram = {{10, 1.0}, {100, 2.0}, {1000, 0.5}};
  }
  SUBCASE("built-in sharegpt (input)") {
    d = parse_workload_yaml("name: s\narrival: {kind: burst}\ninput: {kind: sharegpt}\n"
                            "output: {kind: sharegpt}\nnum_requests: 1\n", "s.yaml").input;
  }
  const double expected = d.expected();
  const double sampled = mean_of_samples(d, 400000, 7);
  CAPTURE(expected);
  CAPTURE(sampled);
  CHECK(expected > 0);
  CHECK(std::abs(sampled - expected) <= 0.015 * expected);
}

TEST_CASE("the sharegpt lognormal without clamps has the published means") {
  // Independent of the clamps: E[lognormal] = exp(m + s^2/2) must give back the mean we set.
  const WorkloadSpec w = parse_workload_yaml(
      "name: s\narrival: {kind: burst}\ninput: {kind: sharegpt}\noutput: {kind: sharegpt}\n"
      "num_requests: 1\n", "s.yaml");
  LengthDist in = w.input, out = w.output;
  in.kind = out.kind = LengthKind::lognormal;
  in.min = out.min = 1e-9;
  in.max = out.max = 0;
  CHECK(in.expected() == doctest::Approx(161.31).epsilon(1e-6));
  CHECK(out.expected() == doctest::Approx(337.99).epsilon(1e-6));
}

// 200k inter-arrival gaps: the standard error of the mean gap is 1/sqrt(2e5) = 0.22% of it
// (exponential, CV 1); 1.5% is ~7 standard errors. The variance estimate of gamma gaps has a
// relative standard error of sqrt((kurtosis - 1) / n) <= sqrt(26 / 2e5) = 1.1% (shape 0.25,
// kurtosis 3 + 6/shape); 4% is ~3.5 standard errors.
TEST_CASE("Poisson and gamma arrivals have the configured rate and burstiness") {
  WorkloadSpec w;
  w.name = "arr";
  w.num_requests = 200000;
  w.input.kind = w.output.kind = LengthKind::fixed;
  w.input.value = w.output.value = 1;
  w.rate = 5.0;
  for (double burstiness : {1.0, 0.25, 4.0}) {
    CAPTURE(burstiness);
    w.arrival = burstiness == 1.0 ? ArrivalKind::poisson : ArrivalKind::gamma;
    w.burstiness = burstiness;
    const auto s = generate_requests(w);
    double sum = 0, sum2 = 0, prev = 0;
    bool sorted = true;
    for (const auto& r : s.requests) {
      const double g = r.arrival_s - prev;
      prev = r.arrival_s;
      sorted = sorted && g >= 0;
      sum += g;
      sum2 += g * g;
    }
    CHECK(sorted);
    const double n = double(s.requests.size());
    const double mean = sum / n, var = sum2 / n - mean * mean;
    CHECK(mean == doctest::Approx(1.0 / w.rate).epsilon(0.015));
    CHECK(var / (mean * mean) == doctest::Approx(1.0 / burstiness).epsilon(0.04));
  }
}

TEST_CASE("requests are deterministic for a seed, and the rate does not change the lengths") {
  WorkloadSpec w = load_workload("sharegpt-like");
  const auto a = generate_requests(w), b = generate_requests(w);
  REQUIRE(a.requests.size() == b.requests.size());
  bool same = true;
  for (size_t i = 0; i < a.requests.size(); ++i)
    same = same && a.requests[i].arrival_s == b.requests[i].arrival_s &&
           a.requests[i].input_tokens == b.requests[i].input_tokens &&
           a.requests[i].output_tokens == b.requests[i].output_tokens;
  CHECK(same);
  WorkloadSpec w2 = w;
  w2.rate = 2 * w.rate;
  const auto c = generate_requests(w2);
  bool lengths_same = true, times_halved = true;
  for (size_t i = 0; i < a.requests.size(); ++i) {
    lengths_same = lengths_same && a.requests[i].input_tokens == c.requests[i].input_tokens &&
                   a.requests[i].output_tokens == c.requests[i].output_tokens;
    times_halved = times_halved &&
                   std::abs(c.requests[i].arrival_s - a.requests[i].arrival_s / 2) <=
                       1e-12 * a.requests[i].arrival_s;
  }
  CHECK(lengths_same);
  CHECK(times_halved);
  WorkloadSpec w3 = w;
  w3.seed = 1;
  const auto d = generate_requests(w3);
  int differ = 0;
  for (size_t i = 0; i < a.requests.size(); ++i)
    differ += a.requests[i].input_tokens != d.requests[i].input_tokens;
  CHECK(differ > int(a.requests.size()) / 2);
}

TEST_CASE("max_seq_len clamps input + output") {
  WorkloadSpec w;
  w.name = "clamp";
  w.arrival = ArrivalKind::burst;
  w.num_requests = 2000;
  w.input.kind = w.output.kind = LengthKind::uniform;
  w.input.min = w.output.min = 1;
  w.input.max = w.output.max = 6000;
  w.max_seq_len = 4096;
  int64_t bad = 0, longest = 0;
  for (const auto& r : generate_requests(w).requests) {
    bad += r.input_tokens < 1 || r.output_tokens < 1 || r.input_tokens + r.output_tokens > 4096;
    longest = std::max(longest, r.input_tokens + r.output_tokens);
  }
  CHECK(bad == 0);
  CHECK(longest == 4096);  // uniform up to 6000 + 6000: some requests hit the cap
}

TEST_CASE("trace files: CSV and JSONL, sorted by arrival, bad rows rejected with the line") {
  const auto csv = temp_file("t.csv", "input_tokens,arrival_s,output_tokens,replica\n"
                                      "10,0.5,3,1\n20,0.1,4,0\n");
  auto rs = read_trace(csv.string());
  REQUIRE(rs.size() == 2);
  CHECK(rs[0].arrival_s == 0.1);
  CHECK(rs[0].input_tokens == 20);
  CHECK(rs[0].output_tokens == 4);
  CHECK(rs[0].replica == 0);
  CHECK(rs[1].replica == 1);
  const auto jsonl = temp_file("t.jsonl",
                               "{\"arrival_s\": 0.0, \"input_tokens\": 7, \"output_tokens\": 9}\n"
                               "{\"arrival_s\": 1.5, \"input_tokens\": 8, \"output_tokens\": 2}\n");
  rs = read_trace(jsonl.string());
  REQUIRE(rs.size() == 2);
  CHECK(rs[1].arrival_s == 1.5);
  CHECK(rs[1].output_tokens == 2);
  CHECK(rs[0].replica == -1);
  const auto bad = temp_file("bad.csv", "arrival_s,input_tokens,output_tokens\n0,5,5\n1,x,5\n");
  try {
    read_trace(bad.string());
    FAIL("expected InputError");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("line 3") != std::string::npos);
  }
  const auto no_header = temp_file("nh.csv", "0,5,5\n");
  CHECK_THROWS_AS(read_trace(no_header.string()), InputError);
  for (const auto& p : {csv, jsonl, bad, no_header}) std::filesystem::remove(p);
}

TEST_CASE("routing histogram files become expert shares") {
  const auto f = temp_file("routing.csv", "# layer rows\n1,3,0,4\n1,1,2,0\n");
  WorkloadSpec w;
  w.routing = "histogram";
  w.routing_file = f.string();
  const RoutingModel r = routing_from_workload(w);
  REQUIRE(r.expert_share.size() == 4);
  CHECK(r.expert_share[0] == doctest::Approx(2.0 / 12));
  CHECK(r.expert_share[1] == doctest::Approx(4.0 / 12));
  CHECK(r.expert_share[3] == doctest::Approx(4.0 / 12));
  const auto g = temp_file("routing_bad.csv", "1,2\n1,2,3\n");
  w.routing_file = g.string();
  CHECK_THROWS_AS(routing_from_workload(w), InputError);
  std::filesystem::remove(f);
  std::filesystem::remove(g);
}
