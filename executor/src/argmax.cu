// Row argmax over bf16 logits (argmax.hpp).
#include "mixserve/gpu/argmax.hpp"

#include <climits>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {
namespace {

constexpr int kThreads = 256;

// (value, index) pairs: a beats b when its value is larger, or equal with a lower index. NaN
// values never win (every comparison with NaN is false), matching std::max_element started at
// a non-NaN element.
struct Best {
  float v;
  int32_t i;
};

__device__ __forceinline__ bool better(float va, int32_t ia, float vb, int32_t ib) {
  return va > vb || (va == vb && ia < ib) || (vb != vb && va == va);
}

__global__ void argmax_rows_kernel(const __nv_bfloat16* __restrict__ logits, int32_t vocab,
                                   int32_t* __restrict__ out) {
  const __nv_bfloat16* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  float bv = __int_as_float(0x7fc00000);  // NaN: loses to any number
  int32_t bi = INT32_MAX;
  for (int32_t j = threadIdx.x; j < vocab; j += kThreads) {
    const float v = __bfloat162float(row[j]);
    if (better(v, j, bv, bi)) {
      bv = v;
      bi = j;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __shared__ float sv[kThreads / 32];
  __shared__ int32_t si[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w)
      if (better(sv[w], si[w], bv, bi)) {
        bv = sv[w];
        bi = si[w];
      }
    out[blockIdx.x] = bi == INT32_MAX ? 0 : bi;  // an all-NaN row: index 0 (as std::max_element)
  }
}

}  // namespace

void launch_argmax_rows(const __nv_bfloat16* logits, int64_t rows, int64_t vocab, int32_t* out,
                        cudaStream_t stream) {
  if (rows < 0 || vocab < 1 || vocab > INT32_MAX)
    throw InputError("argmax_rows: rows=" + std::to_string(rows) + " vocab=" + std::to_string(vocab) +
                     " (need rows >= 0, 1 <= vocab <= INT32_MAX)");
  if (rows == 0) return;
  argmax_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, static_cast<int32_t>(vocab),
                                                                          out);
  MIXSERVE_LAUNCH_CHECK("argmax_rows_kernel");
}

}  // namespace mixserve::gpu
