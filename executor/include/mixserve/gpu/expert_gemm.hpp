// Grouped expert GEMM that reads the expert row offsets from device memory (no host sync, so a
// decode step that uses it can be captured in a CUDA graph):
//   for every expert e and row r in [offsets[e], offsets[e + 1]):
//     out[r, j] = sum_c act[r, c] * weights[e, j, c]        (bf16 in, fp32 accumulate, bf16 out)
// weights [num_experts, n, k] (each expert's Linear weight [out, in]); act and out rows are
// expert-contiguous (the permute's layout, permute.cuh). Rows at and past offsets[E] are untouched.
// Algorithm: a CUDA-core grouped GEMV for small row counts (decode). Grid (n / kColsPerBlock,
// num_experts); a block of 8 warps reads its expert's offsets and exits when the expert has no
// rows; otherwise it stages kRowsPerChunk activation rows in shared memory and each warp computes
// kColsPerBlock / 8 output columns for those rows: the lanes stream the weight row in 16-byte
// vectors (each weight element is read once per chunk of rows) and reduce by shuffles. Experts
// with more rows than a chunk loop over chunks (the weights are then re-read, from L2), so this
// path is for a few rows per expert; larger steps use ExpertGemm (gemm.hpp, cuBLASLt).
// Sync contract: stream order only. Requirements: SM >= 8.0; k a multiple of 8 and <= kMaxK;
// n a multiple of kColsPerBlock; 16-byte aligned act and weights.
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

inline constexpr int kGroupedGemvColsPerBlock = 16;
inline constexpr int kGroupedGemvRowsPerChunk = 8;
inline constexpr int64_t kGroupedGemvMaxK = 8192;

struct GroupedGemvParams {
  const __nv_bfloat16* act = nullptr;      // [rows, k], expert-contiguous
  const __nv_bfloat16* weights = nullptr;  // [num_experts, n, k]
  __nv_bfloat16* out = nullptr;            // [rows, n]
  const int32_t* expert_offsets = nullptr; // [num_experts + 1], device
  int num_experts = 0;
  int64_t n = 0, k = 0;
};

// "" when supported, else why not (legal values named).
std::string grouped_gemv_unsupported_reason(const GroupedGemvParams& p);
// Throws mixserve::InputError naming the unsupported parameter; launch errors are checked.
void launch_grouped_gemv(const GroupedGemvParams& p, cudaStream_t stream);

}  // namespace mixserve::gpu
