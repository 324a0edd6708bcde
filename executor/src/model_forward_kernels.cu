// Small kernels of the model forward: see model_forward_kernels.hpp.
#include "mixserve/gpu/model_forward_kernels.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

namespace mixserve::gpu {
namespace {

__global__ void gather_rows_kernel(const __nv_bfloat16* __restrict__ src, const int32_t* __restrict__ index,
                                   __nv_bfloat16* __restrict__ out, int64_t width) {
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* s = src + int64_t(index[r]) * width;
  __nv_bfloat16* o = out + r * width;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) o[c] = s[c];
}

__global__ void add_bias_kernel(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                                int64_t num_rows, int64_t width) {
  const int64_t n = num_rows * width;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(bias[i % width]));
}

__global__ void offset_ids_kernel(int32_t* __restrict__ ids, int64_t n, int32_t offset) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    ids[i] += offset;
}

constexpr int kLinearThreads = 256;

// One block per row; x row staged in shared memory as fp32; warp w computes columns w, w + 8, ...
__global__ void linear_fp32_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                   float* __restrict__ out, int n, int width) {
  extern __shared__ float xs[];
  const int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x + r * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) xs[c] = __bfloat162float(xr[c]);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = warp; j < n; j += kLinearThreads / 32) {
    const __nv_bfloat16* wr = w + int64_t(j) * width;
    float acc = 0.0f;
    if (width % 8 == 0 && (reinterpret_cast<uintptr_t>(w) & 15) == 0) {
      for (int c = lane * 8; c < width; c += 32 * 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(wr + c);
        const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = __bfloat1622float2(p[q]);
          acc += f.x * xs[c + 2 * q] + f.y * xs[c + 2 * q + 1];
        }
      }
    } else {
      for (int c = lane; c < width; c += 32) acc += __bfloat162float(wr[c]) * xs[c];
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[r * n + j] = acc;
  }
}

constexpr int kQkThreads = 256;

// One block per token; warp w handles heads w, w + 8, ... of q | k | v. Lane l holds elements
// l + 32 m of the head (m < head_dim / 32); the rotate-half partner of element l + 32 m is
// l + 32 (m + head_dim / 64).
template <int D>
__global__ void __launch_bounds__(kQkThreads) qk_norm_rope_kv_kernel(QkNormRopeKvParams p) {
  constexpr int half = D / 2, per_lane = D / 32, m_half = D / 64;
  __shared__ float s_cos[half], s_sin[half];
  kernels::detail::wait_for_previous_kernel();
  kernels::detail::allow_next_kernel();
  const int64_t t = blockIdx.x;
  const int pos = p.positions[t];
  for (int i = threadIdx.x; i < half; i += kQkThreads) {
    if (p.rope_cs) {  // the step's table (launch_rope_table)
      s_cos[i] = p.rope_cs[t * D + i];
      s_sin[i] = p.rope_cs[t * D + half + i];
    } else {  // as rope.cuh: float64 angle, fp32 table
      const double inv_freq = pow(double(p.theta), -2.0 * double(i) / double(D));
      double sn, cs;
      sincos(double(pos) * inv_freq, &sn, &cs);
      s_cos[i] = float(cs);
      s_sin[i] = float(sn);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t cache_row = -1;  // element offset of (block, slot, head 0) in the cache
  if (pos >= 0) {
    const int64_t block = p.block_table[int64_t(p.token_seq[t]) * p.max_blocks_per_seq + pos / p.block_tokens];
    cache_row = (block * p.block_tokens + pos % p.block_tokens) * int64_t(p.kv_heads) * D;
  }
  const int heads = p.q_heads + 2 * p.kv_heads;
  for (int h = warp; h < heads; h += kQkThreads / 32) {
    float f[per_lane];
    if (h >= p.q_heads + p.kv_heads) {  // v: copy into the cache
      const int kvh = h - p.q_heads - p.kv_heads;
      if (cache_row < 0) continue;
      const __nv_bfloat16* src = p.v + (t * p.kv_heads + kvh) * D;
      __nv_bfloat16* dst = p.v_cache + cache_row + int64_t(kvh) * D;
#pragma unroll
      for (int m = 0; m < per_lane; ++m) dst[lane + 32 * m] = src[lane + 32 * m];
      continue;
    }
    const bool is_q = h < p.q_heads;
    __nv_bfloat16* x = is_q ? p.q + (t * p.q_heads + h) * D : p.k + (t * p.kv_heads + (h - p.q_heads)) * D;
    const __nv_bfloat16* nw = is_q ? p.q_norm : p.k_norm;
    float ss = 0.0f;
#pragma unroll
    for (int m = 0; m < per_lane; ++m) {
      f[m] = __bfloat162float(x[lane + 32 * m]);
      ss += f[m] * f[m];
    }
    if (nw) {
#pragma unroll
      for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      const float inv_rms = rsqrtf(ss / float(D) + p.eps);
#pragma unroll
      for (int m = 0; m < per_lane; ++m)
        f[m] = __bfloat162float(__float2bfloat16_rn(f[m] * inv_rms * __bfloat162float(nw[lane + 32 * m])));
    }
#pragma unroll
    for (int m = 0; m < m_half; ++m) {
      const int i = lane + 32 * m;
      const float x1 = f[m], x2 = f[m + m_half];
      f[m] = __bfloat162float(__float2bfloat16_rn(x1 * s_cos[i] - x2 * s_sin[i]));
      f[m + m_half] = __bfloat162float(__float2bfloat16_rn(x2 * s_cos[i] + x1 * s_sin[i]));
    }
#pragma unroll
    for (int m = 0; m < per_lane; ++m) x[lane + 32 * m] = __float2bfloat16_rn(f[m]);
    if (!is_q && cache_row >= 0) {
      __nv_bfloat16* dst = p.k_cache + cache_row + int64_t(h - p.q_heads) * D;
#pragma unroll
      for (int m = 0; m < per_lane; ++m) dst[lane + 32 * m] = __float2bfloat16_rn(f[m]);
    }
  }
}

__global__ void rope_table_kernel(const int32_t* __restrict__ positions, float* __restrict__ cs, int head_dim,
                                  float theta) {
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const double pos = double(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double inv_freq = pow(double(theta), -2.0 * double(i) / double(head_dim));
    double sn, c;
    sincos(pos * inv_freq, &sn, &c);
    cs[t * head_dim + i] = float(c);
    cs[t * head_dim + half + i] = float(sn);
  }
}

}  // namespace

void launch_rope_table(const int32_t* positions, float* cs, int64_t num_tokens, int head_dim, float theta,
                       cudaStream_t stream) {
  if (num_tokens < 0 || head_dim < 2 || head_dim % 2 != 0 || !(theta > 1.0f))
    throw InputError("rope_table: num_tokens=" + std::to_string(num_tokens) + " head_dim=" + std::to_string(head_dim) +
                     " theta=" + std::to_string(theta) + " (need num_tokens >= 0, even head_dim >= 2, theta > 1)");
  if (num_tokens == 0) return;
  rope_table_kernel<<<static_cast<unsigned>(num_tokens), 64, 0, stream>>>(positions, cs, head_dim, theta);
  MIXSERVE_LAUNCH_CHECK("rope_table_kernel");
}

std::string qk_norm_rope_kv_unsupported_reason(const QkNormRopeKvParams& p) {
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff)
    return "num_tokens=" + std::to_string(p.num_tokens) + " (legal: 0..2^31-1)";
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim=" + std::to_string(p.head_dim) + " (legal: 64, 128)";
  if (p.q_heads < 1 || p.kv_heads < 1)
    return "q_heads=" + std::to_string(p.q_heads) + " kv_heads=" + std::to_string(p.kv_heads) + " (need >= 1)";
  if (bool(p.q_norm) != bool(p.k_norm)) return "q_norm and k_norm must both be set or both be null";
  if (!(p.theta > 1.0f)) return "theta=" + std::to_string(p.theta) + " (need > 1)";
  if (p.block_tokens < 1 || p.max_blocks_per_seq < 1)
    return "block_tokens=" + std::to_string(p.block_tokens) + " max_blocks_per_seq=" +
           std::to_string(p.max_blocks_per_seq) + " (need >= 1)";
  if (p.num_tokens > 0 && (!p.q || !p.k || !p.v || !p.positions || !p.token_seq || !p.k_cache || !p.v_cache ||
                           !p.block_table))
    return "a null pointer (q, k, v, positions, token_seq, k_cache, v_cache, block_table must be set)";
  return "";
}

void launch_qk_norm_rope_kv(const QkNormRopeKvParams& p, cudaStream_t stream) {
  if (const auto why = qk_norm_rope_kv_unsupported_reason(p); !why.empty())
    throw InputError("qk_norm_rope_kv: unsupported parameters: " + why);
  if (p.num_tokens == 0) return;
  const auto grid = static_cast<unsigned>(p.num_tokens);
  if (p.head_dim == 64)
    kernels::detail::launch_kernel(p.pdl, qk_norm_rope_kv_kernel<64>, dim3(grid), dim3(kQkThreads), 0, stream, p);
  else
    kernels::detail::launch_kernel(p.pdl, qk_norm_rope_kv_kernel<128>, dim3(grid), dim3(kQkThreads), 0, stream, p);
  MIXSERVE_LAUNCH_CHECK("qk_norm_rope_kv_kernel");
}

void launch_gather_rows(const __nv_bfloat16* src, const int32_t* index, __nv_bfloat16* out, int64_t num_rows,
                        int64_t width, cudaStream_t stream) {
  if (num_rows < 0 || width < 1) throw InputError("gather_rows: num_rows >= 0 and width >= 1 required");
  if (num_rows == 0) return;
  gather_rows_kernel<<<static_cast<unsigned>(num_rows), 256, 0, stream>>>(src, index, out, width);
  MIXSERVE_LAUNCH_CHECK("gather_rows_kernel");
}

void launch_add_bias(__nv_bfloat16* x, const __nv_bfloat16* bias, int64_t num_rows, int64_t width,
                     cudaStream_t stream) {
  if (num_rows < 0 || width < 1) throw InputError("add_bias: num_rows >= 0 and width >= 1 required");
  if (num_rows == 0) return;
  const int64_t n = num_rows * width;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  add_bias_kernel<<<blocks, 256, 0, stream>>>(x, bias, num_rows, width);
  MIXSERVE_LAUNCH_CHECK("add_bias_kernel");
}

void launch_offset_ids(int32_t* ids, int64_t n, int32_t offset, cudaStream_t stream) {
  if (n < 0) throw InputError("offset_ids: n >= 0 required");
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 1024));
  offset_ids_kernel<<<blocks, 256, 0, stream>>>(ids, n, offset);
  MIXSERVE_LAUNCH_CHECK("offset_ids_kernel");
}

void launch_linear_fp32(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int64_t num_rows, int n,
                        int width, cudaStream_t stream) {
  if (num_rows < 0 || n < 1 || width < 1 || width > kLinearFp32MaxWidth)
    throw InputError("linear_fp32: num_rows=" + std::to_string(num_rows) + " n=" + std::to_string(n) +
                     " width=" + std::to_string(width) + " (need num_rows >= 0, n >= 1, 1 <= width <= " +
                     std::to_string(kLinearFp32MaxWidth) + ")");
  if (num_rows == 0) return;
  const std::size_t smem = std::size_t(width) * sizeof(float);
  if (smem > 48 * 1024)
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(linear_fp32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  linear_fp32_kernel<<<static_cast<unsigned>(num_rows), kLinearThreads, smem, stream>>>(x, w, out, n, width);
  MIXSERVE_LAUNCH_CHECK("linear_fp32_kernel");
}

}  // namespace mixserve::gpu
