// Device side of the one-launch permute (permute.cuh, up to kPermuteSingleLaunchMaxPairs pairs),
// shared with the fused router + permute launch (moe_route.cuh) so that both give the same maps:
// the maps are rebuilt in shared memory from topk_ids (histogram, scan, rank = equal experts before
// the pair in flat order), written by one block, and the rows gathered.
// Include from .cu files only.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "mixserve/kernels/permute.cuh"

namespace mixserve::kernels::detail {

// Shared memory of permute_build_maps, in int32: [pairs] ids, [pairs] slots, [E] counts, [E + 1] offsets.
inline constexpr std::size_t permute_maps_smem_ints(int pairs, int num_experts) {
  return 2 * std::size_t(pairs) + 2 * std::size_t(num_experts) + 1;
}

struct PermuteMapsSmem {
  int32_t* ids;   // [pairs] expert of each pair, -1 outside [0, E)
  int32_t* slot;  // [pairs] permuted row of each pair, -1 when dropped
  int32_t* cnt;   // [E]
  int32_t* off;   // [E + 1]
};

__device__ __forceinline__ PermuteMapsSmem permute_maps_carve(int32_t* s_mem, int pairs, int num_experts) {
  PermuteMapsSmem m;
  m.ids = s_mem;
  m.slot = m.ids + pairs;
  m.cnt = m.slot + pairs;
  m.off = m.cnt + num_experts;
  return m;
}

// Every thread of the block calls it; returns with the maps complete in shared memory.
__device__ __forceinline__ void permute_build_maps(const int32_t* topk_ids, int pairs, int E, const PermuteMapsSmem& m) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) m.cnt[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int32_t raw = topk_ids[i];
    const int32_t key = raw >= 0 && raw < E ? raw : -1;
    m.ids[i] = key;
    if (key >= 0) atomicAdd(&m.cnt[key], 1);  // integer: exact in any order
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // exclusive scan: lane l sums a contiguous run of experts
    const int lane = threadIdx.x;
    const int per = (E + 31) / 32;
    const int b = min(E, lane * per), en = min(E, b + per);
    int32_t sum = 0;
    for (int e = b; e < en; ++e) sum += m.cnt[e];
    int32_t incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    int32_t run = incl - sum;
    for (int e = b; e < en; ++e) {
      m.off[e] = run;
      run += m.cnt[e];
    }
    if (lane == 31) m.off[E] = incl;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int32_t key = m.ids[i];
    int32_t row = -1;
    if (key >= 0) {
      row = m.off[key];
      for (int j = 0; j < i; ++j) row += m.ids[j] == key;
    }
    m.slot[i] = row;
  }
  __syncthreads();
}

// Counts, offsets, slot_row and permuted_token from the maps (one block).
__device__ __forceinline__ void permute_write_maps(const PermuteParams& p, int pairs, const PermuteMapsSmem& m) {
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    p.expert_counts[e] = m.cnt[e];
    p.expert_offsets[e] = m.off[e];
  }
  if (threadIdx.x == 0) p.expert_offsets[E] = m.off[E];
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    p.slot_row[i] = m.slot[i];
    if (i >= m.off[E]) p.permuted_token[i] = -1;
    if (m.slot[i] >= 0) p.permuted_token[m.slot[i]] = int32_t(i / p.top_k);
  }
}

// permuted_x[slot[i], :] = x[i / top_k, :] for pairs i = first, first + stride, ... (kVec: 8 with
// 16-byte vectors, else 1).
template <int kVec>
__device__ __forceinline__ void permute_gather_rows(const PermuteParams& p, int pairs, const PermuteMapsSmem& m,
                                                    int first, int stride) {
  const int64_t num_vec = p.hidden / kVec;
  for (int i = first; i < pairs; i += stride) {
    const int32_t row = m.slot[i];
    if (row < 0) continue;
    const int64_t t = i / p.top_k;
    if constexpr (kVec == 1) {
      for (int64_t v = threadIdx.x; v < num_vec; v += blockDim.x) p.permuted_x[row * p.hidden + v] = p.x[t * p.hidden + v];
    } else {
      const auto* src = reinterpret_cast<const uint4*>(p.x + t * p.hidden);
      auto* dst = reinterpret_cast<uint4*>(p.permuted_x + int64_t(row) * p.hidden);
      for (int64_t v = threadIdx.x; v < num_vec; v += blockDim.x) dst[v] = src[v];
    }
  }
}

}  // namespace mixserve::kernels::detail
