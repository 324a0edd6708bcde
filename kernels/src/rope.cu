#include "mixserve/kernels/rope.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {

namespace {
constexpr int kThreads = 128;

// One block per token. No template arguments: the head and rotary sizes are loop bounds, so there
// is nothing to dispatch on (every legal head_dim / rotary_dim runs the same code).
static __global__ void __launch_bounds__(kThreads) rope_kernel(RopeParams p) {
  __shared__ float s_cos[kRopeMaxHeadDim / 2], s_sin[kRopeMaxHeadDim / 2];  // [rotary_dim / 2]
  const int64_t t = blockIdx.x;
  const int half = p.rotary_dim / 2;
  const double pos = double(p.positions[t]);
  for (int i = threadIdx.x; i < half; i += kThreads) {
    const double inv_freq = pow(double(p.theta), -2.0 * double(i) / double(p.rotary_dim));
    double s, c;
    sincos(pos * inv_freq, &s, &c);
    s_cos[i] = float(c);
    s_sin[i] = float(s);
  }
  __syncthreads();
  const int num_heads = p.num_q_heads + (p.k ? p.num_kv_heads : 0);
  const int pairs = num_heads * half;
  for (int idx = threadIdx.x; idx < pairs; idx += kThreads) {
    const int h = idx / half, i = idx - h * half;
    __nv_bfloat16* v = h < p.num_q_heads ? p.q + t * p.q_token_stride + int64_t(h) * p.head_dim
                                         : p.k + t * p.k_token_stride + int64_t(h - p.num_q_heads) * p.head_dim;
    const float x1 = __bfloat162float(v[i]), x2 = __bfloat162float(v[i + half]);
    v[i] = __float2bfloat16_rn(x1 * s_cos[i] - x2 * s_sin[i]);
    v[i + half] = __float2bfloat16_rn(x2 * s_cos[i] + x1 * s_sin[i]);
  }
}

std::string check_params(const RopeParams& p) {
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff)
    return "num_tokens=" + std::to_string(p.num_tokens) + " (legal: 0..2^31-1)";
  if (p.head_dim < 1 || p.head_dim > kRopeMaxHeadDim)
    return "head_dim=" + std::to_string(p.head_dim) + " (legal: 1.." + std::to_string(kRopeMaxHeadDim) + ")";
  if (p.rotary_dim < 2 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0)
    return "rotary_dim=" + std::to_string(p.rotary_dim) + " (legal: even, 2..head_dim=" + std::to_string(p.head_dim) + ")";
  if (p.num_q_heads < 1) return "num_q_heads=" + std::to_string(p.num_q_heads) + " (need >= 1)";
  if (p.num_kv_heads < 0 || (p.k && p.num_kv_heads < 1))
    return "num_kv_heads=" + std::to_string(p.num_kv_heads) + " (need >= 1 when k is set, >= 0 otherwise)";
  if (!(p.theta > 1.0f)) return "theta=" + std::to_string(p.theta) + " (need > 1)";
  if (p.q_token_stride != 0 && p.q_token_stride < int64_t(p.num_q_heads) * p.head_dim)
    return "q_token_stride=" + std::to_string(p.q_token_stride) + " (legal: 0 or >= num_q_heads * head_dim)";
  if (p.k && p.k_token_stride != 0 && p.k_token_stride < int64_t(p.num_kv_heads) * p.head_dim)
    return "k_token_stride=" + std::to_string(p.k_token_stride) + " (legal: 0 or >= num_kv_heads * head_dim)";
  if (p.num_tokens > 0 && (!p.q || !p.positions)) return "q and positions must be set";
  return {};
}
}  // namespace

bool is_supported(const RopeParams& p, int device) {
  if (!check_params(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_rope(const RopeParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("rope: " + err);
  if (p.num_tokens == 0) return;
  RopeParams q = p;
  if (q.q_token_stride == 0) q.q_token_stride = int64_t(q.num_q_heads) * q.head_dim;
  if (q.k_token_stride == 0) q.k_token_stride = int64_t(q.num_kv_heads) * q.head_dim;
  rope_kernel<<<static_cast<unsigned>(q.num_tokens), kThreads, 0, stream>>>(q);
  MIXSERVE_LAUNCH_CHECK("rope_kernel");
}

}  // namespace mixserve::kernels
