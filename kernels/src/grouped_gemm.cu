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
constexpr std::size_t kSmemBytes = std::size_t(kStages) * kStageElems * sizeof(__nv_bfloat16) + 1024;
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

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MIXSERVE_GG_WGMMA 1
#else
#define MIXSERVE_GG_WGMMA 0
#endif

// wgmma shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle layout above
// (8-row groups of 1024 bytes, chunk XOR row): start >> 4, leading offset 1 (unused for this
// layout), stride offset 1024 >> 4, swizzle mode 1 (128 B). The tile base must be 1024-aligned.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr) {
  uint64_t d = 0;
  d |= uint64_t((smem_addr & 0x3FFFF) >> 4);
  d |= uint64_t(1) << 16;
  d |= uint64_t(1024 >> 4) << 32;
  d |= uint64_t(1) << 62;
  return d;
}

// d[64] += A (64 x 16, smem) * B (128 x 16, smem, K-major), fp32 accumulators in the m64n128
// fragment layout: d[4 i + {0, 1}] at (row 16 warp + lane / 4, col 8 i + 2 (lane % 4) + {0, 1}),
// d[4 i + {2, 3}] eight rows further.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db) {
#if MIXSERVE_GG_WGMMA
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db));
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if MIXSERVE_GG_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MIXSERVE_GG_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait0() {
#if MIXSERVE_GG_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {
#if MIXSERVE_GG_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Prefix of output tiles over the experts (s_start[e]: the first flattened tile of expert e;
// s_start[E]: the total), from the device offsets. Thread t owns experts
// [t * kExpertsPerThread, +kExpertsPerThread); a warp scan and a pass over the warp totals.
__device__ int tile_prefix(const GroupedGemmParams& p, int bm, int n_tiles, int* s_start, int* s_warp) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, E = p.num_experts;
  {
    int local[kExpertsPerThread];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kExpertsPerThread; ++i) {
      const int e = tid * kExpertsPerThread + i;
      int tiles = 0;
      if (e < E) {
        const int rows = max(0, p.expert_offsets[e + 1] - p.expert_offsets[e]);
        tiles = (rows + bm - 1) / bm * n_tiles;
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
  return s_start[E];
}

// Expert of flattened tile t: the last e with s_start[e] <= t (empty experts own no tiles).
__device__ __forceinline__ int tile_expert(const int* s_start, int E, int t) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s_start[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <bool kWgmma>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_kernel(GroupedGemmParams p) {
  extern __shared__ __align__(1024) __nv_bfloat16 smem[];  // [kStages][(kBM + kBN) * kBK], + 1 KB to align
  if constexpr (kWgmma && !MIXSERVE_GG_WGMMA) {
    __trap();  // the host launches the wgmma kernel only where it was compiled (sm_90a)
  }
  __shared__ int s_start[kGroupedGemmMaxExperts + 1];     // first flattened tile of each expert
  __shared__ int s_warp[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.num_experts;
  const int64_t n = p.n, k = p.k;
  const int n_tiles = static_cast<int>((n + kBN - 1) / kBN);
  const int k_tiles = static_cast<int>((k + kBK - 1) / kBK);

  const int total_tiles = tile_prefix(p, kBM, n_tiles, s_start, s_warp);

  const int wm = warp >> 2, wn = warp & 3;  // warp's 64-row and 32-column slice of the tile
  const uint32_t smem_base = (smem_u32(smem) + 1023u) & ~1023u;  // wgmma's swizzle needs 1024-aligned tiles

  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const int e = tile_expert(s_start, E, t);
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

    if constexpr (!kWgmma) {
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
    } else {
      // Warpgroup wg computes rows [64 wg, 64 wg + 64) x all 128 columns with wgmma m64n128k16,
      // A and B read by the tensor cores straight from the swizzled stages.
      const int wg = warp >> 2;
      float d[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) d[i] = 0.0f;
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
      }
      for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kStages - 2>();
        fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
        __syncthreads();
        const int nk = kt + kStages - 1;
        if (nk < k_tiles) load_stage(nk % kStages, nk);
        cp_async_commit();
        const int stage = kt % kStages;
        const uint32_t sa = smem_base + uint32_t(stage * kStageElems) * 2u + uint32_t(wg * 64 * kBK) * 2u;
        const uint32_t sb = smem_base + uint32_t(stage * kStageElems) * 2u + uint32_t(kBM * kBK) * 2u;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBK / 16; ++ks)
          wgmma_m64n128k16(d, wgmma_desc(sa + uint32_t(ks) * 32u), wgmma_desc(sb + uint32_t(ks) * 32u));
        wgmma_commit();
        wgmma_wait0();  // the stage is free for the next prefetch once every warpgroup is past the barrier
      }
      cp_async_wait<0>();
      __syncthreads();

      const int64_t r = row0 + wg * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int64_t c = n0 + i * 8 + (lane & 3) * 2;
        if (c >= n) continue;
        if (r < row_end)
          *reinterpret_cast<__nv_bfloat162*>(p.out + r * n + c) = __floats2bfloat162_rn(d[4 * i], d[4 * i + 1]);
        if (r + 8 < row_end)
          *reinterpret_cast<__nv_bfloat162*>(p.out + (r + 8) * n + c) =
              __floats2bfloat162_rn(d[4 * i + 2], d[4 * i + 3]);
      }
    }
  }
}

// d[128] += A (64 x 16) * B (256 x 16, K-major), both from shared memory; the m64n256 fragment
// layout (as m64n128's, with 32 column groups of 8).
#if MIXSERVE_GG_WGMMA
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db));
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
#endif

// The wide wgmma tile: 128 x 256, two warpgroups of 64 x 256 (m64n256k16, 128 fp32 accumulators
// per thread), one block per SM, 4 stages of 48 KB with loads issued two k-tiles ahead and one
// wgmma batch left in flight (wait_group 1): the stage a prefetch overwrites was read by the
// batch of two k-tiles back, which every warpgroup has retired before the barrier.
constexpr int kBNW = 256;
constexpr int kStagesW = 4;
constexpr int kStageElemsW = (kBM + kBNW) * kBK;
constexpr std::size_t kSmemBytesW = std::size_t(kStagesW) * kStageElemsW * sizeof(__nv_bfloat16) + 1024;
static_assert(kStageElemsW * 2 % 1024 == 0, "stages must stay 1024-aligned");

__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_wide_kernel(GroupedGemmParams p) {
  extern __shared__ __align__(1024) __nv_bfloat16 smem[];
#if MIXSERVE_GG_WGMMA
  __shared__ int s_start[kGroupedGemmMaxExperts + 1];
  __shared__ int s_warp[kThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = p.num_experts;
  const int64_t n = p.n, k = p.k;
  const int n_tiles = static_cast<int>((n + kBNW - 1) / kBNW);
  const int k_tiles = static_cast<int>((k + kBK - 1) / kBK);
  const int total_tiles = tile_prefix(p, kBM, n_tiles, s_start, s_warp);
  const uint32_t smem_base = (smem_u32(smem) + 1023u) & ~1023u;
  const int wg = warp >> 2;

  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const int e = tile_expert(s_start, E, t);
    const int local_tile = t - s_start[e];
    const int m_tile = local_tile / n_tiles, n_tile = local_tile % n_tiles;
    const int64_t row0 = int64_t(p.expert_offsets[e]) + int64_t(m_tile) * kBM;
    const int64_t row_end = p.expert_offsets[e + 1];
    const int64_t n0 = int64_t(n_tile) * kBNW;
    const __nv_bfloat16* w = p.weights + int64_t(e) * n * k;

    auto load_stage = [&](int stage, int kt) {
      const uint32_t sa = smem_base + uint32_t(stage * kStageElemsW) * 2u;
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
      for (int i = 0; i < kBNW * kChunks / kThreads; ++i) {
        const int idx = tid + i * kThreads, r = idx >> 3, ch = idx & 7;
        const int64_t gn = n0 + r, gk = kc0 + ch * 8;
        const bool ok = gn < n && gk < k;
        cp_async16(sb + uint32_t(swz(r, ch)) * 2u, ok ? w + gn * k + gk : w, ok ? 16 : 0);
      }
    };

    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.0f;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (s < k_tiles) load_stage(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<1>();   // k-tile kt landed (kt + 1 may still be in flight)
      fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
      __syncthreads();      // ... for every thread; and every warpgroup retired batch kt - 2
      if (kt + 2 < k_tiles) load_stage((kt + 2) % kStagesW, kt + 2);
      cp_async_commit();
      const uint32_t st = smem_base + uint32_t((kt % kStagesW) * kStageElemsW) * 2u;
      const uint32_t sa = st + uint32_t(wg * 64 * kBK) * 2u;
      const uint32_t sb = st + uint32_t(kBM * kBK) * 2u;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks)
        wgmma_m64n256k16(d, wgmma_desc(sa + uint32_t(ks) * 32u), wgmma_desc(sb + uint32_t(ks) * 32u));
      wgmma_commit();
      wgmma_wait<1>();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue overwrites the stages

    const int64_t r = row0 + wg * 64 + (warp & 3) * 16 + (lane >> 2);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int64_t c = n0 + i * 8 + (lane & 3) * 2;
      if (c >= n) continue;
      if (r < row_end)
        *reinterpret_cast<__nv_bfloat162*>(p.out + r * n + c) = __floats2bfloat162_rn(d[4 * i], d[4 * i + 1]);
      if (r + 8 < row_end)
        *reinterpret_cast<__nv_bfloat162*>(p.out + (r + 8) * n + c) = __floats2bfloat162_rn(d[4 * i + 2], d[4 * i + 3]);
    }
  }
#else
  __trap();  // launched only where compiled for sm_90a
#endif
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

// Per device, once: the dynamic shared-memory limit, the resident blocks per SM of each
// implementation and whether the wgmma kernel was compiled for it (its PTX is sm_90a's).
struct DeviceInfo {
  bool ready = false;
  bool has_wgmma = false;
  int grid_mma = 0, grid_wgmma = 0, grid_wide = 0;
};
constexpr int kMaxDevices = 64;

const DeviceInfo& device_info(int device) {
  static DeviceInfo info[kMaxDevices];
  if (device < 0 || device >= kMaxDevices)
    throw InputError("grouped_gemm: device index " + std::to_string(device) + " (legal: 0..63)");
  DeviceInfo& d = info[device];
  if (d.ready) return d;
  int sms = 0, major = 0, minor = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  auto grid = [&](auto kernel, std::size_t smem_bytes = kSmemBytes) {
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
    int per_sm = 0;
    MIXSERVE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes));
    if (per_sm < 1) throw RuntimeError("grouped_gemm: the kernel does not fit on an SM of device " + std::to_string(device));
    return sms * per_sm;
  };
  d.grid_mma = grid(grouped_gemm_kernel<false>);
  if (major == 9 && minor == 0) {
    cudaFuncAttributes fa{};
    MIXSERVE_CUDA_CHECK(cudaFuncGetAttributes(&fa, grouped_gemm_kernel<true>));
    d.has_wgmma = fa.ptxVersion >= 90;
    if (d.has_wgmma) {
      d.grid_wgmma = grid(grouped_gemm_kernel<true>);
      d.grid_wide = grid(grouped_gemm_wide_kernel, kSmemBytesW);
    }
  }
  d.ready = true;
  return d;
}

}  // namespace

std::string grouped_gemm_unsupported_reason(const GroupedGemmParams& p, int device) {
  if (auto err = check_params(p); !err.empty()) return err;
  if (!detail::device_is_sm80_or_newer(device)) return "device " + std::to_string(device) + " is older than SM 8.0";
  if ((p.impl == GroupedGemmImpl::wgmma || p.impl == GroupedGemmImpl::wgmma_wide) && !device_info(device).has_wgmma)
    return "impl=wgmma needs an sm_90a build on an SM 9.0 device (legal here: automatic, mma_sync)";
  return {};
}

void launch_grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream) {
  if (const auto err = check_params(p); !err.empty()) throw InputError("grouped_gemm: " + err);
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  const DeviceInfo& d = device_info(device);
  GroupedGemmImpl impl = p.impl;
  if (impl == GroupedGemmImpl::automatic) impl = d.has_wgmma ? GroupedGemmImpl::wgmma_wide : GroupedGemmImpl::mma_sync;
  if (impl != GroupedGemmImpl::mma_sync && !d.has_wgmma)
    throw InputError("grouped_gemm: impl=wgmma needs an sm_90a build on an SM 9.0 device (legal here: automatic, mma_sync)");
  if (impl == GroupedGemmImpl::wgmma_wide) {
    grouped_gemm_wide_kernel<<<d.grid_wide, kThreads, kSmemBytesW, stream>>>(p);
  } else if (impl == GroupedGemmImpl::wgmma) {
    grouped_gemm_kernel<true><<<d.grid_wgmma, kThreads, kSmemBytes, stream>>>(p);
  } else {
    grouped_gemm_kernel<false><<<d.grid_mma, kThreads, kSmemBytes, stream>>>(p);
  }
  MIXSERVE_LAUNCH_CHECK("grouped_gemm_kernel");
}

}  // namespace mixserve::kernels
