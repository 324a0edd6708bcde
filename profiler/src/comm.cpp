// Collectives, nccl-tests conventions: sizes -b..-e by -f, out-of-place, fp32 sum, time = median
// over runs of the slowest rank, algbw = size / time, busbw = algbw * factor, #wrong from an
// exact-valued check after the timed runs.
#include <ostream>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "context.hpp"
#include "mixserve/profiler/shapes.hpp"

#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#include "mixserve/kernels/comm_check.cuh"
#endif

namespace mixserve::profiler {

#if MIXSERVE_HAVE_NCCL
namespace {
constexpr CollOp kOps[] = {CollOp::all_reduce, CollOp::reduce_scatter, CollOp::all_gather, CollOp::all_to_all,
                           CollOp::send_recv};

double printed_bytes(CollOp op, const gpu::CollCounts& c) {
  const double f = sizeof(float);
  return op == CollOp::all_gather ? f * double(c.recv_elems) : f * double(c.send_elems);
}
}  // namespace

int64_t profile_comm(const ProfileConfig& cfg, HardwareProfile& p, Output& out) {
  gpu::disable_nvls();
  const int visible = gpu::device_count_or_zero();
  const int use = cfg.gpus > 0 ? std::min(cfg.gpus, visible) : visible;
  const auto sizes = geometric_sizes(cfg.comm_min_bytes, cfg.comm_max_bytes, cfg.comm_factor);
  fmt::print(out.table, "#\n# Collectives: one process driving {} GPU(s), NCCL_NVLS_ENABLE=0, fp32 sum, out-of-place, -b {} -e {} -f {}, {} timed runs after {} warm-up\n",
             use, cfg.comm_min_bytes, cfg.comm_max_bytes, cfg.comm_factor, cfg.comm_iters, cfg.comm_warmup);
  if (use < 2) {
    fmt::print(out.table, "# fewer than 2 GPUs: no collective measured (the planner keeps its alpha-beta model)\n");
    return 0;
  }
  if (cfg.dry_run) return 0;
  int64_t total_wrong = 0;
  for (int g = 2; g <= use; g *= 2) {
    std::vector<int> devices(g);
    for (int i = 0; i < g; ++i) devices[i] = i;
    auto comms = gpu::init_single_process(devices);
    std::vector<gpu::Stream> streams;
    std::vector<gpu::DeviceBuffer> send, recv, wrong;
    for (int i = 0; i < g; ++i) {
      MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[i]));
      streams.emplace_back(devices[i]);
      send.emplace_back(static_cast<std::size_t>(cfg.comm_max_bytes));
      recv.emplace_back(static_cast<std::size_t>(cfg.comm_max_bytes));
      wrong.emplace_back(sizeof(unsigned long long));
    }
    std::vector<cudaStream_t> raw_streams;
    for (auto& s : streams) raw_streams.push_back(s.get());
    const std::string group = fmt::format("1x{}", g);
    for (CollOp op : kOps) {
      fmt::print(out.table, "#\n# {} on {} GPUs (group {}), busbw factor {:.3f}\n", to_string(op), g, group,
                 gpu::bus_factor(op, g));
      fmt::print(out.table, "#{:>12} {:>12} {:>6} {:>6} | {:>10} {:>8} {:>8} {:>6} {:>6}\n", "size(B)", "count", "type",
                 "redop", "time(us)", "algbw", "busbw", "#wrong", "noise");
      fmt::print(out.table, "#{:>12} {:>12} {:>6} {:>6} | {:>10} {:>8} {:>8} {:>6} {:>6}\n", "", "(elements)", "", "",
                 "", "(GB/s)", "(GB/s)", "", "");
      fmt::print(out.progress, "[comm] {} on {} GPUs\n", to_string(op), g);
      out.progress.flush();
      double busbw_sum = 0;
      int busbw_n = 0;
      for (int64_t size : sizes) {
        const auto counts = gpu::coll_counts(op, static_cast<std::size_t>(size), g);
        if (counts.send_elems == 0 || counts.recv_elems == 0) continue;
        auto run_once = [&] {
          MIXSERVE_NCCL_CHECK(ncclGroupStart());
          for (int i = 0; i < g; ++i)
            gpu::enqueue_collective(op, comms[i], send[i].get(), recv[i].get(), counts, raw_streams[i]);
          MIXSERVE_NCCL_CHECK(ncclGroupEnd());
        };
        auto params = [&](int i, float* data, int64_t n) {
          kernels::CommCheckParams cp;
          cp.op = op;
          cp.rank = comms[i].rank();
          cp.nranks = g;
          cp.data = data;
          cp.num_elements = n;
          cp.chunk_elements = static_cast<int64_t>(counts.chunk_elems);
          cp.wrong = wrong[i].as<unsigned long long>();
          return cp;
        };
        for (int i = 0; i < g; ++i) {
          MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[i]));
          kernels::launch_comm_fill(params(i, send[i].as<float>(), int64_t(counts.send_elems)), raw_streams[i]);
        }
        const auto r = gpu::time_op_multi(run_once, raw_streams, devices, cfg.comm_warmup, cfg.comm_iters);
        // Check: poison the output, run once more, count wrong elements on every rank.
        for (int i = 0; i < g; ++i) {
          MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[i]));
          MIXSERVE_CUDA_CHECK(cudaMemsetAsync(recv[i].get(), 0xff, counts.recv_elems * sizeof(float), raw_streams[i]));
          MIXSERVE_CUDA_CHECK(cudaMemsetAsync(wrong[i].get(), 0, sizeof(unsigned long long), raw_streams[i]));
        }
        run_once();
        int64_t wrong_here = 0;
        for (int i = 0; i < g; ++i) {
          MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[i]));
          kernels::launch_comm_count_wrong(params(i, recv[i].as<float>(), int64_t(counts.recv_elems)), raw_streams[i]);
          unsigned long long w = 0;
          MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(&w, wrong[i].get(), sizeof(w), cudaMemcpyDeviceToHost, raw_streams[i]));
          MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(raw_streams[i]));
          wrong_here += static_cast<int64_t>(w);
        }
        total_wrong += wrong_here;
        const double bytes = printed_bytes(op, counts);
        const double algbw = bytes / (r.time_us.median * 1e3);
        const double busbw = algbw * gpu::bus_factor(op, g);
        busbw_sum += busbw;
        ++busbw_n;
        const std::size_t count = op == CollOp::all_gather ? counts.recv_elems : counts.send_elems;
        fmt::print(out.table, " {:>12.0f} {:>12} {:>6} {:>6} | {:>10.2f} {:>8.2f} {:>8.2f} {:>6} {:>6.3f}\n", bytes, count,
                   "float", (op == CollOp::all_reduce || op == CollOp::reduce_scatter) ? "sum" : "none", r.time_us.median,
                   algbw, busbw, wrong_here, r.time_us.noise());
        CollectivePoint cpt;
        cpt.op = op;
        cpt.group_size = g;
        cpt.nodes = 1;
        cpt.group = group;
        cpt.bytes = bytes;
        cpt.time_us = r.time_us.median;
        p.collectives.push_back(cpt);
        out.rows.push_back({{"bench", "comm"}, {"op", to_string(op)}, {"group", group}, {"group_size", g},
                            {"bytes", bytes}, {"count", count}, {"time_us", r.time_us.median}, {"algbw_GBps", algbw},
                            {"busbw_GBps", busbw}, {"wrong", wrong_here}, {"noise", r.time_us.noise()},
                            {"iters", r.time_us.count}});
      }
      fmt::print(out.table, "# Avg bus bandwidth ({}, {} GPUs): {:.2f} GB/s\n", to_string(op), g,
                 busbw_n ? busbw_sum / busbw_n : 0.0);
    }
  }
  fmt::print(out.table, "# Out of bounds values : {} {}\n", total_wrong, total_wrong == 0 ? "OK" : "FAILED");
  return total_wrong;
}
#else
int64_t profile_comm(const ProfileConfig&, HardwareProfile&, Output&) {
  throw RuntimeError("mixserve-profile was built without NCCL: collectives cannot be measured (set NCCL_HOME and rebuild)");
}
#endif

}  // namespace mixserve::profiler
