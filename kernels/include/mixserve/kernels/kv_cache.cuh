// Paged KV cache: the layout shared by the cache writer (this file) and the attention kernels
// (attention.cuh), and the kernel that writes one step's new K/V rows into their slots.
//
// Layout (bf16, one pool per K and per V, per layer):
//   k_cache, v_cache  [num_blocks, block_tokens, kv_heads, head_dim]
//   block_table       [num_seqs, max_blocks_per_seq] int32: physical block of each logical block
// Token `pos` of sequence `s` lives in block block_table[s * max_blocks_per_seq + pos / block_tokens],
// slot pos % block_tokens. Blocks of one sequence need not be contiguous or ordered.
//
// Writer algorithm: one thread per 16-byte vector (8 bf16) of a (token, kv head) row; each token
// carries its (sequence, position); tokens with a negative position are padding and are skipped.
// Sync contract: stream order only; the step's tokens must map to distinct slots (no two writers
// of one slot). Requirements: SM >= 8.0, head_dim a multiple of 8, 16-byte aligned buffers.
#pragma once
#include <array>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

// The block sizes (tokens per KV block) the cache writer and the attention kernels accept.
inline constexpr std::array<int, 3> kKvBlockTokens = {8, 16, 32};

// Where the paged cache lives and how it is shaped (shared by writer and attention).
struct PagedKvCache {
  __nv_bfloat16* k = nullptr;           // [num_blocks, block_tokens, kv_heads, head_dim]
  __nv_bfloat16* v = nullptr;           // [num_blocks, block_tokens, kv_heads, head_dim]
  const int32_t* block_table = nullptr; // [num_seqs, max_blocks_per_seq]
  int64_t num_blocks = 0;
  int block_tokens = 16;                // one of kKvBlockTokens
  int kv_heads = 0;
  int head_dim = 0;
  int max_blocks_per_seq = 0;
};

// Row offset (in elements) of (physical block, slot, kv head) in k or v.
inline int64_t kv_row_offset(const PagedKvCache& c, int64_t block, int slot, int kv_head) {
  return ((block * c.block_tokens + slot) * c.kv_heads + kv_head) * int64_t(c.head_dim);
}

struct KvWriteParams {
  PagedKvCache cache;
  const __nv_bfloat16* k_new = nullptr;  // [num_tokens, kv_heads, head_dim] (after RoPE)
  const __nv_bfloat16* v_new = nullptr;  // [num_tokens, kv_heads, head_dim]
  const int32_t* token_seq = nullptr;    // [num_tokens] sequence index (row of block_table)
  const int32_t* token_pos = nullptr;    // [num_tokens] position in the sequence; < 0: padding
  int64_t num_tokens = 0;
};

// True when launch_kv_write can run these parameters on `device`.
bool is_supported(const KvWriteParams& p, int device);
// Throws mixserve::InputError for unsupported parameters (the message lists the legal values).
// Device-side indices are trusted: positions must lie inside the sequence's block table row.
void launch_kv_write(const KvWriteParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
