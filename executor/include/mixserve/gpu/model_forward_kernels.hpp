// Small kernels of the model forward that the kernel library does not have (model_forward.cpp).
//   gather_rows      out[r, :] = src[index[r], :]           (embedding lookup, last-token rows)
//   add_bias         x[r, :] += bias[:]                     (Qwen2 q/k/v bias), fp32 add, bf16 round
//   offset_ids       ids[i] += offset                       (expert parallel: global expert ids to
//                    the shard's; ids outside [0, local experts) are then dropped by the permute)
//   linear_fp32      out[r, j] = sum_c x[r, c] * w[j, c]    fp32 output (router logits, shared-
//                    expert gate logit): one block per row, x in shared memory, a warp per output
//                    column with 16-byte loads when width % 8 == 0; for small n (<= 256).
// Sync contract: stream order only. Requirements: SM >= 8.0; indices in range (not checked).
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

inline constexpr int kLinearFp32MaxWidth = 16384;  // elements of x per row (shared memory)

void launch_gather_rows(const __nv_bfloat16* src, const int32_t* index, __nv_bfloat16* out,
                        int64_t num_rows, int64_t width, cudaStream_t stream);
void launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t num_rows, int64_t width,
                     cudaStream_t stream);
void launch_offset_ids(int32_t* ids, int64_t n, int32_t offset, cudaStream_t stream);
// x [num_rows, width] bf16, w [n, width] bf16, out [num_rows, n] fp32. width <= kLinearFp32MaxWidth.
// One launch for the per-head QK-norm, RoPE and KV write of a step (decode_kernels):
//   q[t, h, :] = rope(bf16(rmsnorm(q[t, h, :]) * q_norm))       (no norm when q_norm is null)
//   k[t, h, :] = rope(bf16(rmsnorm(k[t, h, :]) * k_norm)), then k and v rows into the paged cache
// at (token_seq[t], positions[t]) (tokens with a negative position are not written).
// The same formulas as rmsnorm.cuh (per-head width), rope.cuh (rotate-half over the whole head,
// cos/sin from float64, bf16 rounding after the norm and after the rotation) and kv_cache.cuh.
// One block per token, a warp per head; head_dim 64 or 128.
struct QkNormRopeKvParams {
  __nv_bfloat16* q = nullptr;              // [num_tokens, q_heads, head_dim], rewritten
  __nv_bfloat16* k = nullptr;              // [num_tokens, kv_heads, head_dim], rewritten
  const __nv_bfloat16* v = nullptr;        // [num_tokens, kv_heads, head_dim]
  const __nv_bfloat16* q_norm = nullptr;   // [head_dim] or null (then k_norm is null too)
  const __nv_bfloat16* k_norm = nullptr;   // [head_dim] or null
  const int32_t* positions = nullptr;      // [num_tokens]
  const int32_t* token_seq = nullptr;      // [num_tokens]
  __nv_bfloat16* k_cache = nullptr;        // [num_blocks, block_tokens, kv_heads, head_dim]
  __nv_bfloat16* v_cache = nullptr;
  const int32_t* block_table = nullptr;    // [num_seqs, max_blocks_per_seq]
  int block_tokens = 16, max_blocks_per_seq = 0;
  int64_t num_tokens = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  float theta = 10000.0f, eps = 1e-6f;
  // [num_tokens, head_dim] cos | sin of the tokens' angles (launch_rope_table), computed once per
  // step instead of once per layer; null: computed here (the same float64 formula).
  const float* rope_cs = nullptr;
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;
};
// cs[t, i] = cos, cs[t, head_dim / 2 + i] = sin of positions[t] * theta^(-2i / head_dim), from
// float64 (rope.cuh's angles), for i < head_dim / 2.
void launch_rope_table(const int32_t* positions, float* cs, int64_t num_tokens, int head_dim, float theta,
                       cudaStream_t stream);
// "" when supported, else why not.
std::string qk_norm_rope_kv_unsupported_reason(const QkNormRopeKvParams& p);
void launch_qk_norm_rope_kv(const QkNormRopeKvParams& p, cudaStream_t stream);

void launch_linear_fp32(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int64_t num_rows,
                        int n, int width, cudaStream_t stream);

}  // namespace mixserve::gpu
