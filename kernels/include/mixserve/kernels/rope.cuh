// Rotary position embedding, rotate-half form (GPT-NeoX / Llama / Qwen / Mixtral / OLMoE), applied
// in place to q and k. For each token t (position pos[t]), head, and i < rotary_dim / 2:
//   a = pos[t] * theta^(-2i / rotary_dim)
//   x1 = v[i], x2 = v[i + rotary_dim/2]
//   v[i] = x1 cos a - x2 sin a;  v[i + rotary_dim/2] = x2 cos a + x1 sin a
// Elements at and past rotary_dim are left unchanged (partial rotary). Positions come per token
// from an int array, so one launch serves mixed prefill/decode batches.
// Algorithm: one block per token; its threads compute cos/sin of the rotary_dim/2 angles in
// float64 (exact to fp32 even at positions near 2^20, where an fp32 angle would be off by ~0.06
// rad) into shared memory, then rotate every (head, pair) of q and k in fp32, rounding once to bf16.
// Sync contract: stream order only. q and k must not overlap.
// Requirements: SM >= 8.0; positions >= 0 (not checked on the device).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

inline constexpr int kRopeMaxHeadDim = 256;

struct RopeParams {
  __nv_bfloat16* q = nullptr;          // [num_tokens, q_token_stride], head h at q + h*head_dim
  __nv_bfloat16* k = nullptr;          // [num_tokens, k_token_stride], or null (q only)
  const int32_t* positions = nullptr;  // [num_tokens], token positions in its sequence
  int64_t num_tokens = 0;
  int num_q_heads = 0;                 // >= 1
  int num_kv_heads = 0;                // >= 0 (0 when k is null)
  int head_dim = 0;                    // elements, 1..kRopeMaxHeadDim
  int rotary_dim = 0;                  // elements, even, 2..head_dim (head_dim: full rotary)
  float theta = 10000.0f;              // rope base, > 1
  int64_t q_token_stride = 0;          // elements between tokens in q; 0: num_q_heads * head_dim
  int64_t k_token_stride = 0;          // elements between tokens in k; 0: num_kv_heads * head_dim
};

bool is_supported(const RopeParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_rope(const RopeParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
