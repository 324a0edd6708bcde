// Transports of the GPU MoE communication (transport.hpp).
#include "mixserve/gpu/transport.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

namespace {
void check_streams(std::span<const cudaStream_t> streams, int num_ranks, const char* what) {
  if (static_cast<int>(streams.size()) != num_ranks)
    throw InputError(std::string(what) + ": " + std::to_string(streams.size()) +
                     " streams given, one per rank (" + std::to_string(num_ranks) + ") expected");
}
void check_rank(int r, int num_ranks, const char* what) {
  if (r < 0 || r >= num_ranks)
    throw InputError(std::string(what) + ": rank " + std::to_string(r) + " not in [0, " +
                     std::to_string(num_ranks) + ")");
}
void check_group(std::span<const int> group, std::span<const CollRank> ranks, int num_ranks,
                 const char* what) {
  if (group.empty() || group.size() != ranks.size())
    throw InputError(std::string(what) + ": group of " + std::to_string(group.size()) +
                     " ranks with " + std::to_string(ranks.size()) + " buffer sets (need equal, >= 1)");
  for (int r : group) check_rank(r, num_ranks, what);
}
}  // namespace

// ----------------------------------------------------------------------------- stage view

StageTransport::StageTransport(Transport& base, int first, int num_ranks)
    : base_(base), first_(first), n_(num_ranks), sent_(static_cast<std::size_t>(std::max(num_ranks, 0)), 0.0) {
  if (num_ranks < 1 || first < 0 || first + num_ranks > base.num_ranks())
    throw InputError("stage transport: ranks [" + std::to_string(first) + ", " + std::to_string(first + num_ranks) +
                     ") outside the " + std::to_string(base.num_ranks()) + " ranks of the " + base.name() +
                     " transport");
}

bool StageTransport::is_local(int rank) const {
  return rank >= 0 && rank < n_ && base_.is_local(rank + first_);
}

std::vector<int> StageTransport::global(std::span<const int> group) const {
  std::vector<int> g;
  for (int r : group) {
    check_rank(r, n_, "stage transport");
    g.push_back(r + first_);
  }
  return g;
}

void StageTransport::p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) {
  check_streams(streams, n_, "stage transport p2p");
  std::vector<P2pOp> g(ops.begin(), ops.end());
  for (P2pOp& op : g) {
    check_rank(op.src, n_, "stage transport p2p");
    check_rank(op.dst, n_, "stage transport p2p");
    if (op.src != op.dst) sent_[static_cast<std::size_t>(op.src)] += static_cast<double>(op.bytes);
    op.src += first_;
    op.dst += first_;
  }
  std::vector<cudaStream_t> st(static_cast<std::size_t>(base_.num_ranks()), nullptr);
  for (int r = 0; r < n_; ++r) st[static_cast<std::size_t>(r + first_)] = streams[static_cast<std::size_t>(r)];
  base_.p2p_round(g, st);
}

void StageTransport::all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                                std::size_t bytes_per_rank) {
  const auto g = global(group);
  for (int r : group) sent_[static_cast<std::size_t>(r)] += double(group.size() - 1) * double(bytes_per_rank);
  base_.all_gather(g, ranks, bytes_per_rank);
}

void StageTransport::reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                                    std::size_t count, kernels::MoeDType dtype) {
  const auto g = global(group);
  for (int r : group)
    sent_[static_cast<std::size_t>(r)] +=
        double(group.size() - 1) * double(count) * double(kernels::moe_dtype_bytes(dtype));
  base_.reduce_scatter(g, ranks, count, dtype);
}

// ----------------------------------------------------------------------------- local

LocalTransport::LocalTransport(int num_ranks, int device) : num_ranks_(num_ranks) {
  if (num_ranks < 1) throw InputError("local transport: num_ranks " + std::to_string(num_ranks) + " (need >= 1)");
  if (device < 0) MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  device_ = device;
}

LocalTransport::~LocalTransport() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

cudaEvent_t LocalTransport::event(int i) {
  while (static_cast<int>(events_.size()) <= i) {
    cudaEvent_t e = nullptr;
    MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    events_.push_back(e);
  }
  return events_[i];
}

void LocalTransport::p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) {
  check_streams(streams, num_ranks_, "local transport p2p");
  MIXSERVE_CUDA_CHECK(cudaSetDevice(device_));
  for (const P2pOp& op : ops) {
    check_rank(op.src, num_ranks_, "local transport p2p");
    check_rank(op.dst, num_ranks_, "local transport p2p");
    if (op.bytes == 0) continue;
    if (!op.send || !op.recv)
      throw InputError("local transport p2p: " + std::to_string(op.bytes) + " bytes " +
                       std::to_string(op.src) + " -> " + std::to_string(op.dst) + " with a null buffer");
    cudaStream_t s = streams[op.src], d = streams[op.dst];
    if (s != d) {  // the receiver's buffer is free once its stream got here
      MIXSERVE_CUDA_CHECK(cudaEventRecord(event(0), d));
      MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(s, event(0), 0));
    }
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(op.recv, op.send, op.bytes, cudaMemcpyDeviceToDevice, s));
    if (s != d) {  // the receiver sees the data after the copy
      MIXSERVE_CUDA_CHECK(cudaEventRecord(event(0), s));
      MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(d, event(0), 0));
    }
  }
}

void LocalTransport::barrier(std::span<const CollRank> ranks) {
  for (size_t u = 0; u < ranks.size(); ++u)
    MIXSERVE_CUDA_CHECK(cudaEventRecord(event(static_cast<int>(u)), ranks[u].stream));
  for (size_t u = 0; u < ranks.size(); ++u)
    for (size_t v = 0; v < ranks.size(); ++v)
      if (u != v && ranks[u].stream != ranks[v].stream)
        MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(ranks[u].stream, event(static_cast<int>(v)), 0));
}

void LocalTransport::all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                                std::size_t bytes_per_rank) {
  check_group(group, ranks, num_ranks_, "local transport all-gather");
  if (bytes_per_rank == 0) return;
  MIXSERVE_CUDA_CHECK(cudaSetDevice(device_));
  barrier(ranks);
  // Member u pulls every contribution into its own recv on its own stream.
  for (size_t u = 0; u < ranks.size(); ++u)
    for (size_t v = 0; v < ranks.size(); ++v) {
      char* dst = static_cast<char*>(ranks[u].recv) + v * bytes_per_rank;
      if (dst == ranks[v].send) continue;  // in place
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(dst, ranks[v].send, bytes_per_rank,
                                          cudaMemcpyDeviceToDevice, ranks[u].stream));
    }
  barrier(ranks);  // no member overwrites its send before every peer has read it
}

void LocalTransport::reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                                    std::size_t count, kernels::MoeDType dtype) {
  check_group(group, ranks, num_ranks_, "local transport reduce-scatter");
  if (count == 0) return;
  if (ranks.size() > static_cast<size_t>(kernels::kMaxSumInputs))
    throw InputError("local transport reduce-scatter: group of " + std::to_string(ranks.size()) +
                     " ranks (at most " + std::to_string(kernels::kMaxSumInputs) + ")");
  MIXSERVE_CUDA_CHECK(cudaSetDevice(device_));
  barrier(ranks);
  const size_t chunk_bytes = count * kernels::moe_dtype_bytes(dtype);
  for (size_t u = 0; u < ranks.size(); ++u) {
    kernels::SumBuffersParams p;
    p.num_inputs = static_cast<int>(ranks.size());
    for (size_t v = 0; v < ranks.size(); ++v)
      p.in[v] = static_cast<const char*>(ranks[v].send) + u * chunk_bytes;
    p.out = ranks[u].recv;
    p.num_elements = static_cast<int64_t>(count);
    p.dtype = dtype;
    kernels::launch_sum_buffers(p, ranks[u].stream);
  }
  barrier(ranks);
}

// ----------------------------------------------------------------------------- NCCL

#if MIXSERVE_HAVE_NCCL
namespace {
ncclDataType_t nccl_type(kernels::MoeDType t) {
  switch (t) {
    case kernels::MoeDType::f64: return ncclFloat64;
    case kernels::MoeDType::f32: return ncclFloat32;
    case kernels::MoeDType::bf16: return ncclBfloat16;
  }
  throw InputError("nccl transport: unknown dtype");
}
}  // namespace

NcclTransport::NcclTransport(const std::vector<const Comm*>& world, int group_size)
    : group_size_(group_size), world_(world) {
  if (world.empty()) throw InputError("nccl transport: no world communicator given");
  num_ranks_ = world.front()->size();
  if (group_size < 1 || num_ranks_ % group_size != 0)
    throw InputError("nccl transport: group_size " + std::to_string(group_size) +
                     " must divide the world size " + std::to_string(num_ranks_));
  std::vector<int> group_color(num_ranks_), rail_color(num_ranks_);
  for (int r = 0; r < num_ranks_; ++r) {
    group_color[r] = r / group_size;
    rail_color[r] = r % group_size;
  }
  group_ = split(world, group_color);
  rail_ = split(world, rail_color);
}

int NcclTransport::local_index(int rank) const {
  for (size_t i = 0; i < world_.size(); ++i)
    if (world_[i]->rank() == rank) return static_cast<int>(i);
  return -1;
}
bool NcclTransport::is_local(int rank) const { return local_index(rank) >= 0; }
int NcclTransport::device_of(int rank) const {
  const int i = local_index(rank);
  if (i < 0) throw InputError("nccl transport: rank " + std::to_string(rank) + " is not held by this process");
  return world_[i]->device();
}

void NcclTransport::p2p_round(std::span<const P2pOp> ops, std::span<const cudaStream_t> streams) {
  check_streams(streams, num_ranks_, "nccl transport p2p");
  MIXSERVE_NCCL_CHECK(ncclGroupStart());
  for (const P2pOp& op : ops) {
    check_rank(op.src, num_ranks_, "nccl transport p2p");
    check_rank(op.dst, num_ranks_, "nccl transport p2p");
    if (op.bytes == 0) continue;
    const bool rail = op.src % group_size_ == op.dst % group_size_;
    const int si = local_index(op.src), di = local_index(op.dst);
    if (op.src == op.dst) {
      if (si >= 0) {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(world_[si]->device()));
        MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(op.recv, op.send, op.bytes, cudaMemcpyDeviceToDevice, streams[op.src]));
      }
      continue;
    }
    if (si >= 0)
      MIXSERVE_NCCL_CHECK(ncclSend(op.send, op.bytes, ncclChar, rail ? op.dst / group_size_ : op.dst,
                                   rail ? rail_[si].get() : world_[si]->get(), streams[op.src]));
    if (di >= 0)
      MIXSERVE_NCCL_CHECK(ncclRecv(op.recv, op.bytes, ncclChar, rail ? op.src / group_size_ : op.src,
                                   rail ? rail_[di].get() : world_[di]->get(), streams[op.dst]));
  }
  MIXSERVE_NCCL_CHECK(ncclGroupEnd());
}

void NcclTransport::all_gather(std::span<const int> group, std::span<const CollRank> ranks,
                               std::size_t bytes_per_rank) {
  check_group(group, ranks, num_ranks_, "nccl transport all-gather");
  if (static_cast<int>(group.size()) != group_size_)
    throw InputError("nccl transport all-gather: group of " + std::to_string(group.size()) +
                     " ranks, the communicators have " + std::to_string(group_size_));
  if (bytes_per_rank == 0) return;
  MIXSERVE_NCCL_CHECK(ncclGroupStart());
  for (size_t u = 0; u < group.size(); ++u) {
    const int i = local_index(group[u]);
    if (i < 0) continue;
    MIXSERVE_NCCL_CHECK(ncclAllGather(ranks[u].send, ranks[u].recv, bytes_per_rank, ncclChar,
                                      group_[i].get(), ranks[u].stream));
  }
  MIXSERVE_NCCL_CHECK(ncclGroupEnd());
}

void NcclTransport::reduce_scatter(std::span<const int> group, std::span<const CollRank> ranks,
                                   std::size_t count, kernels::MoeDType dtype) {
  check_group(group, ranks, num_ranks_, "nccl transport reduce-scatter");
  if (static_cast<int>(group.size()) != group_size_)
    throw InputError("nccl transport reduce-scatter: group of " + std::to_string(group.size()) +
                     " ranks, the communicators have " + std::to_string(group_size_));
  if (count == 0) return;
  MIXSERVE_NCCL_CHECK(ncclGroupStart());
  for (size_t u = 0; u < group.size(); ++u) {
    const int i = local_index(group[u]);
    if (i < 0) continue;
    MIXSERVE_NCCL_CHECK(ncclReduceScatter(ranks[u].send, ranks[u].recv, count, nccl_type(dtype),
                                          ncclSum, group_[i].get(), ranks[u].stream));
  }
  MIXSERVE_NCCL_CHECK(ncclGroupEnd());
}
#endif

}  // namespace mixserve::gpu
