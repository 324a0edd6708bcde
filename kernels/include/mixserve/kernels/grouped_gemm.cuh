// Grouped expert GEMM on the tensor cores, rows from device-side expert offsets (no host sync, so
// a prefill step that uses it can be captured in a CUDA graph):
//   for every expert e and row r in [offsets[e], offsets[e + 1]):
//     out[r, j] = sum_c act[r, c] * weights[e, j, c]        (bf16 in, fp32 accumulate, bf16 out)
// weights [num_experts, n, k] (each expert's Linear weight [out, in], the layout of the executor's
// w13 [E, 2I, H] and w2 [E, H, I]); act and out rows are expert-contiguous (permute.cuh's layout).
// Rows at and past offsets[E] are untouched.
// Algorithm: ONE launch per projection for all experts. A persistent grid (blocks per SM from the
// occupancy calculator) first turns the offsets into a prefix of output tiles per expert
// (ceil(rows_e / 128) * ceil(n / 128) tiles of 128 x 128, in shared memory), then walks the
// flattened tile list (expert, m-tile, n-tile; n fastest, so consecutive blocks share an
// activation tile and an expert's weights stay in L2). A tile: 8 warps, each 64 x 32 of the
// output; k in steps of 64 through a 3-stage cp.async pipeline (XOR-swizzled 128-byte rows, so
// the ldmatrix reads are conflict-free), mma.sync m16n8k16 bf16 with fp32 accumulators; rows past
// the expert's end and columns past n are zero-filled on load and not stored. Two tile
// implementations share the scheduler, the loads and the layout (GroupedGemmImpl):
//   mma_sync  each warp 64 x 32 of the tile, ldmatrix + mma.sync m16n8k16 (any SM >= 8.0);
//   wgmma     two warpgroups, each 64 x 128 of the tile, wgmma m64n128k16 reading A and B from
//             the 128-byte-swizzled stages through matrix descriptors (sm_90a builds on SM 9.0).
//   wgmma_wide the same with a 128 x 256 tile (two warpgroups of m64n256k16), 4 stages, loads
//             two k-tiles ahead and one wgmma batch in flight, one block per SM;
//   automatic wgmma_wide where it exists, else mma_sync.
// Sync contract: stream order only. Requirements: SM >= 8.0; n, k >= 1 and multiples of 8;
// 1 <= num_experts <= kGroupedGemmMaxExperts; act, weights and out 16-byte aligned; offsets
// non-decreasing with offsets[0] >= 0 (the permute's).
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::kernels {

inline constexpr int kGroupedGemmTileM = 128;
inline constexpr int kGroupedGemmTileN = 128;
inline constexpr int kGroupedGemmMaxExperts = 1024;

enum class GroupedGemmImpl { automatic, mma_sync, wgmma, wgmma_wide };

struct GroupedGemmParams {
  const __nv_bfloat16* act = nullptr;       // [rows, k], expert-contiguous
  const __nv_bfloat16* weights = nullptr;   // [num_experts, n, k]
  __nv_bfloat16* out = nullptr;             // [rows, n]
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  int num_experts = 0;
  int64_t n = 0, k = 0;
  GroupedGemmImpl impl = GroupedGemmImpl::automatic;
};

// "" when supported on `device`, else why not (the parameter and its legal values).
std::string grouped_gemm_unsupported_reason(const GroupedGemmParams& p, int device);
// Throws mixserve::InputError naming the unsupported parameter; launch errors are checked.
void launch_grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream);

}  // namespace mixserve::kernels
