// Bandwidth-oriented GEMV / skinny GEMM for a few activation rows (decode), on CUDA cores:
//   out[r, j] = sum_c act[r, c] * weights[e, j, c] (+ bias[j])   (bf16 in, fp32 accumulate)
// with the weights [num_experts, n, k] (Linear [out, in] per expert), in two forms:
//   grouped (launch_grouped_gemv_v2) rows are expert-contiguous and the expert row offsets are read
//                                  from device memory (the permute's layout, permute.cuh): no host
//                                  sync, so a decode step that uses it can be captured in a graph.
//                                  Rows at and past offsets[E] are untouched.
//   plain   (launch_gemv)          one weight matrix, num_rows rows; the output columns may be
//                                  split into up to three segments with their own buffers (a fused
//                                  q|k|v weight writes q, k and v), bf16 or fp32 output, optional
//                                  bias.
// Algorithm: a block of 8 warps owns 8 * C consecutive output columns of one expert (grouped: the
// y-th expert that has rows, found by a ballot scan of the offsets, so a step with 8 routed rows
// launches 8 expert slots instead of all E) and a chunk of up to R activation rows, staged in
// shared memory. Each warp owns C columns: every lane loads 16-byte weight vectors of the C
// columns, U vectors apart along k, all issued before use (C * U = 16 independent 16-byte loads in
// flight per lane for 1-2 rows, 8 for 4-8 rows; streaming: evict-first), converts them once and
// multiplies them with the R staged rows; the lanes reduce by shuffles. Each weight element is read
// once per R rows of its expert (R = 1, 2, 4 or 8 from the most rows an expert can have, capped
// so that the R staged rows fit the device's opt-in shared memory per block: gemv_rows_tile
// below; experts with more rows loop over chunks and re-read the weights, from L2). C (4, 2 or 1) is the largest
// whose batch of loads still covers a whole column (short k: down_proj), else 1, narrowed while the
// grid has fewer than two blocks per SM.
// Sync contract: stream order only. Requirements: SM >= 8.0; k a multiple of 8 and <=
// kGroupedGemvMaxK (32768); n >= 1; 16-byte aligned act and weights.
// Shared memory: R x k x 2 bytes of staged rows (by_column, v1), plus the partials
// kWarps x R x 64 x 4 bytes (balanced). On an H200 (227 KiB per block) the largest R is:
//   k        by_column  balanced  v1
//   <= 8192      8          8      8
//   14336        8          4      8     (balanced R = 8 would need 240 KiB)
//   20480        4          4      4
//   32768        2          2      2
//
// launch_grouped_gemv is the previous kernel ("v1": grid over all E experts, 16 columns per block,
// one column per warp at a time, chunks of up to kGroupedGemvRowsPerChunk rows, fewer where they
// do not fit the shared memory; n a multiple of 16, no swiglu_act, launched without PDL; same k
// limit as v2). The executor takes it above GpuModelConfig::grouped_gemv_v2_max_tokens (on the
// H200 it beat v2 at 64 tokens, lost at 1) and with decode_kernels off; mixserve-profile times it.
//
// Two kernels serve launch_gemv and launch_grouped_gemv_v2 (GemvParams::kernel,
// GroupedGemvParams::kernel; same results up to fp32 summation order):
//   GemvKernel::balanced  (default) a grid of exactly the blocks that fit on the GPU at once (SMs x
//                         blocks per SM, from the occupancy calculator; fewer for small problems).
//                         The output columns of all "slots" (grouped: the experts with rows, counted
//                         on the device; plain: the chunks of R rows) are one list, cut into equal
//                         contiguous ranges, one per block (<= 1 column more than the average: no
//                         wave tail). A block cuts its range into 512-byte segments (32 lanes x 16
//                         bytes of one column) and gives each warp an equal contiguous run of them,
//                         so a column may be shared by two warps (split-K inside the block): each
//                         warp issues L segment loads at once (L = 16 for 1-2 rows, 8 for 4-8;
//                         non-coherent, no L1 allocation, L2 evict-first), multiplies them with
//                         the staged rows, reduces a finished column over its lanes and stores the
//                         partial in shared memory; the block then sums the warps' partials in warp
//                         order (deterministic) and writes the outputs. No global workspace.
//   GemvKernel::by_column the kernel before (8 warps x C columns per block, one block per 8 * C
//                         columns and row chunk: one to three waves on the H200, with a tail).
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

inline constexpr int kGroupedGemvColsPerBlock = 16;  // n granularity of the v1 kernel
inline constexpr int kGroupedGemvRowsPerChunk = 8;
// k limit of every GEMV kernel here (core/expert_path.hpp kGemvMaxK, static_asserted equal).
inline constexpr int64_t kGroupedGemvMaxK = 32768;
inline constexpr int kGemvMaxSegments = 3;

// Which GEMV kernel launch_gemv / launch_grouped_gemv_v2 run (see above). One list feeds the enum
// and gemv_kernel_name.
#define MIXSERVE_GEMV_KERNELS(X) \
  X(automatic)                   \
  X(balanced)                    \
  X(by_column)
enum class GemvKernel : uint8_t {
#define MIXSERVE_GEMV_KERNEL_ENUM(name) name,
  MIXSERVE_GEMV_KERNELS(MIXSERVE_GEMV_KERNEL_ENUM)
#undef MIXSERVE_GEMV_KERNEL_ENUM
};
const char* gemv_kernel_name(GemvKernel k);

struct GroupedGemvParams {
  const __nv_bfloat16* act = nullptr;      // [rows, k], expert-contiguous
  const __nv_bfloat16* weights = nullptr;  // [num_experts, n, k]
  __nv_bfloat16* out = nullptr;            // [rows, n]
  const int32_t* expert_offsets = nullptr; // [num_experts + 1], device
  int num_experts = 0;
  int64_t n = 0, k = 0;
  // Upper bounds known on the host (0: unknown): total routed rows (offsets[E]) and the most rows
  // one expert can have (tokens, when every token picks distinct experts). They size the grid and
  // the row chunk; a bound that is too small gives wrong results, so pass 0 when unsure.
  int64_t max_rows = 0;
  int64_t max_rows_per_expert = 0;
  // act holds gate | up rows [rows, 2k] and the kernel multiplies with bf16(silu(gate) * up)
  // (swiglu.cuh's formula and rounding), so the SwiGLU needs no launch of its own.
  bool swiglu_act = false;
  // Programmatic dependent launch (kernels/detail/pdl.cuh; not the v1 kernel): may start while the
  // stream's previous kernel finishes; waits for it before touching memory (decode steps).
  bool pdl = false;
  // v2 only: expert_offsets were written before the previous kernel started (the down projection
  // after the gate|up GEMV over the same offsets, which waited for their writer before it let this
  // launch start), so the kernel may read them, and prefetch its experts' weights into L2, before
  // it waits on the previous kernel. Wrong when the previous kernel writes the offsets.
  bool offsets_before_previous = false;
  GemvKernel kernel = GemvKernel::automatic;  // v2 only (gemv_kernel_for)
};

struct GemvOutSegment {
  void* out = nullptr;  // [num_rows, width] of bf16 or fp32 (row stride width)
  int64_t width = 0;    // columns of this segment; the segments' widths sum to n
};

struct GemvParams {
  const __nv_bfloat16* act = nullptr;      // [num_rows, k]
  const __nv_bfloat16* weights = nullptr;  // [n, k]
  const __nv_bfloat16* bias = nullptr;     // [n] or null
  GemvOutSegment seg[kGemvMaxSegments];    // the first num_segments are used
  int num_segments = 1;
  bool out_fp32 = false;  // fp32 outputs (router logits) instead of bf16
  bool swiglu_act = false;  // act is gate | up [num_rows, 2k]: see GroupedGemvParams (bf16 out only)
  int64_t num_rows = 0, n = 0, k = 0;
  // Programmatic dependent launch (kernels/detail/pdl.cuh): may start while the stream's previous
  // kernel finishes; waits for it before touching memory. For chains of kernels (decode steps).
  bool pdl = false;
  GemvKernel kernel = GemvKernel::automatic;  // gemv_kernel_for
};

// GemvKernel::automatic: by_column for one row per launch (plain GEMV) or per expert (grouped v2
// with max_rows_per_expert 1: a batch-1 decode), balanced above. On the H200 (session 4, call 2,
// docs/forward.md) balanced took 0.72-0.79x by_column's time for 8-row q|k|v, o_proj and the
// SwiGLU down projection, but at one row its q|k|v / o_proj were 7-8% slower and the 48-layer b=1
// decode step 6% slower (its full-GPU grid leaves no room for the next PDL kernel's prefetch).
inline constexpr GemvKernel gemv_kernel_for(GemvKernel requested, int64_t rows_per_weight) {
  if (requested != GemvKernel::automatic) return requested;
  return rows_per_weight == 1 ? GemvKernel::by_column : GemvKernel::balanced;
}

// The row chunk R that launch_gemv / launch_grouped_gemv_v2 run `kernel` (balanced or by_column;
// automatic is refused: gemv_kernel_for resolves it) with for wanted_rows rows per weight matrix
// (plain: num_rows; grouped: max_rows_per_expert, 8 when unknown): the largest of 1, 2, 4, 8 that
// is at most the first of them >= wanted_rows (8 above 4) and whose shared memory (above) fits
// max_smem_bytes, the device's opt-in shared memory per block; 0 when not even one row fits.
int gemv_rows_tile(GemvKernel kernel, int64_t wanted_rows, int64_t k, int64_t max_smem_bytes);

// "" when supported, else why not (legal values named).
std::string grouped_gemv_unsupported_reason(const GroupedGemvParams& p);     // v1
std::string grouped_gemv_v2_unsupported_reason(const GroupedGemvParams& p);
std::string gemv_unsupported_reason(const GemvParams& p);
// Throw mixserve::InputError naming the unsupported parameter; launch errors are checked.
void launch_grouped_gemv(const GroupedGemvParams& p, cudaStream_t stream);  // v1 (see above)
void launch_grouped_gemv_v2(const GroupedGemvParams& p, cudaStream_t stream);
void launch_gemv(const GemvParams& p, cudaStream_t stream);

}  // namespace mixserve::gpu
