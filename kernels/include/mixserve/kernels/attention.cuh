// Causal GQA/MHA attention over the paged KV cache for one mixed step (chunked prefill and decode
// sequences together).
//
// Sequence s brings q_len(s) = q_start[s+1] - q_start[s] new tokens whose K/V rows are already in
// the cache (launch_kv_write); seq_lens[s] is its context after the step, so its new tokens sit at
// positions ctx_before = seq_lens[s] - q_len(s) onwards. New token i (position ctx_before + i)
// attends to cache positions 0 .. ctx_before + i. Query head h reads kv head h / (q_heads / kv_heads).
//   out[t, h, :] = softmax(scale * q[t, h, :] . K[0..p]^T) . V[0..p]     (fp32 softmax and sums)
//
// Algorithm (AttentionImpl::tensor_core): flash-attention-2 style. One CTA of 4 warps owns 64
// query rows of one (sequence, kv head); a row is one (token, q head of the group) pair, so the
// group's q heads share every K/V tile (K/V read once per group, decode included). K/V tiles of 64
// positions are gathered from the paged cache into shared memory; S = Q K^T and O += P V run on
// mma.sync m16n8k16 (bf16 in, fp32 accumulate) with an online softmax; the causal mask is applied
// on the tiles that cross the diagonal. Split over the context: the positions are cut into
// num_splits ranges, one CTA each; every CTA writes a partial (max, sum, unnormalised out) in fp32
// to the workspace and a second kernel merges the splits (one warp per (token, q head)). With one
// split the CTA writes the output directly. Decode (q_len 1) is the case where splits pay: the
// launcher picks enough splits to fill the GPU. When a sequence has more than 64 rows (prefill),
// the CTA has 8 warps and 128 rows (each K/V tile serves twice the rows), and the prefill kernel
// is chosen by AttentionParams::prefill_kernel:
//   pipelined: K/V tiles go straight from the paged cache to a two-stage shared-memory
//     ring by cp.async (zero-filled past the range), the next tile's copy in flight while the
//     current one is computed, one __syncthreads per tile; K and V fragments by ldmatrix (V by
//     ldmatrix.trans from its row-major tile, no transpose on the way in); exp2 of scores
//     pre-scaled by scale * log2(e) in one FMA; the causal and range mask only on the tiles that
//     cross a warp's diagonal or the range end; a warp skips the tiles wholly after its rows;
//   pipelined_m32 (default: 1.66x the registers kernel at 8 x 2048 on the H200, pipelined
//     1.44x, session 4): the same with 4 warps of 32 rows (two 16-row m-tiles each, so every K/V
//     fragment read from shared memory serves twice the mma work), Q read into shared memory once
//     and its fragments by ldmatrix each tile (the registers hold the twice larger
//     accumulators), two CTAs per SM;
//   registers: the previous kernel (the next tile's K/V staged in registers, V transposed on
//     the store to shared memory, 32-bit fragment loads, two syncs per tile), kept to time the
//     change in the same run.
// AttentionImpl::simple: one warp per (token, q head), scalar fp32, one pass with an online
// softmax; a slow, independent implementation kept as a cross-check and a fallback.
//
// Fused merge (AttentionParams::merge_tickets set): no second kernel; after writing its partials
// every CTA takes a ticket (atomic counter per (sequence, kv head, query tile), after a
// __threadfence), and the CTA that arrives last merges the tile's rows and resets the counter to
// zero, so the next launch (a CUDA-graph replay included) starts from zero again. The arithmetic is
// the merge kernel's: the two forms give bit-identical outputs.
// Sync contract: stream order only (the workspace and the tickets are reused by the next launch on
// the stream; two launches sharing tickets must not run concurrently).
// Requirements: SM >= 8.0 (mma.sync bf16); head_dim 64 or 128; block_tokens in kKvBlockTokens;
// q_heads a multiple of kv_heads with q_heads / kv_heads <= 64; 16-byte aligned buffers.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "mixserve/kernels/kv_cache.cuh"

namespace mixserve::kernels {

inline constexpr std::array<int, 2> kAttentionHeadDims = {64, 128};

enum class AttentionImpl { tensor_core, simple };
// The tensor_core kernel of steps whose sequences have more than 64 query rows (see above).
enum class AttentionPrefillKernel { pipelined, pipelined_m32, registers };

struct AttentionParams {
  const __nv_bfloat16* q = nullptr;  // [num_tokens, q_heads, head_dim] (after RoPE)
  __nv_bfloat16* out = nullptr;      // [num_tokens, q_heads, head_dim]
  PagedKvCache cache;                // read only here; kv_heads, head_dim, block_tokens from it
  const int32_t* q_start = nullptr;  // [num_seqs + 1] prefix sums of q_len; q_start[0] = 0
  const int32_t* seq_lens = nullptr; // [num_seqs] context after the step (>= q_len)
  int num_seqs = 0;
  int64_t num_tokens = 0;            // q_start[num_seqs] (host copy)
  int q_heads = 0;
  // Host upper bounds used to size the grid (the kernels read the exact values on the device).
  int max_q_len = 0;                 // >= every q_len
  int max_seq_len = 0;               // >= every seq_lens[s]; <= max_blocks_per_seq * block_tokens
  float softmax_scale = 0.0f;        // 0: 1 / sqrt(head_dim)
  AttentionImpl impl = AttentionImpl::tensor_core;
  AttentionPrefillKernel prefill_kernel = AttentionPrefillKernel::pipelined_m32;  // fastest measured (docs/prefill.md)
  int num_splits = 0;                // tensor_core: context splits; 0 = chosen by the launcher
  void* workspace = nullptr;         // attention_workspace_bytes(...) bytes, 16-byte aligned
  std::size_t workspace_bytes = 0;
  // Fused split merge (tensor_core): attention_merge_tickets(...) int32 counters, all zero before
  // the first launch; every launch leaves them zero. Null: the merge is a second kernel.
  int32_t* merge_tickets = nullptr;
  std::size_t merge_tickets_count = 0;
};

// True when launch_attention can run these parameters on `device`.
bool is_supported(const AttentionParams& p, int device);
// The split count launch_attention uses on `device` (p.num_splits when set, else chosen so that
// the grid covers the GPU about twice: decode and short batches get several splits).
int attention_num_splits(const AttentionParams& p, int device);
// Ticket counters the fused merge needs on `device`: num_seqs * kv_heads * query tiles when the
// launch splits the keys, else 0 (no merge).
std::size_t attention_merge_tickets(const AttentionParams& p, int device);
// Workspace the launch needs on `device` (0 with one split or the simple path).
std::size_t attention_workspace_bytes(const AttentionParams& p, int device);
// Throws mixserve::InputError for unsupported parameters (messages list the legal values) and
// when the workspace is smaller than attention_workspace_bytes.
void launch_attention(const AttentionParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
