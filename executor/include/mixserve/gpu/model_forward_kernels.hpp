// Small kernels of the model forward that the kernel library does not have (model_forward.cpp).
//   gather_rows      out[r, :] = src[index[r], :]           (embedding lookup, last-token rows)
//   add_bias         x[r, :] += bias[:]                     (Qwen2 q/k/v bias), fp32 add, bf16 round
//   linear_fp32      out[r, j] = sum_c x[r, c] * w[j, c]    fp32 output (router logits, shared-
//                    expert gate logit): one block per row, x in shared memory, a warp per output
//                    column with 16-byte loads when width % 8 == 0; for small n (<= 256).
// Sync contract: stream order only. Requirements: SM >= 8.0; indices in range (not checked).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

inline constexpr int kLinearFp32MaxWidth = 16384;  // elements of x per row (shared memory)

void launch_gather_rows(const __nv_bfloat16* src, const int32_t* index, __nv_bfloat16* out,
                        int64_t num_rows, int64_t width, cudaStream_t stream);
void launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t num_rows, int64_t width,
                     cudaStream_t stream);
// x [num_rows, width] bf16, w [n, width] bf16, out [num_rows, n] fp32. width <= kLinearFp32MaxWidth.
void launch_linear_fp32(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int64_t num_rows,
                        int n, int width, cudaStream_t stream);

}  // namespace mixserve::gpu
