#include "mixserve/kernels/rmsnorm.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

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
constexpr int kNarrowRowMaxWidth = 512;  // up to this width one warp per row, else a block per row


template <int kVec>
__device__ __forceinline__ void load_vec(const __nv_bfloat16* src, float (&f)[kVec]) {
  if constexpr (kVec == 1) {
    f[0] = __bfloat162float(*src);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j) {
      const float2 v = __bfloat1622float2(h[j]);
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  }
}
template <int kVec>
__device__ __forceinline__ void store_vec(__nv_bfloat16* dst, const float (&f)[kVec]) {
  if constexpr (kVec == 1) {
    *dst = __float2bfloat16_rn(f[0]);
  } else {
    uint4 raw;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    *reinterpret_cast<uint4*>(dst) = raw;
  }
}

// Sum over the kRowThreads threads of one row (threadIdx.x); every thread of the block must call it.
template <int kRowThreads>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if constexpr (kRowThreads > 32) {
    static_assert(kRowThreads == kThreads, "a wide row uses the whole block");
    __shared__ float s_part[kThreads / 32];
    if ((threadIdx.x & 31) == 0) s_part[threadIdx.x / 32] = v;
    __syncthreads();
    v = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) v += s_part[w];  // same order in every thread
  }
  return v;
}

// blockDim = (kRowThreads, kThreads / kRowThreads): threadIdx.y picks the row within the block.
template <int kVec, int kRowThreads>
static __global__ void __launch_bounds__(kThreads) rmsnorm_kernel(RmsNormParams p) {
  detail::wait_for_previous_kernel();
  detail::allow_next_kernel();
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  const bool active = row < p.num_rows;
  const int num_vec = p.width / kVec;
  const int64_t base = row * p.width;
  float ss = 0.0f;
  if (active) {
    for (int v = threadIdx.x; v < num_vec; v += kRowThreads) {
      float f[kVec];
      load_vec<kVec>(p.x + base + int64_t(v) * kVec, f);
      if (p.residual) {
        float r[kVec];
        load_vec<kVec>(p.residual + base + int64_t(v) * kVec, r);
#pragma unroll
        for (int j = 0; j < kVec; ++j) f[j] = __bfloat162float(__float2bfloat16_rn(f[j] + r[j]));  // the stored sum
        store_vec<kVec>(p.residual_out + base + int64_t(v) * kVec, f);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) ss += f[j] * f[j];
    }
  }
  ss = row_sum<kRowThreads>(ss);
  if (!active) return;
  const float inv_rms = rsqrtf(ss / float(p.width) + p.eps);
  const __nv_bfloat16* src = p.residual ? p.residual_out : p.x;  // [num_rows, width]
  for (int v = threadIdx.x; v < num_vec; v += kRowThreads) {
    float f[kVec], w[kVec];
    load_vec<kVec>(src + base + int64_t(v) * kVec, f);
    load_vec<kVec>(p.weight + int64_t(v) * kVec, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f[j] = f[j] * inv_rms * w[j];
    store_vec<kVec>(p.out + base + int64_t(v) * kVec, f);
  }
}

std::string check_params(const RmsNormParams& p) {
  if (p.num_rows < 0) return "num_rows=" + std::to_string(p.num_rows) + " (need >= 0)";
  if (p.width < 1 || p.width > kRmsNormMaxWidth)
    return "width=" + std::to_string(p.width) + " (legal: 1.." + std::to_string(kRmsNormMaxWidth) + ")";
  if (!(p.eps > 0.0f)) return "eps=" + std::to_string(p.eps) + " (need > 0)";
  if (p.num_rows > 0 && (!p.x || !p.weight || !p.out)) return "x, weight and out must be set";
  if (p.num_rows > 0 && p.residual && !p.residual_out) return "residual is set but residual_out is null";
  return {};
}

// The one place runtime values become template arguments.
template <class F>
void dispatch_rmsnorm(int vec, int row_threads, F&& f) {
  using std::integral_constant;
  if (vec == kVecWide && row_threads == 32) return f(integral_constant<int, kVecWide>{}, integral_constant<int, 32>{});
  if (vec == kVecWide && row_threads == kThreads)
    return f(integral_constant<int, kVecWide>{}, integral_constant<int, kThreads>{});
  if (vec == 1 && row_threads == 32) return f(integral_constant<int, 1>{}, integral_constant<int, 32>{});
  if (vec == 1 && row_threads == kThreads) return f(integral_constant<int, 1>{}, integral_constant<int, kThreads>{});
  throw InputError("rmsnorm: no kernel for vector width " + std::to_string(vec) + ", " + std::to_string(row_threads) +
                   " threads per row (legal: vector width 1 or 8, threads per row 32 or 256)");
}
}  // namespace

bool is_supported(const RmsNormParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_rmsnorm(const RmsNormParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("rmsnorm: " + err);
  if (p.num_rows == 0) return;
  const bool vec_ok = p.width % kVecWide == 0 && aligned16(p.x) && aligned16(p.weight) && aligned16(p.out) &&
                      (!p.residual || (aligned16(p.residual) && aligned16(p.residual_out)));
  const int row_threads = p.width <= kNarrowRowMaxWidth ? 32 : kThreads;
  dispatch_rmsnorm(vec_ok ? kVecWide : 1, row_threads, [&](auto vec, auto rt) {
    constexpr int kRowsPerBlock = kThreads / decltype(rt)::value;
    const int64_t blocks = (p.num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
    if (blocks > 0x7fffffff) throw InputError("rmsnorm: num_rows=" + std::to_string(p.num_rows) + " exceeds the grid");
    detail::launch_kernel(p.pdl, rmsnorm_kernel<decltype(vec)::value, decltype(rt)::value>,
                          dim3(static_cast<unsigned>(blocks)), dim3(decltype(rt)::value, kRowsPerBlock), 0, stream, p);
  });
  MIXSERVE_LAUNCH_CHECK("rmsnorm_kernel");
}

}  // namespace mixserve::kernels
