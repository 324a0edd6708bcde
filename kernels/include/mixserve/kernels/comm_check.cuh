// Exact-valued data for collectives (STYLE.md §12, nccl-tests style): every rank fills its send
// buffer with small integers tagged by rank and index, so every correct result is exact in fp32
// (sums of at most 64 ranks stay below 2^24), and a device kernel counts the wrong elements of
// the result. Input of rank r at index g: (r + 1) * 1000 + g % 977.
// Expected output of rank r at index j, with c the per-rank chunk (elements):
//   all_reduce      sum_s input(s, j)
//   all_gather      input(j / c, j % c)
//   reduce_scatter  sum_s input(s, r * c + j)
//   all_to_all      input(j / c, r * c + j % c)
//   send_recv       input((r - 1 + n) % n, j)      (ring: each rank sends to r + 1)
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "mixserve/core/profile.hpp"

namespace mixserve::kernels {

struct CommCheckParams {
  CollOp op = CollOp::all_reduce;
  int rank = 0, nranks = 1;
  float* data = nullptr;       // fill: the send buffer; count: the receive buffer
  int64_t num_elements = 0;    // of `data`
  int64_t chunk_elements = 0;  // c above (per-rank chunk); unused by all_reduce and send_recv
  unsigned long long* wrong = nullptr;  // count: device counter the kernel adds to (zero it first)
};

float comm_input_value(int rank, int64_t index);
float comm_expected_value(const CommCheckParams& p, int64_t index);  // host mirror of the rule

bool is_supported(const CommCheckParams& p);
void launch_comm_fill(const CommCheckParams& p, cudaStream_t stream);
void launch_comm_count_wrong(const CommCheckParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
