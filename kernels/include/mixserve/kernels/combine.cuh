// Weighted scatter-add combine (the MoE unpermute): for every token t
//   out[t, :] = sum_{j < top_k, slot_row[t, j] >= 0} w[t, j] * expert_out[slot_row[t, j], :]
//               (+ g[t] * shared_out[t, :] when shared_out is set, g[t] = sigmoid(shared_gate[t])
//                when shared_gate is set (Qwen2-MoE), else 1)
// fp32 accumulation, one bf16 rounding at the end. Deterministic: no atomics; each token's rows
// are summed in slot order j = 0..top_k-1, then the shared expert is added.
// Algorithm: one block per token; its rows and weights are staged in shared memory, the threads
// stride over 16-byte vectors of the hidden dim (8 bf16) when hidden % 8 == 0 and all pointers
// are 16-byte aligned, over single elements otherwise. slot_row < 0 marks a slot routed elsewhere
// (expert parallel: not a local expert) and contributes nothing.
// Sync contract: stream order only; out must not overlap the inputs.
// Requirements: SM >= 8.0; slot_row values < the rows of expert_out (not checked on the device).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

inline constexpr int kCombineMaxTopK = 32;

struct CombineParams {
  const __nv_bfloat16* expert_out = nullptr;  // [rows, hidden], expert-contiguous (permute order)
  const int32_t* slot_row = nullptr;          // [num_tokens, top_k]: row of each (token, slot), <0: none
  const float* topk_weights = nullptr;        // [num_tokens, top_k]
  const __nv_bfloat16* shared_out = nullptr;  // [num_tokens, hidden] or null: no shared expert
  const float* shared_gate = nullptr;         // [num_tokens] gate logits or null (requires shared_out)
  __nv_bfloat16* out = nullptr;               // [num_tokens, hidden]
  int64_t num_tokens = 0;
  int top_k = 0;                              // 1..kCombineMaxTopK
  int64_t hidden = 0;                         // elements, >= 1
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;
};

bool is_supported(const CombineParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_combine(const CombineParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
