#include "mixserve/kernels/comm_check.cuh"

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {

namespace {
__host__ __device__ inline float input_value(int rank, int64_t g) {
  return static_cast<float>((rank + 1) * 1000 + static_cast<int>(g % 977));
}
__host__ __device__ inline float sum_over_ranks(int nranks, int64_t g) {
  return static_cast<float>(1000 * nranks * (nranks + 1) / 2 + nranks * static_cast<int>(g % 977));
}
__host__ __device__ inline float expected_value(const CommCheckParams& p, int64_t j) {
  const int64_t c = p.chunk_elements > 0 ? p.chunk_elements : 1;
  switch (p.op) {
    case CollOp::all_reduce: return sum_over_ranks(p.nranks, j);
    case CollOp::all_gather: return input_value(static_cast<int>(j / c), j % c);
    case CollOp::reduce_scatter: return sum_over_ranks(p.nranks, p.rank * c + j);
    case CollOp::all_to_all: return input_value(static_cast<int>(j / c), p.rank * c + j % c);
    default: return input_value((p.rank - 1 + p.nranks) % p.nranks, j);
  }
}
static __global__ void fill_kernel(CommCheckParams p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.num_elements; i += stride)
    p.data[i] = input_value(p.rank, i);
}
static __global__ void count_kernel(CommCheckParams p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  unsigned long long wrong = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.num_elements; i += stride)
    wrong += p.data[i] != expected_value(p, i);
  if (wrong) atomicAdd(p.wrong, wrong);
}
std::string describe(const CommCheckParams& p) {
  return "op " + std::string(to_string(p.op)) + " rank " + std::to_string(p.rank) + "/" + std::to_string(p.nranks) +
         " n=" + std::to_string(p.num_elements) + " chunk=" + std::to_string(p.chunk_elements);
}
unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096))); }
}  // namespace

float comm_input_value(int rank, int64_t index) { return input_value(rank, index); }
float comm_expected_value(const CommCheckParams& p, int64_t index) { return expected_value(p, index); }

bool is_supported(const CommCheckParams& p) {
  const bool chunked = p.op == CollOp::all_gather || p.op == CollOp::reduce_scatter || p.op == CollOp::all_to_all;
  return p.op != CollOp::fused_ag_dispatch && p.op != CollOp::fused_rs_combine && p.nranks >= 1 &&
         p.nranks <= 64 && p.rank >= 0 && p.rank < p.nranks && p.num_elements >= 0 &&
         (p.num_elements == 0 || p.data) && (!chunked || p.chunk_elements > 0);
}

void launch_comm_fill(const CommCheckParams& p, cudaStream_t stream) {
  if (!is_supported(p))
    throw InputError("comm fill: " + describe(p) +
                     " unsupported (ops: all_reduce, all_gather, reduce_scatter, all_to_all, send_recv; 1..64 ranks)");
  if (p.num_elements == 0) return;
  fill_kernel<<<grid_for(p.num_elements), 256, 0, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("comm fill_kernel");
}

void launch_comm_count_wrong(const CommCheckParams& p, cudaStream_t stream) {
  if (!is_supported(p) || !p.wrong)
    throw InputError("comm check: " + describe(p) + " unsupported or no counter");
  if (p.num_elements == 0) return;
  count_kernel<<<grid_for(p.num_elements), 256, 0, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("comm count_kernel");
}

}  // namespace mixserve::kernels
