#include "mixserve/sim/serving_report.hpp"

#include <algorithm>
#include <cmath>
#include <map>

#include <fmt/format.h>

namespace mixserve::sim {

namespace {

void put_stats(nlohmann::json& j, const char* name, const LatencyStats& s) {
  j[fmt::format("mean_{}_ms", name)] = s.mean;
  j[fmt::format("median_{}_ms", name)] = s.median;
  j[fmt::format("std_{}_ms", name)] = s.stddev;
  j[fmt::format("p90_{}_ms", name)] = s.p90;
  j[fmt::format("p99_{}_ms", name)] = s.p99;
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

// 1, 2, 5 x 10^k tick step giving about `n` ticks over span.
double nice_step(double span, int n) {
  if (!(span > 0)) return 1;
  const double raw = span / n;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * p) return m * p;
  return 10 * p;
}

}  // namespace

nlohmann::json metrics_to_json(const ServingMetrics& m, const ServingConfig& cfg) {
  nlohmann::json j;
  j["completed"] = m.completed;
  j["failed"] = 0;
  j["duration"] = m.duration_s;
  j["total_input_tokens"] = m.total_input_tokens;
  j["total_output_tokens"] = m.total_output_tokens;
  j["request_throughput"] = m.request_throughput;
  const bool any_slo = cfg.slo_ttft_ms > 0 || cfg.slo_tpot_ms > 0 || cfg.slo_e2el_ms > 0;
  j["request_goodput"] = any_slo ? nlohmann::json(m.request_goodput) : nlohmann::json(nullptr);
  j["output_throughput"] = m.output_throughput;
  j["total_token_throughput"] = m.total_token_throughput;
  j["max_output_tokens_per_s"] = m.max_output_tokens_per_s;
  j["max_concurrent_requests"] = m.max_concurrent_requests;
  put_stats(j, "ttft", m.ttft);
  put_stats(j, "tpot", m.tpot);
  put_stats(j, "itl", m.itl);
  put_stats(j, "e2el", m.e2el);
  j["mixserve_num_steps"] = m.num_steps;
  j["mixserve_num_preemptions"] = m.num_preemptions;
  j["mixserve_num_empty_replica_steps"] = m.num_empty_replica_steps;
  j["mixserve_mean_step_time_ms"] = m.mean_step_time_ms;
  j["mixserve_mean_tokens_per_step"] = m.mean_tokens_per_step;
  j["mixserve_busy_fraction"] = m.busy_fraction;
  j["mixserve_good_requests"] = m.good_requests;
  j["mixserve_slo_attainment"] = m.slo_attainment;
  j["mixserve_moe_load"] = m.mean_moe_max_over_mean > 0 ? "sampled" : "expected";
  j["mixserve_mean_moe_max_over_mean"] = m.mean_moe_max_over_mean;
  j["mixserve_slo"] = {{"ttft_ms", cfg.slo_ttft_ms}, {"tpot_ms", cfg.slo_tpot_ms},
                       {"e2el_ms", cfg.slo_e2el_ms}};
  j["mixserve_engine"] = {{"num_replicas", cfg.num_replicas},
                          {"pp", cfg.pp},
                          {"router", std::string(to_string(cfg.router))},
                          {"max_num_seqs", cfg.limits.max_num_seqs},
                          {"max_num_batched_tokens", cfg.limits.max_num_batched_tokens},
                          {"chunked_prefill", cfg.limits.chunked_prefill},
                          {"policy", std::string(policy_name(cfg.limits.decode_first))},
                          {"kv_block_tokens", cfg.limits.kv_block_tokens},
                          {"kv_blocks_per_replica", m.kv_blocks_per_replica}};
  return j;
}

std::string requests_csv(const SimResult& r) {
  std::string out =
      "id,replica,arrival_s,input_tokens,output_tokens,ttft_ms,tpot_ms,e2el_ms,finish_s,"
      "preemptions\n";
  for (const auto& q : r.requests)
    out += fmt::format("{},{},{:.6f},{},{},{:.4f},{:.4f},{:.4f},{:.6f},{}\n", q.id, q.replica,
                       q.arrival_s, q.input_tokens, q.output_tokens, q.ttft_ms(), q.tpot_ms(),
                       q.e2el_ms(), q.finish_s, q.preemptions);
  return out;
}

nlohmann::json chrome_trace(const SimResult& r) {
  nlohmann::json events = nlohmann::json::array();
  for (const auto& s : r.steps) {
    for (size_t rep = 0; rep < s.batches.size(); ++rep) {
      const ReplicaBatch& b = s.batches[rep];
      const char* name = b.empty() ? "idle" : b.prefill_tokens == 0 ? "decode"
                                              : b.num_decode == 0  ? "prefill"
                                                                   : "mixed";
      events.push_back({{"name", name},
                        {"ph", "X"},
                        {"ts", s.start_s * 1e6},
                        {"dur", s.time_us},
                        {"pid", s.micro_batch},
                        {"tid", rep},
                        {"args",
                         {{"prefill_tokens", b.prefill_tokens},
                          {"num_prefill_seqs", b.num_prefill_seqs},
                          {"num_decode", b.num_decode},
                          {"decode_context", b.decode_context},
                          {"moe_max_over_mean", s.moe_max_over_mean}}}});
    }
  }
  return {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
}

std::vector<size_t> pareto_front(const std::vector<CurvePoint>& pts) {
  std::vector<size_t> idx(pts.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  // Highest throughput first; among equal throughput, lowest latency first.
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
    if (pts[a].throughput != pts[b].throughput) return pts[a].throughput > pts[b].throughput;
    return pts[a].latency_ms < pts[b].latency_ms;
  });
  std::vector<size_t> front;
  double best_latency = INFINITY;
  for (size_t i : idx) {
    if (pts[i].latency_ms < best_latency) {
      front.push_back(i);
      best_latency = pts[i].latency_ms;
    }
  }
  std::reverse(front.begin(), front.end());
  return front;
}

std::string pareto_svg(const std::vector<CurvePoint>& pts, const std::string& title,
                       const std::string& x_title, const std::string& y_title) {
  // The legend column is as wide as the longest series name (about 7 px a character at 12 px) and
  // the figure as tall as the legend needs.
  size_t longest = 14, num_series = 0;
  {
    std::vector<std::string> seen;
    for (const auto& p : pts)
      if (std::find(seen.begin(), seen.end(), p.series) == seen.end()) {
        seen.push_back(p.series);
        longest = std::max(longest, p.series.size());
      }
    num_series = seen.size();
  }
  const double R = 40 + 7.0 * double(longest), L = 80, T = 40, B = 60;
  const double W = 560 + R, H = std::max(480.0, T + 18.0 * double(num_series + 2) + B);
  double xmax = 0, ymax = 0;
  for (const auto& p : pts) {
    xmax = std::max(xmax, p.throughput);
    ymax = std::max(ymax, p.latency_ms);
  }
  const double xs = nice_step(xmax, 6), ys = nice_step(ymax, 6);
  xmax = std::max(xs, std::ceil(xmax / xs) * xs);
  ymax = std::max(ys, std::ceil(ymax / ys) * ys);
  auto X = [&](double x) { return L + (W - L - R) * x / xmax; };
  auto Y = [&](double y) { return H - B - (H - T - B) * y / ymax; };
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n<text x=\"{}\" y=\"24\" font-size=\"15\">{}</text>\n",
      W, H, L, xml_escape(title));
  for (double x = 0; x <= xmax + 1e-9 * xmax; x += xs)
    s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
                     "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4:g}</text>\n",
                     X(x), T, H - B, H - B + 16, x);
  for (double y = 0; y <= ymax + 1e-9 * ymax; y += ys)
    s += fmt::format("<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
                     "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:g}</text>\n",
                     L, Y(y), W - R, L - 6, Y(y) + 4, y);
  s += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", (L + W - R) / 2,
                   H - 16, xml_escape(x_title));
  s += fmt::format("<text transform=\"translate(20,{}) rotate(-90)\" text-anchor=\"middle\">{}"
                   "</text>\n", (T + H - B) / 2, xml_escape(y_title));
  static constexpr const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  std::map<std::string, std::vector<const CurvePoint*>> series;
  std::vector<std::string> order;
  for (const auto& p : pts) {
    if (!series.count(p.series)) order.push_back(p.series);
    series[p.series].push_back(&p);
  }
  for (size_t k = 0; k < order.size(); ++k) {
    auto v = series[order[k]];
    std::sort(v.begin(), v.end(),
              [](const CurvePoint* a, const CurvePoint* b) { return a->throughput < b->throughput; });
    const char* color = kColors[k % std::size(kColors)];
    // Colours repeat after ten series: later rounds are dashed differently so lines stay apart.
    static constexpr const char* kDashes[] = {"", "6,3", "2,3", "8,3,2,3"};
    const char* dash = kDashes[(k / std::size(kColors)) % std::size(kDashes)];
    std::string poly;
    for (const auto* p : v) poly += fmt::format("{:.1f},{:.1f} ", X(p->throughput), Y(p->latency_ms));
    s += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"{} points=\"{}\"/>\n",
                     color, *dash ? fmt::format(" stroke-dasharray=\"{}\"", dash) : std::string(),
                     poly);
    for (const auto* p : v)
      s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"><title>{} {}: "
                       "{:g}, {:g} ms</title></circle>\n", X(p->throughput), Y(p->latency_ms),
                       color, xml_escape(p->series), xml_escape(p->label), p->throughput,
                       p->latency_ms);
    s += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"3\"{}/>"
                     "<text x=\"{}\" y=\"{}\">{}</text>\n", W - R + 8, T + 18 * k + 5, W - R + 24,
                     T + 18 * k + 5, color,
                     *dash ? fmt::format(" stroke-dasharray=\"{}\"", dash) : std::string(),
                     W - R + 30, T + 18 * k + 10, xml_escape(order[k]));
  }
  std::string front;
  for (size_t i : pareto_front(pts))
    front += fmt::format("{:.1f},{:.1f} ", X(pts[i].throughput), Y(pts[i].latency_ms));
  s += fmt::format("<polyline fill=\"none\" stroke=\"black\" stroke-dasharray=\"5,4\" points=\"{}\"/>"
                   "\n<text x=\"{}\" y=\"{}\">- - Pareto front</text>\n</svg>\n",
                   front, W - R + 12, T + 18 * order.size() + 10);
  return s;
}

}  // namespace mixserve::sim
