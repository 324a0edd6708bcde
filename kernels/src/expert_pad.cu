#include "mixserve/kernels/expert_pad.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <algorithm>
#include <string>
#include <type_traits>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {
constexpr int kThreads = 256;
constexpr int kVecWide = 8;  // bf16 per 16-byte vector
static_assert(kVecWide * sizeof(__nv_bfloat16) == 16, "one vector must be 16 bytes");

int sm_count() {
  int device = 0, sms = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Enough blocks to fill the chip several times over; the grid-stride loops do the rest.
unsigned grid_for(int64_t work) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sm_count()) * 16));
  return static_cast<unsigned>(blocks);
}

// Expert e's first padded row: uniform or per-expert layout (the branch is uniform across the grid).
__device__ __forceinline__ int64_t padded_start(const PadExpertRowsParams& p, int e) {
  return p.padded_offsets ? int64_t(p.padded_offsets[e]) : int64_t(e) * p.rows_per_expert;
}

// The expert whose padded rows hold row r: the last e with padded_offsets[e] <= r (empty experts
// share their start with the next one, so the search lands on the one with rows).
__device__ __forceinline__ int expert_of_padded_row(const int32_t* poff, int num_experts, int64_t r) {
  int lo = 0, hi = num_experts - 1;  // invariant: poff[lo] <= r < poff[num_experts]
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (int64_t(poff[mid]) <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

static __global__ void __launch_bounds__(kThreads) pad_expert_rows_kernel(PadExpertRowsParams p) {
  const int64_t pairs = p.num_tokens * p.top_k;
  const int64_t padded = p.padded_offsets ? p.num_padded_rows : int64_t(p.num_experts) * p.rows_per_expert;
  const int64_t total = max(pairs, padded);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += stride) {
    if (idx < pairs) {
      const int32_t row = p.slot_row[idx];
      if (row >= 0) {
        const int e = p.topk_ids[idx];  // in [0, E): the permute gave the pair a row
        p.slot_row[idx] = static_cast<int32_t>(padded_start(p, e) + (row - p.expert_offsets[e]));
      }
    }
    if (idx < padded) {
      const int e = p.padded_offsets ? expert_of_padded_row(p.padded_offsets, p.num_experts, idx)
                                     : static_cast<int>(idx / p.rows_per_expert);
      const int64_t i = idx - padded_start(p, e);
      p.padded_token[idx] = i < p.expert_counts[e] ? p.permuted_token[p.expert_offsets[e] + i] : -1;
    }
  }
}

template <int kVec>
static __global__ void __launch_bounds__(kThreads) gather_rows_kernel(GatherRowsParams p) {
  const int64_t vec_per_row = p.hidden / kVec;
  const int64_t total = p.num_rows * vec_per_row;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / vec_per_row, c = (idx - r * vec_per_row) * kVec;
    const int32_t src = p.row_token[r];
    __nv_bfloat16* o = p.dst + r * p.hidden + c;
    if constexpr (kVec == 1) {
      *o = src >= 0 ? p.x[int64_t(src) * p.hidden + c] : __float2bfloat16_rn(0.0f);
    } else {
      const uint4 v = src >= 0 ? *reinterpret_cast<const uint4*>(p.x + int64_t(src) * p.hidden + c)
                               : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(o) = v;
    }
  }
}

// The one place runtime values become template arguments.
template <class F>
void dispatch_gather(int vec, F&& f) {
  if (vec == kVecWide) return f(std::integral_constant<int, kVecWide>{});
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  throw InputError("gather_rows: no kernel for vector width " + std::to_string(vec) + " (legal: 1 or 8)");
}
}  // namespace

std::string pad_expert_rows_unsupported_reason(const PadExpertRowsParams& p) {
  if (p.num_tokens < 0) return "num_tokens=" + std::to_string(p.num_tokens) + " (need >= 0)";
  if (p.top_k < 1) return "top_k=" + std::to_string(p.top_k) + " (need >= 1)";
  if (p.num_experts < 1) return "num_experts=" + std::to_string(p.num_experts) + " (need >= 1)";
  if (p.rows_per_expert < 0) return "rows_per_expert=" + std::to_string(p.rows_per_expert) + " (need >= 0)";
  if (p.padded_offsets) {
    if (p.rows_per_expert != 0)
      return "rows_per_expert=" + std::to_string(p.rows_per_expert) +
             " with padded_offsets (need 0: the per-expert layout reads padded_offsets only)";
    if (p.num_padded_rows < 0 || p.num_padded_rows > INT32_MAX)
      return "num_padded_rows=" + std::to_string(p.num_padded_rows) + " (need 0 .. 2^31 - 1: slot_row is int32)";
  } else {
    if (p.num_padded_rows != 0)
      return "num_padded_rows=" + std::to_string(p.num_padded_rows) +
             " without padded_offsets (need 0: the uniform layout has num_experts * rows_per_expert rows)";
    if (int64_t(p.num_experts) * p.rows_per_expert > INT32_MAX)
      return "num_experts * rows_per_expert=" + std::to_string(int64_t(p.num_experts) * p.rows_per_expert) +
             " (need <= 2^31 - 1: slot_row is int32)";
  }
  if (!p.topk_ids || !p.expert_counts || !p.expert_offsets || !p.permuted_token || !p.slot_row || !p.padded_token)
    return "topk_ids, expert_counts, expert_offsets, permuted_token, slot_row and padded_token must be set";
  return {};
}

bool is_supported(const PadExpertRowsParams& p, int device) {
  return pad_expert_rows_unsupported_reason(p).empty() && detail::device_is_sm80_or_newer(device);
}

void launch_pad_expert_rows(const PadExpertRowsParams& p, cudaStream_t stream) {
  if (const auto err = pad_expert_rows_unsupported_reason(p); !err.empty())
    throw InputError("pad_expert_rows: " + err);
  const int64_t work = std::max(p.num_tokens * p.top_k, padded_rows(p));
  if (work == 0) return;
  pad_expert_rows_kernel<<<grid_for(work), kThreads, 0, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("pad_expert_rows_kernel");
}

std::string gather_rows_unsupported_reason(const GatherRowsParams& p) {
  if (p.num_rows < 0) return "num_rows=" + std::to_string(p.num_rows) + " (need >= 0)";
  if (p.hidden < 1) return "hidden=" + std::to_string(p.hidden) + " (need >= 1)";
  if (p.num_rows > 0 && (!p.x || !p.row_token || !p.dst)) return "x, row_token and dst must be set";
  return {};
}

bool is_supported(const GatherRowsParams& p, int device) {
  return gather_rows_unsupported_reason(p).empty() && detail::device_is_sm80_or_newer(device);
}

void launch_gather_rows(const GatherRowsParams& p, cudaStream_t stream) {
  if (const auto err = gather_rows_unsupported_reason(p); !err.empty()) throw InputError("gather_rows: " + err);
  if (p.num_rows == 0) return;
  const bool vec_ok = p.hidden % kVecWide == 0 && aligned16(p.x) && aligned16(p.dst);
  dispatch_gather(vec_ok ? kVecWide : 1, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    gather_rows_kernel<kVec><<<grid_for(p.num_rows * (p.hidden / kVec)), kThreads, 0, stream>>>(p);
  });
  MIXSERVE_LAUNCH_CHECK("gather_rows_kernel");
}

}  // namespace mixserve::kernels
