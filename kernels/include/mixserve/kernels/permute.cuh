// Token permute into expert-contiguous order, computed entirely on the device (no host sync: the
// counts and offsets stay in device memory for the expert GEMM, the SwiGLU and the combine).
// From topk_ids [num_tokens, top_k]:
//   expert_counts[e]   number of (token, slot) pairs routed to expert e
//   expert_offsets[e]  exclusive prefix sum of the counts; expert_offsets[E] = routed pairs
//   slot_row[t, j]     the permuted row of pair (t, j); -1 when topk_ids[t, j] is outside [0, E)
//                      (expert parallel: an expert not on this rank is simply dropped)
//   permuted_token[r]  the source token of permuted row r; -1 for rows >= expert_offsets[E]
//   permuted_x[r, :]   = x[permuted_token[r], :] (skipped when x is null)
// Order: within an expert, rows follow the flat pair index t * top_k + j (stable by token), so the
// layout, and everything computed from it, is deterministic.
// Algorithm (4 launches; one launch up to kPermuteSingleLaunchMaxPairs pairs, see below): (1) per chunk of kPermuteChunk pairs a shared-memory histogram (integer
// atomics: exact) into the workspace [chunks, E]; (2) one block turns it into per-chunk
// offsets within each expert plus the counts and the expert offsets (a shared-memory scan); (3)
// per chunk, 256 pairs at a time, each pair's rank among equal experts from __match_any_sync
// plus per-warp counts, giving slot_row and permuted_token; (4) a gather of the token rows.
// Sync contract: stream order only; the workspace must not be shared by concurrent launches.
// Requirements: SM >= 8.0 (__match_any_sync needs 7.0).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

inline constexpr int kPermuteMaxExperts = 1024;
inline constexpr int kPermuteChunk = 2048;  // pairs per block in launches 1 and 3
// Up to this many pairs (decode-sized steps) one launch does it all: every block recomputes the
// maps from topk_ids in shared memory (histogram, scan, rank = equal experts before the pair in
// flat order), block 0 writes them, and the blocks share the gather of the rows.
inline constexpr int kPermuteSingleLaunchMaxPairs = 128;  // rank: a loop over the earlier pairs

struct PermuteParams {
  const int32_t* topk_ids = nullptr;   // [num_tokens, top_k]
  const __nv_bfloat16* x = nullptr;    // [num_tokens, hidden] or null: index maps only
  __nv_bfloat16* permuted_x = nullptr; // [num_tokens * top_k, hidden]; rows >= offsets[E] untouched
  int32_t* expert_counts = nullptr;    // [num_experts]
  int32_t* expert_offsets = nullptr;   // [num_experts + 1]
  int32_t* slot_row = nullptr;         // [num_tokens, top_k]
  int32_t* permuted_token = nullptr;   // [num_tokens * top_k]
  void* workspace = nullptr;           // permute_workspace_bytes(...) bytes
  std::size_t workspace_bytes = 0;
  int64_t num_tokens = 0;
  int top_k = 0;                       // >= 1
  int num_experts = 0;                 // 1..kPermuteMaxExperts
  int64_t hidden = 0;                  // elements, >= 1 when x is set
  bool allow_single_launch = true;     // false: always the 4-launch path (tests, benchmarks)
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;  // the single launch only (the 4-launch path launches normally)
};

// Workspace the launch needs: [ceil(num_tokens * top_k / kPermuteChunk), num_experts] int32.
std::size_t permute_workspace_bytes(int64_t num_tokens, int top_k, int num_experts);

// "" when the parameters are legal (the device is not checked), else why not, naming the legal values.
std::string permute_unsupported_reason(const PermuteParams& p);
bool is_supported(const PermuteParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_permute(const PermuteParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
