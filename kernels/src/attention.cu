#include "mixserve/kernels/attention.cuh"
#include "mixserve/kernels/detail/device_support.hpp"
#include "mixserve/kernels/detail/pdl.cuh"

#include <algorithm>
#include <cmath>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {
using detail::aligned16;

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerCta = kWarps * 16;  // query rows (token, q head) of one CTA: 16 per warp
constexpr int kWarpsWide = 8;             // prefill-sized steps: 8 warps, 128 rows per CTA
constexpr int kRowsPerCtaWide = kWarpsWide * 16;
constexpr int kKvTile = 64;               // cache positions per shared-memory tile
constexpr int kPad = 8;                   // bf16 of padding per smem row: conflict-free fragment reads
constexpr int kMaxGroup = 64;             // q heads per kv head
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kKvTile % 16 == 0, "the P.V product walks the tile in k-slices of 16");
static_assert(kThreads % kKvTile == 0, "the V loader gives each thread whole columns of the tile");

// Shapes the kernels see, resolved once on the host.
struct Launch {
  int group = 1;             // q heads per kv head
  int block_shift = 4;       // log2(block_tokens)
  int num_splits = 1;
  int split_tokens = 0;      // cache positions per split (a multiple of kKvTile)
  float scale_log2 = 0.0f;   // softmax scale * log2(e): p = exp2((s - m) * scale_log2)
  float* part_o = nullptr;   // [num_splits, num_tokens, q_heads, head_dim] unnormalised out
  float2* part_ml = nullptr; // [num_splits, num_tokens, q_heads] (running max, sum)
  // AttentionParams::merge_tickets when the split merge runs inside the attention launch:
  // [num_seqs, kv_heads, q_tiles] arrival counters, zero between launches; null: merge kernel.
  int32_t* merge_tickets = nullptr;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// d += a (16x16, row-major) . b (16x8, column-major); bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Physical element offset of (position, kv head, dim 0) in a paged K or V pool.
__device__ __forceinline__ int64_t cache_offset(const PagedKvCache& c, int seq, int pos, int kv_head,
                                                int block_shift, int head_dim) {
  const int64_t block = c.block_table[int64_t(seq) * c.max_blocks_per_seq + (pos >> block_shift)];
  const int slot = pos & ((1 << block_shift) - 1);
  return ((block << block_shift) + slot) * (int64_t(c.kv_heads) * head_dim) + int64_t(kv_head) * head_dim;
}

// Merge of the splits of one row w = token * q_heads + head (one warp; pos: the token's cache
// position): splits past the position are unused. The partials are read through L2 (__ldcg): in
// the fused merge other CTAs of this launch wrote them.
template <int kHeadDim>
__device__ __forceinline__ void merge_row(const AttentionParams& p, const Launch& L, int64_t w, int pos, int lane) {
  constexpr int kPerLane = kHeadDim / 32;
  const int used = min(L.num_splits, pos / L.split_tokens + 1);
  const int64_t stride = p.num_tokens * int64_t(p.q_heads);  // between splits of one row
  float mx = -INFINITY;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, __ldcg(&L.part_ml[s * stride + w]).x);
  float acc[kPerLane] = {};
  float sum = 0.0f;
  for (int s = 0; s < used; ++s) {
    const float2 ml = __ldcg(&L.part_ml[s * stride + w]);
    const float f = exp2f((ml.x - mx) * L.scale_log2);
    sum += ml.y * f;
    const float* src = L.part_o + (s * stride + w) * kHeadDim + lane * kPerLane;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] += __ldcg(src + j) * f;
  }
  const float inv = 1.0f / sum;
#pragma unroll
  for (int j = 0; j < kPerLane; j += 2)
    *reinterpret_cast<uint32_t*>(p.out + w * kHeadDim + lane * kPerLane + j) = pack_bf16(acc[j] * inv, acc[j + 1] * inv);
}

// The tile of a tensor-core attention CTA: grid (q_tiles * num_splits, num_seqs, kv_heads), the
// late (heavy) query tiles first. false when the CTA has nothing to do: its rows lie past the
// sequence, or its split's key range is empty (rows whose keys all lie in earlier splits: the merge
// skips this split).
struct CtaTile {
  int num_q_tiles, q_tile, split, seq, kvh;
  int q0, q_len, rows, row0;  // rows of this (sequence, kv head): token-major, group heads each
  int ctx_before, n_keys;     // the CTA's last row sees positions [0, n_keys)
  int k_begin, k_end;         // this split's keys
};
template <int kRowsPerCta>
__device__ __forceinline__ bool cta_tile(const AttentionParams& p, const Launch& L, CtaTile& t) {
  t.num_q_tiles = gridDim.x / L.num_splits;
  t.q_tile = t.num_q_tiles - 1 - int(blockIdx.x) / L.num_splits;
  t.split = int(blockIdx.x) % L.num_splits;
  t.seq = blockIdx.y;
  t.kvh = blockIdx.z;
  t.q0 = p.q_start[t.seq];
  t.q_len = p.q_start[t.seq + 1] - t.q0;
  t.rows = t.q_len * L.group;
  t.row0 = t.q_tile * kRowsPerCta;
  if (t.row0 >= t.rows) return false;
  t.ctx_before = p.seq_lens[t.seq] - t.q_len;
  const int last_tok = (min(t.rows, t.row0 + kRowsPerCta) - 1) / L.group;
  t.n_keys = t.ctx_before + last_tok + 1;
  t.k_begin = t.split * L.split_tokens;
  t.k_end = min(t.n_keys, t.k_begin + L.split_tokens);
  return t.k_begin < t.k_end;
}

// Fused split merge (L.merge_tickets set): every CTA of a (sequence, kv head, q tile) that wrote
// partials takes a ticket after a fence; the one that arrives last (`arrivals` in all: the splits
// whose key range is not empty) resets the counter to zero for the next launch (graph replays)
// and merges the tile's rows, one warp per row, with the same arithmetic as merge_splits_kernel.
// Every thread of the CTA must call it.
template <int kHeadDim, int kW>
__device__ __forceinline__ void merge_tile_if_last(const AttentionParams& p, const Launch& L, int ticket,
                                                   int arrivals, int row0, int rows_end, int q0, int kvh,
                                                   int ctx_before) {
  __shared__ int s_last;
  __threadfence();  // this thread's partials are visible device-wide before the CTA's ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const int before = atomicAdd(&L.merge_tickets[ticket], 1);
    s_last = before == arrivals - 1;
    if (s_last) L.merge_tickets[ticket] = 0;  // every arrival has counted: no more adds this launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // the other CTAs' partials (fenced before their tickets) are read after ours
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = row0 + warp; r < rows_end; r += kW) {
    const int tok = r / L.group;
    const int64_t w = int64_t(q0 + tok) * p.q_heads + kvh * L.group + r % L.group;
    merge_row<kHeadDim>(p, L, w, ctx_before + tok, lane);
  }
}

// grid (q_tiles * num_splits, num_seqs, kv_heads), kW * 32 threads (kW warps of 16 query rows:
// 4 for decode-sized steps, 8 for prefill, where the K/V tiles are shared by twice the rows).
// See attention.cuh.
template <int kHeadDim, int kW>
static __global__ void __launch_bounds__(kW * 32) tc_attention_kernel(AttentionParams p, Launch L) {
  detail::allow_next_kernel();  // the o_proj GEMV may start prefetching its weights
  static_assert(kHeadDim % 16 == 0, "the Q.K^T product walks head_dim in k-slices of 16");
  constexpr int kThreads = kW * 32;
  constexpr int kRowsPerCta = kW * 16;
  constexpr int kVecPerRow = kHeadDim / 8;  // 16-byte vectors per cache row
  constexpr int kLoadsPerThread = kKvTile * kVecPerRow / kThreads;
  static_assert(kKvTile * kVecPerRow % kThreads == 0, "the tile loader gives every thread the same count");
  static_assert(kThreads % kKvTile == 0, "the V loader gives each thread whole columns of the tile");
  __shared__ __align__(16) __nv_bfloat16 ks[kKvTile][kHeadDim + kPad];  // [position, dim]
  __shared__ __align__(16) __nv_bfloat16 vt[kHeadDim][kKvTile + kPad];  // [dim, position] (V transposed)

  CtaTile t;
  if (!cta_tile<kRowsPerCta>(p, L, t)) return;
  const auto [num_q_tiles, q_tile, split, seq, kvh, q0, q_len, rows, row0, ctx_before, n_keys, k_begin, k_end] = t;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates: row group, thread in quad
  const bool warp_active = row0 + warp * 16 < rows;

  // The thread's two rows: r[0] (fragment rows 0-7) and r[1] (rows 8-15).
  int pos[2];              // cache position of the row's token; -1 for rows past the sequence
  int64_t head_off[2];     // element offset of the row in q / out: [num_tokens, q_heads, head_dim]
  int tok_global[2], q_head[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + warp * 16 + g + 8 * i;
    const bool valid = r < rows;
    const int tok = valid ? r / L.group : 0;
    q_head[i] = kvh * L.group + (valid ? r % L.group : 0);
    tok_global[i] = q0 + tok;
    pos[i] = valid ? ctx_before + tok : -1;
    head_off[i] = (int64_t(tok_global[i]) * p.q_heads + q_head[i]) * kHeadDim;
  }

  // Q fragments for the whole loop: [k-slice][4 registers of bf16x2], zero for invalid rows.
  uint32_t qa[kHeadDim / 16][4];
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    const int c = kk * 16 + tq * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      qa[kk][i] = pos[i] >= 0 ? *reinterpret_cast<const uint32_t*>(p.q + head_off[i] + c) : 0u;
      qa[kk][i + 2] = pos[i] >= 0 ? *reinterpret_cast<const uint32_t*>(p.q + head_off[i] + c + 8) : 0u;
    }
  }

  float o[kHeadDim / 8][4];  // [d n-tile][fragment]: rows r[0] (0,1) and r[1] (2,3)
#pragma unroll
  for (int dt = 0; dt < kHeadDim / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the raw scores
  float l[2] = {0.0f, 0.0f};            // this thread's share of the running sum

  // K and V tiles go through registers. 8 warps: the loads of tile kt + kKvTile are issued right
  // after tile kt is stored to shared memory, so they are in flight while tile kt is computed
  // (4 warps: loaded at the top of each iteration, as the registers would spill). Every load of a
  // tile is issued before the first shared-memory store. K
  // row-major, one thread per 16-byte vector; V transposed on the way in, a warp covering 32
  // consecutive positions of one vector column (conflict-free 2-byte stores). Positions past
  // k_end read as zeros (0 * NaN is NaN).
  uint4 kr[kLoadsPerThread], vr[kLoadsPerThread];
  auto load_tile = [&](int kt) {
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int c = tid + j * kThreads;
      const int krow = c / kVecPerRow, kvec = c % kVecPerRow;
      const int vrow = c % kKvTile, vvec = c / kKvTile;
      kr[j] = vr[j] = make_uint4(0, 0, 0, 0);
      if (kt + krow < k_end)
        kr[j] = *reinterpret_cast<const uint4*>(p.cache.k + cache_offset(p.cache, seq, kt + krow, kvh, L.block_shift, kHeadDim) + kvec * 8);
      if (kt + vrow < k_end)
        vr[j] = *reinterpret_cast<const uint4*>(p.cache.v + cache_offset(p.cache, seq, kt + vrow, kvh, L.block_shift, kHeadDim) + vvec * 8);
    }
  };
  constexpr bool kPrefetch = kW >= 8;
  if (kPrefetch) load_tile(k_begin);
  for (int kt = k_begin; kt < k_end; kt += kKvTile) {
    __syncthreads();  // the previous tile is consumed
    if (!kPrefetch) load_tile(kt);
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int c = tid + j * kThreads;
      *reinterpret_cast<uint4*>(&ks[c / kVecPerRow][(c % kVecPerRow) * 8]) = kr[j];
      const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&vr[j]);
#pragma unroll
      for (int i = 0; i < 8; ++i) vt[(c / kKvTile) * 8 + i][c % kKvTile] = e[i];
    }
    __syncthreads();
    if (kPrefetch && kt + kKvTile < k_end) load_tile(kt + kKvTile);
    if (!warp_active) continue;

    // S = Q K^T for the warp's 16 rows x 64 positions: [n-tile of 8 positions][fragment].
    float s[kKvTile / 8][4];
#pragma unroll
    for (int nt = 0; nt < kKvTile / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&ks[nt * 8 + g][kk * 16 + tq * 2]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&ks[nt * 8 + g][kk * 16 + 8 + tq * 2]);
        mma_bf16_16816(s[nt], qa[kk], b0, b1);
      }
    }
    // Causal and range mask, then the online softmax update per row.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kKvTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, key = kt + nt * 8 + tq * 2 + (e % 2);
        if (key >= k_end || key > pos[i]) s[nt][e] = -INFINITY;
        tile_max[i] = fmaxf(tile_max[i], s[nt][e]);
      }
    float base[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float m_new = fmaxf(m[i], tile_max[i]);
      base[i] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing seen yet stays at zero
      alpha[i] = exp2f((m[i] - base[i]) * L.scale_log2);
      m[i] = m_new;
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int nt = 0; nt < kKvTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f((s[nt][e] - base[e / 2]) * L.scale_log2);
        l[e / 2] += s[nt][e];
      }
    // O += P V: the S accumulator layout of n-tiles 2j, 2j+1 is the A fragment of k-slice j.
#pragma unroll
    for (int j = 0; j < kKvTile / 16; ++j) {
      const uint32_t pa[4] = {pack_bf16(s[2 * j][0], s[2 * j][1]), pack_bf16(s[2 * j][2], s[2 * j][3]),
                              pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]),
                              pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 8; ++dt) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&vt[dt * 8 + g][j * 16 + tq * 2]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&vt[dt * 8 + g][j * 16 + 8 + tq * 2]);
        mma_bf16_16816(o[dt], pa, b0, b1);
      }
    }
  }
  if (warp_active) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    if (L.num_splits == 1) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (pos[i] < 0) continue;
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int dt = 0; dt < kHeadDim / 8; ++dt)
          *reinterpret_cast<uint32_t*>(p.out + head_off[i] + dt * 8 + tq * 2) =
              pack_bf16(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (pos[i] < 0) continue;
      const int64_t idx = (int64_t(split) * p.num_tokens + tok_global[i]) * p.q_heads + q_head[i];
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 8; ++dt)
        *reinterpret_cast<float2*>(L.part_o + idx * kHeadDim + dt * 8 + tq * 2) = make_float2(o[dt][2 * i], o[dt][2 * i + 1]);
      if (tq == 0) L.part_ml[idx] = make_float2(m[i], l[i]);
    }
  }
  if (L.num_splits == 1 || !L.merge_tickets) return;
  // The splits of this tile that wrote partials: those whose key range [k_begin, k_end) is not empty.
  const int arrivals = min(L.num_splits, (n_keys + L.split_tokens - 1) / L.split_tokens);
  const int ticket = (seq * int(gridDim.z) + kvh) * num_q_tiles + q_tile;
  merge_tile_if_last<kHeadDim, kW>(p, L, ticket, arrivals, row0, min(rows, row0 + kRowsPerCta), q0, kvh, ctx_before);
}

// ---- Prefill kernels (AttentionPrefillKernel::pipelined, pipelined_m32) ----
constexpr int kPrefillStages = 2;  // K/V tiles in flight: the one computed, the next
template <int kHeadDim>
constexpr int kPrefillRowElems = kHeadDim + kPad;  // smem row: 16 bytes more than the data, so the
                                                   // 8 rows of an ldmatrix land in distinct banks
// Dynamic shared memory of tc_prefill_attention_kernel<kHeadDim, kW, kM>: the K/V ring, then (kM
// == 2) the CTA's Q rows.
template <int kHeadDim, int kW, int kM>
constexpr std::size_t prefill_smem_bytes() {
  const std::size_t kv = std::size_t(kPrefillStages) * 2 * kKvTile * kPrefillRowElems<kHeadDim>;
  const std::size_t q = kM == 1 ? 0 : std::size_t(kW) * kM * 16 * kPrefillRowElems<kHeadDim>;
  return (kv + q) * sizeof(__nv_bfloat16);
}

// 16-byte async copy global -> shared; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 bf16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i,
// r[i] is the thread's fragment of matrix i (row lane/4, columns 2(lane%4), +1; transposed with
// .trans: rows 2(lane%4), +1 of column lane/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
// 2^x, one MUFU op (2 ulp; -inf gives +0). P is rounded to bf16 before P.V anyway.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// grid (q_tiles * num_splits, num_seqs, kv_heads), kW * 32 threads, prefill_smem_bytes of dynamic
// shared memory: [stage][K, V][kKvTile positions][kPrefillRowElems] bf16, row-major (position,
// dim), then for kM == 2 [kW * kM * 16 rows][kPrefillRowElems] of Q. Each warp owns kM * 16
// query rows: kM == 1 keeps its Q fragments in registers for the whole loop; kM == 2 reads them
// from shared memory each tile (registers for the twice larger accumulators), so every K/V
// fragment loaded serves two m-tiles (half the shared-memory reads per mma). The rows, splits
// and outputs are those of tc_attention_kernel (attention.cuh).
template <int kHeadDim, int kW, int kM>
static __global__ void __launch_bounds__(kW * 32, 8 / kW) tc_prefill_attention_kernel(AttentionParams p, Launch L) {
  detail::allow_next_kernel();  // the o_proj GEMV may start prefetching its weights
  static_assert(kHeadDim % 16 == 0, "Q.K^T walks head_dim in k-slices of 16, P.V in pairs of 8-wide n-tiles");
  static_assert(kKvTile % 16 == 0, "Q.K^T takes the tile's positions in pairs of 8-wide n-tiles");
  static_assert(kM == 1 || kM == 2, "one or two 16-row m-tiles per warp");
  constexpr int kThreads = kW * 32;
  constexpr int kRowsPerWarp = kM * 16;
  constexpr int kRowsPerCta = kW * kRowsPerWarp;
  constexpr int kRow = kPrefillRowElems<kHeadDim>;
  constexpr int kVecPerRow = kHeadDim / 8;  // 16-byte vectors per cache row
  constexpr int kLoadsPerThread = kKvTile * kVecPerRow / kThreads;
  static_assert(kKvTile * kVecPerRow % kThreads == 0, "the tile loader gives every thread the same count");
  static_assert(kRowsPerCta * kVecPerRow % kThreads == 0, "the Q loader gives every thread the same count");
  static_assert(kRow * 2 % 16 == 0, "cp.async and ldmatrix need 16-byte aligned smem rows");
  extern __shared__ __align__(16) unsigned char prefill_smem[];
  __nv_bfloat16* const smem = reinterpret_cast<__nv_bfloat16*>(prefill_smem);
  auto k_tile = [&](int stage) { return smem + (stage * 2) * kKvTile * kRow; };      // [kKvTile][kRow]
  auto v_tile = [&](int stage) { return smem + (stage * 2 + 1) * kKvTile * kRow; };  // [kKvTile][kRow]
  __nv_bfloat16* const qs = smem + kPrefillStages * 2 * kKvTile * kRow;             // [kRowsPerCta][kRow] (kM == 2)

  CtaTile t;
  if (!cta_tile<kRowsPerCta>(p, L, t)) return;
  const auto [num_q_tiles, q_tile, split, seq, kvh, q0, q_len, rows, row0, ctx_before, n_keys, k_begin, k_end] = t;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // mma fragment coordinates: row group, thread in quad
  const int warp_row0 = row0 + warp * kRowsPerWarp;
  const bool warp_active = warp_row0 < rows;
  const bool warp_full = warp_row0 + kRowsPerWarp <= rows;
  // Positions of the warp's first and last valid rows (-1 for an idle warp): tiles after
  // warp_last_pos are skipped, tiles wholly at or before warp_first_pos need no causal mask.
  const int warp_first_pos = warp_active ? ctx_before + warp_row0 / L.group : -1;
  const int warp_last_pos = warp_active ? ctx_before + (min(rows, warp_row0 + kRowsPerWarp) - 1) / L.group : -1;

  // The thread's rows: m-tile mi, fragment rows g (i = 0) and g + 8 (i = 1). Their q/out offsets
  // are recomputed in the epilogue (registers go to the accumulators).
  auto row_of = [&](int mi, int i) { return warp_row0 + mi * 16 + g + 8 * i; };
  // Element offset of valid row r in q / out: [num_tokens, q_heads, head_dim].
  auto head_off = [&](int r) {
    return (int64_t(q0 + r / L.group) * p.q_heads + kvh * L.group + r % L.group) * kHeadDim;
  };
  int pos[kM][2];  // cache position of the row's token; -1 for rows past the sequence
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row_of(mi, i);
      pos[mi][i] = r < rows ? ctx_before + r / L.group : -1;
    }

  // K/V tile at position kt into `stage`: one 16-byte cp.async per vector; positions at or past
  // k_end are zero-filled (0 * NaN would be NaN in P.V).
  auto load_tile = [&](int kt, int stage) {
    __nv_bfloat16* ks = k_tile(stage);
    __nv_bfloat16* vs = v_tile(stage);
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int c = tid + j * kThreads;
      const int row = c / kVecPerRow, vec = c % kVecPerRow;
      const bool valid = kt + row < k_end;
      const int64_t off =
          valid ? cache_offset(p.cache, seq, kt + row, kvh, L.block_shift, kHeadDim) + vec * 8 : 0;
      cp_async16_zfill(ks + row * kRow + vec * 8, p.cache.k + off, valid);
      cp_async16_zfill(vs + row * kRow + vec * 8, p.cache.v + off, valid);
    }
  };
  if constexpr (kM == 2) {
    // The CTA's Q rows into shared memory (zeros past the sequence), in the first tile's group.
#pragma unroll
    for (int j = 0; j < kRowsPerCta * kVecPerRow / kThreads; ++j) {
      const int c = tid + j * kThreads;
      const int row = c / kVecPerRow, vec = c % kVecPerRow;
      const int r = row0 + row;
      const bool valid = r < rows;
      cp_async16_zfill(qs + row * kRow + vec * 8, p.q + (valid ? head_off(r) + vec * 8 : 0), valid);
    }
  }
  load_tile(k_begin, 0);
  cp_async_commit();

  // kM == 1: Q fragments for the whole loop, [k-slice][4 registers of bf16x2], zero for invalid rows.
  uint32_t qa_regs[kM == 1 ? kHeadDim / 16 : 1][4];
  if constexpr (kM == 1) {
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const int c = kk * 16 + tq * 2;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const __nv_bfloat16* q = p.q + (pos[0][i] >= 0 ? head_off(row_of(0, i)) : 0);
        qa_regs[kk][i] = pos[0][i] >= 0 ? *reinterpret_cast<const uint32_t*>(q + c) : 0u;
        qa_regs[kk][i + 2] = pos[0][i] >= 0 ? *reinterpret_cast<const uint32_t*>(q + c + 8) : 0u;
      }
    }
  }

  float o[kM][kHeadDim / 8][4];  // [m-tile][d n-tile][fragment]: rows g (0,1) and g + 8 (2,3)
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) o[mi][dt][0] = o[mi][dt][1] = o[mi][dt][2] = o[mi][dt][3] = 0.0f;
  float m[kM][2], l[kM][2];  // running max of the raw scores; this thread's share of the running sum
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.0f;
  }

  // ldmatrix row addresses: lane -> matrix lane / 8, row lane % 8 of it.
  const int ld_mat = lane / 8, ld_row = lane % 8;
  const int num_tiles = (k_end - k_begin + kKvTile - 1) / kKvTile;
  for (int t = 0; t < num_tiles; ++t) {
    const int kt = k_begin + t * kKvTile;
    cp_async_wait_all();
    // Tile t (and Q) has landed for every thread, and every warp is done with tile t - 1, whose
    // stage the next copy overwrites.
    __syncthreads();
    if (t + 1 < num_tiles) {
      load_tile(kt + kKvTile, (t + 1) % kPrefillStages);
      cp_async_commit();
    }
    if (kt > warp_last_pos) continue;  // every key of the tile is after the warp's rows (or idle warp)
    const __nv_bfloat16* ks = k_tile(t % kPrefillStages);
    const __nv_bfloat16* vs = v_tile(t % kPrefillStages);

    // S = Q K^T for the warp's rows x kKvTile positions: [m-tile][n-tile of 8 positions][fragment].
    // One ldmatrix.x4 gives the B fragments (k lo, k hi) of two n-tiles.
    float s[kM][kKvTile / 8][4];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int nt = 0; nt < kKvTile / 8; ++nt) s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t qa[kM][4];
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
        if constexpr (kM == 1) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[mi][e] = qa_regs[kk][e];
        } else {
          // A fragment of rows (mi * 16 ..) x k-slice kk: matrices (rows lo, k lo), (hi, lo),
          // (lo, hi), (hi, hi).
          ldmatrix_x4(qa[mi], qs + ((warp * kM + mi) * 16 + (ld_mat % 2) * 8 + ld_row) * kRow + kk * 16 +
                                  (ld_mat / 2) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < kKvTile / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, ks + ((2 * np + ld_mat / 2) * 8 + ld_row) * kRow + kk * 16 + (ld_mat % 2) * 8);
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) {
          mma_bf16_16816(s[mi][2 * np], qa[mi], b[0], b[1]);
          mma_bf16_16816(s[mi][2 * np + 1], qa[mi], b[2], b[3]);
        }
      }
    }
    // Causal and range mask, only where some key of the tile may be after a row or past k_end.
    const bool masked = !warp_full || kt + kKvTile > k_end || kt + kKvTile - 1 > warp_first_pos;
    if (masked) {
#pragma unroll
      for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int nt = 0; nt < kKvTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kt + nt * 8 + tq * 2 + (e % 2);
            if (key >= k_end || key > pos[mi][e / 2]) s[mi][nt][e] = -INFINITY;
          }
    }
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) {
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kKvTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[mi][nt][e]);
      float base_scaled[2];  // running max * scale * log2(e): p = 2^(s * scale_log2 - base_scaled)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
        const float m_new = fmaxf(m[mi][i], tile_max[i]);
        base_scaled[i] = m_new == -INFINITY ? 0.0f : m_new * L.scale_log2;  // nothing seen yet: stays zero
        const float alpha = exp2_approx(fmaf(m[mi][i], L.scale_log2, -base_scaled[i]));
        m[mi][i] = m_new;
        l[mi][i] *= alpha;
#pragma unroll
        for (int dt = 0; dt < kHeadDim / 8; ++dt) {
          o[mi][dt][2 * i] *= alpha;
          o[mi][dt][2 * i + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kKvTile / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mi][nt][e] = exp2_approx(fmaf(s[mi][nt][e], L.scale_log2, -base_scaled[e / 2]));
          l[mi][e / 2] += s[mi][nt][e];
        }
    }
    // O += P V: the S accumulator layout of n-tiles 2j, 2j+1 is the A fragment of k-slice j; one
    // ldmatrix.x4.trans gives the B fragments (positions lo, hi) of two 8-wide d-tiles.
#pragma unroll
    for (int j = 0; j < kKvTile / 16; ++j) {
      uint32_t pa[kM][4];
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
        pa[mi][0] = pack_bf16(s[mi][2 * j][0], s[mi][2 * j][1]);
        pa[mi][1] = pack_bf16(s[mi][2 * j][2], s[mi][2 * j][3]);
        pa[mi][2] = pack_bf16(s[mi][2 * j + 1][0], s[mi][2 * j + 1][1]);
        pa[mi][3] = pack_bf16(s[mi][2 * j + 1][2], s[mi][2 * j + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (j * 16 + (ld_mat % 2) * 8 + ld_row) * kRow + (2 * dp + ld_mat / 2) * 8);
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) {
          mma_bf16_16816(o[mi][2 * dp], pa[mi], b[0], b[1]);
          mma_bf16_16816(o[mi][2 * dp + 1], pa[mi], b[2], b[3]);
        }
      }
    }
  }
  if (warp_active) {
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        l[mi][i] += __shfl_xor_sync(0xffffffffu, l[mi][i], 1);
        l[mi][i] += __shfl_xor_sync(0xffffffffu, l[mi][i], 2);
      }
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (pos[mi][i] < 0) continue;
        const int r = row_of(mi, i);
        if (L.num_splits == 1) {
          const float inv = 1.0f / l[mi][i];
          __nv_bfloat16* out = p.out + head_off(r);
#pragma unroll
          for (int dt = 0; dt < kHeadDim / 8; ++dt)
            *reinterpret_cast<uint32_t*>(out + dt * 8 + tq * 2) = pack_bf16(o[mi][dt][2 * i] * inv, o[mi][dt][2 * i + 1] * inv);
        } else {
          const int64_t idx = (int64_t(split) * p.num_tokens + q0 + r / L.group) * p.q_heads + kvh * L.group + r % L.group;
#pragma unroll
          for (int dt = 0; dt < kHeadDim / 8; ++dt)
            *reinterpret_cast<float2*>(L.part_o + idx * kHeadDim + dt * 8 + tq * 2) =
                make_float2(o[mi][dt][2 * i], o[mi][dt][2 * i + 1]);
          if (tq == 0) L.part_ml[idx] = make_float2(m[mi][i], l[mi][i]);
        }
      }
  }
  if (L.num_splits == 1 || !L.merge_tickets) return;
  // Fused split merge, as tc_attention_kernel: every thread of the CTA (idle warps included) calls it.
  const int arrivals = min(L.num_splits, (n_keys + L.split_tokens - 1) / L.split_tokens);
  const int ticket = (seq * int(gridDim.z) + kvh) * num_q_tiles + q_tile;
  merge_tile_if_last<kHeadDim, kW>(p, L, ticket, arrivals, row0, min(rows, row0 + kRowsPerCta), q0, kvh, ctx_before);
}

// Sequence of a step token: the last s with q_start[s] <= token (binary search).
__device__ __forceinline__ int seq_of_token(const int32_t* q_start, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (q_start[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Merge of the splits (two-launch form): one warp per (token, q head).
template <int kHeadDim>
static __global__ void merge_splits_kernel(AttentionParams p, Launch L) {
  detail::allow_next_kernel();  // the o_proj GEMV may start prefetching its weights
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= p.num_tokens * p.q_heads) return;
  const int token = int(w / p.q_heads);
  const int seq = seq_of_token(p.q_start, p.num_seqs, token);
  const int q_len = p.q_start[seq + 1] - p.q_start[seq];
  const int pos = p.seq_lens[seq] - q_len + (token - p.q_start[seq]);
  merge_row<kHeadDim>(p, L, w, pos, lane);
}

// AttentionImpl::simple: one warp per (token, q head), one key at a time, scalar fp32.
template <int kHeadDim>
static __global__ void simple_attention_kernel(AttentionParams p, Launch L) {
  constexpr int kPerLane = kHeadDim / 32;
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= p.num_tokens * p.q_heads) return;
  const int token = int(w / p.q_heads), head = int(w % p.q_heads);
  const int seq = seq_of_token(p.q_start, p.num_seqs, token);
  const int q_len = p.q_start[seq + 1] - p.q_start[seq];
  const int pos = p.seq_lens[seq] - q_len + (token - p.q_start[seq]);
  const int kvh = head / L.group;
  float q[kPerLane], acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    q[j] = __bfloat162float(p.q[w * kHeadDim + lane + 32 * j]);
    acc[j] = 0.0f;
  }
  float mx = -INFINITY, sum = 0.0f;
  for (int key = 0; key <= pos; ++key) {
    const int64_t off = cache_offset(p.cache, seq, key, kvh, L.block_shift, kHeadDim);
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) dot += q[j] * __bfloat162float(p.cache.k[off + lane + 32 * j]);
#pragma unroll
    for (int d = 16; d >= 1; d /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, d);
    const float m_new = fmaxf(mx, dot);
    const float alpha = exp2f((mx - m_new) * L.scale_log2), e = exp2f((dot - m_new) * L.scale_log2);
    sum = sum * alpha + e;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) acc[j] = acc[j] * alpha + e * __bfloat162float(p.cache.v[off + lane + 32 * j]);
    mx = m_new;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) p.out[w * kHeadDim + lane + 32 * j] = __float2bfloat16_rn(acc[j] / sum);
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// "" when supported, else why not (the device is checked by is_supported).
std::string unsupported_reason(const AttentionParams& p) {
  const auto& c = p.cache;
  if (p.num_seqs < 0 || p.num_tokens < 0)
    return "num_seqs=" + std::to_string(p.num_seqs) + " num_tokens=" + std::to_string(p.num_tokens) + " (need >= 0)";
  if (std::find(kAttentionHeadDims.begin(), kAttentionHeadDims.end(), c.head_dim) == kAttentionHeadDims.end())
    return "head_dim=" + std::to_string(c.head_dim) + " (legal: 64, 128)";
  if (std::find(kKvBlockTokens.begin(), kKvBlockTokens.end(), c.block_tokens) == kKvBlockTokens.end())
    return "block_tokens=" + std::to_string(c.block_tokens) + " (legal: 8, 16, 32)";
  if (c.kv_heads <= 0 || p.q_heads <= 0 || p.q_heads % c.kv_heads != 0 || p.q_heads / c.kv_heads > kMaxGroup)
    return "q_heads=" + std::to_string(p.q_heads) + " kv_heads=" + std::to_string(c.kv_heads) +
           " (need q_heads a multiple of kv_heads, at most 64 q heads per kv head)";
  if (!(p.softmax_scale >= 0.0f) || !std::isfinite(p.softmax_scale))
    return "softmax_scale=" + std::to_string(p.softmax_scale) + " (need > 0, or 0 for 1/sqrt(head_dim))";
  if (p.impl != AttentionImpl::tensor_core && p.impl != AttentionImpl::simple) return "unknown impl";
  if (p.num_splits < 0) return "num_splits=" + std::to_string(p.num_splits) + " (need >= 0; 0 = automatic)";
  if (p.num_seqs == 0 || p.num_tokens == 0) return "";
  if (!p.q || !p.out || !c.k || !c.v || !c.block_table || !p.q_start || !p.seq_lens)
    return "a null pointer (q, out, cache.k, cache.v, cache.block_table, q_start, seq_lens must be set)";
  if (!aligned16(p.q) || !aligned16(p.out) || !aligned16(c.k) || !aligned16(c.v))
    return "q, out or the K/V pools not 16-byte aligned";
  if (p.max_q_len <= 0 || p.max_seq_len < p.max_q_len)
    return "max_q_len=" + std::to_string(p.max_q_len) + " max_seq_len=" + std::to_string(p.max_seq_len) +
           " (need 0 < max_q_len <= max_seq_len)";
  if (int64_t(p.max_seq_len) > int64_t(c.max_blocks_per_seq) * c.block_tokens)
    return "max_seq_len=" + std::to_string(p.max_seq_len) + " exceeds max_blocks_per_seq * block_tokens = " +
           std::to_string(int64_t(c.max_blocks_per_seq) * c.block_tokens);
  return "";
}

int sm_count(int device) {
  int sms = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Query tiles per (sequence, kv head) of the tensor-core grid (RunTensorCore's choice of CTA rows).
int q_tiles_of(const AttentionParams& p) {
  const int64_t rows = int64_t(p.max_q_len) * (p.q_heads / p.cache.kv_heads);
  return ceil_div(rows, rows > kRowsPerCta ? kRowsPerCtaWide : kRowsPerCta);
}

// Splits and their length in positions (a multiple of kKvTile).
void choose_splits(const AttentionParams& p, int device, int& num_splits, int& split_tokens) {
  num_splits = 1;
  split_tokens = std::max(kKvTile, ceil_div(p.max_seq_len, kKvTile) * kKvTile);
  if (p.impl != AttentionImpl::tensor_core || p.num_seqs == 0 || p.num_tokens == 0) return;
  int want = p.num_splits;
  if (want == 0) {
    // Aim at two CTAs per SM: decode grids (one q tile per (sequence, kv head)) are far smaller.
    const int group = p.q_heads / p.cache.kv_heads;
    const int64_t rows = int64_t(p.max_q_len) * group;
    const int per_cta = rows > kRowsPerCta ? kRowsPerCtaWide : kRowsPerCta;  // RunTensorCore's choice
    const int64_t base = int64_t(ceil_div(rows, per_cta)) * p.num_seqs * p.cache.kv_heads;
    const int64_t target = 2 * int64_t(sm_count(device));
    want = base >= target ? 1 : ceil_div(target, base);
  }
  split_tokens = std::max(kKvTile, ceil_div(ceil_div(p.max_seq_len, want), kKvTile) * kKvTile);
  num_splits = ceil_div(p.max_seq_len, split_tokens);
}

// The one dispatch over head_dim (legal values: kAttentionHeadDims).
template <template <int> class Fn, class... Args>
void dispatch_head_dim(int head_dim, Args&&... args) {
  switch (head_dim) {
    case 64: Fn<64>::run(args...); break;
    case 128: Fn<128>::run(args...); break;
    default: throw InputError("attention: head_dim=" + std::to_string(head_dim) + " (legal: 64, 128)");
  }
}

// The pipelined prefill kernel with kW warps of kM 16-row m-tiles.
template <int D, int kW, int kM>
void launch_prefill(const AttentionParams& p, const Launch& L, int64_t rows, cudaStream_t stream) {
  static_assert(kW * kM * 16 == kRowsPerCtaWide, "choose_splits sizes the grid with kRowsPerCtaWide rows per CTA");
  const int q_tiles = ceil_div(rows, kRowsPerCtaWide);
  const dim3 grid(unsigned(q_tiles * L.num_splits), unsigned(p.num_seqs), unsigned(p.cache.kv_heads));
  constexpr std::size_t smem = prefill_smem_bytes<D, kW, kM>();
  MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(tc_prefill_attention_kernel<D, kW, kM>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  tc_prefill_attention_kernel<D, kW, kM><<<grid, kW * 32, smem, stream>>>(p, L);
}

template <int D>
struct RunTensorCore {
  static void run(const AttentionParams& p, const Launch& L, cudaStream_t stream) {
    // 8 warps (128 query rows per CTA) once a sequence has more than 4 warps' worth of rows.
    const int64_t rows = int64_t(p.max_q_len) * L.group;
    if (rows > kRowsPerCta && p.prefill_kernel == AttentionPrefillKernel::pipelined) {
      launch_prefill<D, kWarpsWide, 1>(p, L, rows, stream);
    } else if (rows > kRowsPerCta && p.prefill_kernel == AttentionPrefillKernel::pipelined_m32) {
      launch_prefill<D, kWarpsWide / 2, 2>(p, L, rows, stream);
    } else if (rows > kRowsPerCta) {
      constexpr int kW = kWarpsWide;
      const int q_tiles = ceil_div(rows, kRowsPerCtaWide);
      const dim3 grid(unsigned(q_tiles * L.num_splits), unsigned(p.num_seqs), unsigned(p.cache.kv_heads));
      tc_attention_kernel<D, kW><<<grid, kW * 32, 0, stream>>>(p, L);
    } else {
      const int q_tiles = ceil_div(rows, kRowsPerCta);
      const dim3 grid(unsigned(q_tiles * L.num_splits), unsigned(p.num_seqs), unsigned(p.cache.kv_heads));
      tc_attention_kernel<D, kWarps><<<grid, kThreads, 0, stream>>>(p, L);
    }
    MIXSERVE_LAUNCH_CHECK("tc_attention_kernel");
    if (L.num_splits > 1 && !L.merge_tickets) {
      const int64_t warps = p.num_tokens * p.q_heads;
      merge_splits_kernel<D><<<unsigned(ceil_div(warps * 32, kThreads)), kThreads, 0, stream>>>(p, L);
      MIXSERVE_LAUNCH_CHECK("merge_splits_kernel");
    }
  }
};

template <int D>
struct RunSimple {
  static void run(const AttentionParams& p, const Launch& L, cudaStream_t stream) {
    const int64_t warps = p.num_tokens * p.q_heads;
    simple_attention_kernel<D><<<unsigned(ceil_div(warps * 32, kThreads)), kThreads, 0, stream>>>(p, L);
    MIXSERVE_LAUNCH_CHECK("simple_attention_kernel");
  }
};

}  // namespace

bool is_supported(const AttentionParams& p, int device) {
  if (!unsupported_reason(p).empty()) return false;
  return detail::device_is_sm80_or_newer(device);
}

int attention_num_splits(const AttentionParams& p, int device) {
  int n = 1, len = 0;
  choose_splits(p, device, n, len);
  return n;
}

std::size_t attention_merge_tickets(const AttentionParams& p, int device) {
  if (p.impl != AttentionImpl::tensor_core || p.num_seqs <= 0 || p.num_tokens <= 0 || p.cache.kv_heads <= 0 ||
      attention_num_splits(p, device) <= 1)
    return 0;
  return std::size_t(p.num_seqs) * std::size_t(p.cache.kv_heads) * std::size_t(q_tiles_of(p));
}

std::size_t attention_workspace_bytes(const AttentionParams& p, int device) {
  const int n = attention_num_splits(p, device);
  if (n <= 1) return 0;
  const std::size_t rows = std::size_t(n) * std::size_t(p.num_tokens) * std::size_t(p.q_heads);
  return rows * std::size_t(p.cache.head_dim) * sizeof(float) + rows * sizeof(float2);
}

void launch_attention(const AttentionParams& p, cudaStream_t stream) {
  const std::string why = unsupported_reason(p);
  if (!why.empty()) throw InputError("attention: unsupported parameters: " + why);
  if (p.num_seqs == 0 || p.num_tokens == 0) return;
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  Launch L;
  L.group = p.q_heads / p.cache.kv_heads;
  L.block_shift = 0;
  while ((1 << L.block_shift) < p.cache.block_tokens) ++L.block_shift;
  const float scale = p.softmax_scale > 0.0f ? p.softmax_scale : 1.0f / std::sqrt(float(p.cache.head_dim));
  L.scale_log2 = scale * kLog2e;
  choose_splits(p, device, L.num_splits, L.split_tokens);
  if (L.num_splits > 1) {
    const std::size_t need = attention_workspace_bytes(p, device);
    if (!p.workspace || p.workspace_bytes < need || !aligned16(p.workspace))
      throw InputError("attention: workspace of " + std::to_string(p.workspace_bytes) + " bytes given, " +
                       std::to_string(need) + " needed (16-byte aligned) for " + std::to_string(L.num_splits) +
                       " splits");
    const std::size_t rows = std::size_t(L.num_splits) * std::size_t(p.num_tokens) * std::size_t(p.q_heads);
    L.part_o = static_cast<float*>(p.workspace);                               // [splits, tokens, q_heads, head_dim]
    L.part_ml = reinterpret_cast<float2*>(L.part_o + rows * p.cache.head_dim);  // [splits, tokens, q_heads]
    if (p.merge_tickets && p.impl == AttentionImpl::tensor_core) {
      const std::size_t need_tickets = attention_merge_tickets(p, device);
      if (p.merge_tickets_count < need_tickets)
        throw InputError("attention: merge_tickets_count=" + std::to_string(p.merge_tickets_count) + ", " +
                         std::to_string(need_tickets) + " needed (num_seqs * kv_heads * query tiles) for the fused merge");
      L.merge_tickets = p.merge_tickets;  // [num_seqs, kv_heads, q_tiles]
    }
  }
  if (p.impl == AttentionImpl::simple)
    dispatch_head_dim<RunSimple>(p.cache.head_dim, p, L, stream);
  else
    dispatch_head_dim<RunTensorCore>(p.cache.head_dim, p, L, stream);
}

}  // namespace mixserve::kernels
