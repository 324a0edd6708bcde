// Padded expert layouts for the batched expert GEMMs (executor: GpuModelConfig::expert_gemm_streams).
// After an index-only permute (permute.cuh with x = null), every expert e gets the rows
// [start(e), start(e) + counts[e]) of a padded buffer instead of [offsets[e], offsets[e + 1]):
//   uniform    (padded_offsets null; kExpertGemmPaddedBatch, ExpertGemm::run_padded_batch):
//              start(e) = e * rows_per_expert, num_experts * rows_per_expert rows;
//   per expert (padded_offsets set; kExpertGemmBucketed[Batched], ExpertGemm::run_bucketed_call):
//              start(e) = padded_offsets[e] (the host's prefix sum of each count rounded up to the
//              bucket alignment), padded_offsets[E] = num_padded_rows rows.
//
// launch_pad_expert_rows (one launch, grid-stride over max(pairs, padded rows)):
//   slot_row[t, j]   rewritten in place: p -> start(e) + (p - offsets[e]), e = topk_ids[t, j],
//                    for p >= 0 (a pair routed elsewhere keeps -1). The combine (combine.cuh)
//                    then reads the padded GEMM output through it unchanged.
//   padded_token[r]  r = start(e) + i: permuted_token[offsets[e] + i] for i < counts[e], else -1
//                    (a pad row). Per-expert mode finds e by a binary search of padded_offsets.
// launch_gather_rows: dst[r, :] = x[row_token[r], :] for row_token[r] >= 0, zeros for -1 (pad
//   rows are zero, so their GEMM outputs are zero and finite; no real row reads them).
//   16-byte vectors when hidden % 8 == 0 and both pointers are 16-byte aligned, else elements.
// Sync contract: stream order only; slot_row is read and written by the same thread; padded_token
// must not overlap permuted_token; dst must not overlap x; padded_offsets must be on the device
// before the launch (a copy earlier on the same stream).
// Requirements: SM >= 8.0; uniform: rows_per_expert >= every counts[e]; per expert:
// padded_offsets[e + 1] - padded_offsets[e] >= counts[e], non-decreasing, padded_offsets[0] = 0,
// padded_offsets[E] = num_padded_rows (the caller builds them from the host copy of the counts;
// not checked on the device).
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
  int32_t* padded_token = nullptr;          // [padded_rows(p)]
  int64_t num_tokens = 0;
  int top_k = 0;                            // >= 1
  int num_experts = 0;                      // >= 1
  // Uniform layout (padded_offsets null): rows per expert, >= the largest count.
  int64_t rows_per_expert = 0;
  // Per-expert layout: [num_experts + 1] device row offsets (rows_per_expert must be 0), and
  // num_padded_rows = padded_offsets[num_experts] (host value: the padded_token rows written).
  const int32_t* padded_offsets = nullptr;
  int64_t num_padded_rows = 0;
};
// Rows padded_token gets: num_experts * rows_per_expert, or num_padded_rows (per-expert layout).
inline int64_t padded_rows(const PadExpertRowsParams& p) {
  return p.padded_offsets ? p.num_padded_rows : int64_t(p.num_experts) * p.rows_per_expert;
}

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
