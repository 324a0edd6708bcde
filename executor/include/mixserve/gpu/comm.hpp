// NCCL communicators: a world communicator per rank and sub-communicators (TP, DP, EP, rails)
// split from it by the colors of a rank map (groups.hpp). Two launch modes:
//   - one process per GPU under MPI (mpirun/srun): init_mpi_world (built when MPI is found);
//   - one process driving every GPU of a node: init_single_process (ncclCommInitAll).
// NVLink multicast (NVLS) is banned on our machines: every init first forces NCCL_NVLS_ENABLE=0.
// Collectives follow nccl-tests' size convention: `bytes` is the size nccl-tests prints (all_gather:
// the gathered output; reduce_scatter and all_to_all: the full input; all_reduce, send_recv: the
// buffer). Data is fp32.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "mixserve/core/profile.hpp"

namespace mixserve::gpu {

// Sets NCCL_NVLS_ENABLE=0 in this process's environment (overriding any other value).
void disable_nvls();

class Comm {
 public:
  Comm(ncclComm_t c, int device);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  Comm(Comm&& o) noexcept : c_(o.c_), device_(o.device_), rank_(o.rank_), size_(o.size_) { o.c_ = nullptr; }
  ncclComm_t get() const { return c_; }
  int device() const { return device_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  ncclComm_t c_ = nullptr;
  int device_ = 0, rank_ = 0, size_ = 1;
};

// One world communicator per device, rank i on devices[i].
std::vector<Comm> init_single_process(const std::vector<int>& devices);

#if MIXSERVE_HAVE_MPI
// Call after MPI_Init: the world communicator of this MPI rank on `device`.
Comm init_mpi_world(int device);
#endif

// Sub-communicators by color (colors[world_rank]), for the world comms this process holds (one
// per local device in single-process mode, one under MPI). Must be called by every rank.
std::vector<Comm> split(const std::vector<const Comm*>& world, const std::vector<int>& colors);

struct CollCounts {
  std::size_t send_elems = 0, recv_elems = 0, chunk_elems = 0;  // chunk: per-rank piece
};
// Element counts for an nccl-tests size (rounded down so chunks are whole elements).
CollCounts coll_counts(CollOp op, std::size_t bytes, int nranks);
// nccl-tests bus-bandwidth factor: busbw = algbw * factor.
double bus_factor(CollOp op, int nranks);

// Enqueues one collective on `stream` (fp32, sum). Call inside ncclGroupStart/End when one
// process drives several ranks. Throws InputError for the fused ops (not a plain collective).
void enqueue_collective(CollOp op, const Comm& comm, const void* send, void* recv,
                        const CollCounts& counts, cudaStream_t stream);

}  // namespace mixserve::gpu
