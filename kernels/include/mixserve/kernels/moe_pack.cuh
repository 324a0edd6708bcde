// Data-movement kernels of the MoE communication schedules (executor/moe_comm.hpp,
// docs/moe-comm.md): gather/pack of token rows and hidden slices, the sum of T equal-size
// buffers (the local transport's reduce-scatter), the home scatter-add of the fused combine, the
// weighted per-token combine of plain EP, and the toy expert of sim/host_exec.hpp ported to the
// device so that the host executor's single-device reference applies.
//
// Layouts. A buffer of `rows` rows of `cols` columns is either row-major ([rows, cols]) or
// slice-major: `cols / slice_cols` slices of [rows, slice_cols] one after the other, element
// (r, c) at (c / slice_cols) * rows * slice_cols + r * slice_cols + c % slice_cols. Row-major is
// the slice-major layout with slice_cols == cols. The fused schedule keeps its received rows
// slice-major per dispatch block so that the group's all-gather and reduce-scatter act on
// contiguous [T][rows * h/T] buffers (NCCL's layout).
//
// Algorithm: one thread per element (grid-stride), no atomics: every output element is written
// by one thread. Sync contract: stream order only. Requirements: SM >= 8.0, all buffers on the
// launching device (the local transport's ranks share one device).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mixserve::kernels {

// Element type of the moved activations (the toy expert is f64 only: exact arithmetic).
enum class MoeDType { f64, f32, bf16 };
int moe_dtype_bytes(MoeDType t);
const char* to_string(MoeDType t);

// A [rows, cols] view in the slice-major layout above. slice_cols == cols: row-major.
struct RowView {
  void* data = nullptr;
  int64_t rows = 0;      // rows of the whole buffer (the slice stride is rows * slice_cols)
  int cols = 0;          // columns of the whole buffer
  int slice_cols = 0;    // columns per slice; must divide cols
};

// dst(k, c) = src(index ? index[k] : k, src_col0 + c), k < num_rows, c < num_cols.
struct PackRowsParams {
  RowView src, dst;
  const int32_t* index = nullptr;  // [num_rows] source rows (device), null = identity
  int64_t num_rows = 0;
  int num_cols = 0;
  int src_col0 = 0;
  MoeDType dtype = MoeDType::bf16;
};
bool is_supported(const PackRowsParams& p, int device);
void launch_pack_rows(const PackRowsParams& p, cudaStream_t stream);

// out[i] = sum_{j < num_inputs} in[j][i], i < num_elements (inputs may include out: in place).
inline constexpr int kMaxSumInputs = 8;
struct SumBuffersParams {
  const void* in[kMaxSumInputs] = {};
  int num_inputs = 0;
  void* out = nullptr;
  int64_t num_elements = 0;
  MoeDType dtype = MoeDType::bf16;
};
bool is_supported(const SumBuffersParams& p, int device);
void launch_sum_buffers(const SumBuffersParams& p, cudaStream_t stream);

// y[index[k] * cols + c] += in[k * cols + c]: the indices of one call must be distinct.
struct ScatterAddParams {
  const void* in = nullptr;        // [num_rows, cols]
  const int32_t* index = nullptr;  // [num_rows] destination rows (device), distinct
  void* y = nullptr;               // [*, cols]
  int64_t num_rows = 0;
  int cols = 0;
  MoeDType dtype = MoeDType::bf16;
};
bool is_supported(const ScatterAddParams& p, int device);
void launch_scatter_add(const ScatterAddParams& p, cudaStream_t stream);

// Per token t in [token_begin, token_end): y[t] = sum over rows j of its CSR list
// (row_offset[t - token_begin] .. row_offset[t - token_begin + 1]) of weight[j] * in[row[j]].
struct WeightedCombineParams {
  const void* in = nullptr;             // [*, cols] rows coming back from the experts
  const int64_t* row_offset = nullptr;  // [token_end - token_begin + 1] (device)
  const int64_t* row = nullptr;         // [pairs] rows of `in` (device)
  const double* weight = nullptr;       // [pairs] top-k weights (device)
  void* y = nullptr;                    // [*, cols]
  int32_t token_begin = 0, token_end = 0;
  int cols = 0;
  MoeDType dtype = MoeDType::bf16;
};
bool is_supported(const WeightedCombineParams& p, int device);
void launch_weighted_combine(const WeightedCombineParams& p, cudaStream_t stream);

// The toy expert of sim/host_exec.hpp (f64): for row r of x, with its pairs
// pair_offset[r] .. pair_offset[r+1] (global expert id, weight),
//   y(r, :) = sum over pairs of weight * (TP rank tp_rank's partial of f_expert(x(r, :))).
// x and y share the view shape [num_rows, hidden] but are slice-major per block: block b holds
// rows [block_row_offset[b], block_row_offset[b+1]) as its own [slices][rows_b][slice_cols]
// buffer starting at element block_row_offset[b] * hidden. slice_cols == hidden: row-major.
inline constexpr int kToyIntermediate = 8;  // = sim::kToyIntermediate (checked by the tests)
struct ToyExpertParams {
  const double* x = nullptr;
  double* y = nullptr;
  int64_t num_rows = 0;
  int hidden = 0;
  int slice_cols = 0;
  const int64_t* block_row_offset = nullptr;  // [num_blocks + 1] (device)
  int num_blocks = 0;
  const int64_t* pair_offset = nullptr;       // [num_rows + 1] (device)
  const int32_t* pair_expert = nullptr;       // [pairs] global expert id (device)
  const double* pair_weight = nullptr;        // [pairs] (device)
  int tp_rank = 0, tp = 1;
};
bool is_supported(const ToyExpertParams& p, int device);
void launch_toy_expert(const ToyExpertParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
