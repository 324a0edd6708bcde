// The fused batch-1 decode layer (decode_layer.hpp).
#include "mixserve/gpu/decode_layer.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/kernels/detail/pdl.cuh"
#include "mixserve/kernels/detail/router_device.cuh"
#include "mixserve/kernels/router.cuh"

namespace mixserve::gpu {

namespace {
using bf16 = __nv_bfloat16;
constexpr int kWarps = 8;
constexpr int kLoadU = 8;  // 16-byte weight vectors per lane per chunk (4 KB per warp)
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 32;   // context positions per attention tile (one per lane)
constexpr int kChunk = 256; // k elements one warp covers with one 16-byte load per lane
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint4 ld_weights(const bf16* p) {  // streamed: no L1 allocation
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ float dot8(const uint4& w, const uint4& a, float acc) {
  const auto* wh = reinterpret_cast<const __nv_bfloat162*>(&w);
  const auto* ah = reinterpret_cast<const __nv_bfloat162*>(&a);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 wf = __bfloat1622float2(wh[j]), af = __bfloat1622float2(ah[j]);
    acc = fmaf(wf.x, af.x, acc);
    acc = fmaf(wf.y, af.y, acc);
  }
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Grid-wide barrier number `phase` (1-based) over a counter that was zero at launch. Writes before
// it (any block) are visible after it; data written inside the launch is read with ld.cg (L2).
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned phase) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    const unsigned target = phase * gridDim.x;
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
    __threadfence();
  }
  __syncthreads();
}

// One warp: for columns col = first, first + stride, ... < ncols, the sum over parts j < `parts`
// of part_round(j, row_of(col, j) . act_of(j)) (k elements each: bf16 rows in global memory,
// activations bf16 in shared memory, fp32 dot products reduced over the warp), summed in order
// j = 0, 1, ...; `emit(col, v)` gets it on lane 0. A column's 16-byte vectors (parts x k / 256 per
// lane) are streamed in chunks of U per lane across part boundaries; the next chunk's loads are
// issued (into registers) before the current chunk is summed. (A cp.async ring of 4 chunks in
// shared memory per warp measured slower on the H200, session 5: docs/forward.md.)
template <int U, class RowOf, class ActOf, class PartRound, class Emit>
__device__ __forceinline__ void warp_columns(int64_t first, int64_t stride, int64_t ncols, int parts, int64_t k,
                                                  RowOf row_of, ActOf act_of, PartRound part_round, Emit emit) {
  const int lane = threadIdx.x & 31;
  if (first >= ncols) return;
  const int vpp = int((k + kChunk - 1) / kChunk);
  const int nv = vpp * parts;
  int64_t col = first;
  int v0 = 0;
  auto load = [&](int64_t c, int vb, uint4 (&w)[U]) {
    int j = vb / vpp, kv = vb - j * vpp;
    const bf16* row = row_of(c, j < parts ? j : 0);  // row_of once per part, not per vector
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t idx = int64_t(kv) * kChunk + lane * 8;
      w[u] = (vb + u < nv && idx < k) ? ld_weights(row + idx) : make_uint4(0, 0, 0, 0);
      if (++kv == vpp) {
        kv = 0;
        ++j;
        if (vb + u + 1 < nv) row = row_of(c, j);
      }
    }
  };
  uint4 cur[U], nxt[U];
  load(col, v0, cur);
  float part = 0.0f, total = 0.0f;
  while (true) {
    int64_t ncol = col;
    int nv0 = v0 + U;
    if (nv0 >= nv) {
      ncol = col + stride;
      nv0 = 0;
    }
    const bool more = ncol < ncols;
    if (more) load(ncol, nv0, nxt);
    int j = v0 / vpp, kv = v0 - j * vpp;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u >= nv) break;
      const int64_t idx = int64_t(kv) * kChunk + lane * 8;
      if (idx < k) part = dot8(cur[u], *reinterpret_cast<const uint4*>(act_of(j) + idx), part);
      if (kv == vpp - 1) {
        total += part_round(j, warp_sum(part));
        part = 0.0f;
        kv = 0;
        ++j;
      } else {
        ++kv;
      }
    }
    if (v0 + U >= nv) {
      if (lane == 0) emit(col, total);
      total = 0.0f;
    }
    if (!more) break;
    col = ncol;
    v0 = nv0;
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = nxt[u];
  }
}

// out = bf16(x * inv_rms * w) as rmsnorm.cuh, x and out in shared memory (bf16), w global;
// 8 elements per thread per step (n % 8 == 0), the weights' loads issued before the sum.
__device__ void block_rmsnorm(const bf16* x, const bf16* w, bf16* out, int64_t n, float eps, float* red) {
  constexpr int kMaxSteps = 8;  // n <= kMaxSteps * 8 * kThreads = 16384 keeps w in registers
  uint4 wv[kMaxSteps];
#pragma unroll
  for (int u = 0; u < kMaxSteps; ++u) {
    const int64_t i = (int64_t(u) * kThreads + threadIdx.x) * 8;
    wv[u] = i < n ? *reinterpret_cast<const uint4*>(w + i) : make_uint4(0, 0, 0, 0);
  }
  float ss = 0.0f;
  for (int64_t i = threadIdx.x * 8; i < n; i += kThreads * 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(x + i);
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      ss = fmaf(f.x, f.x, ss);
      ss = fmaf(f.y, f.y, ss);
    }
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  float tot = 0.0f;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) tot += red[i];
  const float inv = rsqrtf(tot / float(n) + eps);
#pragma unroll
  for (int u = 0; u < kMaxSteps; ++u) {
    const int64_t i = (int64_t(u) * kThreads + threadIdx.x) * 8;
    if (i >= n) break;
    const uint4 v = *reinterpret_cast<const uint4*>(x + i);
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    const auto* wh = reinterpret_cast<const __nv_bfloat162*>(&wv[u]);
    uint4 o;
    auto* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]), g = __bfloat1622float2(wh[j]);
      oh[j] = __floats2bfloat162_rn(f.x * inv * g.x, f.y * inv * g.y);
    }
    *reinterpret_cast<uint4*>(out + i) = o;
  }
  __syncthreads();
}

// A head (D elements, lane + 32 m layout) normed (optional) and rotated as the QK-norm/RoPE kernel.
template <int D>
__device__ __forceinline__ void norm_rope(float (&f)[D / 32], const bf16* nw, const float* cs, float eps) {
  constexpr int per_lane = D / 32, m_half = D / 64, half = D / 2;
  const int lane = threadIdx.x & 31;
  if (nw) {
    float ss = 0.0f;
#pragma unroll
    for (int m = 0; m < per_lane; ++m) ss += f[m] * f[m];
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / float(D) + eps);
#pragma unroll
    for (int m = 0; m < per_lane; ++m)
      f[m] = __bfloat162float(__float2bfloat16_rn(f[m] * inv * __bfloat162float(nw[lane + 32 * m])));
  }
#pragma unroll
  for (int m = 0; m < m_half; ++m) {
    const int i = lane + 32 * m;
    const float c = cs[i], s = cs[half + i];
    const float x1 = f[m], x2 = f[m + m_half];
    f[m] = __bfloat162float(__float2bfloat16_rn(x1 * c - x2 * s));
    f[m + m_half] = __bfloat162float(__float2bfloat16_rn(x2 * c + x1 * s));
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1) fused_decode_layer_kernel(FusedDecodeLayerParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t H = p.hidden, QW = int64_t(p.q_heads) * D, KVW = int64_t(p.kv_heads) * D, I = p.inter;
  const int K = p.top_k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t gwarp = int64_t(blockIdx.x) * kWarps + warp, nwarps = int64_t(gridDim.x) * kWarps;
  bf16* s_x = reinterpret_cast<bf16*>(smem);  // [H] residual
  bf16* s_n = s_x + H;                        // [H] normed
  unsigned char* s_u = reinterpret_cast<unsigned char*>(s_n + H);  // phase scratch (16-byte aligned: H % 8 == 0)
  auto gemv = [&](int64_t first, int64_t stride, int64_t ncols, int parts, int64_t k, auto row_of, auto act_of,
                  auto part_round, auto emit) {
    warp_columns<kLoadU>(first, stride, ncols, parts, k, row_of, act_of, part_round, emit);
  };
  // L2 prefetch of the next phase's known weights (o_proj during the attention, the chosen
  // experts' down rows during gate|up, q|k|v before the PDL wait): measured slower (session 5).
  const bool prefetch = p.prefetch_l2;
  __shared__ float s_red[kWarps];
  __shared__ int32_t s_ids[kFusedDecodeMaxTopK];
  __shared__ float s_w[kFusedDecodeMaxTopK];

  // Prologue: this warp's q|k|v rows into L2 before waiting on the previous kernel.
  const int64_t nqkv = QW + 2 * KVW;
  for (int64_t c = gwarp; c < nqkv; c += nwarps)
    if (prefetch && lane == 0) kernels::detail::prefetch_l2(p.wqkv + c * H, unsigned(H * 2));
  kernels::detail::wait_for_previous_kernel();
  // Diagnostics: block 0 adds each phase's time (ns, barrier wait included) to phase_ns[0..6].
  const bool timed = p.phase_ns && blockIdx.x == 0 && threadIdx.x == 0;
  unsigned long long t_last = timed ? global_ns() : 0;
  auto mark = [&](int phase) {
    if (!timed) return;
    const unsigned long long t = global_ns();
    atomicAdd(p.phase_ns + phase, t - t_last);
    t_last = t;
  };

  // Phase 0: x, normed, q|k|v.
  for (int64_t i = threadIdx.x * 8; i < H; i += kThreads * 8) {
    uint4 r = __ldcg(reinterpret_cast<const uint4*>(p.res + i));
    if (p.tmp_in) {
      const uint4 t = __ldcg(reinterpret_cast<const uint4*>(p.tmp_in + i));
      auto* rh = reinterpret_cast<__nv_bfloat162*>(&r);
      const auto* th = reinterpret_cast<const __nv_bfloat162*>(&t);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(rh[j]), b = __bfloat1622float2(th[j]);
        rh[j] = __floats2bfloat162_rn(b.x + a.x, b.y + a.y);  // rmsnorm.cuh: bf16(x + residual)
      }
    }
    *reinterpret_cast<uint4*>(s_x + i) = r;
    if (blockIdx.x == 0 && p.rec_in) *reinterpret_cast<uint4*>(p.rec_in + i) = r;
  }
  __syncthreads();
  block_rmsnorm(s_x, p.in_norm, s_n, H, p.eps, s_red);
  gemv(
      gwarp, nwarps, nqkv, 1, H, [&](int64_t c, int) { return p.wqkv + c * H; }, [&](int) { return (const bf16*)s_n; },
      [](int, float v) { return v; },
      [&](int64_t c, float v) {
        if (c < QW)
          p.q[c] = __float2bfloat16_rn(v);
        else
          p.kv[c - QW] = __float2bfloat16_rn(v);
      });
  grid_barrier(p.barrier, 1);
  mark(0);

  // Phase 1: attention partials. Items = kv heads x chunks of the context (tiles of kTile
  // positions); a warp per q head of the item's group.
  const int ctx = __ldcg(p.seq_len);
  const int pos = __ldcg(p.position);
  const int group = p.q_heads / p.kv_heads;
  const int max_splits = (int(gridDim.x) + p.kv_heads - 1) / p.kv_heads;
  const int splits = max(1, min(max_splits, (ctx + kTile - 1) / kTile));
  const int chunk = (ctx + splits - 1) / splits;
  const float scale2 = (p.softmax_scale > 0.0f ? p.softmax_scale : rsqrtf(float(D))) * kLog2e;
  {
    // o_proj rows of this warp into L2 while the attention runs.
    for (int64_t c = gwarp; c < H; c += nwarps)
      if (prefetch && lane == 0) kernels::detail::prefetch_l2(p.wo + c * QW, unsigned(QW * 2));
    constexpr int kRow = D + 8;  // padded smem row (bf16)
    constexpr int kVecPerRow = D / 8;
    constexpr int kTileVecs = 2 * kTile * kVecPerRow;  // K and V vectors of a tile
    constexpr int kVecsPerThread = (kTileVecs + kThreads - 1) / kThreads;
    bf16* s_k = reinterpret_cast<bf16*>(s_u);      // [kTile][kRow]
    bf16* s_v = s_k + kTile * kRow;                // [kTile][kRow]
    float* s_q = reinterpret_cast<float*>(s_v + kTile * kRow);  // [group][D] (scaled)
    float* s_cs = s_q + group * D;                 // [D] cos | sin
    for (int i = threadIdx.x; i < D; i += kThreads) s_cs[i] = __ldcg(p.rope_cs + i);
    // The tile's K / V vectors (the new token's row excluded: it comes from p.kv below).
    auto load_tile = [&](int kvh, int t0, int n, uint4 (&r)[kVecsPerThread]) {
#pragma unroll
      for (int u = 0; u < kVecsPerThread; ++u) {
        const int i = threadIdx.x + u * kThreads;
        r[u] = make_uint4(0, 0, 0, 0);
        if (i >= kTileVecs) continue;
        const int which = i / (kTile * kVecPerRow), rem = i % (kTile * kVecPerRow);
        const int row = rem / kVecPerRow, v = rem % kVecPerRow;
        const int ps = t0 + row;
        if (row < n && ps != pos) {
          const int64_t blk = __ldg(p.block_table + ps / p.block_tokens);
          const int64_t off = ((blk * p.block_tokens + ps % p.block_tokens) * p.kv_heads + kvh) * D + v * 8;
          r[u] = __ldcg(reinterpret_cast<const uint4*>((which ? p.v_cache : p.k_cache) + off));
        }
      }
    };
    auto store_tile = [&](int t0, const uint4 (&r)[kVecsPerThread]) {
#pragma unroll
      for (int u = 0; u < kVecsPerThread; ++u) {
        const int i = threadIdx.x + u * kThreads;
        if (i >= kTileVecs) continue;
        const int which = i / (kTile * kVecPerRow), rem = i % (kTile * kVecPerRow);
        const int row = rem / kVecPerRow, v = rem % kVecPerRow;
        if (t0 + row == pos) continue;  // written from p.kv
        *reinterpret_cast<uint4*>((which ? s_v : s_k) + row * kRow + v * 8) = r[u];
      }
    };
    __syncthreads();
    for (int item = blockIdx.x; item < p.kv_heads * splits; item += gridDim.x) {
      const int kvh = item / splits, sp = item % splits;
      const int p0 = sp * chunk, p1 = min(ctx, p0 + chunk);
      uint4 tile[kVecsPerThread];
      if (p0 < p1) load_tile(kvh, p0, min(kTile, p1 - p0), tile);  // in flight during the q work
      // The q heads of the group: normed, rotated, scaled.
      for (int hh = warp; hh < group; hh += kWarps) {
        const int h = kvh * group + hh;
        float f[D / 32];
#pragma unroll
        for (int m = 0; m < D / 32; ++m) f[m] = __bfloat162float(__ldcg(p.q + int64_t(h) * D + lane + 32 * m));
        norm_rope<D>(f, p.q_norm, s_cs, p.eps);
#pragma unroll
        for (int m = 0; m < D / 32; ++m) s_q[hh * D + lane + 32 * m] = f[m] * scale2;
      }
      // Each warp keeps the state of its heads hh = warp, warp + kWarps, ... (at most 2).
      constexpr int kMaxHeadsPerWarp = 2;
      float st_m[kMaxHeadsPerWarp], st_l[kMaxHeadsPerWarp], acc[kMaxHeadsPerWarp][D / 32];
#pragma unroll
      for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
        st_m[r] = -INFINITY;
        st_l[r] = 0.0f;
#pragma unroll
        for (int m = 0; m < D / 32; ++m) acc[r][m] = 0.0f;
      }
      for (int t0 = p0; t0 < p1; t0 += kTile) {
        const int n = min(kTile, p1 - t0);
        store_tile(t0, tile);
        // The new token's k (normed, rotated) and v: into the tile and the paged cache.
        if (pos >= t0 && pos < t0 + n && warp == 0) {
          float f[D / 32];
#pragma unroll
          for (int m = 0; m < D / 32; ++m) f[m] = __bfloat162float(__ldcg(p.kv + int64_t(kvh) * D + lane + 32 * m));
          norm_rope<D>(f, p.k_norm, s_cs, p.eps);
          const int64_t blk = p.block_table[pos / p.block_tokens];
          const int64_t off = ((blk * p.block_tokens + pos % p.block_tokens) * p.kv_heads + kvh) * D;
          const int row = pos - t0;
#pragma unroll
          for (int m = 0; m < D / 32; ++m) {
            const bf16 kb = __float2bfloat16_rn(f[m]);
            const bf16 vb = __ldcg(p.kv + KVW + int64_t(kvh) * D + lane + 32 * m);
            p.k_cache[off + lane + 32 * m] = kb;
            p.v_cache[off + lane + 32 * m] = vb;
            s_k[row * kRow + lane + 32 * m] = kb;
            s_v[row * kRow + lane + 32 * m] = vb;
          }
        }
        __syncthreads();
        if (t0 + kTile < p1) load_tile(kvh, t0 + kTile, min(kTile, p1 - t0 - kTile), tile);  // next tile
#pragma unroll
        for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
          const int hh = warp + r * kWarps;
          if (hh >= group) break;
          // Lane j: score of position t0 + j.
          float sc = -INFINITY;
          if (lane < n) {
            float s = 0.0f;
            const bf16* kr = s_k + lane * kRow;
            const float* qh = s_q + hh * D;
#pragma unroll
            for (int v = 0; v < D / 8; ++v) {
              const uint4 kv8 = *reinterpret_cast<const uint4*>(kr + v * 8);
              const auto* kh = reinterpret_cast<const __nv_bfloat162*>(&kv8);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 kf = __bfloat1622float2(kh[j]);
                s = fmaf(qh[v * 8 + 2 * j], kf.x, s);
                s = fmaf(qh[v * 8 + 2 * j + 1], kf.y, s);
              }
            }
            sc = s;
          }
          const float mt = warp_max(sc);
          const float m_new = fmaxf(st_m[r], mt);
          const float pj = lane < n ? exp2f(sc - m_new) : 0.0f;
          const float corr = exp2f(st_m[r] - m_new);
          st_l[r] = st_l[r] * corr + warp_sum(pj);
          st_m[r] = m_new;
#pragma unroll
          for (int m = 0; m < D / 32; ++m) acc[r][m] *= corr;
          for (int j = 0; j < n; ++j) {
            const float pjj = __shfl_sync(0xffffffffu, pj, j);
            const bf16* vr = s_v + j * kRow;
#pragma unroll
            for (int m = 0; m < D / 32; ++m) acc[r][m] = fmaf(pjj, __bfloat162float(vr[lane + 32 * m]), acc[r][m]);
          }
        }
        __syncthreads();
      }
      // Partials: [h][sp] = (m, l, acc[D]).
#pragma unroll
      for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
        const int hh = warp + r * kWarps;
        if (hh >= group) break;
        const int h = kvh * group + hh;
        float* w = p.attn_ws + (int64_t(h) * max_splits + sp) * (D + 2);
        if (lane == 0) {
          w[0] = st_m[r];
          w[1] = st_l[r];
        }
#pragma unroll
        for (int m = 0; m < D / 32; ++m) w[2 + lane + 32 * m] = acc[r][m];
      }
    }
  }
  grid_barrier(p.barrier, 2);
  mark(1);

  // Phase 2: merge the chunks of each q head: a block per head; every warp finds the max and the
  // weights, warp w sums chunks w, w + kWarps, ..., the block adds the warps' sums in order.
  {
    float* s_f = reinterpret_cast<float*>(s_u);            // [max_splits] chunk weights
    float* s_part = s_f + max_splits;                      // [kWarps][D]
    __shared__ float s_l;
    for (int h = blockIdx.x; h < p.q_heads; h += gridDim.x) {
      const float* w = p.attn_ws + int64_t(h) * max_splits * (D + 2);
      if (warp == 0) {
        float m = -INFINITY;
        for (int sp = lane; sp < splits; sp += 32) m = fmaxf(m, __ldcg(w + int64_t(sp) * (D + 2)));
        m = warp_max(m);
        float l = 0.0f;
        for (int sp = lane; sp < splits; sp += 32) {
          const float ms = __ldcg(w + int64_t(sp) * (D + 2));
          const float f = ms == -INFINITY ? 0.0f : exp2f(ms - m);
          s_f[sp] = f;
          l += __ldcg(w + int64_t(sp) * (D + 2) + 1) * f;
        }
        l = warp_sum(l);
        if (lane == 0) s_l = l;
      }
      float a[D / 32];
#pragma unroll
      for (int j = 0; j < D / 32; ++j) a[j] = 0.0f;
      // The acc loads do not need the weights: issue them first.
      constexpr int kMaxPerWarp = 2;
      float vals[kMaxPerWarp][D / 32];
#pragma unroll
      for (int r = 0; r < kMaxPerWarp; ++r) {
        const int sp = warp + r * kWarps;
#pragma unroll
        for (int j = 0; j < D / 32; ++j)
          vals[r][j] = sp < splits ? __ldcg(w + int64_t(sp) * (D + 2) + 2 + lane + 32 * j) : 0.0f;
      }
      __syncthreads();  // s_f, s_l
#pragma unroll
      for (int r = 0; r < kMaxPerWarp; ++r) {
        const int sp = warp + r * kWarps;
        if (sp >= splits) break;
#pragma unroll
        for (int j = 0; j < D / 32; ++j) a[j] = fmaf(vals[r][j], s_f[sp], a[j]);
      }
      for (int sp = warp + kMaxPerWarp * kWarps; sp < splits; sp += kWarps)  // more chunks than kMaxPerWarp per warp
#pragma unroll
        for (int j = 0; j < D / 32; ++j) a[j] = fmaf(__ldcg(w + int64_t(sp) * (D + 2) + 2 + lane + 32 * j), s_f[sp], a[j]);
#pragma unroll
      for (int j = 0; j < D / 32; ++j) s_part[warp * D + lane + 32 * j] = a[j];
      __syncthreads();
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float t = 0.0f;
        for (int ww = 0; ww < kWarps; ++ww) t += s_part[ww * D + d];
        p.attn[int64_t(h) * D + d] = __float2bfloat16_rn(s_l > 0.0f ? t / s_l : 0.0f);
      }
      __syncthreads();
    }
  }
  grid_barrier(p.barrier, 3);
  mark(2);

  // Phase 3: o = attn . Wo^T.
  {
    bf16* s_a = reinterpret_cast<bf16*>(s_u);  // [QW]
    for (int64_t i = threadIdx.x * 8; i < QW; i += kThreads * 8)
      *reinterpret_cast<uint4*>(s_a + i) = __ldcg(reinterpret_cast<const uint4*>(p.attn + i));
    __syncthreads();
    // The router rows (small) into L2.
    for (int64_t c = gwarp; c < p.num_experts; c += nwarps)
      if (prefetch && lane == 0) kernels::detail::prefetch_l2(p.router + c * H, unsigned(H * 2));
    gemv(
        gwarp, nwarps, H, 1, QW, [&](int64_t c, int) { return p.wo + c * QW; }, [&](int) { return (const bf16*)s_a; },
        [](int, float v) { return v; }, [&](int64_t c, float v) { p.o[c] = __float2bfloat16_rn(v); });
  }
  grid_barrier(p.barrier, 4);
  mark(3);

  // Phase 4: x2 = bf16(x + o), normed2, router logits.
  for (int64_t i = threadIdx.x * 8; i < H; i += kThreads * 8) {
    uint4 r = *reinterpret_cast<const uint4*>(s_x + i);
    const uint4 t = __ldcg(reinterpret_cast<const uint4*>(p.o + i));
    auto* rh = reinterpret_cast<__nv_bfloat162*>(&r);
    const auto* th = reinterpret_cast<const __nv_bfloat162*>(&t);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __bfloat1622float2(rh[j]), b = __bfloat1622float2(th[j]);
      rh[j] = __floats2bfloat162_rn(b.x + a.x, b.y + a.y);
    }
    *reinterpret_cast<uint4*>(s_x + i) = r;
    if (blockIdx.x == 0) {
      *reinterpret_cast<uint4*>(p.res + i) = r;
      if (p.rec_attn) *reinterpret_cast<uint4*>(p.rec_attn + i) = r;
    }
  }
  __syncthreads();
  block_rmsnorm(s_x, p.post_norm, s_n, H, p.eps, s_red);
  gemv(
      gwarp, nwarps, p.num_experts, 1, H, [&](int64_t c, int) { return p.router + c * H; },
      [&](int) { return (const bf16*)s_n; }, [](int, float v) { return v; }, [&](int64_t c, float v) { p.logits[c] = v; });
  grid_barrier(p.barrier, 5);
  mark(4);

  // Phase 5: routing (every block, warp 0), then gate|up for the chosen experts.
  {
    float* s_lg = reinterpret_cast<float*>(s_u);  // [E]
    for (int e = threadIdx.x; e < p.num_experts; e += kThreads) s_lg[e] = __ldcg(p.logits + e);
    __syncthreads();
    if (warp == 0) {
      kernels::RouterParams rp;
      rp.logits = s_lg;
      rp.topk_ids = s_ids;
      rp.topk_weights = s_w;
      rp.num_tokens = 1;
      rp.num_experts = p.num_experts;
      rp.top_k = K;
      rp.scoring = kernels::RouterScoring::softmax_topk;
      rp.renormalize = p.renormalize;
      rp.routed_scaling = p.routed_scaling;
      if (p.num_experts <= 32)
        kernels::detail::route_token<1>(rp, s_lg, 0, lane);
      else if (p.num_experts <= 64)
        kernels::detail::route_token<2>(rp, s_lg, 0, lane);
      else if (p.num_experts <= 128)
        kernels::detail::route_token<4>(rp, s_lg, 0, lane);
      else
        kernels::detail::route_token<8>(rp, s_lg, 0, lane);
    }
    __syncthreads();
  }
  // This warp's down rows (phase 6) into L2 while gate|up streams.
  for (int64_t c = gwarp; c < H; c += nwarps)
    if (prefetch && lane == 0)
      for (int j = 0; j < K; ++j) kernels::detail::prefetch_l2(p.w2 + (int64_t(s_ids[j]) * H + c) * I, unsigned(I * 2));
  gemv(
      gwarp, nwarps, int64_t(K) * 2 * I, 1, H,
      [&](int64_t c, int) { return p.w13 + (int64_t(s_ids[c / (2 * I)]) * 2 * I + c % (2 * I)) * H; },
      [&](int) { return (const bf16*)s_n; }, [](int, float v) { return v; },
      [&](int64_t c, float v) { p.gu[c] = __float2bfloat16_rn(v); });
  grid_barrier(p.barrier, 6);
  mark(5);
  kernels::detail::allow_next_kernel();

  // Phase 6: SwiGLU of every chosen expert into shared memory, then the down projection and the
  // weighted combine per output column.
  {
    bf16* s_a = reinterpret_cast<bf16*>(s_u);  // [K][I]
#pragma unroll 4
    for (int64_t i = threadIdx.x * 8; i < int64_t(K) * I; i += kThreads * 8) {  // I % 8 == 0
      const int64_t j = i / I, c = i % I;
      const uint4 gv = __ldcg(reinterpret_cast<const uint4*>(p.gu + j * 2 * I + c));
      const uint4 uv = __ldcg(reinterpret_cast<const uint4*>(p.gu + j * 2 * I + I + c));
      const auto* gh = reinterpret_cast<const __nv_bfloat162*>(&gv);
      const auto* uh = reinterpret_cast<const __nv_bfloat162*>(&uv);
      uint4 o;
      auto* oh = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 g = __bfloat1622float2(gh[q]), u = __bfloat1622float2(uh[q]);
        oh[q] = __floats2bfloat162_rn(g.x / (1.0f + __expf(-g.x)) * u.x, g.y / (1.0f + __expf(-g.y)) * u.y);  // swiglu.cuh
      }
      *reinterpret_cast<uint4*>(s_a + i) = o;
    }
    __syncthreads();
    gemv(
        gwarp, nwarps, H, K, I, [&](int64_t c, int j) { return p.w2 + (int64_t(s_ids[j]) * H + c) * I; },
        [&](int j) { return (const bf16*)(s_a + int64_t(j) * I); },
        [&](int j, float v) { return s_w[j] * __bfloat162float(__float2bfloat16_rn(v)); },
        [&](int64_t c, float v) { p.tmp_out[c] = __float2bfloat16_rn(v); });
  }
  mark(6);
  if (timed) atomicAdd(p.phase_ns + 7, 1ull);
}

int64_t scratch_bytes(const FusedDecodeLayerParams& p, int blocks) {
  const int64_t D = p.head_dim, group = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 0;
  const int64_t merge = p.kv_heads > 0 ? (int64_t(blocks + p.kv_heads - 1) / p.kv_heads + int64_t(kWarps) * D) * 4 : 0;
  const int64_t attn = 2 * kTile * (D + 8) * 2 + (group * D + D) * 4;
  const int64_t oproj = int64_t(p.q_heads) * D * 2;
  const int64_t route = int64_t(p.num_experts) * 4;
  const int64_t down = int64_t(p.top_k) * p.inter * 2;
  return std::max(std::max(std::max(attn, oproj), std::max(route, down)), merge);
}

int64_t smem_bytes(const FusedDecodeLayerParams& p, int blocks) {
  return 2 * p.hidden * 2 + (scratch_bytes(p, blocks) + 15) / 16 * 16;
}
constexpr int64_t kMaxSmem = 227 * 1024;

// The blocks of a launch: the reason check sizes shared memory for at most this many SMs.
constexpr int kMaxBlocks = 1024;

}  // namespace

int fused_decode_layer_blocks(int device) {
  int sms = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int64_t fused_decode_layer_ws_floats(int blocks, int q_heads, int kv_heads, int head_dim) {
  if (kv_heads < 1) return 0;
  const int64_t max_splits = (blocks + kv_heads - 1) / kv_heads;
  return int64_t(q_heads) * max_splits * (head_dim + 2);
}

std::string fused_decode_layer_unsupported_reason(const FusedDecodeLayerParams& p) {
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim=" + s(p.head_dim) + " (legal: 64, 128)";
  if (p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0)
    return "q_heads=" + s(p.q_heads) + " kv_heads=" + s(p.kv_heads) + " (need kv_heads >= 1 dividing q_heads)";
  if (p.q_heads / p.kv_heads > 2 * kWarps)
    return "q_heads / kv_heads=" + s(p.q_heads / p.kv_heads) + " (legal: <= " + s(2 * kWarps) + ")";
  if (p.hidden < 8 || p.hidden % 8 != 0) return "hidden=" + s(p.hidden) + " (need a positive multiple of 8)";
  if (p.inter < 8 || p.inter % 8 != 0) return "inter=" + s(p.inter) + " (need a positive multiple of 8)";
  if (p.num_experts < 1 || p.num_experts > kernels::kRouterMaxExperts)
    return "num_experts=" + s(p.num_experts) + " (legal: 1.." + s(kernels::kRouterMaxExperts) + ")";
  if (p.top_k < 1 || p.top_k > kFusedDecodeMaxTopK || p.top_k > p.num_experts)
    return "top_k=" + s(p.top_k) + " (legal: 1..min(" + s(kFusedDecodeMaxTopK) + ", num_experts))";
  if (bool(p.q_norm) != bool(p.k_norm)) return "q_norm and k_norm must both be set or both be null";
  if (!(p.routed_scaling > 0.0f)) return "routed_scaling must be > 0";
  if (p.block_tokens < 1) return "block_tokens=" + s(p.block_tokens) + " (need >= 1)";
  if (p.hidden > 16384) return "hidden=" + s(p.hidden) + " (legal: <= 16384)";
  if (smem_bytes(p, kMaxBlocks) > kMaxSmem)
    return "shared memory " + s(smem_bytes(p, kMaxBlocks)) + " bytes (hidden, top_k x inter or q width too large; limit " +
           s(kMaxSmem) + ")";
  if (!p.res || !p.tmp_out || !p.in_norm || !p.post_norm || !p.wqkv || !p.wo || !p.rope_cs || !p.position ||
      !p.seq_len || !p.k_cache || !p.v_cache || !p.block_table || !p.router || !p.w13 || !p.w2 || !p.q || !p.kv ||
      !p.attn_ws || !p.attn || !p.o || !p.logits || !p.gu || !p.barrier)
    return "a required pointer is null";
  return {};
}

void launch_fused_decode_layer(const FusedDecodeLayerParams& p, cudaStream_t stream) {
  if (const auto why = fused_decode_layer_unsupported_reason(p); !why.empty())
    throw InputError("fused decode layer: " + why);
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  const int blocks = fused_decode_layer_blocks(device);
  if (p.attn_ws_floats < fused_decode_layer_ws_floats(blocks, p.q_heads, p.kv_heads, p.head_dim))
    throw InputError("fused decode layer: attention workspace of " + std::to_string(p.attn_ws_floats) +
                     " floats, need " + std::to_string(fused_decode_layer_ws_floats(blocks, p.q_heads, p.kv_heads, p.head_dim)));
  const std::size_t smem = std::size_t(smem_bytes(p, blocks));
  auto go = [&](auto kernel) {
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    int per_sm = 0;
    MIXSERVE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    if (per_sm < 1)
      throw InputError("fused decode layer: no block fits on an SM (" + std::to_string(smem) + " bytes of shared memory)");
    kernels::detail::launch_kernel(p.pdl, kernel, dim3(unsigned(blocks)), dim3(kThreads), smem, stream, p);
  };
  if (p.head_dim == 64)
    go(fused_decode_layer_kernel<64>);
  else
    go(fused_decode_layer_kernel<128>);
  MIXSERVE_LAUNCH_CHECK("fused_decode_layer_kernel");
}

}  // namespace mixserve::gpu
