#include "mixserve/kernels/permute.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"
#include "mixserve/kernels/detail/permute_device.cuh"

#include <string>
#include <type_traits>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kScanThreads = 1024;
static_assert(kPermuteMaxExperts <= kScanThreads, "the scan block gives one thread per expert");
static_assert(kPermuteChunk % kThreads == 0, "a chunk is a whole number of block-wide steps");
constexpr int kVecWide = 8;  // bf16 per 16-byte vector


int64_t num_chunks(int64_t pairs) { return (pairs + kPermuteChunk - 1) / kPermuteChunk; }

// (1) Per-chunk histogram into chunk_counts [chunks, E]; also resets permuted_token to -1.
static __global__ void __launch_bounds__(kThreads) permute_count_kernel(PermuteParams p, int32_t* chunk_counts) {
  extern __shared__ int32_t s_cnt[];  // [E]
  const int E = p.num_experts;
  for (int e = threadIdx.x; e < E; e += kThreads) s_cnt[e] = 0;
  __syncthreads();
  const int64_t pairs = p.num_tokens * p.top_k;
  const int64_t begin = int64_t(blockIdx.x) * kPermuteChunk;
  const int64_t end = min(pairs, begin + kPermuteChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int32_t id = p.topk_ids[i];
    if (id >= 0 && id < E) atomicAdd(&s_cnt[id], 1);  // integer: exact in any order
    p.permuted_token[i] = -1;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) chunk_counts[int64_t(blockIdx.x) * E + e] = s_cnt[e];
}

// (2) One block: chunk_counts becomes each chunk's start within its expert; counts and offsets.
static __global__ void __launch_bounds__(kScanThreads) permute_scan_kernel(PermuteParams p, int32_t* chunk_counts,
                                                                           int64_t chunks) {
  __shared__ int32_t s_scan[kScanThreads];  // [E], inclusive prefix sum of the counts
  const int E = p.num_experts;
  const int e = threadIdx.x;
  int32_t run = 0;
  if (e < E) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = chunk_counts[c * E + e];
      chunk_counts[c * E + e] = run;
      run += n;
    }
    p.expert_counts[e] = run;
  }
  s_scan[e] = e < E ? run : 0;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scan
    const int32_t add = e >= off ? s_scan[e - off] : 0;
    __syncthreads();
    s_scan[e] += add;
    __syncthreads();
  }
  if (e < E) p.expert_offsets[e] = s_scan[e] - run;
  if (e == 0) p.expert_offsets[E] = s_scan[kScanThreads - 1];
}

// (3) Ranks: pair i of expert e goes to row offsets[e] + (pairs of e before i), in flat order.
static __global__ void __launch_bounds__(kThreads) permute_rank_kernel(PermuteParams p, const int32_t* chunk_start) {
  extern __shared__ int32_t s_mem[];
  const int E = p.num_experts;
  int32_t* s_next = s_mem;           // [E]: next free row of each expert
  int32_t* s_warp = s_mem + E;       // [kWarps, E]: pairs of each expert in each warp, this step
  for (int e = threadIdx.x; e < E; e += kThreads) {
    s_next[e] = p.expert_offsets[e] + chunk_start[int64_t(blockIdx.x) * E + e];
    for (int w = 0; w < kWarps; ++w) s_warp[w * E + e] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t pairs = p.num_tokens * p.top_k;
  const int64_t begin = int64_t(blockIdx.x) * kPermuteChunk;
  const int64_t end = min(pairs, begin + kPermuteChunk);
  for (int64_t step = begin; step < end; step += kThreads) {
    const int64_t i = step + threadIdx.x;
    const int32_t raw = i < end ? p.topk_ids[i] : -1;
    const bool valid = raw >= 0 && raw < E;
    const int32_t key = valid ? raw : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (valid && rank_in_warp == 0) s_warp[warp * E + key] = __popc(peers);
    __syncthreads();
    if (valid) {
      int32_t row = s_next[key] + rank_in_warp;
      for (int w = 0; w < warp; ++w) row += s_warp[w * E + key];
      p.slot_row[i] = row;
      p.permuted_token[row] = int32_t(i / p.top_k);
    } else if (i < end) {
      p.slot_row[i] = -1;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += kThreads) {
      int32_t add = 0;
      for (int w = 0; w < kWarps; ++w) {
        add += s_warp[w * E + e];
        s_warp[w * E + e] = 0;
      }
      s_next[e] += add;
    }
    __syncthreads();
  }
}

// (4) permuted_x[slot_row[i], :] = x[i / top_k, :]: one block per pair.
template <int kVec>
static __global__ void __launch_bounds__(kThreads) permute_gather_kernel(PermuteParams p) {
  const int64_t i = blockIdx.x;
  const int32_t row = p.slot_row[i];
  if (row < 0) return;
  const int64_t t = i / p.top_k;
  const int64_t num_vec = p.hidden / kVec;
  if constexpr (kVec == 1) {
    for (int64_t v = threadIdx.x; v < num_vec; v += kThreads) p.permuted_x[row * p.hidden + v] = p.x[t * p.hidden + v];
  } else {
    const auto* src = reinterpret_cast<const uint4*>(p.x + t * p.hidden);  // [hidden / 8]
    auto* dst = reinterpret_cast<uint4*>(p.permuted_x + int64_t(row) * p.hidden);
    for (int64_t v = threadIdx.x; v < num_vec; v += kThreads) dst[v] = src[v];
  }
}

// Single launch for up to kPermuteSingleLaunchMaxPairs pairs: every block rebuilds the maps in
// shared memory (same order as the 4-launch path), block 0 writes them, all blocks gather
// (detail/permute_device.cuh).
template <int kVec>
static __global__ void __launch_bounds__(kThreads) permute_single_kernel(PermuteParams p) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  extern __shared__ int32_t s_mem[];
  const int pairs = static_cast<int>(p.num_tokens * p.top_k);
  const detail::PermuteMapsSmem m = detail::permute_maps_carve(s_mem, pairs, p.num_experts);
  detail::permute_build_maps(p.topk_ids, pairs, p.num_experts, m);
  if (blockIdx.x == 0) detail::permute_write_maps(p, pairs, m);
  if (!p.x) return;
  detail::permute_gather_rows<kVec>(p, pairs, m, blockIdx.x, gridDim.x);
}

std::string check_params(const PermuteParams& p) {
  if (p.num_tokens < 0) return "num_tokens=" + std::to_string(p.num_tokens) + " (need >= 0)";
  if (p.top_k < 1) return "top_k=" + std::to_string(p.top_k) + " (need >= 1)";
  if (p.num_experts < 1 || p.num_experts > kPermuteMaxExperts)
    return "num_experts=" + std::to_string(p.num_experts) + " (legal: 1.." + std::to_string(kPermuteMaxExperts) + ")";
  if (p.num_tokens * p.top_k > 0x7fffffff)
    return "num_tokens * top_k=" + std::to_string(p.num_tokens * p.top_k) + " (legal: < 2^31, int32 rows)";
  if (p.x && p.hidden < 1) return "hidden=" + std::to_string(p.hidden) + " with x set (need >= 1)";
  if (p.x && !p.permuted_x) return "x is set but permuted_x is null";
  if (!p.expert_counts || !p.expert_offsets) return "expert_counts and expert_offsets must be set";
  if (p.num_tokens > 0 && (!p.topk_ids || !p.slot_row || !p.permuted_token))
    return "topk_ids, slot_row and permuted_token must be set";
  const std::size_t need = permute_workspace_bytes(p.num_tokens, p.top_k, p.num_experts);
  if (need > 0 && (!p.workspace || p.workspace_bytes < need))
    return "workspace_bytes=" + std::to_string(p.workspace_bytes) + " (need >= " + std::to_string(need) +
           " = permute_workspace_bytes(...))";
  return {};
}

// The one place runtime values become template arguments.
template <class F>
void dispatch_gather(int vec, F&& f) {
  if (vec == kVecWide) return f(std::integral_constant<int, kVecWide>{});
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  throw InputError("permute: no gather kernel for vector width " + std::to_string(vec) + " (legal: 1 or 8)");
}
}  // namespace

std::size_t permute_workspace_bytes(int64_t num_tokens, int top_k, int num_experts) {
  if (num_tokens <= 0 || top_k <= 0 || num_experts <= 0) return 0;
  return std::size_t(num_chunks(num_tokens * top_k)) * std::size_t(num_experts) * sizeof(int32_t);
}

std::string permute_unsupported_reason(const PermuteParams& p) { return check_params(p); }

bool is_supported(const PermuteParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_permute(const PermuteParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("permute: " + err);
  const int E = p.num_experts;
  const int64_t pairs = p.num_tokens * p.top_k;
  if (pairs == 0) {  // no routed pairs: zero counts and offsets, still without a host sync
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(p.expert_counts, 0, sizeof(int32_t) * E, stream));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(p.expert_offsets, 0, sizeof(int32_t) * (E + 1), stream));
    return;
  }
  if (p.allow_single_launch && pairs <= kPermuteSingleLaunchMaxPairs) {
    const bool vec_ok = !p.x || (p.hidden % kVecWide == 0 && aligned16(p.x) && aligned16(p.permuted_x));
    const std::size_t smem = sizeof(int32_t) * detail::permute_maps_smem_ints(int(pairs), E);
    const unsigned blocks = p.x ? static_cast<unsigned>(pairs) : 1u;
    dispatch_gather(vec_ok ? kVecWide : 1, [&](auto vec) {
      detail::launch_kernel(p.pdl, permute_single_kernel<decltype(vec)::value>, dim3(blocks), dim3(kThreads), smem,
                            stream, p);
    });
    MIXSERVE_LAUNCH_CHECK("permute_single_kernel");
    return;
  }
  const int64_t chunks = num_chunks(pairs);
  auto* chunk_counts = static_cast<int32_t*>(p.workspace);  // [chunks, E]
  permute_count_kernel<<<static_cast<unsigned>(chunks), kThreads, sizeof(int32_t) * E, stream>>>(p, chunk_counts);
  MIXSERVE_LAUNCH_CHECK("permute_count_kernel");
  permute_scan_kernel<<<1, kScanThreads, 0, stream>>>(p, chunk_counts, chunks);
  MIXSERVE_LAUNCH_CHECK("permute_scan_kernel");
  const std::size_t rank_smem = sizeof(int32_t) * std::size_t(E) * (1 + kWarps);
  permute_rank_kernel<<<static_cast<unsigned>(chunks), kThreads, rank_smem, stream>>>(p, chunk_counts);
  MIXSERVE_LAUNCH_CHECK("permute_rank_kernel");
  if (p.x) {
    const bool vec_ok = p.hidden % kVecWide == 0 && aligned16(p.x) && aligned16(p.permuted_x);
    dispatch_gather(vec_ok ? kVecWide : 1, [&](auto vec) {
      permute_gather_kernel<decltype(vec)::value><<<static_cast<unsigned>(pairs), kThreads, 0, stream>>>(p);
    });
    MIXSERVE_LAUNCH_CHECK("permute_gather_kernel");
  }
}

}  // namespace mixserve::kernels
