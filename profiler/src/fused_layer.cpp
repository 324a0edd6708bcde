// mixserve-profile fused-layer: the fused batch-1 decode layer's time per layer (profiler.hpp).
#include <algorithm>
#include <ostream>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/bench.hpp"
#include "mixserve/profiler/profiler.hpp"
#include "mixserve/sim/cost_model.hpp"

namespace mixserve::profiler {

Plan check_fused_layer(const FusedLayerConfig& cfg) {
  if (cfg.layers.size() != 2 || cfg.layers[0] < 1 || cfg.layers[1] <= cfg.layers[0])
    throw InputError(fmt::format("fused-layer: --layers: expected two layer counts L1 < L2 (L1 >= 1), got {}",
                                 fmt::join(cfg.layers, ",")));
  if (cfg.contexts.empty())
    throw InputError("fused-layer: --contexts: expected at least one context length");
  for (int64_t c : cfg.contexts)
    if (c < 1) throw InputError(fmt::format("fused-layer: --contexts: expected lengths >= 1, got {}", c));
  if (cfg.output_len < 3) throw InputError(fmt::format("fused-layer: --output-len: expected >= 3, got {}", cfg.output_len));
  const Plan plan = load_plan(cfg.plan);
  if (plan.model.num_layers < cfg.layers[1])
    throw InputError(fmt::format("fused-layer: --layers: {} has {} layers, fewer than {}", cfg.plan,
                                 plan.model.num_layers, cfg.layers[1]));
  if (!sim::fused_layer_model_ok(plan.model))
    throw InputError(fmt::format("fused-layer: {}: the model {} has layers the fused batch-1 layer does not take "
                                 "(a shared expert, q/k/v or o bias, a q/k norm over the whole projection, MLA, a "
                                 "sliding window, or routing other than softmax top-k <= 8)",
                                 cfg.plan, plan.model.name));
  if (plan.chosen.layout.world_size() != 1)
    throw InputError(fmt::format("fused-layer: {}: a plan of {} GPUs (the fused layer runs on one: give a plan for "
                                 "a one-GPU cluster, e.g. mixserve-plan search ... --cluster h200-1x1)",
                                 cfg.plan, plan.chosen.layout.world_size()));
  return plan;
}

void profile_fused_layer(const FusedLayerConfig& cfg, HardwareProfile& p, Output& out) {
  const Plan plan = check_fused_layer(cfg);
  FusedLayerPoint shape = sim::fused_layer_shape(plan.model);
  std::vector<FusedLayerPoint> points;
  fmt::print(out.table, "# fused-layer: {} ({}), layers {} and {}, {} decode steps a run, batch 1\n", plan.model.name,
             cfg.plan, cfg.layers[0], cfg.layers[1], cfg.output_len - 1);
  fmt::print(out.table, "# {:>8} {:>14} {:>14} {:>12}\n", "context", "step L1 (us)", "step L2 (us)", "layer (us)");
  for (int64_t ctx : cfg.contexts) {
    double step_us[2] = {0, 0}, context = 0;
    int moe[2] = {0, 0};
    for (int i = 0; i < 2; ++i) {
      gpu::BenchConfig b;
      b.batch = 1;
      b.input_len = int(ctx);
      b.output_len = cfg.output_len;
      b.num_layers = cfg.layers[size_t(i)];
      b.seed = cfg.seed;
      b.fused_decode_layer = true;
      fmt::print(out.progress, "mixserve-profile fused-layer: context {}, {} layers ...\n", ctx, b.num_layers);
      out.progress.flush();
      const gpu::BenchResult r = gpu::run_bench(cfg.plan, b);
      if (r.fused_layers_run == 0)
        throw InputError(fmt::format("fused-layer: {}: no layer ran fused on this device (the kernel refused the "
                                     "shape; see docs/forward.md)", cfg.plan));
      moe[i] = r.model.num_moe_layers();
      step_us[i] = r.median_decode_latency * 1e6;
      double sum = 0;
      int n = 0;
      for (const auto& st : r.steps)
        if (st.kind == "decode") sum += double(st.batch.decode_context), ++n;
      context = n > 0 ? sum / n : double(ctx);
      out.rows.push_back({{"bench", "fused_layer"}, {"model", plan.model.name}, {"layers", b.num_layers},
                          {"moe_layers", moe[i]}, {"context", context}, {"decode_step_us", step_us[i]}});
    }
    if (moe[1] - moe[0] != cfg.layers[1] - cfg.layers[0])
      throw InputError(fmt::format("fused-layer: layers {}..{} of {} are not all MoE layers", cfg.layers[0],
                                   cfg.layers[1] - 1, plan.model.name));
    FusedLayerPoint q = shape;
    q.context = int64_t(context + 0.5);
    q.time_us = (step_us[1] - step_us[0]) / double(moe[1] - moe[0]);
    if (!(q.time_us > 0))
      throw RuntimeError(fmt::format("fused-layer: context {}: {} layers took {:.1f} us, {} layers {:.1f} us: no "
                                     "positive per-layer time (noise?)",
                                     ctx, cfg.layers[1], step_us[1], cfg.layers[0], step_us[0]));
    fmt::print(out.table, "  {:>8} {:>14.1f} {:>14.1f} {:>12.2f}\n", q.context, step_us[0], step_us[1], q.time_us);
    points.push_back(q);
  }
  std::erase_if(p.fused_decode_layer.points, [&](const FusedLayerPoint& q) { return q.same_shape(shape); });
  for (const auto& q : points) {
    if (std::any_of(p.fused_decode_layer.points.begin(), p.fused_decode_layer.points.end(),
                    [&](const FusedLayerPoint& o) { return o.same_shape(q) && o.context == q.context; }))
      throw InputError(fmt::format("fused-layer: --contexts: two contexts measure as {}", q.context));
    p.fused_decode_layer.points.push_back(q);
  }
  // measured_with: one entry per model measured ("; " between them); a later run of a model
  // replaces its entry.
  const std::string tag = "(" + plan.model.name + ")";
  const std::string entry = fmt::format(
      "mixserve-profile fused-layer --plan {} --layers {},{} --contexts {} {} | {} | {}", cfg.plan, cfg.layers[0],
      cfg.layers[1], fmt::join(cfg.contexts, ","), tag,
      p.versions.count("device_name") ? p.versions.at("device_name") : p.gpu, now_iso8601_utc());
  std::string all;
  const std::string& old = p.fused_decode_layer.measured_with;
  for (size_t a = 0; a < old.size();) {
    size_t b = old.find("; ", a);
    if (b == std::string::npos) b = old.size();
    const std::string item = old.substr(a, b - a);
    if (!item.empty() && item.find(tag) == std::string::npos) all += item + "; ";
    a = b + 2;
  }
  p.fused_decode_layer.measured_with = all + entry;
}

}  // namespace mixserve::profiler
