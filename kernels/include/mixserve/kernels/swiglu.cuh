// SwiGLU activation of the experts (and dense MLPs): out[r, i] = silu(gate[r, i]) * up[r, i] with
// silu(g) = g / (1 + exp(-g)), read from the fused [rows, 2*I] buffer that a concatenated gate|up
// weight produces: the GATE is the FIRST half (columns [0, I)), UP the second ([I, 2I)) — the
// order of vLLM's fused w13 / silu_and_mul. Computed in fp32, rounded once to bf16.
// Algorithm: grid-stride loop over (row, 8-element vector) when I % 8 == 0 and the pointers are
// 16-byte aligned, over single elements otherwise. When num_rows_device is set, rows at and past
// *num_rows_device are skipped (left untouched): a launch sized for the worst case (tokens * top_k
// rows) does only the rows the permute routed, with no host sync (pass &expert_offsets[E]).
// Sync contract: stream order only; out must not overlap gate_up.
// Requirements: SM >= 8.0.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

struct SwigluParams {
  const __nv_bfloat16* gate_up = nullptr;   // [num_rows, 2 * inter]: gate | up
  __nv_bfloat16* out = nullptr;             // [num_rows, inter]
  int64_t num_rows = 0;                     // rows the launch covers (upper bound)
  int64_t inter = 0;                        // I, elements per half-row, >= 1
  const int32_t* num_rows_device = nullptr; // [1] or null: rows actually present (<= num_rows)
};

bool is_supported(const SwigluParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_swiglu(const SwigluParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
