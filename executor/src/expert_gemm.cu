// Bandwidth-oriented GEMV / skinny GEMM, plain and grouped over device-side expert offsets: see
// expert_gemm.hpp.
#include "mixserve/gpu/expert_gemm.hpp"

#include <algorithm>
#include <type_traits>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

namespace mixserve::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Static shared memory of the by_column kernel (its s_rows), counted against the opt-in limit.
constexpr int64_t kByColumnStaticSmem = 3 * sizeof(int);

struct GemvArgs {
  const __nv_bfloat16* act;
  const __nv_bfloat16* weights;
  const __nv_bfloat16* bias;
  void* out[kGemvMaxSegments];
  int64_t width[kGemvMaxSegments];
  int64_t n, k;
  int64_t num_rows;                // plain
  const int32_t* expert_offsets;   // grouped when set
  int num_experts;
  bool offsets_early;              // grouped: the offsets may be read before the wait
};

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 t = __bfloat1622float2(h[q]);
    f[2 * q] = t.x;
    f[2 * q + 1] = t.y;
  }
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

template <int C, int R, int L, bool kF32, bool kSwiglu>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvArgs a) {
  constexpr int U = L / C;          // vectors along k per column per batch of loads
  extern __shared__ uint4 smem[];   // [R, k / 8] activation rows
  __shared__ int s_rows[3];              // expert, first row, end row
  static_assert(int64_t(sizeof(s_rows)) == kByColumnStaticSmem, "the row tile counts it");
  // Before the wait on the previous kernel only what it does not write is read: the block's rows
  // for a plain GEMV, the expert offsets when the launcher says they were written earlier
  // (offsets_early); then this warp's weight columns are prefetched into L2 so that, under a
  // programmatic launch, their stream overlaps the previous kernel's tail.
  const bool early = !a.expert_offsets || a.offsets_early;
  if (!early) kernels::detail::wait_for_previous_kernel();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (a.expert_offsets) {
    // The blockIdx.y-th expert with rows (in expert order); none: the block has nothing to do.
    if (warp == 0) {
      const int slot = static_cast<int>(blockIdx.y);
      int seen = 0, found = -1;
      for (int base = 0; base < a.num_experts; base += 32) {
        const int e = base + lane;
        const bool has = e < a.num_experts && a.expert_offsets[e + 1] > a.expert_offsets[e];
        unsigned m = __ballot_sync(0xffffffffu, has);
        const int cnt = __popc(m);
        if (slot < seen + cnt) {
          for (int i = 0; i < slot - seen; ++i) m &= m - 1;  // drop the lower set bits
          found = base + __ffs(m) - 1;
          break;
        }
        seen += cnt;
      }
      if (lane == 0) {
        s_rows[0] = found;
        s_rows[1] = found >= 0 ? a.expert_offsets[found] : 0;
        s_rows[2] = found >= 0 ? a.expert_offsets[found + 1] : 0;
      }
    }
  } else if (threadIdx.x == 0) {
    s_rows[0] = 0;
    s_rows[1] = static_cast<int>(blockIdx.y) * R;
    s_rows[2] = static_cast<int>(imin64(a.num_rows, int64_t(blockIdx.y + 1) * R));
  }
  __syncthreads();
  const int e = s_rows[0], row_begin = s_rows[1], row_end = s_rows[2];
  if (early) {
    const int64_t col = int64_t(blockIdx.x) * (kWarps * C) + int64_t(warp) * C + lane;
    const bool first = a.expert_offsets || blockIdx.y == 0;  // plain: one row chunk prefetches
    if (first && e >= 0 && row_end > row_begin && lane < C && col < a.n)
      kernels::detail::prefetch_l2(a.weights + (int64_t(e) * a.n + col) * a.k, static_cast<unsigned>(a.k * 2));
    kernels::detail::wait_for_previous_kernel();
  }
  kernels::detail::allow_next_kernel();
  if (e < 0 || row_end <= row_begin) return;  // uniform over the block
  const int64_t kv = a.k / 8;
  const __nv_bfloat16* w = a.weights + int64_t(e) * a.n * a.k;
  const int64_t col0 = int64_t(blockIdx.x) * (kWarps * C) + int64_t(warp) * C;
  const uint4* wp[C];
#pragma unroll
  for (int c = 0; c < C; ++c) wp[c] = reinterpret_cast<const uint4*>(w + imin64(col0 + c, a.n - 1) * a.k);
  for (int r0 = row_begin; r0 < row_end; r0 += R) {
    const int nr = min(R, row_end - r0);
    __syncthreads();  // the previous chunk's readers are done
    if constexpr (kSwiglu) {  // act is gate | up [rows, 2k]: stage bf16(silu(gate) * up) (swiglu.cuh)
      const uint4* src = reinterpret_cast<const uint4*>(a.act + int64_t(r0) * 2 * a.k);
      for (int64_t i = threadIdx.x; i < int64_t(nr) * kv; i += kThreads) {
        const int64_t r = i / kv, v = i - r * kv;
        const uint4 g = src[r * 2 * kv + v], u = src[r * 2 * kv + kv + v];
        const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
        const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
        uint4 o;
        auto* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 gf = __bfloat1622float2(g2[j]), uf = __bfloat1622float2(u2[j]);
          o2[j] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
        }
        smem[i] = o;
      }
    } else {
      const uint4* src = reinterpret_cast<const uint4*>(a.act + int64_t(r0) * a.k);
      for (int64_t i = threadIdx.x; i < int64_t(nr) * kv; i += kThreads) smem[i] = src[i];
    }
    __syncthreads();
    if (col0 >= a.n) continue;  // this warp's columns are past n (still takes part in the syncs)
    float acc[R][C];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
    for (int64_t v0 = lane; v0 < kv; v0 += 32 * U) {
      uint4 wv[U][C];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int c = 0; c < C; ++c)
          wv[u][c] = v0 + 32 * u < kv ? __ldcs(wp[c] + v0 + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + 32 * u;
        if (v >= kv) break;
        float wf[C][8];
#pragma unroll
        for (int c = 0; c < C; ++c) bf16x8_to_float(wv[u][c], wf[c]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r < nr) {
            float af[8];
            bf16x8_to_float(smem[r * kv + v], af);
#pragma unroll
            for (int c = 0; c < C; ++c)
#pragma unroll
              for (int q = 0; q < 8; ++q) acc[r][c] = fmaf(wf[c][q], af[q], acc[r][c]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc[r][c] += __shfl_xor_sync(0xffffffffu, acc[r][c], o);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t col = col0 + c;
        if (lane != (r * C + c) % 32 || r >= nr || col >= a.n) continue;
        float val = acc[r][c];
        if (a.bias) val += __bfloat162float(a.bias[col]);
        int s = 0;
        int64_t lc = col;
        while (s + 1 < kGemvMaxSegments && lc >= a.width[s]) lc -= a.width[s++];
        const int64_t idx = int64_t(r0 + r) * a.width[s] + lc;
        if constexpr (kF32)
          static_cast<float*>(a.out[s])[idx] = val;
        else
          static_cast<__nv_bfloat16*>(a.out[s])[idx] = __float2bfloat16(val);
      }
  }
}

// ---- GemvKernel::balanced (expert_gemm.hpp) ----
// Columns per block tile; the warps' per-column partials for a tile live in shared memory as
// float [kWarps][R][kBalTileCols].
constexpr int kBalTileCols = 64;

// L2 policy for the weights: evict first (each weight byte is read once per step, and should not
// push the KV cache or the activations out of L2).
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// One 16-byte weight load: non-coherent (nothing writes the weights during the kernel), not
// allocated in L1, with the L2 policy above and a 256-byte L2 fetch (a warp reads 512 contiguous
// bytes). volatile keeps the loads of a batch issued together, ahead of their first use.
__device__ __forceinline__ uint4 ld_weight(const uint4* p, uint64_t policy) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(policy));
  return v;
}

// 8 bf16 (one 16-byte vector, element 0 in the low half of the first word) to fp32, exactly.
__device__ __forceinline__ void bf16x8_bits_to_float(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = __uint_as_float(w[q] << 16);
    f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
  }
}

// Number of experts with rows; called by every lane of a warp (all get the count).
__device__ __forceinline__ int count_active_experts(const int32_t* off, int num_experts, int lane) {
  int n = 0;
  for (int base = 0; base < num_experts; base += 32) {
    const int e = base + lane;
    n += __popc(__ballot_sync(0xffffffffu, e < num_experts && off[e + 1] > off[e]));
  }
  return n;
}

// The slot-th expert with rows, in expert order (-1 if there are fewer); every lane of a warp calls
// it and gets the answer.
__device__ __forceinline__ int nth_active_expert(const int32_t* off, int num_experts, int64_t slot, int lane) {
  int64_t seen = 0;
  for (int base = 0; base < num_experts; base += 32) {
    const int e = base + lane;
    unsigned m = __ballot_sync(0xffffffffu, e < num_experts && off[e + 1] > off[e]);
    const int cnt = __popc(m);
    if (slot < seen + cnt) {
      for (int64_t i = 0; i < slot - seen; ++i) m &= m - 1;  // drop the lower set bits
      return base + __ffs(m) - 1;
    }
    seen += cnt;
  }
  return -1;
}

// out[rows, cols] over "slots": grouped, the experts with rows (their rows may exceed R: chunks of R,
// the weights re-read from L2); plain, the chunks of R rows of one weight matrix. All slots' columns
// form one list of slots * n; block b takes [total * b / grid, total * (b + 1) / grid).
template <int R, int L, bool kF32, bool kSwiglu>
__global__ void __launch_bounds__(kThreads, 2) gemv_balanced_kernel(GemvArgs a) {
  extern __shared__ uint4 smem[];  // [R, k / 8] staged rows, then float [kWarps][R][kBalTileCols]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kv = static_cast<int>(a.k / 8);  // 16-byte vectors per column, <= kGroupedGemvMaxK / 8 = 4096
  const int spc = (kv + 31) / 32;            // 512-byte segments per column (the last may be partial)
  float* part = reinterpret_cast<float*>(smem + R * kv);
  const bool grouped = a.expert_offsets != nullptr;
  // Before the wait on the previous kernel only what it does not write is read: nothing for a plain
  // GEMV, the expert offsets when the launcher says they were written earlier (offsets_early).
  const bool early = !grouped || a.offsets_early;
  if (!early) kernels::detail::wait_for_previous_kernel();
  const int64_t slots =
      grouped ? count_active_experts(a.expert_offsets, a.num_experts, lane) : (a.num_rows + R - 1) / R;
  const int64_t total = slots * a.n;
  const int64_t cb = total * blockIdx.x / gridDim.x, ce = total * (blockIdx.x + 1) / gridDim.x;
  if (early) {
    // This block's weight columns into L2 (plain: the first row chunk's blocks only, the others
    // read the same columns), so that their stream overlaps the previous kernel's tail.
    for (int64_t c = cb; c < ce;) {
      const int64_t slot = c / a.n, pe = imin64(ce, (slot + 1) * a.n);
      if (grouped || slot == 0) {
        const int e = grouped ? nth_active_expert(a.expert_offsets, a.num_experts, slot, lane) : 0;
        for (int64_t j = c + threadIdx.x; j < pe; j += kThreads)
          kernels::detail::prefetch_l2(a.weights + (int64_t(e) * a.n + (j - slot * a.n)) * a.k,
                                       static_cast<unsigned>(a.k * 2));
      }
      c = pe;
    }
    kernels::detail::wait_for_previous_kernel();
  }
  kernels::detail::allow_next_kernel();
  const uint64_t policy = evict_first_policy();
  for (int64_t c = cb; c < ce;) {  // pieces of the range within one slot
    const int64_t slot = c / a.n, slot_col0 = slot * a.n, pe = imin64(ce, slot_col0 + a.n);
    int e = 0, row_begin, row_end;
    if (grouped) {
      e = nth_active_expert(a.expert_offsets, a.num_experts, slot, lane);
      row_begin = a.expert_offsets[e];
      row_end = a.expert_offsets[e + 1];
    } else {
      row_begin = static_cast<int>(slot * R);
      row_end = static_cast<int>(imin64(a.num_rows, slot * R + R));
    }
    const uint4* w = reinterpret_cast<const uint4*>(a.weights + int64_t(e) * a.n * a.k);
    for (int64_t t0 = c - slot_col0; t0 < pe - slot_col0; t0 += kBalTileCols) {
      const int nct = static_cast<int>(imin64(kBalTileCols, pe - slot_col0 - t0));  // columns of this tile
      const uint4* wt = w + t0 * kv;  // [nct, kv], contiguous
      for (int r0 = row_begin; r0 < row_end; r0 += R) {
        const int nr = min(R, row_end - r0);
        __syncthreads();  // the previous tile's readers of the rows and partials are done
        for (int i = threadIdx.x; i < kWarps * R * kBalTileCols; i += kThreads) part[i] = 0.0f;
        // Stage the rows; rows nr..R-1 of the tile are zero (multiplied, never written out).
        for (int i = threadIdx.x; i < R * kv; i += kThreads) {
          const int r = i / kv, v = i - r * kv;
          uint4 o = make_uint4(0, 0, 0, 0);
          if (r < nr) {
            if constexpr (kSwiglu) {  // act is gate | up [rows, 2k]: bf16(silu(gate) * up) (swiglu.cuh)
              const uint4* src = reinterpret_cast<const uint4*>(a.act + int64_t(r0 + r) * 2 * a.k);
              const uint4 g = src[v], u = src[kv + v];
              const auto* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
              const auto* u2 = reinterpret_cast<const __nv_bfloat162*>(&u);
              auto* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 gf = __bfloat1622float2(g2[j]), uf = __bfloat1622float2(u2[j]);
                o2[j] = __floats2bfloat162_rn(silu_mul(gf.x, uf.x), silu_mul(gf.y, uf.y));
              }
            } else {
              o = reinterpret_cast<const uint4*>(a.act + int64_t(r0 + r) * a.k)[v];
            }
          }
          smem[i] = o;
        }
        __syncthreads();
        // This warp's equal share of the tile's nct * spc segments, in column order.
        const int segs = nct * spc;
        const int sa = segs * warp / kWarps, sb = segs * (warp + 1) / kWarps;
        int col = sa / spc, sc = sa - col * spc;  // column and segment in it of segment s0
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.0f;
        for (int s0 = sa; s0 < sb; s0 += L) {
          uint4 wv[L];
          {
            int cc = col, qq = sc;
#pragma unroll
            for (int u = 0; u < L; ++u) {
              const int v = qq * 32 + lane;
              wv[u] = s0 + u < sb && v < kv ? ld_weight(wt + cc * kv + v, policy) : make_uint4(0, 0, 0, 0);
              if (++qq == spc) qq = 0, ++cc;
            }
          }
#pragma unroll
          for (int u = 0; u < L; ++u) {
            if (s0 + u >= sb) break;  // uniform over the warp
            const int v = sc * 32 + lane;
            if (v < kv) {
              float wf[8];
              bf16x8_bits_to_float(wv[u], wf);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                float af[8];
                bf16x8_bits_to_float(smem[r * kv + v], af);
#pragma unroll
                for (int q = 0; q < 8; ++q) acc[r] = fmaf(wf[q], af[q], acc[r]);
              }
            }
            if (++sc == spc || s0 + u + 1 == sb) {  // this warp's part of column col is done
#pragma unroll
              for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int o = 16; o > 0; o /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
                if (lane == r) part[(warp * R + r) * kBalTileCols + col] = acc[r];
                acc[r] = 0.0f;
              }
              if (sc == spc) sc = 0, ++col;
            }
          }
        }
        __syncthreads();
        // Sum the warps' partials in warp order (deterministic), add the bias, write.
        for (int i = threadIdx.x; i < nr * nct; i += kThreads) {
          const int r = i / nct, j = i - r * nct;
          float val = 0.0f;
#pragma unroll
          for (int ww = 0; ww < kWarps; ++ww) val += part[(ww * R + r) * kBalTileCols + j];
          const int64_t colg = t0 + j;
          if (a.bias) val += __bfloat162float(a.bias[colg]);
          // The column's output segment, by constant indices (a run-time index would copy the
          // parameters to local memory).
          static_assert(kGemvMaxSegments == 3, "the segment lookup below is written for 3 segments");
          void* out = a.out[0];
          int64_t width = a.width[0], lc = colg;
          if (lc >= a.width[0]) {
            lc -= a.width[0];
            out = a.out[1];
            width = a.width[1];
            if (lc >= a.width[1]) {
              lc -= a.width[1];
              out = a.out[2];
              width = a.width[2];
            }
          }
          const int64_t idx = int64_t(r0 + r) * width + lc;
          if constexpr (kF32)
            static_cast<float*>(out)[idx] = val;
          else
            static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16(val);
        }
      }
    }
    c = pe;
  }
}

int num_sms() {
  int dev = 0, sms = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

int rows_tile(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

// The device's opt-in shared memory per block (static + dynamic; 227 KiB on the H100/H200).
int64_t smem_optin() {
  int dev = 0, bytes = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&dev));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// Shared memory of a block staging R rows: R x per_row dynamic bytes (the row, k bf16, and for
// balanced its partials, float [kWarps][R][kBalTileCols]) plus the kernel's static `fixed` bytes.
struct SmemNeed {
  int64_t per_row, fixed;
};
SmemNeed smem_need(GemvKernel kernel, int64_t k) {
  if (kernel == GemvKernel::balanced) return {2 * k + int64_t(kWarps) * kBalTileCols * 4, 0};
  return {2 * k, kByColumnStaticSmem};  // by_column
}
SmemNeed v1_smem_need(int64_t k) { return {2 * k, 0}; }

// The largest of 1, 2, 4, 8 up to rows_tile(wanted) whose R x per_row + fixed bytes fit max_smem;
// 0 when none does.
int rows_tile_for_smem(int64_t wanted, int64_t per_row, int64_t fixed, int64_t max_smem) {
  for (int r = rows_tile(wanted); r >= 1; r /= 2)
    if (int64_t(r) * per_row + fixed <= max_smem) return r;
  return 0;
}

// The row tile on this device, or InputError naming the limit (k up to kGroupedGemvMaxK fits one
// row on every SM >= 8.0: at most 66 KiB against at least 99 KiB).
int fitting_rows_tile(const char* kernel, int64_t wanted, int64_t k, SmemNeed need) {
  const int64_t optin = smem_optin();
  const int r = rows_tile_for_smem(wanted, need.per_row, need.fixed, optin);
  if (r == 0)
    throw InputError(std::string(kernel) + ": k=" + std::to_string(k) + " needs " +
                     std::to_string(need.per_row + need.fixed) +
                     " B of shared memory for one staged row, the device allows " + std::to_string(optin) +
                     " B per block (legal: k a multiple of 8 in 8.." + std::to_string(kGroupedGemvMaxK) +
                     " whose row fits)");
  return r;
}

// 16-byte weight loads per lane issued together: 16 for 1-2 rows, 8 for 4-8 rows (registers).
int loads_in_flight(int rows) { return rows <= 2 ? 16 : 8; }

// Columns per warp: the most (<= 4) whose loads still cover a whole column of k in one batch, so
// that a warp keeps `loads` independent loads in flight even when k is short (down_proj); the
// launch narrows it again when the grid would be smaller than two blocks per SM.
int cols_per_warp(int64_t k, int loads) {
  const int64_t per_lane = (k / 8 + 31) / 32;  // 16-byte vectors of one column per lane
  for (int c : {4, 2})
    if (loads / c >= per_lane) return c;
  return 1;
}

// The one place runtime values become template arguments: row tile R (1, 2, 4, 8), loads in flight
// per lane L (from R), fp32 output, SwiGLU input; dispatch() adds the by_column kernel's column tile.
template <class F>
void dispatch_rows(int r, bool f32, bool swiglu, F&& f) {
  auto with_flags = [&](auto rr) {
    constexpr int L = decltype(rr)::value <= 2 ? 16 : 8;
    auto ll = std::integral_constant<int, L>{};
    if (f32 && swiglu) throw InputError("gemv: fp32 output with the SwiGLU input is not supported");
    if (f32) return f(rr, ll, std::true_type{}, std::false_type{});
    if (swiglu) return f(rr, ll, std::false_type{}, std::true_type{});
    return f(rr, ll, std::false_type{}, std::false_type{});
  };
  switch (r) {
    case 1: return with_flags(std::integral_constant<int, 1>{});
    case 2: return with_flags(std::integral_constant<int, 2>{});
    case 4: return with_flags(std::integral_constant<int, 4>{});
    case 8: return with_flags(std::integral_constant<int, 8>{});
    default: throw InputError("gemv: no kernel for a row tile of " + std::to_string(r) + " (legal: 1, 2, 4, 8)");
  }
}

template <class F>
void dispatch(int c, int r, bool f32, bool swiglu, F&& f) {
  auto with_c = [&](auto cc) { dispatch_rows(r, f32, swiglu, [&](auto... rest) { f(cc, rest...); }); };
  switch (c) {
    case 1: return with_c(std::integral_constant<int, 1>{});
    case 2: return with_c(std::integral_constant<int, 2>{});
    case 4: return with_c(std::integral_constant<int, 4>{});
    default: throw InputError("gemv: no kernel for a column tile of " + std::to_string(c) + " (legal: 1, 2, 4)");
  }
}

// r: the row tile (by_column_rows_tile); grid_y: the row chunks (plain) or expert slots (grouped).
void launch(const GemvArgs& a, int r, bool f32, bool swiglu, unsigned grid_y, bool pdl, cudaStream_t stream) {
  int c = cols_per_warp(a.k, loads_in_flight(r));
  // Narrower tiles while that leaves fewer than two blocks per SM (router: n = 128).
  while (c > 1 && (a.n + kWarps * c - 1) / (kWarps * c) * int64_t(grid_y) < 2 * int64_t(num_sms())) c /= 2;
  // [r, k] bf16 rows
  const std::size_t smem = std::size_t(r) * std::size_t(smem_need(GemvKernel::by_column, a.k).per_row);
  const unsigned grid_x = static_cast<unsigned>((a.n + kWarps * c - 1) / (kWarps * c));
  dispatch(c, r, f32, swiglu, [&](auto cc, auto rr, auto ll, auto ff, auto sw) {
    auto* kernel = gemv_kernel<decltype(cc)::value, decltype(rr)::value, decltype(ll)::value, decltype(ff)::value,
                               decltype(sw)::value>;
    if (smem > 48 * 1024)
      MIXSERVE_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernels::detail::launch_kernel(pdl, kernel, dim3(grid_x, grid_y), dim3(kThreads), smem, stream, a);
  });
  MIXSERVE_LAUNCH_CHECK("gemv_kernel");
}

int by_column_rows_tile(int64_t wanted, int64_t k) {
  return fitting_rows_tile("gemv (by_column)", wanted, k, smem_need(GemvKernel::by_column, k));
}
int balanced_rows_tile(int64_t wanted, int64_t k) {
  return fitting_rows_tile("gemv (balanced)", wanted, k, smem_need(GemvKernel::balanced, k));
}

// GemvKernel::balanced: as many blocks as fit on the GPU at once (the occupancy calculator's blocks
// per SM x SMs), fewer when the columns of max_slots slots give less than one segment per warp.
void launch_balanced(const GemvArgs& a, int r, bool f32, bool swiglu, int64_t max_slots, bool pdl,
                     cudaStream_t stream) {
  const int64_t kv = a.k / 8, spc = (kv + 31) / 32;
  // [r, k] bf16 rows, then float [kWarps][r][kBalTileCols] partials
  const std::size_t smem = std::size_t(r) * std::size_t(smem_need(GemvKernel::balanced, a.k).per_row);
  dispatch_rows(r, f32, swiglu, [&](auto rr, auto ll, auto ff, auto sw) {
    auto* kernel = gemv_balanced_kernel<decltype(rr)::value, decltype(ll)::value, decltype(ff)::value,
                                        decltype(sw)::value>;
    if (smem > 48 * 1024)
      MIXSERVE_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 0;
    MIXSERVE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    if (per_sm < 1)
      throw InputError("gemv: no block of the balanced kernel fits on an SM (k=" + std::to_string(a.k) +
                       ", row tile " + std::to_string(r) + ", " + std::to_string(smem) + " B shared memory)");
    const int64_t resident = int64_t(per_sm) * num_sms();
    const int64_t useful = (max_slots * a.n * spc + kWarps - 1) / kWarps;
    const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(resident, useful)));
    kernels::detail::launch_kernel(pdl, kernel, dim3(grid), dim3(kThreads), smem, stream, a);
  });
  MIXSERVE_LAUNCH_CHECK("gemv_balanced_kernel");
}

std::string check_k(int64_t k) {
  if (k < 8 || k % 8 != 0 || k > kGroupedGemvMaxK)
    return "k=" + std::to_string(k) + " (legal: a multiple of 8 in 8.." + std::to_string(kGroupedGemvMaxK) + ")";
  return "";
}

// ---- v1: the previous grouped kernel (baseline) ----
constexpr int kV1Cols = kGroupedGemvColsPerBlock;
constexpr int kV1Rows = kGroupedGemvRowsPerChunk;
static_assert(kV1Cols % kWarps == 0, "every warp owns the same number of columns");

// rows_per_chunk (1, 2, 4 or kV1Rows): the rows staged at a time, as many as fit the shared memory.
__global__ void __launch_bounds__(kThreads) grouped_gemv_v1_kernel(GroupedGemvParams p, int rows_per_chunk) {
  extern __shared__ uint4 smem[];  // [rows_per_chunk, k / 8]
  const int e = blockIdx.y;
  const int row_begin = p.expert_offsets[e], row_end = p.expert_offsets[e + 1];
  if (row_end <= row_begin) return;
  const int64_t kv = p.k / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const __nv_bfloat16* w = p.weights + int64_t(e) * p.n * p.k;
  for (int r0 = row_begin; r0 < row_end; r0 += rows_per_chunk) {
    const int nr = min(rows_per_chunk, row_end - r0);
    __syncthreads();
    const uint4* a = reinterpret_cast<const uint4*>(p.act + int64_t(r0) * p.k);
    for (int64_t i = threadIdx.x; i < int64_t(nr) * kv; i += kThreads) smem[i] = a[i];
    __syncthreads();
    for (int cc = 0; cc < kV1Cols / kWarps; ++cc) {
      const int64_t col = int64_t(blockIdx.x) * kV1Cols + warp * (kV1Cols / kWarps) + cc;
      const uint4* wr = reinterpret_cast<const uint4*>(w + col * p.k);
      float acc[kV1Rows];
#pragma unroll
      for (int r = 0; r < kV1Rows; ++r) acc[r] = 0.0f;
#pragma unroll 4
      for (int64_t v = lane; v < kv; v += 32) {
        float wf[8];
        bf16x8_to_float(__ldg(wr + v), wf);
#pragma unroll
        for (int r = 0; r < kV1Rows; ++r) {
          if (r < nr) {
            float af[8];
            bf16x8_to_float(smem[r * kv + v], af);
#pragma unroll
            for (int q = 0; q < 8; q += 2) acc[r] += wf[q] * af[q] + wf[q + 1] * af[q + 1];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kV1Rows; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      }
      if (lane == 0) {
        for (int r = 0; r < nr; ++r) p.out[int64_t(r0 + r) * p.n + col] = __float2bfloat16(acc[r]);
      }
    }
  }
}

}  // namespace

int gemv_rows_tile(GemvKernel kernel, int64_t wanted_rows, int64_t k, int64_t max_smem_bytes) {
  if (kernel == GemvKernel::balanced || kernel == GemvKernel::by_column) {
    const SmemNeed need = smem_need(kernel, k);
    return rows_tile_for_smem(wanted_rows, need.per_row, need.fixed, max_smem_bytes);
  }
  throw InputError(std::string("gemv_rows_tile: kernel ") + gemv_kernel_name(kernel) +
                   " (legal: balanced, by_column; gemv_kernel_for resolves automatic)");
}

const char* gemv_kernel_name(GemvKernel k) {
  switch (k) {
#define MIXSERVE_GEMV_KERNEL_NAME(name) \
  case GemvKernel::name:                \
    return #name;
    MIXSERVE_GEMV_KERNELS(MIXSERVE_GEMV_KERNEL_NAME)
#undef MIXSERVE_GEMV_KERNEL_NAME
  }
  return "?";
}

std::string grouped_gemv_v2_unsupported_reason(const GroupedGemvParams& p) {
  if (p.num_experts < 1 || p.num_experts > 65535)
    return "num_experts=" + std::to_string(p.num_experts) + " (legal: 1..65535)";
  if (auto why = check_k(p.k); !why.empty()) return why;
  if (p.n < 1 || p.n > (int64_t(1) << 30)) return "n=" + std::to_string(p.n) + " (legal: 1..2^30)";
  if (p.max_rows < 0 || p.max_rows_per_expert < 0)
    return "max_rows=" + std::to_string(p.max_rows) + " max_rows_per_expert=" +
           std::to_string(p.max_rows_per_expert) + " (legal: >= 0, 0 = unknown)";
  if (!p.act || !p.weights || !p.out || !p.expert_offsets)
    return "a null pointer (act, weights, out, expert_offsets must be set)";
  if ((reinterpret_cast<uintptr_t>(p.act) | reinterpret_cast<uintptr_t>(p.weights)) % 16 != 0)
    return "act or weights not 16-byte aligned";
  return "";
}

std::string grouped_gemv_unsupported_reason(const GroupedGemvParams& p) {
  std::string why = grouped_gemv_v2_unsupported_reason(p);
  if (why.empty() && p.n % kV1Cols != 0)
    why = "n=" + std::to_string(p.n) + " (legal: a multiple of " + std::to_string(kV1Cols) + ")";
  if (why.empty() && p.swiglu_act) why = "swiglu_act (legal: false; launch_grouped_gemv_v2 takes it)";
  return why;
}

std::string gemv_unsupported_reason(const GemvParams& p) {
  if (p.num_rows < 0 || p.num_rows > 65535 * 8)
    return "num_rows=" + std::to_string(p.num_rows) + " (legal: 0.." + std::to_string(65535 * 8) + ")";
  if (auto why = check_k(p.k); !why.empty()) return why;
  if (p.n < 1 || p.n > (int64_t(1) << 30)) return "n=" + std::to_string(p.n) + " (legal: 1..2^30)";
  if (p.num_segments < 1 || p.num_segments > kGemvMaxSegments)
    return "num_segments=" + std::to_string(p.num_segments) + " (legal: 1.." + std::to_string(kGemvMaxSegments) + ")";
  int64_t sum = 0;
  for (int s = 0; s < p.num_segments; ++s) {
    if (p.seg[s].width < 1 || !p.seg[s].out)
      return "segment " + std::to_string(s) + ": width=" + std::to_string(p.seg[s].width) +
             " and out must be set (width >= 1)";
    sum += p.seg[s].width;
  }
  if (sum != p.n) return "segment widths sum to " + std::to_string(sum) + ", n=" + std::to_string(p.n);
  if (p.out_fp32 && p.swiglu_act) return "out_fp32 together with swiglu_act (legal: at most one)";
  if (!p.act || !p.weights) return "a null pointer (act and weights must be set)";
  if ((reinterpret_cast<uintptr_t>(p.act) | reinterpret_cast<uintptr_t>(p.weights)) % 16 != 0)
    return "act or weights not 16-byte aligned";
  return "";
}

void launch_grouped_gemv_v2(const GroupedGemvParams& p, cudaStream_t stream) {
  const std::string why = grouped_gemv_v2_unsupported_reason(p);
  if (!why.empty()) throw InputError("grouped_gemv_v2: unsupported parameters: " + why);
  GemvArgs a{};
  a.act = p.act;
  a.weights = p.weights;
  a.out[0] = p.out;
  a.width[0] = p.n;
  for (int s = 1; s < kGemvMaxSegments; ++s) a.width[s] = int64_t(1) << 62;
  a.n = p.n;
  a.k = p.k;
  a.expert_offsets = p.expert_offsets;
  a.num_experts = p.num_experts;
  a.offsets_early = p.offsets_before_previous;
  const int64_t slots = p.max_rows > 0 ? std::min<int64_t>(p.num_experts, p.max_rows) : p.num_experts;
  // Rows staged at a time: the most one expert can have (up to 8), fewer where they do not fit the
  // shared memory (an expert with more rows loops over chunks).
  const int64_t wanted = p.max_rows_per_expert > 0 ? p.max_rows_per_expert : kGroupedGemvRowsPerChunk;
  if (gemv_kernel_for(p.kernel, p.max_rows_per_expert) == GemvKernel::balanced)
    launch_balanced(a, balanced_rows_tile(wanted, p.k), false, p.swiglu_act, slots, p.pdl, stream);
  else
    launch(a, by_column_rows_tile(wanted, p.k), false, p.swiglu_act, static_cast<unsigned>(slots), p.pdl, stream);
}

void launch_gemv(const GemvParams& p, cudaStream_t stream) {
  const std::string why = gemv_unsupported_reason(p);
  if (!why.empty()) throw InputError("gemv: unsupported parameters: " + why);
  if (p.num_rows == 0) return;
  GemvArgs a{};
  a.act = p.act;
  a.weights = p.weights;
  a.bias = p.bias;
  for (int s = 0; s < kGemvMaxSegments; ++s) {
    a.out[s] = s < p.num_segments ? p.seg[s].out : nullptr;
    a.width[s] = s < p.num_segments ? p.seg[s].width : int64_t(1) << 62;
  }
  a.n = p.n;
  a.k = p.k;
  a.num_rows = p.num_rows;
  if (gemv_kernel_for(p.kernel, p.num_rows) == GemvKernel::balanced) {
    const int r = balanced_rows_tile(p.num_rows, p.k);
    launch_balanced(a, r, p.out_fp32, p.swiglu_act, (p.num_rows + r - 1) / r, p.pdl, stream);
    return;
  }
  // by_column: one block row per chunk of r rows (grid y <= 65535).
  const int r = by_column_rows_tile(p.num_rows, p.k);
  const int64_t chunks = (p.num_rows + r - 1) / r;
  if (chunks > 65535)
    throw InputError("gemv: unsupported parameters: num_rows=" + std::to_string(p.num_rows) + " with k=" +
                     std::to_string(p.k) + " on the by_column kernel, whose row chunk here is " + std::to_string(r) +
                     " (legal: num_rows <= 65535 x " + std::to_string(r) + " = " + std::to_string(65535 * r) +
                     "; the balanced kernel has no such limit)");
  launch(a, r, p.out_fp32, p.swiglu_act, static_cast<unsigned>(chunks), p.pdl, stream);
}

void launch_grouped_gemv(const GroupedGemvParams& p, cudaStream_t stream) {
  const std::string why = grouped_gemv_unsupported_reason(p);
  if (!why.empty()) throw InputError("grouped_gemv: unsupported parameters: " + why);
  const int r = fitting_rows_tile("grouped_gemv", kV1Rows, p.k, v1_smem_need(p.k));
  const std::size_t smem = std::size_t(r) * std::size_t(v1_smem_need(p.k).per_row);  // [r, k] bf16
  if (smem > 48 * 1024)
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(grouped_gemv_v1_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.n / kV1Cols), static_cast<unsigned>(p.num_experts));
  grouped_gemv_v1_kernel<<<grid, kThreads, smem, stream>>>(p, r);
  MIXSERVE_LAUNCH_CHECK("grouped_gemv_v1_kernel");  // v1: the kernel before 2026-11-29
}

}  // namespace mixserve::gpu
