// Padded expert layout for one strided-batched GEMM per projection (executor: ExpertGemm::
// run_padded_batch, GpuModelConfig::expert_gemm_streams = kExpertGemmPaddedBatch). After an
// index-only permute (permute.cuh with x = null), every expert e gets the rows
// [e * rows_per_expert, e * rows_per_expert + counts[e]) of a padded buffer of
// num_experts * rows_per_expert rows, instead of [offsets[e], offsets[e + 1]).
//
// launch_pad_expert_rows (one launch, grid-stride over max(pairs, padded rows)):
//   slot_row[t, j]   rewritten in place: p -> e * rows_per_expert + (p - offsets[e]), e = topk_ids[t, j],
//                    for p >= 0 (a pair routed elsewhere keeps -1). The combine (combine.cuh)
//                    then reads the padded GEMM output through it unchanged.
//   padded_token[r]  r = e * rows_per_expert + i: permuted_token[offsets[e] + i] for i < counts[e],
//                    else -1 (a pad row).
// launch_gather_rows: dst[r, :] = x[row_token[r], :] for row_token[r] >= 0, zeros for -1 (pad
//   rows are zero, so their GEMM outputs are zero and finite; no real row reads them).
//   16-byte vectors when hidden % 8 == 0 and both pointers are 16-byte aligned, else elements.
// Sync contract: stream order only; slot_row is read and written by the same thread; padded_token
// must not overlap permuted_token; dst must not overlap x.
// Requirements: SM >= 8.0; rows_per_expert >= every counts[e] (the caller takes the max count
// from the host copy of the counts; not checked on the device).
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

struct PadExpertRowsParams {
  const int32_t* topk_ids = nullptr;        // [num_tokens, top_k], the permute's ids
  const int32_t* expert_counts = nullptr;   // [num_experts]
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1]
  const int32_t* permuted_token = nullptr;  // [>= expert_offsets[E]]
  int32_t* slot_row = nullptr;              // [num_tokens, top_k], rewritten in place
  int32_t* padded_token = nullptr;          // [num_experts * rows_per_expert]
  int64_t num_tokens = 0;
  int top_k = 0;                            // >= 1
  int num_experts = 0;                      // >= 1
  int64_t rows_per_expert = 0;              // >= the largest count
};

struct GatherRowsParams {
  const __nv_bfloat16* x = nullptr;   // [source rows, hidden]
  const int32_t* row_token = nullptr; // [num_rows]: source row, or -1 for a zero row
  __nv_bfloat16* dst = nullptr;       // [num_rows, hidden]
  int64_t num_rows = 0;
  int64_t hidden = 0;                 // elements, >= 1
};

std::string pad_expert_rows_unsupported_reason(const PadExpertRowsParams& p);
bool is_supported(const PadExpertRowsParams& p, int device);
void launch_pad_expert_rows(const PadExpertRowsParams& p, cudaStream_t stream);

std::string gather_rows_unsupported_reason(const GatherRowsParams& p);
bool is_supported(const GatherRowsParams& p, int device);
void launch_gather_rows(const GatherRowsParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
