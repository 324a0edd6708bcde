#include "mixserve/gpu/comm.hpp"

#include <cstdlib>

#include <fmt/format.h>

#include "mixserve/gpu/check.hpp"


namespace mixserve::gpu {

void disable_nvls() { setenv("NCCL_NVLS_ENABLE", "0", 1); }

Comm::Comm(ncclComm_t c, int device) : c_(c), device_(device) {
  MIXSERVE_NCCL_CHECK(ncclCommUserRank(c_, &rank_));
  MIXSERVE_NCCL_CHECK(ncclCommCount(c_, &size_));
}
Comm::~Comm() {
  if (c_) ncclCommDestroy(c_);
}

std::vector<Comm> init_single_process(const std::vector<int>& devices) {
  if (devices.empty()) throw InputError("communicators: no devices given");
  disable_nvls();
  std::vector<ncclComm_t> raw(devices.size());
  MIXSERVE_NCCL_CHECK(ncclCommInitAll(raw.data(), static_cast<int>(devices.size()), devices.data()));
  std::vector<Comm> comms;
  for (std::size_t i = 0; i < devices.size(); ++i) comms.emplace_back(raw[i], devices[i]);
  return comms;
}


std::vector<Comm> split(const std::vector<const Comm*>& world, const std::vector<int>& colors) {
  std::vector<ncclComm_t> raw(world.size(), nullptr);
  MIXSERVE_NCCL_CHECK(ncclGroupStart());
  for (std::size_t i = 0; i < world.size(); ++i) {
    const int r = world[i]->rank();
    if (r >= static_cast<int>(colors.size()))
      throw InputError(fmt::format("communicator split: rank {} not in the color list (size {})", r, colors.size()));
    MIXSERVE_CUDA_CHECK(cudaSetDevice(world[i]->device()));
    MIXSERVE_NCCL_CHECK(ncclCommSplit(world[i]->get(), colors[r], r, &raw[i], nullptr));
  }
  MIXSERVE_NCCL_CHECK(ncclGroupEnd());
  std::vector<Comm> out;
  for (std::size_t i = 0; i < world.size(); ++i) out.emplace_back(raw[i], world[i]->device());
  return out;
}

CollCounts coll_counts(CollOp op, std::size_t bytes, int nranks) {
  const std::size_t elems = bytes / sizeof(float);
  const std::size_t n = static_cast<std::size_t>(nranks);
  CollCounts c;
  switch (op) {
    case CollOp::all_reduce:
    case CollOp::send_recv:
      c.send_elems = c.recv_elems = elems;
      c.chunk_elems = elems;
      break;
    case CollOp::all_gather:
      c.chunk_elems = elems / n;
      c.send_elems = c.chunk_elems;
      c.recv_elems = c.chunk_elems * n;
      break;
    case CollOp::reduce_scatter:
      c.chunk_elems = elems / n;
      c.send_elems = c.chunk_elems * n;
      c.recv_elems = c.chunk_elems;
      break;
    case CollOp::all_to_all:
      c.chunk_elems = elems / n;
      c.send_elems = c.recv_elems = c.chunk_elems * n;
      break;
    default:
      throw InputError(fmt::format("collective {} is a fused schedule, not a plain collective", to_string(op)));
  }
  return c;
}

double bus_factor(CollOp op, int nranks) {
  const double n = nranks;
  switch (op) {
    case CollOp::all_reduce: return n > 1 ? 2.0 * (n - 1) / n : 0.0;
    case CollOp::all_gather:
    case CollOp::reduce_scatter:
    case CollOp::all_to_all: return n > 1 ? (n - 1) / n : 0.0;
    default: return 1.0;
  }
}

void enqueue_collective(CollOp op, const Comm& comm, const void* send, void* recv,
                        const CollCounts& counts, cudaStream_t stream) {
  ncclComm_t c = comm.get();
  const int n = comm.size(), r = comm.rank();
  switch (op) {
    case CollOp::all_reduce:
      MIXSERVE_NCCL_CHECK(ncclAllReduce(send, recv, counts.send_elems, ncclFloat32, ncclSum, c, stream));
      break;
    case CollOp::all_gather:
      MIXSERVE_NCCL_CHECK(ncclAllGather(send, recv, counts.chunk_elems, ncclFloat32, c, stream));
      break;
    case CollOp::reduce_scatter:
      MIXSERVE_NCCL_CHECK(ncclReduceScatter(send, recv, counts.chunk_elems, ncclFloat32, ncclSum, c, stream));
      break;
    case CollOp::all_to_all: {
      const std::size_t chunk_bytes = counts.chunk_elems * sizeof(float);
      MIXSERVE_NCCL_CHECK(ncclGroupStart());
      for (int peer = 0; peer < n; ++peer) {
        MIXSERVE_NCCL_CHECK(ncclSend(static_cast<const char*>(send) + peer * chunk_bytes, counts.chunk_elems,
                                     ncclFloat32, peer, c, stream));
        MIXSERVE_NCCL_CHECK(ncclRecv(static_cast<char*>(recv) + peer * chunk_bytes, counts.chunk_elems,
                                     ncclFloat32, peer, c, stream));
      }
      MIXSERVE_NCCL_CHECK(ncclGroupEnd());
      break;
    }
    case CollOp::send_recv:
      MIXSERVE_NCCL_CHECK(ncclGroupStart());
      MIXSERVE_NCCL_CHECK(ncclSend(send, counts.send_elems, ncclFloat32, (r + 1) % n, c, stream));
      MIXSERVE_NCCL_CHECK(ncclRecv(recv, counts.recv_elems, ncclFloat32, (r - 1 + n) % n, c, stream));
      MIXSERVE_NCCL_CHECK(ncclGroupEnd());
      break;
    default:
      throw InputError(fmt::format("collective {} is a fused schedule, not a plain collective", to_string(op)));
  }
}

}  // namespace mixserve::gpu
