#include "mixserve/kernels/kv_cache.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {
constexpr int kThreads = 256;
constexpr int kVec = 8;  // bf16 per 16-byte vector
static_assert(kVec * sizeof(__nv_bfloat16) == 16, "one vector must be 16 bytes");

// One thread per 16-byte vector of a (token, kv head) row of K and of V.
template <int kBlockTokens>
static __global__ void kv_write_kernel(KvWriteParams p) {
  const int vec_per_row = p.cache.head_dim / kVec;
  const int64_t vec_per_token = int64_t(p.cache.kv_heads) * vec_per_row;
  const int64_t total = p.num_tokens * vec_per_token;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / vec_per_token;
    const int64_t within = i - t * vec_per_token;  // kv_head * vec_per_row + vec
    const int pos = p.token_pos[t];
    if (pos < 0) continue;
    const int seq = p.token_seq[t];
    const int64_t block = p.cache.block_table[int64_t(seq) * p.cache.max_blocks_per_seq + pos / kBlockTokens];
    const int slot = pos % kBlockTokens;
    // [num_blocks, block_tokens, kv_heads, head_dim] in 16-byte vectors
    const int64_t dst = (block * kBlockTokens + slot) * vec_per_token + within;
    reinterpret_cast<uint4*>(p.cache.k)[dst] = reinterpret_cast<const uint4*>(p.k_new)[i];
    reinterpret_cast<uint4*>(p.cache.v)[dst] = reinterpret_cast<const uint4*>(p.v_new)[i];
  }
}


// "" when supported, else why not (device checks left to is_supported).
std::string unsupported_reason(const KvWriteParams& p) {
  const auto& c = p.cache;
  if (p.num_tokens < 0) return "num_tokens=" + std::to_string(p.num_tokens) + " (need >= 0)";
  if (std::find(kKvBlockTokens.begin(), kKvBlockTokens.end(), c.block_tokens) == kKvBlockTokens.end())
    return "block_tokens=" + std::to_string(c.block_tokens) + " (legal: 8, 16, 32)";
  if (c.head_dim <= 0 || c.head_dim % kVec != 0)
    return "head_dim=" + std::to_string(c.head_dim) + " (need a positive multiple of 8)";
  if (c.kv_heads <= 0) return "kv_heads=" + std::to_string(c.kv_heads) + " (need > 0)";
  if (p.num_tokens == 0) return "";
  if (!c.k || !c.v || !c.block_table || !p.k_new || !p.v_new || !p.token_seq || !p.token_pos)
    return "a null pointer (k, v, block_table, k_new, v_new, token_seq, token_pos must be set)";
  if (!aligned16(c.k) || !aligned16(c.v) || !aligned16(p.k_new) || !aligned16(p.v_new))
    return "a K/V buffer not 16-byte aligned";
  if (c.max_blocks_per_seq <= 0 || c.num_blocks <= 0)
    return "max_blocks_per_seq=" + std::to_string(c.max_blocks_per_seq) +
           " num_blocks=" + std::to_string(c.num_blocks) + " (need > 0)";
  return "";
}
}  // namespace

bool is_supported(const KvWriteParams& p, int device) {
  if (!unsupported_reason(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_kv_write(const KvWriteParams& p, cudaStream_t stream) {
  const std::string why = unsupported_reason(p);
  if (!why.empty()) throw InputError("kv_write: unsupported parameters: " + why);
  if (p.num_tokens == 0) return;
  int device = 0, sms = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t work = p.num_tokens * p.cache.kv_heads * (p.cache.head_dim / kVec);
  const auto blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * 16)));
  // The one dispatch over block_tokens (legal values: kKvBlockTokens).
  switch (p.cache.block_tokens) {
    case 8: kv_write_kernel<8><<<blocks, kThreads, 0, stream>>>(p); break;
    case 16: kv_write_kernel<16><<<blocks, kThreads, 0, stream>>>(p); break;
    case 32: kv_write_kernel<32><<<blocks, kThreads, 0, stream>>>(p); break;
    default: throw InputError("kv_write: block_tokens=" + std::to_string(p.cache.block_tokens) + " (legal: 8, 16, 32)");
  }
  MIXSERVE_LAUNCH_CHECK("kv_write_kernel");
}

}  // namespace mixserve::kernels
