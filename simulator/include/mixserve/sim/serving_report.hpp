// Views of a serving simulation: vLLM-style result JSON, per-request CSV, Chrome trace of the
// steps, and an SVG plot of tail latency against throughput. Only callers that write these
// include this header (it pulls in nlohmann/json).
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixserve/sim/serving.hpp"

namespace mixserve::sim {

// The keys of vLLM's `bench serve --save-result` JSON (completed, duration, total_input_tokens,
// request_throughput, request_goodput (null without SLOs), mean_/median_/std_/p90_/p99_
// {ttft,tpot,itl,e2el}_ms, ...) plus mixserve_* keys of our own.
nlohmann::json metrics_to_json(const ServingMetrics& m, const ServingConfig& cfg);

// One row per request: id, replica, arrival_s, input_tokens, output_tokens, ttft_ms, tpot_ms,
// e2el_ms, finish_s, preemptions.
std::string requests_csv(const SimResult& r);

// Chrome trace (chrome://tracing, Perfetto): one complete event per step and replica, on
// pid = micro-batch slot, tid = replica, with the batch composition in args.
nlohmann::json chrome_trace(const SimResult& r);

// One point of a latency-throughput plot.
struct CurvePoint {
  std::string series;       // candidate / layout name
  double throughput = 0;    // x: e.g. output tokens/s or req/s per GPU
  double latency_ms = 0;    // y: e.g. p90 TTFT
  std::string label;        // e.g. "4 req/s"
};
// Self-contained SVG: one polyline per series, and the Pareto front (lowest latency at each
// throughput, over all points) dashed. Axis titles as given.
std::string pareto_svg(const std::vector<CurvePoint>& points, const std::string& title,
                       const std::string& x_title, const std::string& y_title);
// Indices of the points on the Pareto front (no other point has >= throughput and <= latency,
// one strictly better), sorted by throughput.
std::vector<size_t> pareto_front(const std::vector<CurvePoint>& points);

}  // namespace mixserve::sim
