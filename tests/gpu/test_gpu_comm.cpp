// NCCL tests: collectives driven by one process over every visible GPU with exact-valued data
// (built twice: test_gpu_comm, label multigpu, needs >= 2 GPUs; test_gpu_comm_1gpu, label gpu,
// runs the same code on a one-rank world so the NCCL path is exercised on a single-GPU host).
// Data come from comm_check.cuh: the host compares every element with the documented expected value and the device counter must agree; 0 wrong is the only pass.
// Sub-communicators split by rank-map colors have the expected sizes and ranks.
#include <doctest/doctest.h>

#include "mixserve/gpu/comm.hpp"
#include "mixserve/gpu/groups.hpp"
#include "mixserve/kernels/comm_check.cuh"
#include "reference.hpp"

using namespace mixserve;
using namespace mixserve::test;

TEST_CASE("NCCL collectives on all visible GPUs: exact results, 0 wrong") {
  const int g = gpu::device_count_or_zero();
  REQUIRE(g >= MIXSERVE_GPU_TEST_MIN_DEVICES);
  std::vector<int> devices(g);
  for (int i = 0; i < g; ++i) devices[i] = i;
  auto comms = gpu::init_single_process(devices);
  REQUIRE(std::string(std::getenv("NCCL_NVLS_ENABLE")) == "0");
  std::vector<gpu::Stream> streams;
  for (int i = 0; i < g; ++i) streams.emplace_back(devices[i]);
  // Sizes: tiny, a prime number of elements per rank, and a few MiB.
  for (CollOp op : {CollOp::all_reduce, CollOp::reduce_scatter, CollOp::all_gather, CollOp::all_to_all, CollOp::send_recv})
    for (std::size_t per_rank : {std::size_t(1), std::size_t(7919), std::size_t(1) << 20}) {
      const std::size_t bytes = per_rank * g * sizeof(float);
      const auto counts = gpu::coll_counts(op, bytes, g);
      std::vector<gpu::DeviceBuffer> send, recv, wrong;
      for (int i = 0; i < g; ++i) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(i));
        send.emplace_back(counts.send_elems * 4);
        recv.emplace_back(counts.recv_elems * 4);
        wrong.emplace_back(8);
        MIXSERVE_CUDA_CHECK(cudaMemset(recv.back().get(), 0xff, counts.recv_elems * 4));  // poison
        MIXSERVE_CUDA_CHECK(cudaMemset(wrong.back().get(), 0, 8));
      }
      auto params = [&](int i, void* data, std::size_t n) {
        kernels::CommCheckParams p;
        p.op = op;
        p.rank = comms[i].rank();
        p.nranks = g;
        p.data = static_cast<float*>(data);
        p.num_elements = static_cast<int64_t>(n);
        p.chunk_elements = static_cast<int64_t>(counts.chunk_elems);
        p.wrong = wrong[i].as<unsigned long long>();
        return p;
      };
      for (int i = 0; i < g; ++i) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(i));
        kernels::launch_comm_fill(params(i, send[i].get(), counts.send_elems), streams[i].get());
      }
      MIXSERVE_NCCL_CHECK(ncclGroupStart());
      for (int i = 0; i < g; ++i)
        gpu::enqueue_collective(op, comms[i], send[i].get(), recv[i].get(), counts, streams[i].get());
      MIXSERVE_NCCL_CHECK(ncclGroupEnd());
      for (int i = 0; i < g; ++i) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(i));
        kernels::launch_comm_count_wrong(params(i, recv[i].get(), counts.recv_elems), streams[i].get());
        streams[i].synchronize();
        const auto got = download<float>(recv[i].get(), counts.recv_elems);
        const auto p = params(i, recv[i].get(), counts.recv_elems);
        int64_t host_wrong = 0;
        for (std::size_t j = 0; j < got.size(); ++j) host_wrong += got[j] != kernels::comm_expected_value(p, int64_t(j));
        const auto dev_wrong = download<unsigned long long>(wrong[i].get(), 1)[0];
        INFO(to_string(op) << " rank " << i << "/" << g << " per-rank elements " << per_rank);
        CHECK(host_wrong == 0);
        CHECK(dev_wrong == 0u);
      }
    }
}

TEST_CASE("sub-communicators split by rank-map colors") {
  const int g = gpu::device_count_or_zero();
  REQUIRE(g >= MIXSERVE_GPU_TEST_MIN_DEVICES);
  std::vector<int> devices(g);
  for (int i = 0; i < g; ++i) devices[i] = i;
  auto world = gpu::init_single_process(devices);
  std::vector<const gpu::Comm*> w;
  for (auto& c : world) w.push_back(&c);
  // A one-node rank map with attention TP over all GPUs: attn_tp is the world, attn_dp singletons.
  std::vector<RankInfo> map(g);
  for (int r = 0; r < g; ++r) {
    map[r].rank = r;
    map[r].local_gpu = r;
    map[r].attn_tp_rank = r;
    map[r].moe_tp_rank = r;
  }
  auto tp = gpu::split(w, gpu::group_colors(map, gpu::GroupKind::attn_tp));
  auto dp = gpu::split(w, gpu::group_colors(map, gpu::GroupKind::attn_dp));
  for (int r = 0; r < g; ++r) {
    CHECK(tp[r].size() == g);
    CHECK(tp[r].rank() == r);
    CHECK(dp[r].size() == 1);
    CHECK(dp[r].rank() == 0);
  }
}
