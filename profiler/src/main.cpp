// mixserve-profile: measures this machine and writes a hardware profile (profiles/<name>.yaml).
//   mixserve-profile all -o profiles/h200.yaml --json run.json
//   mixserve-profile gemm|experts|elementwise|attention|expert_gemv|gemv|comm [-o FILE] [--merge OLD]
//   mixserve-profile check --profile profiles/h200.yaml        (predicted vs measured)
//   mixserve-profile fused-layer --plan one.yaml --merge profiles/h200.yaml -o profiles/h200.yaml
// Exit codes: 0 ok, 1 runtime failure or a failed check, 2 bad input, 3 no GPU.
#include <filesystem>
#include <set>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ostream.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/profiler/profiler.hpp"

namespace {

constexpr int kExitNoGpu = 3;

struct Cli {
  mixserve::profiler::ProfileConfig cfg;
  std::string output, json, profile_in, merge;
  mixserve::profiler::FusedLayerConfig fused;
  int check_count = 30;
  double check_bar = 0.10;
  bool no_flush = false;
};

std::string join_args(int argc, char** argv) {
  std::string s;
  for (int i = 0; i < argc; ++i) s += (i ? " " : "") + std::string(argv[i]);
  return s;
}

// "iterations a..b, noise median x / p90 y" over the result rows of one bench, or "".
std::string noise_summary(const nlohmann::json& rows, const std::string& bench) {
  std::vector<double> noise;
  int lo = 1 << 30, hi = 0;
  for (const auto& r : rows)
    if (r.value("bench", "") == bench && r.contains("noise")) {
      noise.push_back(r["noise"].get<double>());
      lo = std::min(lo, r.value("iters", 0));
      hi = std::max(hi, r.value("iters", 0));
    }
  if (noise.empty()) return "";
  const auto st = mixserve::gpu::summarize(noise);
  return fmt::format("{} {} points, {}-{} timed runs each, noise (p90-p10)/median: median {:.3f}, p90 {:.3f}; ",
                     bench, noise.size(), lo, hi, st.median, st.p90);
}

std::string collectives_sentence(const mixserve::HardwareProfile& p) {
  std::set<std::string> groups;
  for (const auto& c : p.collectives) groups.insert(c.group);
  std::string g;
  for (const auto& s : groups) g += (g.empty() ? "" : ", ") + s;
  if (groups.empty()) return "Collectives need two GPUs or more and stay alpha-beta until measured.";
  return fmt::format("Collectives measured for group shapes {} only (GPUs of one node, one process, NCCL, "
                     "NCCL_NVLS_ENABLE=0, fp32, out-of-place); every other group size and all inter-node "
                     "collectives stay alpha-beta.",
                     g);
}

std::string notes_for(const mixserve::HardwareProfile& p, const nlohmann::json& rows) {
  std::string n = fmt::format(
      "Measured by mixserve-profile on one {} (device {}): peaks (cuBLASLt bf16/fp8 8192^3, SGEMM fp32, "
      "2 GiB device copy) are the roofline ceilings; GEMM, expert GEMM and elementwise tables. GEMM and "
      "expert times: CUDA events, median, L2 flushed before each run; expert GEMMs run one cuBLASLt GEMM "
      "per non-empty expert inside a CUDA graph. ",
      p.gpu, p.versions.count("device_name") ? p.versions.at("device_name") : p.gpu);
  for (const char* b : {"gemm", "experts", "elementwise", "attention", "expert_gemv", "gemv", "comm"})
    n += noise_summary(rows, b);
  return n + collectives_sentence(p);
}

int run(const std::string& what, const Cli& cli, int argc, char** argv) {
  using namespace mixserve;
  if (what == "fused-layer") {  // bad arguments or plan first, GPU or not
    (void)profiler::check_fused_layer(cli.fused);
    (void)load_profile(cli.merge);
  }
  if (!cli.cfg.dry_run && gpu::device_count_or_zero() == 0) {
    std::cerr << "mixserve-profile: skipped: no GPU (no CUDA device visible)\n";
    return kExitNoGpu;
  }
  profiler::ProfileConfig cfg = cli.cfg;
  if (cli.no_flush) cfg.timing.flush_l2 = false;
  profiler::Output out{std::cout, std::cerr};
  HardwareProfile p;
  int rc = kExitOk;
  if (what == "fused-layer") {
    // Needs a measured profile of this GPU to add to (the peaks and tables stay as they are).
    p = load_profile(cli.merge);
    HardwareProfile here;
    profiler::describe_machine(cfg, here, out);
    if (here.gpu != p.gpu)
      throw InputError(fmt::format("{}: key 'gpu': expected this machine's GPU '{}', got '{}'", cli.merge, here.gpu, p.gpu));
    profiler::profile_fused_layer(cli.fused, p, out);
    fmt::print(std::cout, "# Verdict: OK ({} fused-layer points in the profile), exit code 0\n",
               p.fused_decode_layer.points.size());
    if (!cli.output.empty()) {
      write_file_atomic(cli.output, profile_to_yaml(p));
      std::cerr << "mixserve-profile: wrote " << cli.output << "\n";
    }
  } else if (what == "check") {
    p = load_profile(cli.profile_in);
    profiler::describe_machine(cfg, p, out);
    const double med = profiler::check_predictions(cfg, p, cli.check_count, out);
    const bool pass = med <= cli.check_bar;
    fmt::print(std::cout, "# Verdict: {} (median |error| {:.1f}% vs bar {:.0f}%), exit code {}\n", pass ? "PASS" : "FAIL",
               100.0 * med, 100.0 * cli.check_bar, pass ? 0 : 1);
    rc = pass ? kExitOk : kExitRuntime;
  } else {
    if (!cli.merge.empty()) {
      // Add to a profile measured earlier on this machine: keep its peaks and provenance.
      p = load_profile(cli.merge);
      HardwareProfile here;
      profiler::describe_machine(cfg, here, out);
      if (here.gpu != p.gpu)
        throw InputError(fmt::format("{}: key 'gpu': expected this machine's GPU '{}', got '{}'", cli.merge, here.gpu, p.gpu));
      if (what == "all" || what == "gemm") p.gemm.clear();
      if (what == "all" || what == "experts") p.experts.clear();
      if (what == "all" || what == "elementwise") p.elementwise.clear();
      if (what == "all" || what == "comm") p.collectives.clear();
      if (what == "all" || what == "attention") p.attention.clear();
      if (what == "all" || what == "gemv") {  // the decode kernels' points
        p.gemv.clear();
        std::erase_if(p.experts, [](const ExpertGemmPoint& e) { return e.distribution.starts_with(kExpertGemvV2Tag); });
      }
      // expert_gemv replaces the tagged points of the shapes it measures itself (profile_expert_gemv),
      // so `--models M` re-measures M's experts and keeps the other models' points.
    } else if (!cfg.dry_run) {
      profiler::describe_machine(cfg, p, out);
      profiler::measure_peaks(cfg, p, out);
    }
    const bool all = what == "all";
    if (all || what == "gemm") profiler::profile_gemm(cfg, p, out);
    if (all || what == "experts") profiler::profile_experts(cfg, p, out);
    if (all || what == "elementwise") profiler::profile_elementwise(cfg, p, out);
    if (all || what == "attention") profiler::profile_attention(cfg, p, out);
    if (all || what == "expert_gemv") profiler::profile_expert_gemv(cfg, p, out);
    if (all || what == "gemv") profiler::profile_gemv(cfg, p, out);
    int64_t wrong = 0;
    const bool comm = all || what == "comm";
    if (comm) wrong = profiler::profile_comm(cfg, p, out);
    std::vector<std::pair<std::string, std::string>> inputs;
    for (const auto& m : profiler::effective_models(cfg)) {
      const auto path = data_dir() / "configs" / "models" / (m + ".yaml");
      if (std::filesystem::exists(path)) inputs.emplace_back(path.string(), read_text_file(path));
    }
    p.provenance = make_provenance(fmt::format("mixserve-profile {} ({})", kMixServeVersion, join_args(argc, argv)), inputs);
    if (!cli.merge.empty()) {  // keep the merged file's description and statistics, add this run's
      const auto pos = p.notes.find("Collectives");
      std::string added;
      for (const char* b : {"attention", "expert_gemv", "gemv"}) {
        const std::string sum = noise_summary(out.rows, b);
        if (!sum.empty()) added += fmt::format("Added {} by `mixserve-profile {} --merge`: {}", now_iso8601_utc(), b, sum);
      }
      p.notes = (pos == std::string::npos ? p.notes + " " : p.notes.substr(0, pos)) + added +
                noise_summary(out.rows, "comm") + collectives_sentence(p);
    } else {
      p.notes = notes_for(p, out.rows);
    }
    if (wrong != 0) {
      fmt::print(std::cout, "# Verdict: FAIL ({} wrong collective elements), exit code 1\n", wrong);
      rc = kExitRuntime;
    } else {
      fmt::print(std::cout,
                 "# Verdict: OK ({} GEMM, {} expert, {} elementwise, {} attention, {} GEMV, {} collective points), exit "
                 "code 0\n",
                 p.gemm.size(), p.experts.size(), p.elementwise.size(), p.attention.size(), p.gemv.size(),
                 p.collectives.size());
    }
    if (!cli.output.empty() && !cfg.dry_run && rc == kExitOk) {
      write_file_atomic(cli.output, profile_to_yaml(p));
      std::cerr << "mixserve-profile: wrote " << cli.output << "\n";
    }
  }
  if (!cli.json.empty()) {
    nlohmann::json j;
    j["tool"] = fmt::format("mixserve-profile {}", kMixServeVersion);
    j["args"] = join_args(argc, argv);
    j["created"] = now_iso8601_utc();
    j["device"] = {{"name", p.versions.count("device_name") ? p.versions.at("device_name") : p.gpu},
                   {"sm_count", p.sm_count}, {"memory_GiB", p.memory_GiB}};
    j["versions"] = p.versions;
    j["peaks"] = {{"bf16_tflops", p.peak_tflops_bf16}, {"fp8_tflops", p.peak_tflops_fp8},
                  {"fp32_tflops", p.peak_tflops_fp32}, {"mem_bw_GBps", p.mem_bw_GBps},
                  {"kernel_launch_us", p.kernel_launch_us}};
    j["rows"] = out.rows;
    write_file_atomic(cli.json, j.dump(1) + "\n");
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mixserve-profile: measure GEMMs, expert GEMMs, elementwise bandwidth and collectives; write a hardware profile"};
  app.require_subcommand(1);
  Cli cli;
  auto& cfg = cli.cfg;
  auto common = [&](CLI::App* s, bool writes_profile) {
    s->add_option("--device", cfg.device, "CUDA device for single-GPU benchmarks")->capture_default_str();
    s->add_option("--json", cli.json, "also write the results (args, versions, device, rows) as JSON here");
    s->add_option("--iters", cfg.timing.timed_iters, "maximum timed runs per point")->capture_default_str();
    s->add_option("--min-iters", cfg.min_iters, "minimum timed runs per point")->capture_default_str();
    s->add_option("--warmup", cfg.timing.warmup_iters, "maximum warm-up runs per point")->capture_default_str();
    s->add_option("--target-ms", cfg.target_ms_per_point, "timed milliseconds aimed for per point")->capture_default_str();
    s->add_flag("--no-flush", cli.no_flush, "do not flush the L2 before each timed run");
    s->add_option("--models", cfg.models, "models whose shapes to measure (shipped names or YAML paths; default: every shipped model)")
        ->delimiter(',');
    s->add_option("--tp", cfg.tp, "attention TP degrees of the GEMM families")->delimiter(',')->capture_default_str();
    s->add_option("--ep", cfg.ep, "EP degrees of the expert families")->delimiter(',')->capture_default_str();
    s->add_option("--m", cfg.m_grid, "GEMM token sweep (default: 1, 2, 4, ..., 16384)")->delimiter(',');
    s->add_option("--generic", cfg.generic_dims, "generic grid n and k values")->delimiter(',')->capture_default_str();
    s->add_option("--rows", cfg.expert_rows, "expert routed-row sweep (default: 4, 16, ..., 65536)")->delimiter(',');
    s->add_option("--distributions", cfg.distributions, "expert token distributions: uniform, zipf:S, empty:F")
        ->delimiter(',')->capture_default_str();
    s->add_option("-b,--minbytes", cfg.comm_min_bytes, "collectives: smallest size (bytes)")->capture_default_str();
    s->add_option("-e,--maxbytes", cfg.comm_max_bytes, "collectives: largest size (bytes)")->capture_default_str();
    s->add_option("-f,--stepfactor", cfg.comm_factor, "collectives: size factor")->capture_default_str();
    s->add_option("--gpus", cfg.gpus, "collectives: GPUs to use (0 = all visible)")->capture_default_str();
    s->add_option("--comm-iters", cfg.comm_iters, "collectives: timed runs per size")->capture_default_str();
    if (writes_profile) {
      s->add_option("-o,--output", cli.output, "write the profile (YAML) here");
      s->add_option("--name", cfg.name, "profile name")->capture_default_str();
      s->add_flag("--dry-run", cfg.dry_run, "list the shapes and an estimated run time; measure nothing");
      s->add_option("--merge", cli.merge, "start from this profile (same GPU): keep its peaks and other tables");
    }
  };
  std::string chosen;
  for (const char* name : {"all", "gemm", "experts", "elementwise", "attention", "expert_gemv", "gemv", "comm"}) {
    auto* s = app.add_subcommand(name, fmt::format("measure {} and write a profile", name));
    common(s, true);
    s->callback([&chosen, name] { chosen = name; });
  }
  auto* check = app.add_subcommand("check", "time shapes that are not in a profile's grid and compare with its prediction");
  common(check, false);
  check->add_option("--profile", cli.profile_in, "the profile to check")->required();
  check->add_option("--count", cli.check_count, "number of shapes")->capture_default_str();
  check->add_option("--bar", cli.check_bar, "largest acceptable median relative error")->capture_default_str();
  check->callback([&chosen] { chosen = "check"; });
  auto* fl = app.add_subcommand(
      "fused-layer", "time the fused batch-1 decode layer of a one-GPU plan's model at several contexts (two layer "
                     "counts, the difference per layer) and add the points to a profile");
  fl->add_option("--device", cfg.device, "CUDA device")->capture_default_str();
  fl->add_option("--json", cli.json, "also write the results (args, versions, device, rows) as JSON here");
  fl->add_option("--plan", cli.fused.plan, "a one-GPU plan of the model (mixserve-plan search ... --cluster h200-1x1)")
      ->required();
  fl->add_option("--contexts", cli.fused.contexts, "context lengths (prompt tokens)")->delimiter(',')->capture_default_str();
  fl->add_option("--layers", cli.fused.layers, "two layer counts L1 < L2 of the model")->delimiter(',')->capture_default_str();
  fl->add_option("--output-len", cli.fused.output_len, "tokens generated a run (decode steps + 1)")->capture_default_str();
  fl->add_option("--merge", cli.merge, "the measured profile of this GPU to add the points to")->required();
  fl->add_option("-o,--output", cli.output, "write the profile (YAML) here");
  fl->callback([&chosen] { chosen = "fused-layer"; });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : mixserve::kExitInput;
  }
  try {
    return run(chosen, cli, argc, argv);
  } catch (const mixserve::InputError& e) {
    std::cerr << "mixserve-profile: " << e.what() << "\n";
    return mixserve::kExitInput;
  } catch (const std::exception& e) {
    std::cerr << "mixserve-profile: error: " << e.what() << "\n";
    return mixserve::kExitRuntime;
  }
}
