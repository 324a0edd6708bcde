// mixserve-bench-moe-comm: one MoE layer's dispatch + combine on the GPU, nccl-tests style, with
// the simulator's prediction for the same shape beside each measured row (docs/moe-comm.md).
//   mixserve-bench-moe-comm --nodes 2 --gpus-per-node 4 --tokens 128,512 --hidden 7168
//       --topk 8 --experts 256 --algo fused,rs-a2a-ag,ep-a2a --json out.json
// Transport local: the N x G ranks are logical ranks on ONE GPU (rows labelled "emulated": the
// "network" is a device copy, the times measure copies, not links). Transport nccl: one rank per
// GPU, N x G GPUs needed (the node structure is then the real one only when the GPUs really are
// on N nodes; on one host it is labelled emulated too). Data are bf16 and not checked here
// (test_gpu_moe_comm checks the same code with exact data).
// Exit codes: 0 ok, 1 runtime failure, 2 bad input, 3 no GPU.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/moe_comm.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/sim/comm_schedule.hpp"
#include "mixserve/sim/cost_moe_comm.hpp"
#include "mixserve/sim/op_timer.hpp"
#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#endif

namespace {
using namespace mixserve;

// X(enum, CLI name): the algorithms, one list for the enum, the names and the CLI choices.
#define MIXSERVE_BENCH_ALGOS(X) X(fused, "fused") X(rs_a2a_ag, "rs-a2a-ag") X(ep_a2a, "ep-a2a")
enum class Algo {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_BENCH_ALGOS(MIXSERVE_X)
#undef MIXSERVE_X
};
constexpr std::pair<Algo, const char*> kAlgos[] = {
#define MIXSERVE_X(e, s) {Algo::e, s},
    MIXSERVE_BENCH_ALGOS(MIXSERVE_X)
#undef MIXSERVE_X
};
const char* name_of(Algo a) {
  for (const auto& [e, s] : kAlgos)
    if (e == a) return s;
  return "?";
}

struct Config {
  int nodes = 2, gpus_per_node = 4;
  std::vector<int> tokens{128, 512, 2048};
  int hidden = 7168, top_k = 8, experts = 256;
  std::string transport = "local";
  std::vector<std::string> algos{"fused", "rs-a2a-ag", "ep-a2a"};
  int warmup = 5, iters = 20;
  uint64_t seed = 1;
  std::string profile = "h200", cluster = "h200-2x8";
  std::string json;
};

struct Row {
  std::string algo;
  int tokens = 0;
  double bytes = 0;  // max over ranks of the bytes a rank sends in dispatch + combine
  gpu::Stats dispatch_us, combine_us;
  double pred_dispatch_us = 0, pred_combine_us = 0;
};

// Uniform top-k routing, k distinct experts per token, weights 1/k.
std::vector<sim::ReplicaRouting> make_routing(int replicas, int tokens, int E, int k, std::mt19937_64& rng) {
  std::vector<sim::ReplicaRouting> out(replicas);
  for (auto& rt : out) {
    rt.num_tokens = tokens;
    rt.topk_ids.resize(static_cast<size_t>(tokens) * k);
    rt.topk_weights.assign(rt.topk_ids.size(), 1.0 / k);
    std::vector<int32_t> perm(E);
    for (int t = 0; t < tokens; ++t) {
      for (int e = 0; e < E; ++e) perm[e] = e;
      for (int j = 0; j < k; ++j) {
        std::swap(perm[j], perm[j + rng() % static_cast<uint64_t>(E - j)]);
        rt.topk_ids[static_cast<size_t>(t) * k + j] = perm[j];
      }
    }
  }
  return out;
}

// --------------------------------------------------------------------------- prediction

sim::CommGroup group(int size, int nodes) { return sim::CommGroup{size, nodes}; }

// Fused (overlap) or rs_a2a_ag (serialised): per round the slowest rank's rail message and
// group collective, through the cost model's round-by-round timing (cost_moe_comm.hpp).
std::pair<double, double> predict_fused(const sim::FusedSchedule& s, const sim::OpTimer& t,
                                        bool overlap, int tokens) {
  const auto& g = s.geo;
  const int Q = s.num_groups, T = s.group_size;
  const double eb = g.elem_bytes, row = g.hidden * eb, slice = s.slice_elems * eb;
  std::vector<double> p2p_d, ag_d, rs_c, p2p_c;
  double local_rs = 0;
  auto coll = [&](CollOp op, double bytes) {
    return T > 1 && bytes > 0 ? t.collective(op, group(T, 1), bytes).time_us : 0.0;
  };
  auto rail = [&](double bytes, bool inter) {
    return bytes > 0 ? t.collective(CollOp::send_recv, group(2, inter ? 2 : 1), bytes).time_us : 0.0;
  };
  for (int i = 1; i < Q; ++i) {
    double dsend = 0, drecv = 0, csend = 0;
    bool inter = false;
    for (int r = 0; r < g.num_ranks; ++r) {
      const auto& st = s.steps[r][i];
      dsend = std::max(dsend, double(st.dispatch_send_rows));
      drecv = std::max(drecv, double(st.dispatch_recv_rows));
      csend = std::max(csend, double(st.combine_send_rows));
      inter = inter || st.send_inter_node;
    }
    p2p_d.push_back(rail(dsend * slice, inter));
    ag_d.push_back(coll(CollOp::all_gather, drecv * row));
    p2p_c.push_back(rail(csend * slice, inter));
  }
  for (int i = 0; i < Q; ++i) {
    double rs = 0;
    for (int r = 0; r < g.num_ranks; ++r) rs = std::max(rs, double(s.steps[r][i].combine_rs_rows));
    (i == 0 ? local_rs : rs_c.emplace_back()) = coll(CollOp::reduce_scatter, rs * row);
  }
  const double final_ag = coll(CollOp::all_gather, double(tokens) * row);
  if (overlap)
    return {sim::fused_dispatch_time_us(p2p_d, ag_d, 0),
            sim::fused_combine_time_us(rs_c, p2p_c, local_rs) + final_ag};
  double d = 0, c = local_rs + final_ag;
  for (size_t i = 0; i < p2p_d.size(); ++i) d += p2p_d[i] + ag_d[i];
  for (size_t i = 0; i < p2p_c.size(); ++i) c += p2p_c[i] + rs_c[i];
  return {d, c};
}

// Plain EP: one all-to-all each way (the slowest rank's whole send buffer) and, split, the
// replica all-gather of the combined rows.
std::pair<double, double> predict_ep(const sim::EpSchedule& s, const sim::OpTimer& t, int nodes, int tokens) {
  const auto& g = s.geo;
  const double row = g.hidden * g.elem_bytes;
  double send = 0, recv = 0;
  for (const auto& rp : s.ranks) {
    send = std::max(send, double(rp.send_offset.back()) * row);
    recv = std::max(recv, double(rp.recv_rows()) * row);
  }
  const auto grp = group(g.num_ranks, nodes);
  const double counts = t.collective(CollOp::all_to_all, grp, double(g.num_ranks) * g.experts_per_ep_rank() * 8).time_us;
  double d = counts + t.collective(CollOp::all_to_all, grp, send).time_us;
  double c = t.collective(CollOp::all_to_all, grp, recv).time_us;
  if (s.source == sim::EpSource::split && g.attn_tp > 1)
    c += t.collective(CollOp::all_gather, group(g.attn_tp, 1), double(tokens) * row).time_us;
  return {d, c};
}

double fused_bytes(const sim::FusedSchedule& s) {
  double m = 0;
  for (int r = 0; r < s.geo.num_ranks; ++r) {
    double b = s.final_ag_bytes[r].inter_bytes + s.final_ag_bytes[r].intra_bytes;
    for (const auto& st : s.steps[r])
      b += st.dispatch_bytes.inter_bytes + st.dispatch_bytes.intra_bytes +
           st.combine_bytes.inter_bytes + st.combine_bytes.intra_bytes;
    m = std::max(m, b);
  }
  return m;
}
double ep_bytes(const sim::EpSchedule& s) {
  double m = 0;
  for (const auto& rp : s.ranks)
    m = std::max(m, rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes +
                        rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes);
  return m;
}

// --------------------------------------------------------------------------- measurement

// Main streams (one per device of a held rank) and event timing of `op` over all of them.
struct Timer {
  std::map<int, std::unique_ptr<gpu::Stream>> main;  // device -> stream
  std::vector<cudaStream_t> per_rank;
  explicit Timer(const gpu::Transport& tr) : per_rank(tr.num_ranks(), nullptr) {
    for (int r = 0; r < tr.num_ranks(); ++r) {
      if (!tr.is_local(r)) continue;
      const int d = tr.device_of(r);
      if (!main.count(d)) main[d] = std::make_unique<gpu::Stream>(d);
      per_rank[r] = main[d]->get();
    }
  }
  template <class Op>
  gpu::Stats time(const Op& op, int warmup, int iters) {
    std::vector<double> us;
    std::map<int, std::pair<gpu::Event, gpu::Event>> ev;
    for (auto& [d, s] : main) {
      MIXSERVE_CUDA_CHECK(cudaSetDevice(d));
      ev.emplace(std::piecewise_construct, std::forward_as_tuple(d), std::forward_as_tuple());
    }
    for (int it = 0; it < warmup + iters; ++it) {
      for (auto& [d, s] : main) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(d));
        ev.at(d).first.record(s->get());
      }
      op(per_rank);
      double worst = 0;
      for (auto& [d, s] : main) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(d));
        ev.at(d).second.record(s->get());
      }
      for (auto& [d, s] : main) {
        s->synchronize();
        worst = std::max(worst, 1e3 * gpu::Event::elapsed_ms(ev.at(d).first, ev.at(d).second));
      }
      if (it >= warmup) us.push_back(worst);
    }
    return gpu::summarize(us);
  }
};

template <class Mc>
void measure(Mc& mc, Timer& timer, const Config& c, Row& row) {
  row.dispatch_us = timer.time([&](const std::vector<cudaStream_t>& m) {
    mc.fork(m);
    mc.dispatch();
    mc.join(m);
  }, c.warmup, c.iters);
  row.combine_us = timer.time([&](const std::vector<cudaStream_t>& m) {
    mc.fork(m);
    mc.combine();
    mc.join(m);
  }, c.warmup, c.iters);
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

int run(const Config& c, const std::string& args) {
  const int N = c.nodes, G = c.gpus_per_node, P = N * G;
  std::vector<Algo> algos;
  for (const auto& a : c.algos)
    for (const auto& [e, s] : kAlgos)
      if (a == s) algos.push_back(e);
  const HardwareProfile prof = load_profile(c.profile);
  ClusterSpec cl = load_cluster(c.cluster);
  const std::string base_cluster = cl.name;
  cl.name = fmt::format("{}x{} (from {})", N, G, base_cluster);
  cl.num_nodes = N;
  cl.gpus_per_node = G;
  cl.nics_per_node = N > 1 ? G : 0;  // one NIC per GPU (rail-optimised), as the base cluster
  const auto timer_model = sim::make_profile_timer(prof, cl);

  const int ndev = gpu::device_count_or_zero();
  std::unique_ptr<gpu::Transport> tr_fused, tr_ep;
#if MIXSERVE_HAVE_NCCL
  std::vector<gpu::Comm> world;
  std::vector<const gpu::Comm*> wp;
#endif
  const bool emulated = c.transport == "local" || N > 1;
  if (c.transport == "local") {
    tr_fused = std::make_unique<gpu::LocalTransport>(P, 0);
    tr_ep = std::make_unique<gpu::LocalTransport>(P, 0);
  } else {
#if MIXSERVE_HAVE_NCCL
    if (ndev < P)
      throw InputError(fmt::format("--transport nccl: {} x {} = {} ranks need {} GPUs, {} visible", N, G, P, P, ndev));
    std::vector<int> devices(P);
    for (int i = 0; i < P; ++i) devices[i] = i;
    world = gpu::init_single_process(devices);
    for (auto& w : world) wp.push_back(&w);
    tr_fused = std::make_unique<gpu::NcclTransport>(wp, G);
    tr_ep = std::make_unique<gpu::NcclTransport>(wp, 1);
#else
    throw InputError("--transport nccl: built without NCCL");
#endif
  }
  const gpu::DeviceInfo dev = gpu::query_device(0);

  std::printf("# mixserve-bench-moe-comm %s\n", args.c_str());
  std::printf("# device 0: %s, %d SMs; %d visible\n", dev.name.c_str(), dev.sm_count, ndev);
  std::string vers;
  for (const auto& [k, v] : dev.versions) vers += (vers.empty() ? "" : ", ") + k + " " + v;
  std::printf("# versions: %s\n", vers.c_str());
  std::printf("# layout: %d nodes x %d GPUs, transport %s%s; hidden %d, top-%d of %d experts, bf16, uniform routing, seed %llu\n",
              N, G, c.transport.c_str(),
              emulated ? (c.transport == "local" ? " (EMULATED: logical ranks on one GPU, copies not links)"
                                                 : " (EMULATED node structure on one host)") : "",
              c.hidden, c.top_k, c.experts, static_cast<unsigned long long>(c.seed));
  std::printf("# predicted: simulator cost model, profile %s, cluster %s (real links, not the emulation)\n",
              c.profile.c_str(), cl.name.c_str());
  std::printf("# bytes: the most any rank sends in dispatch + combine (schedule accounting); algbw = bytes / total time\n");
  std::printf("# %-10s %8s %12s | %10s %10s %10s %8s | %10s %10s %10s | %s\n", "algo", "tokens", "bytes",
              "disp(us)", "comb(us)", "total(us)", "algbw", "pdisp(us)", "pcomb(us)", "ptotal(us)", "label");
  std::printf("# %-10s %8s %12s | %10s %10s %10s %8s | %10s %10s %10s | %s\n", "", "/replica", "(B)", "", "",
              "", "(GB/s)", "", "", "", "");

  std::mt19937_64 rng(c.seed);
  std::vector<Row> rows;
  for (int tokens : c.tokens) {
    const auto routing = make_routing(N, tokens, c.experts, c.top_k, rng);
    for (Algo a : algos) {
      Row row;
      row.algo = name_of(a);
      row.tokens = tokens;
      if (a == Algo::ep_a2a) {
        sim::CommGeometry g;
        g.num_ranks = P;
        g.gpus_per_node = G;
        g.attn_tp = G;
        g.attn_dp = N;
        g.moe_tp = 1;
        g.moe_ep = P;
        g.num_experts = c.experts;
        g.top_k = c.top_k;
        g.hidden = c.hidden;
        g.elem_bytes = 2;
        const auto s = sim::build_ep_schedule(g, routing, sim::EpSource::split);
        gpu::EpMoeComm mc(g, tokens, sim::EpSource::split, kernels::MoeDType::bf16, *tr_ep);
        mc.prepare(s, routing);
        Timer timer(*tr_ep);
        measure(mc, timer, c, row);
        row.bytes = ep_bytes(s);
        std::tie(row.pred_dispatch_us, row.pred_combine_us) = predict_ep(s, *timer_model, N, tokens);
      } else {
        sim::CommGeometry g;
        g.num_ranks = P;
        g.gpus_per_node = G;
        g.attn_tp = g.moe_tp = G;
        g.attn_dp = g.moe_ep = N;
        g.num_experts = c.experts;
        g.top_k = c.top_k;
        g.hidden = c.hidden;
        g.elem_bytes = 2;
        const auto s = sim::build_fused_schedule(g, routing);
        gpu::FusedMoeComm mc(g, tokens, kernels::MoeDType::bf16, *tr_fused);
        mc.set_overlap(a == Algo::fused);
        mc.prepare(s, routing);
        Timer timer(*tr_fused);
        measure(mc, timer, c, row);
        row.bytes = fused_bytes(s);
        std::tie(row.pred_dispatch_us, row.pred_combine_us) = predict_fused(s, *timer_model, a == Algo::fused, tokens);
      }
      const double total = row.dispatch_us.median + row.combine_us.median;
      std::printf("  %-10s %8d %12.0f | %10.1f %10.1f %10.1f %8.2f | %10.1f %10.1f %10.1f | %s\n", row.algo.c_str(),
                  tokens, row.bytes, row.dispatch_us.median, row.combine_us.median, total,
                  total > 0 ? row.bytes / total / 1e3 : 0.0, row.pred_dispatch_us, row.pred_combine_us,
                  row.pred_dispatch_us + row.pred_combine_us, emulated ? "emulated" : "measured");
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  std::printf("# median of %d timed runs after %d warm-up runs; dispatch and combine timed apart (fork, op, join)\n",
              c.iters, c.warmup);
  std::printf("# data are not checked here: test_gpu_moe_comm runs the same code on exact data (0 wrong)\n");

  if (!c.json.empty()) {
    nlohmann::json j;
    j["tool"] = "mixserve-bench-moe-comm";
    j["args"] = args;
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char ts[32];
    std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    j["timestamp"] = ts;
    j["device"] = {{"name", dev.name}, {"sm_count", dev.sm_count}, {"visible", ndev}};
    j["versions"] = dev.versions;
    j["config"] = {{"nodes", N}, {"gpus_per_node", G}, {"transport", c.transport}, {"emulated", emulated},
                   {"hidden", c.hidden}, {"top_k", c.top_k}, {"experts", c.experts}, {"dtype", "bf16"},
                   {"routing", "uniform"}, {"seed", c.seed}, {"warmup", c.warmup}, {"iters", c.iters},
                   {"profile", c.profile}, {"cluster", cl.name}};
    for (const auto& r : rows) {
      auto stats = [](const gpu::Stats& s) {
        return nlohmann::json{{"median", s.median}, {"min", s.min}, {"max", s.max}, {"p10", s.p10},
                              {"p90", s.p90}, {"noise", s.noise()}};
      };
      j["rows"].push_back({{"algo", r.algo}, {"tokens_per_replica", r.tokens}, {"bytes", r.bytes},
                           {"dispatch_us", stats(r.dispatch_us)}, {"combine_us", stats(r.combine_us)},
                           {"total_us", r.dispatch_us.median + r.combine_us.median},
                           {"predicted_dispatch_us", r.pred_dispatch_us},
                           {"predicted_combine_us", r.pred_combine_us},
                           {"predicted_total_us", r.pred_dispatch_us + r.pred_combine_us},
                           {"label", emulated ? "emulated" : "measured"}});
    }
    const std::filesystem::path out(c.json), tmp = out.string() + ".tmp";
    {
      std::ofstream f(tmp);
      f << j.dump(2) << "\n";
      if (!f) throw RuntimeError("cannot write " + tmp.string());
    }
    std::filesystem::rename(tmp, out);
  }
  std::printf("# verdict: ok (exit 0)\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  CLI::App app{"mixserve-bench-moe-comm: one MoE layer's dispatch + combine, fused vs unfused"};
  app.add_option("--nodes", c.nodes, "nodes N")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--gpus-per-node", c.gpus_per_node, "GPUs per node G")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--tokens", c.tokens, "tokens per attention replica (node), comma list")
      ->delimiter(',')->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--hidden", c.hidden, "hidden size")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--topk", c.top_k, "experts per token")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--experts", c.experts, "routed experts")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--transport", c.transport, "local: N*G logical ranks on one GPU; nccl: one GPU per rank")
      ->check(CLI::IsMember({"local", "nccl"}))->capture_default_str();
  std::vector<std::string> algo_names;
  for (const auto& [e, s] : kAlgos) algo_names.push_back(s);
  app.add_option("--algo", c.algos, "algorithms, comma list")->delimiter(',')
      ->check(CLI::IsMember(algo_names))->capture_default_str();
  app.add_option("--warmup", c.warmup, "untimed runs")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--iters", c.iters, "timed runs (median reported)")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--seed", c.seed, "routing seed")->capture_default_str();
  app.add_option("--profile", c.profile, "hardware profile for the prediction")->capture_default_str();
  app.add_option("--cluster", c.cluster, "cluster whose links the prediction uses (nodes/GPUs replaced)")->capture_default_str();
  app.add_option("--json", c.json, "write the results as JSON");
  CLI11_PARSE(app, argc, argv);
  std::string args;
  for (int i = 0; i < argc; ++i) args += (i ? " " : "") + std::string(argv[i]);
  try {
    if (gpu::device_count_or_zero() == 0) {
      std::fprintf(stderr, "mixserve-bench-moe-comm: no GPU visible\n");
      return 3;
    }
    return run(c, args);
  } catch (const InputError& e) {
    std::fprintf(stderr, "mixserve-bench-moe-comm: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mixserve-bench-moe-comm: %s\n", e.what());
    return 1;
  }
}
