// Grouped expert GEMM (tensor cores, device-side expert offsets): see grouped_gemm.cuh.
#include "mixserve/kernels/grouped_gemm.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {

constexpr int kThreads = 256;  // 8 warps: 2 (m) x 4 (n), each 64 x 32 of the tile
constexpr int kBM = kGroupedGemmTileM;
constexpr int kBN = kGroupedGemmTileN;
constexpr int kBK = 64;        // bf16 per smem row: 128 bytes = 8 chunks of 16 bytes
constexpr int kStages = 3;
constexpr int kChunks = kBK / 8;
constexpr int kStageElems = (kBM + kBN) * kBK;
constexpr std::size_t kSmemBytes = std::size_t(kStages) * kStageElems * sizeof(__nv_bfloat16);
constexpr int kExpertsPerThread = (kGroupedGemmMaxExperts + kThreads - 1) / kThreads;
static_assert(kBM * kChunks % kThreads == 0 && kBN * kChunks % kThreads == 0, "whole chunks per thread");
static_assert(kChunks == 8, "the XOR swizzle assumes 8 chunks per row");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Element offset of (row, 16-byte chunk) in a [rows, kBK] tile with the chunk XOR-swizzled by the
// row: the 8 rows an ldmatrix phase reads hit 8 different 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) << 3); }

__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_kernel(GroupedGemmParams p) {
  extern __shared__ __align__(128) __nv_bfloat16 smem[];  // [kStages][(kBM + kBN) * kBK]
  __shared__ int s_start[kGroupedGemmMaxExperts + 1];     // first flattened tile of each expert
  __shared__ int s_warp[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.num_experts;
  const int64_t n = p.n, k = p.k;
  const int n_tiles = static_cast<int>((n + kBN - 1) / kBN);
  const int k_tiles = static_cast<int>((k + kBK - 1) / kBK);

  // Tile prefix over the experts: thread t owns experts [t * kExpertsPerThread, +kExpertsPerThread).
  {
    int local[kExpertsPerThread];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kExpertsPerThread; ++i) {
      const int e = tid * kExpertsPerThread + i;
      int tiles = 0;
      if (e < E) {
        const int rows = max(0, p.expert_offsets[e + 1] - p.expert_offsets[e]);
        tiles = (rows + kBM - 1) / kBM * n_tiles;
      }
      local[i] = sum;
      sum += tiles;
    }
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < warp ? s_warp[w] : 0;
      total += s_warp[w];
    }
    const int excl = before + incl - sum;
#pragma unroll
    for (int i = 0; i < kExpertsPerThread; ++i) {
      const int e = tid * kExpertsPerThread + i;
      if (e < E) s_start[e] = excl + local[i];
    }
    if (tid == 0) s_start[E] = total;
    __syncthreads();
  }
  const int total_tiles = s_start[E];

  const int wm = warp >> 2, wn = warp & 3;  // warp's 64-row and 32-column slice of the tile
  const uint32_t smem_base = smem_u32(smem);

  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    // Expert of tile t: the last e with s_start[e] <= t (empty experts have no tiles).
    int lo = 0, hi = E - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s_start[mid] <= t) lo = mid;
      else hi = mid - 1;
    }
    const int e = lo;
    const int local_tile = t - s_start[e];
    const int m_tile = local_tile / n_tiles, n_tile = local_tile % n_tiles;
    const int64_t row0 = int64_t(p.expert_offsets[e]) + int64_t(m_tile) * kBM;
    const int64_t row_end = p.expert_offsets[e + 1];
    const int64_t n0 = int64_t(n_tile) * kBN;
    const __nv_bfloat16* w = p.weights + int64_t(e) * n * k;

    auto load_stage = [&](int stage, int kt) {
      const uint32_t sa = smem_base + uint32_t(stage * kStageElems) * 2u;
      const uint32_t sb = sa + uint32_t(kBM * kBK) * 2u;
      const int64_t kc0 = int64_t(kt) * kBK;
#pragma unroll
      for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
        const int idx = tid + i * kThreads, r = idx >> 3, ch = idx & 7;
        const int64_t gr = row0 + r, gk = kc0 + ch * 8;
        const bool ok = gr < row_end && gk < k;
        cp_async16(sa + uint32_t(swz(r, ch)) * 2u, ok ? p.act + gr * k + gk : p.act, ok ? 16 : 0);
      }
#pragma unroll
      for (int i = 0; i < kBN * kChunks / kThreads; ++i) {
        const int idx = tid + i * kThreads, r = idx >> 3, ch = idx & 7;
        const int64_t gn = n0 + r, gk = kc0 + ch * 8;
        const bool ok = gn < n && gk < k;
        cp_async16(sb + uint32_t(swz(r, ch)) * 2u, ok ? w + gn * k + gk : w, ok ? 16 : 0);
      }
    };

    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage kt landed for every thread; stage kt - 1 is no longer read
      const int nk = kt + kStages - 1;
      if (nk < k_tiles) load_stage(nk % kStages, nk);
      cp_async_commit();
      const int stage = kt % kStages;
      const uint32_t sa = smem_base + uint32_t(stage * kStageElems) * 2u;
      const uint32_t sb = sa + uint32_t(kBM * kBK) * 2u;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        uint32_t a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int r = wm * 64 + mi * 16 + (lane & 15), ch = ks * 2 + (lane >> 4);
          ldmatrix_x4(sa + uint32_t(swz(r, ch)) * 2u, a[mi]);
        }
#pragma unroll
        for (int pr = 0; pr < 2; ++pr) {
          const int r = wn * 32 + pr * 16 + ((lane >> 4) << 3) + (lane & 7), ch = ks * 2 + ((lane >> 3) & 1);
          uint32_t q[4];
          ldmatrix_x4(sb + uint32_t(swz(r, ch)) * 2u, q);
          b[2 * pr][0] = q[0];
          b[2 * pr][1] = q[1];
          b[2 * pr + 1][0] = q[2];
          b[2 * pr + 1][1] = q[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue overwrites the stages

    // Epilogue: fp32 accumulators -> bf16 pairs; rows past the expert and columns past n dropped.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      const int64_t r = row0 + wm * 64 + mi * 16 + (lane >> 2);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t c = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
        if (c >= n) continue;  // n is a multiple of 8, so c + 1 < n too
        if (r < row_end)
          *reinterpret_cast<__nv_bfloat162*>(p.out + r * n + c) = __floats2bfloat162_rn(acc[mi][ni][0], acc[mi][ni][1]);
        if (r + 8 < row_end)
          *reinterpret_cast<__nv_bfloat162*>(p.out + (r + 8) * n + c) =
              __floats2bfloat162_rn(acc[mi][ni][2], acc[mi][ni][3]);
      }
    }
  }
}

std::string check_params(const GroupedGemmParams& p) {
  if (p.num_experts < 1 || p.num_experts > kGroupedGemmMaxExperts)
    return "num_experts=" + std::to_string(p.num_experts) + " (legal: 1.." + std::to_string(kGroupedGemmMaxExperts) + ")";
  if (p.n < 1 || p.n % 8 != 0) return "n=" + std::to_string(p.n) + " (legal: a positive multiple of 8)";
  if (p.k < 1 || p.k % 8 != 0) return "k=" + std::to_string(p.k) + " (legal: a positive multiple of 8)";
  if (!p.act || !p.weights || !p.out || !p.expert_offsets) return "act, weights, out and expert_offsets must be set";
  if (!aligned16(p.act) || !aligned16(p.weights) || !aligned16(p.out))
    return "act, weights and out must be 16-byte aligned";
  return {};
}

}  // namespace

std::string grouped_gemm_unsupported_reason(const GroupedGemmParams& p, int device) {
  if (auto err = check_params(p); !err.empty()) return err;
  if (!detail::device_is_sm80_or_newer(device)) return "device " + std::to_string(device) + " is older than SM 8.0";
  return {};
}

void launch_grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("grouped_gemm: " + err);
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  // Per device, once: the dynamic shared-memory limit and the resident blocks per SM.
  constexpr int kMaxDevices = 64;
  static int grid_for[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) throw InputError("grouped_gemm: device index " + std::to_string(device) + " >= 64");
  if (grid_for[device] == 0) {
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(kSmemBytes)));
    int sms = 0, per_sm = 0;
    MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    MIXSERVE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grouped_gemm_kernel, kThreads, kSmemBytes));
    if (per_sm < 1) throw RuntimeError("grouped_gemm: the kernel does not fit on an SM of device " + std::to_string(device));
    grid_for[device] = sms * per_sm;
  }
  grouped_gemm_kernel<<<grid_for[device], kThreads, kSmemBytes, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("grouped_gemm_kernel");
}

}  // namespace mixserve::kernels
