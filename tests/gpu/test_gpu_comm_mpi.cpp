// Multi-GPU test under MPI (label multigpu, run through mpiexec with one process per GPU):
// init_mpi_world bootstraps NCCL from MPI, every rank runs each collective on its own GPU with
// exact-valued data, and the total of wrong elements over all ranks must be 0. Without enough GPUs
// for the MPI world every rank prints "skipped: no GPU" and exits 77 (CTest: skipped).
#include <mpi.h>

#include <cstdio>

#include "mixserve/gpu/comm.hpp"
#include "mixserve/kernels/comm_check.cuh"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/runtime.hpp"

using namespace mixserve;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int ndev = gpu::device_count_or_zero();
  int enough = (ndev >= 1 && size >= 2) ? 1 : 0, all_enough = 0;
  MPI_Allreduce(&enough, &all_enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_enough) {
    if (rank == 0) std::printf("skipped: no GPU (%d CUDA device(s) on rank 0, %d MPI ranks; need a GPU per rank and >= 2 ranks)\n", ndev, size);
    MPI_Finalize();
    return 77;
  }
  long long wrong_total = 0, failures = 0;
  try {
    const int device = rank % ndev;
    gpu::Comm world = gpu::init_mpi_world(device);
    gpu::Stream stream(device);
    for (CollOp op : {CollOp::all_reduce, CollOp::reduce_scatter, CollOp::all_gather, CollOp::all_to_all, CollOp::send_recv})
      for (std::size_t per_rank : {std::size_t(1), std::size_t(7919), std::size_t(1) << 20}) {
        const auto counts = gpu::coll_counts(op, per_rank * size * sizeof(float), size);
        gpu::DeviceBuffer send(counts.send_elems * 4), recv(counts.recv_elems * 4), wrong(8);
        MIXSERVE_CUDA_CHECK(cudaMemset(recv.get(), 0xff, counts.recv_elems * 4));
        MIXSERVE_CUDA_CHECK(cudaMemset(wrong.get(), 0, 8));
        kernels::CommCheckParams p;
        p.op = op;
        p.rank = world.rank();
        p.nranks = size;
        p.chunk_elements = static_cast<int64_t>(counts.chunk_elems);
        p.wrong = wrong.as<unsigned long long>();
        p.data = send.as<float>();
        p.num_elements = static_cast<int64_t>(counts.send_elems);
        kernels::launch_comm_fill(p, stream.get());
        gpu::enqueue_collective(op, world, send.get(), recv.get(), counts, stream.get());
        p.data = recv.as<float>();
        p.num_elements = static_cast<int64_t>(counts.recv_elems);
        kernels::launch_comm_count_wrong(p, stream.get());
        unsigned long long w = 0;
        MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(&w, wrong.get(), 8, cudaMemcpyDeviceToHost, stream.get()));
        stream.synchronize();
        if (w) std::printf("rank %d: %s with %zu elements per rank: %llu wrong\n", rank, std::string(to_string(op)).c_str(), per_rank, w);
        wrong_total += static_cast<long long>(w);
      }
  } catch (const std::exception& e) {
    std::printf("rank %d: error: %s\n", rank, e.what());
    failures = 1;
  }
  long long sum[2] = {wrong_total, failures}, all[2] = {0, 0};
  MPI_Allreduce(sum, all, 2, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) std::printf("%lld wrong elements, %lld failed ranks over %d ranks: %s\n", all[0], all[1], size, (all[0] || all[1]) ? "FAILED" : "PASSED");
  MPI_Finalize();
  return (all[0] || all[1]) ? 1 : 0;
}
