// RMSNorm, optionally with the residual add fused in front (the pre-attention / pre-MoE norm of
// every supported model), also usable as the per-head QK-norm (rows = tokens * heads,
// width = head_dim).
//   without residual: out[r, :] = x[r, :] / rms(x[r, :]) * weight
//   with residual:    residual_out[r, :] = bf16(x[r, :] + residual[r, :]);
//                     out[r, :] = residual_out[r, :] / rms(residual_out[r, :]) * weight
//   rms(v) = sqrt(mean(v^2) + eps)
// The norm reads the bf16-rounded sum, the value the next layer's residual branch also reads (as
// the HF models do, where the residual stream is bf16).
// Algorithm: a group of 32 threads (width <= 512) or 256 threads per row; pass 1 accumulates the
// sum of squares in fp32 (and writes residual_out), a warp/block reduction gives 1/rms, pass 2
// re-reads the row (L1/L2-resident) and writes out. 16-byte vectors (8 bf16) when width % 8 == 0
// and every pointer is 16-byte aligned, scalar otherwise: every width >= 1 is supported.
// Sync contract: stream order only. Aliasing: out may alias x; residual_out may alias x or
// residual (in-place updates); no other overlaps.
// Requirements: SM >= 8.0.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

inline constexpr int kRmsNormMaxWidth = 16384;  // elements per row

struct RmsNormParams {
  const __nv_bfloat16* x = nullptr;         // [num_rows, width]
  const __nv_bfloat16* residual = nullptr;  // [num_rows, width], or null: no residual add
  __nv_bfloat16* residual_out = nullptr;    // [num_rows, width]; required when residual is set
  const __nv_bfloat16* weight = nullptr;    // [width]
  __nv_bfloat16* out = nullptr;             // [num_rows, width]
  int64_t num_rows = 0;                     // tokens (or tokens * heads for QK-norm)
  int width = 0;                            // elements per row, 1..kRmsNormMaxWidth
  float eps = 1e-6f;                        // > 0
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;
};

// True when launch_rmsnorm runs these parameters on `device` (compute capability >= 8.0,
// num_rows >= 0, 1 <= width <= kRmsNormMaxWidth, eps > 0, the pointers it needs set).
bool is_supported(const RmsNormParams& p, int device);
// Throws mixserve::InputError naming the parameter and its legal values; launch errors are checked.
void launch_rmsnorm(const RmsNormParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
