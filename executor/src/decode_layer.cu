// The fused batch-1 decode layer (decode_layer.hpp).
#include "mixserve/gpu/decode_layer.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/kernels/detail/pdl.cuh"
#include "mixserve/kernels/detail/router_device.cuh"
#include "mixserve/kernels/router.cuh"

// The compute_80 pass compiles the kernel body out (sm_90 only), leaving its helpers unused.
#pragma nv_diag_suppress 177

namespace mixserve::gpu {

namespace {
using bf16 = __nv_bfloat16;
// Consumer warps: every phase's work. 11 + the producer = 12 warps, 3 on each of the SM's 4
// schedulers, which leaves the same 168 registers a thread as 9 warps did (a scheduler's 16 K
// registers over its most loaded 3 warps); session 11 (H200 call 1): 8 consumers 2884.6 / 2881.7 us
// a step, 11 consumers 2721.5 / 2720.8, 7 (220 registers, no spills) 3117.7 / 3115.4.
constexpr int kWarps = 11;
constexpr int kThreads = 32 * kWarps;         // consumer threads
constexpr int kBlockThreads = kThreads + 32;  // + one producer warp: the weight stream
constexpr int kTile = 32;   // context positions per attention tile (one per lane)
constexpr float kLog2e = 1.4426950408889634f;
// A stage of the weight ring holds whole rows, >= 16.5 KiB by default (o_proj rows of 8 KB two a
// stage; 12 KB stages were ~1% slower: session 7). Session 11 (tensor-core sums, H200 calls 9-10):
// 16896 bytes (11 expert rows of 768 instead of 10, so a block's ~124 down rows of Qwen3-30B-A3B
// take 12 stages instead of 13 of the 11-stage ring) 2585.1-2599.8 us a step against 2617.0-2621.0
// with 16384. (The general kernel's default.)
constexpr int64_t kMinStageBytes = 16896;
// The compact layout (specialised(), session 12) leaves room for 11 stages of 18432 bytes: 12 down
// rows of 768 a stage, so a block's <= 128 down rows (one expert's share, kind_table) take <= 11.
// H200 call 5 (with the down rows by expert): 2601.2 / 2598.1 us a step, 16896-byte stages (12 of
// them) 2633.4; call 4 (without): 18432 2586.2 / 2581.9, 16896 2629.7 / 2628.8.
constexpr int64_t kCompactStageBytes = 18432;
constexpr int kMaxStages = 32;
// Named barriers: 0 is __syncthreads (used once, after the ring's barriers are initialised);
// 1 the consumer warps; 2 the routing hand-over from the consumers to the producer.
constexpr int kConsumerBar = 1, kRoutedBar = 2;

// The back-off between two polls of tagged words (ns). Session 9 (H200 call 11, with the relaxed
// grid-barrier polls below): 128 ns 3116.9 / 3119.4 us a step, 32 ns 3137.2 / 3130.6, 512 ns
// 3160.4 / 3154.5 (ncu, call 9: at 32 ns the SwiGLU's polls alone read ~2 GB of L2 a step).
constexpr unsigned kPollNs = 128;
// The specialised kernel's compact shared-memory layout (specialised(), session 12): no fp32 copies
// of the activations (only the general kernel's CUDA-core sums read them), the attention's q heads
// in the normed activations' bf16 copy; false gives the session-11 layout (an A/B switch).
constexpr bool kCompactLayout = true;
// The residual's combine gated by a counter (session 13): each block adds 1 to its layer's
// (otherwise unused) grid-barrier counter once its down sums are stored; the next layer's phase 0
// has one thread poll that word until every block has, then reads the tagged partials once (still
// checking the tags), instead of 256 threads re-reading all K x H words while the slowest block
// finishes. Alone it measured no gain (H200, session 13 call 1: 2582.0 / 2589.1 us a step vs
// 2577.5 / 2578.1); with kCountedSwiglu and route_token<4> below, 2520.0 / 2520.9.
constexpr bool kCountedCombine = true;
// The same for the SwiGLU: each block adds 1 to the counter of every expert slot its gate|up rows
// touch (barrier[1 + j]); a block whose down rows are one slot's (down rows by expert) has one
// thread wait for all of that slot's gate|up writers (session 13 call 1: 2555.3 / 2559.1 us with
// the counted combine, 2520.0 / 2520.9 with route_token<4> as well).
constexpr bool kCountedSwiglu = true;
// Trace builds (kFusedDecodeTraceStages > 0): the stamped layer's stage records (decode_layer.hpp),
// the producer's and the consumers' pointer (null outside that layer) and stage count at its start.
__shared__ unsigned long long *s_trp, *s_trc;
__shared__ uint32_t s_g0p, s_g0c;

__device__ __forceinline__ void csync() { asm volatile("bar.sync %0, %1;" ::"n"(kConsumerBar), "n"(kThreads) : "memory"); }

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// 8 bf16 weights (a 16-byte vector: element 2i in the low half of word i) . 8 fp32 activations,
// elements 0-3 at lo, 4-7 at hi. bf16 -> fp32 is a shift or a mask of the word.
// Activations of k elements live in shared memory as two planes (store_act8): vector v's elements
// 8v..8v+3 at [4v], 8v+4..8v+7 at [k/2 + 4v], so that a warp's 16-byte loads of consecutive vectors
// are consecutive (one 32-byte load per lane would conflict two ways: measured, ncu).
__device__ __forceinline__ float dot8r(const uint4& w, const float4& a0, const float4& a1, float acc) {
  acc = fmaf(__uint_as_float(w.x << 16), a0.x, acc);
  acc = fmaf(__uint_as_float(w.x & 0xffff0000u), a0.y, acc);
  acc = fmaf(__uint_as_float(w.y << 16), a0.z, acc);
  acc = fmaf(__uint_as_float(w.y & 0xffff0000u), a0.w, acc);
  acc = fmaf(__uint_as_float(w.z << 16), a1.x, acc);
  acc = fmaf(__uint_as_float(w.z & 0xffff0000u), a1.y, acc);
  acc = fmaf(__uint_as_float(w.w << 16), a1.z, acc);
  acc = fmaf(__uint_as_float(w.w & 0xffff0000u), a1.w, acc);
  return acc;
}
__device__ __forceinline__ float dot8f(const uint4& w, const float* lo, const float* hi, float acc) {
  return dot8r(w, *reinterpret_cast<const float4*>(lo), *reinterpret_cast<const float4*>(hi), acc);
}

// The same sum with the 8 activations as packed bf16 (the compact layout): the same products in the
// same order as dot8r of their fp32 values.
__device__ __forceinline__ float dot8b(const uint4& w, const uint4& x, float acc) {
  acc = fmaf(__uint_as_float(w.x << 16), __uint_as_float(x.x << 16), acc);
  acc = fmaf(__uint_as_float(w.x & 0xffff0000u), __uint_as_float(x.x & 0xffff0000u), acc);
  acc = fmaf(__uint_as_float(w.y << 16), __uint_as_float(x.y << 16), acc);
  acc = fmaf(__uint_as_float(w.y & 0xffff0000u), __uint_as_float(x.y & 0xffff0000u), acc);
  acc = fmaf(__uint_as_float(w.z << 16), __uint_as_float(x.z << 16), acc);
  acc = fmaf(__uint_as_float(w.z & 0xffff0000u), __uint_as_float(x.z & 0xffff0000u), acc);
  acc = fmaf(__uint_as_float(w.w << 16), __uint_as_float(x.w << 16), acc);
  acc = fmaf(__uint_as_float(w.w & 0xffff0000u), __uint_as_float(x.w & 0xffff0000u), acc);
  return acc;
}

// Stores 8 activations (elements 8v..8v+7 of a k-element vector) in the two-plane layout.
__device__ __forceinline__ void store_act8(float* base, int64_t k, int64_t v, const float (&f)[8]) {
  *reinterpret_cast<float4*>(base + 4 * v) = make_float4(f[0], f[1], f[2], f[3]);
  *reinterpret_cast<float4*>(base + k / 2 + 4 * v) = make_float4(f[4], f[5], f[6], f[7]);
}

// 8 floats (bf16 values) as 8 packed bf16, element 2i in the low half of word i.
__device__ __forceinline__ uint4 pack_bf16x8(const float (&f)[8]) {
  uint4 o;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(f[2 * e], f[2 * e + 1]);
  return o;
}

// bf16(a + b) of 8 bf16 pairs (rmsnorm.cuh's residual add: bf16(x + residual)).
__device__ __forceinline__ uint4 add_bf16x8(uint4 a, const uint4& b) {
  auto* ah = reinterpret_cast<__nv_bfloat162*>(&a);
  const auto* bh = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x = __bfloat1622float2(ah[j]), y = __bfloat1622float2(bh[j]);
    ah[j] = __floats2bfloat162_rn(y.x + x.x, y.y + x.y);
  }
  return a;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// v[r] summed over the warp for 8 rows at once (9 shuffles instead of 8 x 5, a reduce-scatter):
// every lane returns the total of row 4 b4 + 2 b3 + b2 (bits 4, 3, 2 of the lane), so row r's total
// is in lane row_lane(r) (and the 3 lanes above it).
__device__ __forceinline__ float reduce8(float (&v)[8]) {
  const int lane = threadIdx.x & 31;
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // keep rows 4 b4 + i
    const float send = b4 ? v[i] : v[i + 4], keep = b4 ? v[i + 4] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // keep rows 4 b4 + 2 b3 + i
    const float send = b3 ? v[i] : v[i + 2], keep = b3 ? v[i + 2] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  const float send = b2 ? v[0] : v[1], keep = b2 ? v[1] : v[0];
  float t = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  t += __shfl_xor_sync(0xffffffffu, t, 2);
  return t + __shfl_xor_sync(0xffffffffu, t, 1);
}
__device__ __forceinline__ int row_lane(int r) { return ((r & 4) << 2) | ((r & 2) << 2) | ((r & 1) << 2); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Grid-wide barrier number `phase` (1-based) over a counter that was zero at launch, among the
// consumer warps of every block (the producer warp never takes part). Writes before it (any
// block) are visible after it; data written inside the launch is read with ld.cg (L2).
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned phase, unsigned long long* stamp = nullptr) {
  csync();
  if (threadIdx.x == 0) {
    // The block's writes (ordered before this thread's by the barrier above) released at GPU
    // scope with the arrival; the acquire load orders the reads after it.
    if (stamp) stamp[0] = global_ns();
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
    if (stamp) {
      unsigned long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) :: "memory");
      stamp[1] = t;
    }
    const unsigned target = phase * gridDim.x;
    unsigned seen;
    // Relaxed polls (an acquire load also invalidates the SM's L1 each time: ncu showed
    // CCTL.IVALL per poll), then one acquire load: it reads a value of the counter's release
    // sequence, so it synchronises with every arrival before it.
    do {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
  }
  csync();
}

// The weight ring (sm_90: bulk copies into shared memory completing on mbarriers). Stage i has a
// `full` barrier (the producer's expect_tx arrival + the copy's bytes) and an `empty` one (the
// consuming warp's arrival). The parity trick as usual: the producer's first pass does not wait.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_fence_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// The wait sleeps until the phase completes or the hint (ns) runs out, instead of re-polling.
constexpr unsigned kSuspendHintNs = 20000;
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t a = smem_u32(b);
  uint32_t ok = 0;
  while (!ok)
    asm volatile(
        "{\n .reg .pred P;\n mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2, %3;\n selp.u32 %0, 1, 0, P;\n}\n"
        : "=r"(ok)
        : "r"(a), "r"(parity), "r"(kSuspendHintNs)
        : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
#endif
}
// The producer's arrival on a full barrier, announcing `bytes`, and the copy that completes them.
// evict_first (a createpolicy value, or 0): the weights are read once per step, so they may leave
// L2 first and keep the KV cache and the activations there.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, uint64_t* full,
                                          uint64_t evict_first) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(full)), "r"(bytes) : "memory");
  if (evict_first) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
            smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(full)), "l"(evict_first)
        : "memory");
    return;
  }
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(full))
               : "memory");
#endif
}

// The weight matrices a block streams, in the order the producer issues them and the consumers
// take them: q|k|v, o_proj, router, then (once routed) gate|up and down of the chosen experts.
enum Kind : int { kQkv = 0, kOproj = 1, kRouter = 2, kGateUp = 3, kDown = 4 };

// The shapes and weights the stream needs (passed by value to the out-of-line stream functions).
struct Mats {
  const bf16 *wqkv, *wo, *router, *w13, *w2;
  int64_t H, QW, KVW, I;
  int E, K;
  bool multirow;  // FusedDecodeLayerParams::multirow
  bool mma;       // FusedDecodeLayerParams::mma
};

// A run of `rows` consecutive weight rows of k elements starting at `src`; `out0` numbers the first
// row in the phase's outputs; `slot` is the expert slot (gate|up, down).
struct Seg {
  const bf16* src;
  int64_t rows, k, out0;
  int slot;
};

__device__ __forceinline__ void block_range(int64_t n, int64_t& lo, int64_t& hi) {
  lo = n * blockIdx.x / gridDim.x;
  hi = n * (int64_t(blockIdx.x) + 1) / gridDim.x;
}

// Rows of k elements per stage.
__device__ __host__ __forceinline__ int64_t stage_rows(int64_t stage_bytes, int64_t k) {
  const int64_t n = stage_bytes / (k * 2);
  return n < 1 ? 1 : n;
}

// A block's segments of each kind, computed once per launch (kind_table) into shared memory: the
// shapes, the grid and the stage size are the launch's, only the experts' ids change by layer.
// (Session 12: computed at every phase, seg_at's 64-bit divisions cost the producer ~1.5 us
// at each change of kind and the consumers ~1 us before each phase's first stage.)
// Segment: rows off .. off + rows of the matrix (gate|up, down: of expert slot j's n rows),
// numbered out0 .. in the phase's outputs.
struct SegT {
  int32_t off, rows, out0, j;
};
struct KindT {
  int32_t nseg, k, cps, stages;  // segments; row length; rows a stage; stages (all segments)
  SegT seg[kFusedDecodeMaxTopK];
};
constexpr int kKinds = 5;
__shared__ KindT s_kinds[kKinds];

// Thread `kind` of the prologue: s_kinds[kind]. q|k|v, o_proj, router: a contiguous share of the
// rows. gate|up: the block's share of the K x 2I rows, slot-major, cut at slot boundaries (one or
// two experts' rows in long runs). down: by expert when top_k <= blocks (below; down_slots() on the
// host assumes the same), else like gate|up. (Down rows by output column, all K experts per block,
// streamed at a third of gate|up's rate in session 6: docs/forward.md.)
__device__ void kind_table(const Mats& m, int kind, int64_t stage_bytes) {
  int64_t n, k, per = 0;
  switch (kind) {
    case kQkv: n = m.QW + 2 * m.KVW, k = m.H; break;
    case kOproj: n = m.H, k = m.QW; break;
    case kRouter: n = m.E, k = m.H; break;
    case kGateUp: per = 2 * m.I, n = int64_t(m.K) * per, k = m.H; break;
    default: per = m.H, n = int64_t(m.K) * per, k = m.I; break;
  }
  int64_t lo, hi;
  block_range(n, lo, hi);
  if (kind == kDown && int64_t(m.K) <= int64_t(gridDim.x)) {
    // Down rows by expert (session 12): the blocks [j G / K, (j + 1) G / K) share expert slot j's
    // H rows, so that a block's rows are one run of one expert (at most ceil(H / floor(G / K)) rows)
    // and never two partial runs: cut at a slot boundary, ~124 rows took one stage more than the
    // ring held in some blocks, whose last copy waited for a free slot while every block's next
    // layer waited for them.
    const int G = int(gridDim.x), b = int(blockIdx.x), K = m.K;
    int j = 0;
    while ((j + 1) * G / K <= b) ++j;
    const int b0 = j * G / K, nb = (j + 1) * G / K - b0, q = b - b0;
    lo = int64_t(j) * per + per * q / nb;
    hi = int64_t(j) * per + per * (q + 1) / nb;
  }
  KindT& t = s_kinds[kind];
  t.k = int32_t(k);
  t.cps = int32_t(stage_rows(stage_bytes, k));
  t.nseg = 0;
  t.stages = 0;
  for (int64_t c = lo; c < hi && t.nseg < kFusedDecodeMaxTopK;) {
    const int64_t j = per ? c / per : 0, r = c - j * per, len = per ? min(hi - c, per - r) : hi - c;
    t.seg[t.nseg++] = SegT{int32_t(r), int32_t(len), int32_t(c), int32_t(j)};
    t.stages += int32_t((len + t.cps - 1) / t.cps);
    c += len;
  }
}
// Segment i of `kind` as a Seg: the first row's address (the experts' from this layer's ids).
__device__ __forceinline__ Seg seg_of(const Mats& m, int kind, const int32_t* ids, int i) {
  const KindT& t = s_kinds[kind];
  const SegT& q = t.seg[i];
  const bf16* base;
  int64_t row = q.off;
  switch (kind) {
    case kQkv: base = m.wqkv; break;
    case kOproj: base = m.wo; break;
    case kRouter: base = m.router; break;
    case kGateUp: base = m.w13, row += int64_t(ids[q.j]) * 2 * m.I; break;
    default: base = m.w2, row += int64_t(ids[q.j]) * m.H; break;
  }
  return Seg{base + row * t.k, q.rows, t.k, q.out0, q.j};
}

// The ring: stages, their barriers, the counts that producer and consumers share.
struct Ring {
  bf16* buf;
  uint64_t *full, *empty;
  int64_t stage_bytes;
  int ns;
  unsigned inflight;  // bytes in flight at most (at least one copy)
  unsigned inflight_pre;  // the same for o_proj and the router (Layout::inflight_pre)
  unsigned inflight_qkv;  // the same for q|k|v (Layout::inflight_qkv)
  uint32_t* sizes;    // [ns] bytes of the copy in each slot (producer only)
  uint32_t* state;    // [4] oldest copy not yet seen landed, bytes outstanding, its slot, parity (producer only)
  uint64_t evict_first;  // L2 policy of the copies, or 0
};

// The producer (one warp, lane 0 issues): this block's stages of `kind` into the ring; `g` counts
// the block's stages since the launch (the consumers count the same way). Out of line, like
// consume(): inlined at each call the kernel's code grew to ~350 KB and ran from a cold
// instruction cache, phase after phase (measured, docs/forward.md).
__device__ __noinline__ uint32_t produce(Mats m, int kind, const int32_t* ids, Ring R, uint32_t g0) {
  const int lane = threadIdx.x & 31;
  const KindT& t = s_kinds[kind];
  if (lane == 0) {
    uint32_t g = g0;  // (lane 0's count; every lane returns g0 + the kind's stages)
    const unsigned ns = unsigned(R.ns);
    // Slots and barrier parities advanced without divisions; R.state: [0] the oldest copy not yet
    // seen landed, [1] bytes outstanding, [2] its slot, [3] its full barrier's parity.
    unsigned slot = g % ns, epar = ((g / ns) & 1u) ^ 1u;
    uint32_t oldest = R.state[0], out = R.state[1], oslot = R.state[2], opar = R.state[3];
    auto drop_oldest = [&]() {
      out -= R.sizes[oslot];
      ++oldest;
      if (++oslot == ns) oslot = 0, opar ^= 1u;
    };
    const unsigned cap = kind == kOproj || kind == kRouter ? R.inflight_pre : kind == kQkv ? R.inflight_qkv : R.inflight;
    for (int i = 0; i < t.nseg; ++i) {
      const Seg s = seg_of(m, kind, ids, i);
      for (int64_t r0 = 0; r0 < s.rows; r0 += t.cps, ++g) {
        mbar_wait(R.empty + slot, epar);
        const int64_t n = s.rows - r0 < t.cps ? s.rows - r0 : t.cps;
        const unsigned bytes = unsigned(n * s.k * 2);
        // At most `cap` bytes outstanding. Copies at least ns stages old have landed (their
        // consumer freed the slot); younger ones are waited for on their full barrier, whose
        // parity is theirs (their slot is not re-issued before g).
        while (g - oldest >= ns) drop_oldest();
        while (out > 0 && out + bytes > cap && oldest < g) {
          mbar_wait(R.full + oslot, opar);
          drop_oldest();
        }
        R.sizes[slot] = bytes;
        out += bytes;
        if constexpr (kFusedDecodeTraceStages > 0) {
          const uint32_t gi = g - s_g0p;
          if (s_trp && int64_t(gi) < kFusedDecodeTraceStages) s_trp[4 + 4 * gi] = global_ns();
        }
        bulk_load(R.buf + int64_t(slot) * (R.stage_bytes / 2), s.src + r0 * s.k, bytes, R.full + slot, R.evict_first);
        if (++slot == ns) slot = 0, epar ^= 1u;
      }
    }
    R.state[0] = oldest;
    R.state[1] = out;
    R.state[2] = oslot;
    R.state[3] = opar;
  }
  __syncwarp();
  return g0 + uint32_t(t.stages);
}

// Where consume() puts a row's value v (row c = seg.out0 + r of the phase's numbering).
enum Out : int {
  kOutBf16 = 1,  // bf16 out[c]
  kOutF32 = 2,   // float out[c]
  kOutPart = 3,  // float out[c] = w[slot] * bf16(v) (c = slot x H + output column)
  kOutTagged = 4,  // uint32 out[c] = bits of bf16(v) | tag << 16 (one relaxed store: value and tag together)
  kOutF32Tagged = 5,  // uint64 out[c] = bits of v | tag << 32 (one relaxed store)
};
struct Sink {
  int mode;
  void *out, *out2;
  int64_t split;
  const float* w;
  unsigned tag = 0;  // kOutTagged
};

// Stores row rr (of the segment) = v as `sink` says.
__device__ __forceinline__ void sink_store(const Sink& sink, const Seg& s, int64_t rr, float t) {
  const int64_t c = s.out0 + rr;
  switch (sink.mode) {
    case kOutBf16: static_cast<bf16*>(sink.out)[c] = __float2bfloat16_rn(t); break;
    case kOutF32: static_cast<float*>(sink.out)[c] = t; break;
    case kOutF32Tagged: {
      const unsigned long long w = (static_cast<unsigned long long>(sink.tag) << 32) | __float_as_uint(t);
      asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(static_cast<unsigned long long*>(sink.out) + c), "l"(w)
                   : "memory");
      break;
    }
    case kOutTagged: {
      const unsigned w = unsigned(__bfloat16_as_ushort(__float2bfloat16_rn(t))) | (sink.tag << 16);
      asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(static_cast<uint32_t*>(sink.out) + c), "r"(w) : "memory");
      break;
    }
    default:
      static_cast<float*>(sink.out)[c] = sink.w[s.slot] * __bfloat162float(__float2bfloat16_rn(t));
  }
}

// 8 consecutive 32-bit words by two relaxed 16-byte loads (each word single-copy atomic).
__device__ __forceinline__ void ld_relaxed8(const uint32_t* src, uint32_t (&w)[8]) {
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
               : "l"(src)
               : "memory");
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[4]), "=r"(w[5]), "=r"(w[6]), "=r"(w[7])
               : "l"(src + 4)
               : "memory");
}
// 8 tagged words (kOutTagged) from src, re-read until all carry `tag` (relaxed loads: each word is
// single-copy atomic, so a word with the tag has the value written with it).
__device__ __forceinline__ void load_tagged8(const uint32_t* src, unsigned tag, uint32_t (&w)[8]) {
  for (bool ready = false; !ready;) {
    ld_relaxed8(src, w);
    ready = true;
#pragma unroll
    for (int e = 0; e < 8; ++e) ready = ready && (w[e] >> 16) == tag;
    if (!ready) __nanosleep(kPollNs);  // fewer polls while the writers' stores travel
  }
}
// The bf16 bits of a tagged word as a float.
__device__ __forceinline__ float tagged_value(uint32_t w) { return __uint_as_float(w << 16); }
// src[32 m] for m < N (kOutTagged words; a lane's elements of a head in the lane + 32 m layout),
// re-read until all carry `tag`.
template <int N>
__device__ __forceinline__ void load_tagged_lane(const uint32_t* src, unsigned tag, uint32_t (&w)[N]) {
  for (bool ready = false; !ready;) {
    ready = true;
#pragma unroll
    for (int m = 0; m < N; ++m) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(w[m]) : "l"(src + 32 * m) : "memory");
      ready = ready && (w[m] >> 16) == tag;
    }
    if (!ready) __nanosleep(kPollNs);
  }
}
// 64-bit tagged words (fp32 bits | tag32 << 32: the attention partials): n <= N words at
// src + stride i (i < n), re-read until all carry tag32: the loads of a pass are
// independent (in flight together), so a ready batch costs one round trip.
template <int N>
__device__ __forceinline__ void load_tagged64_batch(const unsigned long long* src, int64_t stride, int n, unsigned tag32,
                                                    float (&v)[N]) {
  for (bool ready = false; !ready;) {
    ready = true;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i >= n) break;
      unsigned long long w;
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(src + stride * i) : "memory");
      ready = ready && unsigned(w >> 32) == tag32;
      v[i] = __uint_as_float(unsigned(w));
    }
    if (!ready) __nanosleep(kPollNs);
  }
}
__device__ __forceinline__ void store_tagged64(unsigned long long* dst, float v, unsigned tag32) {
  const unsigned long long w = (static_cast<unsigned long long>(tag32) << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(dst), "l"(w) : "memory");
}

// One warp's stage of n rows of k = 256 VPL elements (Mats::multirow): up to 8 rows summed at once,
// each lane's activation vectors loaded into registers once per 8 rows (4 at a time: 9 warps per
// SM leave 168 registers a thread), one reduce8 per 8 rows.
template <int VPL>
__device__ __forceinline__ void multirow_stage(const bf16* rows, int n, const float* a, const float* ah,
                                               const Sink& sink, const Seg& s, int64_t r0) {
  constexpr int64_t k = 256 * VPL;
  constexpr int kChunk = 4;
  const int lane = threadIdx.x & 31;
  const int mine = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);  // reduce8's row
  for (int rb = 0; rb < n; rb += 8) {
    float acc[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) acc[r] = 0.0f;
#pragma unroll
    for (int j0 = 0; j0 < VPL; j0 += kChunk) {
      float4 lo[kChunk], hi[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk && j0 + j < VPL; ++j) {
        lo[j] = *reinterpret_cast<const float4*>(a + (lane + 32 * (j0 + j)) * 4);
        hi[j] = *reinterpret_cast<const float4*>(ah + (lane + 32 * (j0 + j)) * 4);
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        if (rb + r >= n) break;
        const bf16* row = rows + int64_t(rb + r) * k;
#pragma unroll
        for (int j = 0; j < kChunk && j0 + j < VPL; ++j)
          acc[r] = dot8r(*reinterpret_cast<const uint4*>(row + (lane + 32 * (j0 + j)) * 8), lo[j], hi[j], acc[r]);
      }
    }
    const float t = reduce8(acc);
    if ((lane & 3) == 0 && rb + mine < n) sink_store(sink, s, r0 + rb + mine, t);
  }
}

// ldmatrix .x4 (four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, which
// lands in r[i]). volatile: ordered after the ring's mbarrier wait and the consumers' barriers.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// c += A . B, m16n8k16, bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// NP row pairs (rows rb + 2q, rb + 2q + 1; a missing second row repeats the first) of mma_stage:
// no branch inside, so that the pairs' loads and products interleave.
template <int NP>
__device__ __forceinline__ void mma_pairs(const bf16* rows, int n, int rb, int64_t k, const bf16* xl, float (&v)[8]) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const bool on_diag = (lane & 3) == (g >> 1), odd = g & 1;
  const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: this lane's matrix and row
  const int nc = int(k / 128);
  // A (weights): matrices 0, 1 = piece 0 of the pair's two rows, 2, 3 = piece 1.
  const bf16* wl[NP];
#pragma unroll
  for (int q = 0; q < NP; ++q) {
    const int ra = rb + 2 * q, r1 = min(ra + 1, n - 1);
    wl[q] = rows + int64_t((mi & 1) ? r1 : ra) * k + (mi >> 1) * 64 + mr * 8;
  }
  float acc[NP][2][4];
#pragma unroll
  for (int q = 0; q < NP; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][0][e] = acc[q][1][e] = 0.0f;
#pragma unroll 2
  for (int c = 0; c < nc; c += 2) {
    uint32_t bx[4];
    ldsm_x4(bx, xl + c * 128);
#pragma unroll
    for (int q = 0; q < NP; ++q) {
      uint32_t a0[4], a1[4];
      ldsm_x4(a0, wl[q] + c * 128);
      ldsm_x4(a1, wl[q] + (c + 1) * 128);
      mma_bf16(acc[q][0], a0, bx[0], bx[1]);
      mma_bf16(acc[q][1], a1, bx[2], bx[3]);
    }
  }
#pragma unroll
  for (int q = 0; q < NP; ++q) {
    const bool has1 = on_diag && rb + 2 * q + 1 < n;
    v[2 * q] = on_diag ? (odd ? acc[q][0][1] + acc[q][1][1] : acc[q][0][0] + acc[q][1][0]) : 0.0f;
    v[2 * q + 1] = has1 ? (odd ? acc[q][0][3] + acc[q][1][3] : acc[q][0][2] + acc[q][1][2]) : 0.0f;
  }
}

// One warp's stage of n rows of k elements (k % 256 == 0) on the tensor cores (Mats::mma, session
// 11). A 128-element chunk of a row is cut into 8 segments of 16 (segment s: elements 8s..8s+7 and
// 64 + 8s..64 + 8s + 7 of the chunk, so that ldmatrix reads 128 contiguous bytes); one m16n8k16
// product takes two rows' segments as A (rows 8r + s) and the activations' segments as B (column s),
// so the diagonal entries C[8r + s][s] are the segment dots of row r. Up to 4 row pairs share each
// activation load, two accumulators a pair (even and odd chunks); the 8 diagonal entries of each row
// are summed with the same reduce8 as multirow_stage. xb: the activations as bf16 (exactly the
// values the fp32 path reads). fp32 sums in the tensor cores' order.
__device__ __forceinline__ void mma_stage(const bf16* rows, int n, int64_t k, const bf16* xb, const Sink& sink,
                                          const Seg& s, int64_t r0) {
  const int lane = threadIdx.x & 31;
  const int mi = lane >> 3, mr = lane & 7;
  const int mine = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);  // reduce8's row
  // B (activations): matrices 0, 1 = pieces 0, 1 of chunk c; 2, 3 = those of chunk c + 1.
  const bf16* xl = xb + (mi >> 1) * 128 + (mi & 1) * 64 + mr * 8;
  for (int rb = 0; rb < n; rb += 8) {
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    switch (min(4, (n - rb + 1) / 2)) {  // row pairs in this group
      case 1: mma_pairs<1>(rows, n, rb, k, xl, v); break;
      case 2: mma_pairs<2>(rows, n, rb, k, xl, v); break;
      case 3: mma_pairs<3>(rows, n, rb, k, xl, v); break;
      default: mma_pairs<4>(rows, n, rb, k, xl, v); break;
    }
    const float t = reduce8(v);
    if ((lane & 3) == 0 && rb + mine < n) sink_store(sink, s, r0 + rb + mine, t);
  }
}

// The consumers: warp (slot mod kWarps) takes stage g (slot g mod ns) of this block's stages of
// `kind`, so each slot has one consumer that takes its uses in order (the full barrier's parity
// then never runs two phases behind); a row's dot product with act + slot x act_stride (fp32
// values of bf16 activations, shared memory) is summed in fp32 by one warp in one fixed order:
// rows of k = 256 m (m <= 8) by multirow_stage (8 rows at once, one reduce8), others one row at a
// time (four partial sums per lane, warp_sum), and stored as `sink` says. t_arrive / t_first
// (diagnostics, shared, or null): the last and the first arrival of a stage (globaltimer).
// VH > 0 (a specialised kernel, see kSpecialised): the multi-row sums only for rows of k = 256 VH
// and 256 VI (the model's hidden and expert widths), the others row by row; VH = 0: every k = 256 m,
// m <= 8. Session 10: with only the two needed multirow_stage instantiations in the kernel (271
// instead of 350 KB of code) the Qwen3-30B-A3B step took 2943-2945 instead of 3015-3017 us.
template <int VH, int VI>
__device__ __noinline__ uint32_t consume(Mats m, int kind, const int32_t* ids, Ring R, uint32_t g, const float* act,
                                         int64_t act_stride, const bf16* actb, Sink sink, bool skip_dot,
                                         unsigned long long* t_arrive, unsigned long long* t_first) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  // The stage's slot and its full barrier's parity, advanced without divisions (the loop walks
  // every stage of the block, the other warps' too).
  int slot = int(g % unsigned(R.ns));
  unsigned parity = (g / unsigned(R.ns)) & 1u;
  auto advance = [&]() {
    ++g;
    if (++slot == R.ns) {
      slot = 0;
      parity ^= 1u;
    }
  };
  const KindT& kt = s_kinds[kind];
  for (int i = 0; i < kt.nseg; ++i) {
    const SegT& q = kt.seg[i];
    const Seg s{nullptr, q.rows, kt.k, q.out0, q.j};  // (src: the producer's)
    const int64_t cps = kt.cps;
    const float* a = act ? act + s.slot * act_stride : nullptr;  // two planes (dot8f); null: compact
    const float* ah = a ? a + s.k / 2 : nullptr;
    const bf16* xb = actb ? actb + s.slot * act_stride : nullptr;
    // Vector v's dot product for the per-row sums: fp32 activations, or (the specialised kernel's
    // compact layout) the bf16 ones, the same values.
    auto dotv = [&](const uint4& w, int v, float acc) {
      if constexpr (kCompactLayout && VH > 0)
        return dot8b(w, *reinterpret_cast<const uint4*>(xb + v * 8), acc);
      else
        return dot8f(w, a + v * 4, ah + v * 4, acc);
    };
    const int nv = int(s.k / 8);
    for (int64_t r0 = 0; r0 < s.rows; r0 += cps, advance()) {
      if (slot % kWarps != warp) continue;
      mbar_wait(R.full + slot, parity);
      const unsigned long long t_in = t_arrive || t_first ? global_ns() : 0;
      uint32_t tr_gi = ~0u;
      if constexpr (kFusedDecodeTraceStages > 0) {
        tr_gi = g - s_g0c;
        if (s_trc && int64_t(tr_gi) < kFusedDecodeTraceStages && lane == 0) {
          s_trc[4 + 4 * tr_gi + 1] = global_ns();
          s_trc[4 + 4 * tr_gi + 3] = unsigned(kind);
        }
      }
      if (t_arrive && lane == 0) atomicMax(t_arrive, t_in);
      if (t_first && lane == 0) atomicMin(t_first, t_in);
      const int n = int(s.rows - r0 < cps ? s.rows - r0 : cps);
      const bf16* rows = R.buf + int64_t(slot) * (R.stage_bytes / 2);
      // Up to 8 vectors per lane (the rows of o_proj, k = 4096 and one per stage, were slower this
      // way: 9.0 vs 7.5 us per layer, session 7).
      int vpl = s.k % 256 == 0 && s.k <= 8 * 256 && m.multirow && !skip_dot ? int(s.k / 256) : 0;
      if (actb && m.mma && s.k % 256 == 0 && !skip_dot) {
        mma_stage(rows, n, s.k, actb + s.slot * act_stride, sink, s, r0);
        vpl = -1;
      } else if constexpr (VH > 0) {
        // The specialised kernel: no multi-row CUDA-core sums compiled (session 11: with every row
        // on the tensor cores they were unexecuted code, which cost ~2%: 2618.9-2628.8 us a step
        // without them, 2677.1-2678.0 with them); rows mma_stage does not take (MIXSERVE_FUSED_MMA=0)
        // are summed one at a time below.
        vpl = 0;
      } else {
        switch (vpl) {
          case 1: multirow_stage<1>(rows, n, a, ah, sink, s, r0); break;
          case 2: multirow_stage<2>(rows, n, a, ah, sink, s, r0); break;
          case 3: multirow_stage<3>(rows, n, a, ah, sink, s, r0); break;
          case 4: multirow_stage<4>(rows, n, a, ah, sink, s, r0); break;
          case 5: multirow_stage<5>(rows, n, a, ah, sink, s, r0); break;
          case 6: multirow_stage<6>(rows, n, a, ah, sink, s, r0); break;
          case 7: multirow_stage<7>(rows, n, a, ah, sink, s, r0); break;
          case 8: multirow_stage<8>(rows, n, a, ah, sink, s, r0); break;
          default: break;
        }
      }
      for (int r = 0; r < n && vpl == 0; ++r) {  // (vpl < 0: summed by mma_stage)
        float t = 0.0f;
        if (!skip_dot) {  // diagnostics: the stream without the arithmetic (zeros: WRONG results)
          const bf16* row = rows + int64_t(r) * s.k;
          float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
          int v = lane;
          for (; v + 96 < nv; v += 128) {
            const uint4 w0 = *reinterpret_cast<const uint4*>(row + v * 8);
            const uint4 w1 = *reinterpret_cast<const uint4*>(row + (v + 32) * 8);
            const uint4 w2 = *reinterpret_cast<const uint4*>(row + (v + 64) * 8);
            const uint4 w3 = *reinterpret_cast<const uint4*>(row + (v + 96) * 8);
            acc0 = dotv(w0, v, acc0);
            acc1 = dotv(w1, v + 32, acc1);
            acc2 = dotv(w2, v + 64, acc2);
            acc3 = dotv(w3, v + 96, acc3);
          }
          // The last 1-3 vectors per lane on independent sums too (k = 768: three per lane).
          if (v < nv) acc0 = dotv(*reinterpret_cast<const uint4*>(row + v * 8), v, acc0);
          if (v + 32 < nv) acc1 = dotv(*reinterpret_cast<const uint4*>(row + (v + 32) * 8), v + 32, acc1);
          if (v + 64 < nv) acc2 = dotv(*reinterpret_cast<const uint4*>(row + (v + 64) * 8), v + 64, acc2);
          t = warp_sum((acc0 + acc1) + (acc2 + acc3));
        }
        if (lane == 0) sink_store(sink, s, r0 + r, t);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(R.empty + slot);
      if constexpr (kFusedDecodeTraceStages > 0)
        if (s_trc && int64_t(tr_gi) < kFusedDecodeTraceStages && lane == 0) s_trc[4 + 4 * tr_gi + 2] = global_ns();
    }
  }
  return g;
}

// out = bf16(x * inv_rms * w) as rmsnorm.cuh (fp32 values, two-plane layout: dot8f; null in the
// compact layout) and outb (the same as bf16), x, out and outb in shared memory (x bf16), w global;
// 8 elements per thread per step (n % 8 == 0), the weights' loads issued before the sum.
__device__ void block_rmsnorm(const bf16* x, const bf16* w, float* out, bf16* outb, int64_t n, float eps, float* red) {
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
  csync();
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
    float o[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]), g = __bfloat1622float2(wh[j]);
      o[2 * j] = __bfloat162float(__float2bfloat16_rn(f.x * inv * g.x));
      o[2 * j + 1] = __bfloat162float(__float2bfloat16_rn(f.y * inv * g.y));
    }
    if (out) store_act8(out, n, i / 8, o);  // (null: the compact layout, bf16 only)
    *reinterpret_cast<uint4*>(outb + i) = pack_bf16x8(o);  // the same values as bf16 (mma_stage)
  }
  csync();
}

// bf16(sum over the K slots, in slot order, of part[slot][i .. i + 8)) as 8 packed bf16 (the MoE
// output of columns i..i+7; part written inside the launch, so read from L2).
__device__ __forceinline__ uint4 combine8(const float* part, int K, int64_t H, int64_t i) {
  float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll  // the K slots' loads in flight together (one L2 round trip, ~1 us under the weight stream)
  for (int j = 0; j < kFusedDecodeMaxTopK; ++j) {
    if (j >= K) break;
    const float4 a = __ldcg(reinterpret_cast<const float4*>(part + int64_t(j) * H + i));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(part + int64_t(j) * H + i + 4));
    t[0] += a.x, t[1] += a.y, t[2] += a.z, t[3] += a.w, t[4] += b.x, t[5] += b.y, t[6] += b.z, t[7] += b.w;
  }
  uint4 o;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(t[2 * e], t[2 * e + 1]);
  return o;
}

// bf16(sum over the K slots, in slot order, of w[slot] * part[slot][i .. i + 8)) from tagged words
// (FusedDecodeLayerParams::tagged_part: bf16 | tag << 16), re-read until all carry `tag`: the same
// fp32 products and sums as the float partials of combine8 (w * bf16, then the slot-order sum).
__device__ __forceinline__ uint4 combine8_tagged(const uint32_t* part, const float* w, int K, int64_t H, int64_t i,
                                                 unsigned tag) {
  float t[8];
  for (bool ready = false; !ready;) {
    ready = true;
#pragma unroll
    for (int e = 0; e < 8; ++e) t[e] = 0.0f;
#pragma unroll  // the K slots' loads in flight together
    for (int j = 0; j < kFusedDecodeMaxTopK; ++j) {
      if (j >= K) break;
      uint32_t v[8];
      ld_relaxed8(part + int64_t(j) * H + i, v);
      const float wj = w[j];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        ready = ready && (v[e] >> 16) == tag;
        t[e] = __fadd_rn(t[e], __fmul_rn(wj, __uint_as_float(v[e] << 16)));
      }
    }
    if (!ready) __nanosleep(kPollNs);
  }
  uint4 o;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(t[2 * e], t[2 * e + 1]);
  return o;
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

// The one specialised kernel (consume's VH, VI): hidden 2048 and expert width 768 with head_dim 128
// (Qwen3-30B-A3B, the model of issue #5's benchmark; other shapes run the general kernel, whose
// multi-row sums cover every k = 256 m, m <= 8, at the cost of ~80 KB more code).
constexpr int kSpecialisedH = 8, kSpecialisedI = 3;

// Shared memory of a launch: [x | normed | phase scratch | ring] (byte offsets).
struct Layout {
  int64_t scratch = 0, ring = 0, total = 0;
  int64_t stage_bytes = 0;  // ring stage size
  int ns = 0;               // ring stages
  int64_t inflight = 0;     // bytes in flight at most
  int64_t inflight_pre = 0;  // the same for o_proj's and the router's copies (at most inflight)
  int64_t inflight_qkv = 0;  // the same for q|k|v's (at most inflight)
  int down_slots = 0;       // expert slots a block's down rows touch, at most (down_slots())
};

// The expert slots a block's share of the K x H down rows touches at most: one when the blocks
// are shared out by expert (kind_table, top_k <= blocks); else a run of at most ceil(K H / blocks)
// rows spans at most (run - 1) / H + 2 slots.
int down_slots(const FusedDecodeLayerParams& p, int blocks) {
  if (p.top_k <= blocks) return 1;  // by expert (kind_table)
  const int64_t run = (int64_t(p.top_k) * p.hidden + blocks - 1) / std::max(blocks, 1);
  return int(std::min<int64_t>(p.top_k, (run - 1) / std::max<int64_t>(p.hidden, 1) + 2));
}

template <int D, int VH, int VI>
__global__ void __launch_bounds__(kBlockThreads, 1)
    fused_decode_layer_kernel(const __grid_constant__ FusedDecodeStepParams P, Layout lay) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  const FusedDecodeLayerParams& p0 = P.layer[0];  // the shapes and switches (every layer's are equal)
  const int64_t H = p0.hidden, QW = int64_t(p0.q_heads) * D, KVW = int64_t(p0.kv_heads) * D, I = p0.inter;
  const int K = p0.top_k;
  const int L = P.num_layers;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  bf16* s_x = reinterpret_cast<bf16*>(smem);  // [H] residual
  // The specialised kernel's compact layout (session 12: no fp32 copies of the activations, which
  // only the general kernel's CUDA-core sums read; one more ring stage or larger stages): s_n null.
  constexpr bool kCompact = kCompactLayout && VH > 0;
  float* s_n = kCompact ? nullptr : reinterpret_cast<float*>(s_x + H);  // [H] normed (fp32 values of the bf16 results, two planes)
  bf16* s_nb = kCompact ? s_x + H : reinterpret_cast<bf16*>(s_n + H);  // [H] the same as bf16 (mma_stage)
  unsigned char* s_u = smem + lay.scratch;    // phase scratch
  bf16* ring = reinterpret_cast<bf16*>(smem + lay.ring);      // [ns][stage_bytes]
  const int ns = lay.ns;
  const int64_t sb = lay.stage_bytes;
  __shared__ uint64_t s_full[kMaxStages], s_empty[kMaxStages];
  __shared__ float s_red[kWarps];
  // The routing of layer l in [l % 2]: the producer may still read layer l's while the consumers
  // route layer l + 1.
  __shared__ int32_t s_ids2[2][kFusedDecodeMaxTopK];
  __shared__ float s_w2[2][kFusedDecodeMaxTopK];
  // diagnostics: last arrivals of q|k|v, gate|up, down; first of gate|up, down; last and first of o_proj
  __shared__ unsigned long long s_t[8];
  if (threadIdx.x == 0) {
    if constexpr (kFusedDecodeTraceStages > 0) {
      s_trp = s_trc = nullptr;
      s_g0p = s_g0c = 0;
    }
    s_t[0] = s_t[1] = s_t[2] = 0;
    s_t[3] = s_t[4] = s_t[6] = s_t[7] = ~0ull;
    s_t[5] = 0;
    for (int i = 0; i < ns; ++i) {
      mbar_init(s_full + i, 1);
      mbar_init(s_empty + i, 1);
    }
    mbar_fence_init();
  }
  if (threadIdx.x >= 32 && threadIdx.x < 32 + kKinds)  // (another warp than the barriers' thread)
    kind_table(Mats{nullptr, nullptr, nullptr, nullptr, nullptr, H, QW, KVW, I, p0.num_experts, K, false, false},
               int(threadIdx.x) - 32, sb);
  // kCountedSwiglu: how many blocks write gate|up rows of this block's down slot (0: not counted)
  __shared__ int s_gu_writers;
  if (threadIdx.x == 40) {
    s_gu_writers = 0;
    if (kCountedSwiglu && int64_t(K) <= int64_t(gridDim.x)) {
      const int64_t per = 2 * I, n = int64_t(K) * per, G = gridDim.x;
      int64_t jj = 0;  // the block's down slot (kind_table's partition by expert)
      while ((jj + 1) * G / K <= int64_t(blockIdx.x)) ++jj;
      auto lo = [&](int64_t b) { return n * b / G; };  // block_range's lo of block b
      // The blocks whose [lo, hi) meets [jj per, (jj + 1) per): from the one holding row jj per to
      // the one holding row (jj + 1) per - 1.
      auto holder = [&](int64_t r) {
        int64_t b = r * G / n;
        while (b + 1 < G && lo(b + 1) <= r) ++b;
        while (b > 0 && lo(b) > r) --b;
        return b;
      };
      int writers = 0;  // (blocks with no rows add nothing)
      for (int64_t b = holder(jj * per), b1 = holder((jj + 1) * per - 1); b <= b1; ++b)
        writers += lo(b + 1) > lo(b) ? 1 : 0;
      s_gu_writers = writers;
    }
  }
  __shared__ uint32_t s_sizes[kMaxStages], s_prod[4];
  if (threadIdx.x == 64) s_prod[0] = s_prod[1] = s_prod[2] = s_prod[3] = 0;
  __syncthreads();  // the only whole-block barrier: the producer warp leaves here
  uint32_t g = 0;   // this block's ring stages so far (producer and consumers count alike)
  auto mats_of = [&](const FusedDecodeLayerParams& p) {
    return Mats{p.wqkv, p.wo, p.router, p.w13, p.w2, H, QW, KVW, I, p.num_experts, K,
                p0.multirow, p0.mma};
  };
  auto diag_of = [&](const FusedDecodeLayerParams& p) {
    return p.diag ? p.diag + int64_t(blockIdx.x) * kFusedDecodeDiagStamps : nullptr;
  };
  uint64_t policy = 0;  // the weights leave L2 first: read once per step (measured 4% faster)
  if (p0.evict_first) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  const Ring R{ring, s_full, s_empty, sb, ns, unsigned(lay.inflight), unsigned(lay.inflight_pre),
               unsigned(lay.inflight_qkv), s_sizes, s_prod, policy};
  const bool skip = p0.diag_skip_dot;

  if (warp == kWarps) {
    // The producer: the weights do not depend on the previous kernel, so no PDL wait. It runs
    // ahead of the consumers as far as the ring allows, across their grid barriers, and waits only
    // for the routing (the experts to stream). Layer after layer: the next layer's q|k|v rows
    // follow the down rows into the ring while the consumers still sum those.
    for (int l = 0; l < L; ++l) {
      const FusedDecodeLayerParams& p = P.layer[l];
      const Mats mats = mats_of(p);
      unsigned long long* diag = diag_of(p);
      const int32_t* s_ids = s_ids2[l & 1];
      if (diag && lane == 0) diag[0] = global_ns();
      if constexpr (kFusedDecodeTraceStages > 0) {
        if (lane == 0) {
          s_trp = diag ? diag + kFusedDecodeDiagNamed : nullptr;
          s_g0p = g;
        }
        __syncwarp();
      }
      g = produce(mats, kQkv, nullptr, R, g);
      g = produce(mats, kOproj, nullptr, R, g);
      g = produce(mats, kRouter, nullptr, R, g);
      asm volatile("bar.sync %0, %1;" ::"n"(kRoutedBar), "n"(kBlockThreads) : "memory");
      if (diag && lane == 0) diag[3] = global_ns();
      g = produce(mats, kGateUp, s_ids, R, g);
      if (diag && lane == 0) diag[15] = global_ns();
      g = produce(mats, kDown, s_ids, R, g);
      if (diag && lane == 0) diag[14] = global_ns();
    }
    return;
  }

  kernels::detail::wait_for_previous_kernel();
  // The launch's number (FusedDecodeLayerParams::epoch): layer l's gate|up values carry the tag
  // (epoch x kFusedDecodeMaxLayers + l) mod 2^16, so a reader tells this layer's from the previous one's.
  const unsigned epoch = __ldcg(p0.epoch);
  // Launch constants (session 11): every layer of a launch serves the same token of one sequence
  // (launch_fused_decode_layers checks that the layers share position, seq_len, rope_cs and the
  // block table), so the context length, the position, RoPE's cos | sin and the cache rows of the
  // block's first attention tile are read once here instead of in every layer's attention, where
  // each was a dependent global round trip before the first K / V load.
  __shared__ int s_ctx, s_pos, s_splits, s_chunk;
  __shared__ float s_cs[D];           // cos | sin
  __shared__ int64_t s_row0[kTile];   // cache row of each position of the block's first tile
  if (threadIdx.x == 0) {
    s_ctx = __ldcg(p0.seq_len);
    s_pos = __ldcg(p0.position);
  }
  for (int i = threadIdx.x; i < D; i += kThreads) s_cs[i] = __ldcg(p0.rope_cs + i);
  csync();
  {
    // The attention's split of the context into chunks (phase 1, phase 2).
    const int max_splits = (int(gridDim.x) + p0.kv_heads - 1) / p0.kv_heads;
    const int splits = max(1, min(max_splits, (s_ctx + kTile - 1) / kTile));
    const int chunk = (s_ctx + splits - 1) / splits;
    if (threadIdx.x == 0) {
      s_splits = splits;
      s_chunk = chunk;
    }
    // The block's first work item (kv head, chunk) is blockIdx.x (phase 1): its first tile's rows.
    if (int(blockIdx.x) < p0.kv_heads * splits && threadIdx.x < kTile) {
      const int ps = (int(blockIdx.x) % splits) * chunk + int(threadIdx.x);
      s_row0[threadIdx.x] = ps < s_ctx ? int64_t(__ldg(p0.block_table + ps / p0.block_tokens)) * p0.block_tokens +
                                             ps % p0.block_tokens
                                       : 0;
    }
  }
  // (phase 0's barriers order these stores before phase 1's reads)
  // Diagnostics: block 0 adds each phase's time (ns, barrier wait included) to phase_ns[0..6] and
  // counts the layers in [7].
  const bool timed = p0.phase_ns && blockIdx.x == 0 && threadIdx.x == 0;
  unsigned long long t_last = timed ? global_ns() : 0;
  for (int l = 0; l < L; ++l) {
  const FusedDecodeLayerParams& p = P.layer[l];
  const Mats mats = mats_of(p);
  unsigned long long* diag = diag_of(p);
  int32_t* s_ids = s_ids2[l & 1];
  float* s_w = s_w2[l & 1];
  if (diag && threadIdx.x == 0) diag[1] = global_ns();
  if constexpr (kFusedDecodeTraceStages > 0) {
    if (threadIdx.x == 0) {
      s_trc = diag ? diag + kFusedDecodeDiagNamed : nullptr;
      s_g0c = g;
    }
  }
  // This layer's tag of the values exchanged without a grid barrier: 16 bits next to a bf16 value
  // (q|k|v, attn, o, gu) or the logits' fp32, 32 bits next to the attention partials' fp32.
  const unsigned tag32 = epoch * unsigned(kFusedDecodeMaxLayers) + unsigned(l);
  const unsigned tag = tag32 & 0xffffu;
  // The experts' partials alternate between two buffers by layer: layer l + 1's phase 6 may write
  // while a slow block still reads layer l's in its phase 0 (no grid barrier between them).
  float* part = p.part + int64_t(l & 1) * K * H;
  auto mark = [&](int phase) {
    if (!timed) return;
    const unsigned long long t = global_ns();
    atomicAdd(p.phase_ns + phase, t - t_last);
    t_last = t;
  };

  // Phase 0: x, normed, q|k|v. After the launch's first layer the residual is this block's own
  // x2 of the previous layer (s_x: every block computes all of it in phase 4), so res is read
  // once and written once per launch.
  if (kCountedCombine && l > 0 && p0.tagged_part) {
    if (threadIdx.x == 0) {
      const unsigned* cnt = P.layer[l - 1].barrier;
      unsigned seen;
      for (;;) {
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(cnt) : "memory");
        if (seen >= gridDim.x) break;
        __nanosleep(kPollNs);
      }
    }
    csync();
  }
  for (int64_t i = threadIdx.x * 8; i < H; i += kThreads * 8) {
    uint4 r;
    if (l > 0) {  // the previous layer's MoE output, combined here
      const float* prev = P.layer[l - 1].part + int64_t((l - 1) & 1) * K * H;
      r = add_bf16x8(*reinterpret_cast<const uint4*>(s_x + i),
                     p0.tagged_part ? combine8_tagged(reinterpret_cast<const uint32_t*>(prev), s_w2[(l - 1) & 1], K, H,
                                                      i, (tag32 - 1u) & 0xffffu)
                                    : combine8(prev, K, H, i));
    } else {
      r = __ldcg(reinterpret_cast<const uint4*>(p.res + i));
      if (p.tmp_in) r = add_bf16x8(r, __ldcg(reinterpret_cast<const uint4*>(p.tmp_in + i)));
    }
    *reinterpret_cast<uint4*>(s_x + i) = r;
    if (blockIdx.x == 0 && p.rec_in) *reinterpret_cast<uint4*>(p.rec_in + i) = r;
  }
  csync();
  if (diag && threadIdx.x == 0) diag[23] = global_ns();
  block_rmsnorm(s_x, p.in_norm, s_n, s_nb, H, p.eps, s_red);
  if (diag && threadIdx.x == 0) diag[24] = global_ns();
  g = consume<VH, VI>(mats, kQkv, nullptr, R, g, s_n, 0, s_nb, Sink{kOutTagged, p.qkv_tagged, nullptr, 0, nullptr, tag}, skip,
              diag ? s_t : nullptr, diag ? s_t + 7 : nullptr);
  // No grid barrier (session 9): the attention re-reads the q|k|v words it needs until tagged.
  if (diag) csync();
  if (diag && threadIdx.x == 0) {
    diag[2] = s_t[0];
    diag[8] = global_ns();
  }
  mark(0);

  // Phase 1: attention partials. Items = kv heads x chunks of the context (tiles of kTile
  // positions); a warp per q head of the item's group.
  const int ctx = s_ctx;  // the launch constants (above)
  const int pos = s_pos;
  const int group = p.q_heads / p.kv_heads;
  const int max_splits = (int(gridDim.x) + p.kv_heads - 1) / p.kv_heads;
  const int splits = s_splits, chunk = s_chunk;
  const float scale2 = (p.softmax_scale > 0.0f ? p.softmax_scale : rsqrtf(float(D))) * kLog2e;
  {
    constexpr int kRow = D + 8;  // padded smem row (bf16)
    constexpr int kVecPerRow = D / 8;
    constexpr int kTileVecs = 2 * kTile * kVecPerRow;  // K and V vectors of a tile
    constexpr int kVecsPerThread = (kTileVecs + kThreads - 1) / kThreads;
    bf16* s_k = reinterpret_cast<bf16*>(s_u);      // [kTile][kRow]
    bf16* s_v = s_k + kTile * kRow;                // [kTile][kRow]
    // [group][D] (scaled); compact: in s_nb (free from q|k|v's last sum to phase 4; the launch
    // checks group x D x 4 <= H x 2)
    float* s_q = kCompact ? reinterpret_cast<float*>(s_nb) : reinterpret_cast<float*>(s_v + kTile * kRow);
    // The tile's K / V vectors (the new token's row excluded: it comes from the q|k|v words below).
    // first: the block's first tile, whose cache rows are in s_row0.
    auto load_tile = [&](int kvh, int t0, int n, uint4 (&r)[kVecsPerThread], bool first) {
#pragma unroll
      for (int u = 0; u < kVecsPerThread; ++u) {
        const int i = threadIdx.x + u * kThreads;
        r[u] = make_uint4(0, 0, 0, 0);
        if (i >= kTileVecs) continue;
        const int which = i / (kTile * kVecPerRow), rem = i % (kTile * kVecPerRow);
        const int row = rem / kVecPerRow, v = rem % kVecPerRow;
        const int ps = t0 + row;
        if (row < n && ps != pos) {
          const int64_t crow =
              first ? s_row0[row] : int64_t(__ldg(p.block_table + ps / p.block_tokens)) * p.block_tokens + ps % p.block_tokens;
          const int64_t off = (crow * p.kv_heads + kvh) * D + v * 8;
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
        if (t0 + row == pos) continue;  // written from the q|k|v words
        *reinterpret_cast<uint4*>((which ? s_v : s_k) + row * kRow + v * 8) = r[u];
      }
    };
    csync();
    for (int item = blockIdx.x; item < p.kv_heads * splits; item += gridDim.x) {
      const int kvh = item / splits, sp = item % splits;
      const int p0 = sp * chunk, p1 = min(ctx, p0 + chunk);
      uint4 tile[kVecsPerThread];
      if (p0 < p1) load_tile(kvh, p0, min(kTile, p1 - p0), tile, item == int(blockIdx.x));  // in flight during the q work
      // The q heads of the group: normed, rotated, scaled.
      for (int hh = warp; hh < group; hh += kWarps) {
        const int h = kvh * group + hh;
        float f[D / 32];
        uint32_t qw[D / 32];
        load_tagged_lane<D / 32>(p.qkv_tagged + int64_t(h) * D + lane, tag, qw);
#pragma unroll
        for (int m = 0; m < D / 32; ++m) f[m] = tagged_value(qw[m]);
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
          uint32_t kw[D / 32], vw[D / 32];
          load_tagged_lane<D / 32>(p.qkv_tagged + QW + int64_t(kvh) * D + lane, tag, kw);
          load_tagged_lane<D / 32>(p.qkv_tagged + QW + KVW + int64_t(kvh) * D + lane, tag, vw);
#pragma unroll
          for (int m = 0; m < D / 32; ++m) f[m] = tagged_value(kw[m]);
          norm_rope<D>(f, p.k_norm, s_cs, p.eps);
          const int64_t blk = p.block_table[pos / p.block_tokens];
          const int64_t off = ((blk * p.block_tokens + pos % p.block_tokens) * p.kv_heads + kvh) * D;
          const int row = pos - t0;
#pragma unroll
          for (int m = 0; m < D / 32; ++m) {
            const bf16 kb = __float2bfloat16_rn(f[m]);
            const bf16 vb = __ushort_as_bfloat16(static_cast<unsigned short>(vw[m] & 0xffffu));
            p.k_cache[off + lane + 32 * m] = kb;
            p.v_cache[off + lane + 32 * m] = vb;
            s_k[row * kRow + lane + 32 * m] = kb;
            s_v[row * kRow + lane + 32 * m] = vb;
          }
        }
        csync();
        if (t0 + kTile < p1) load_tile(kvh, t0 + kTile, min(kTile, p1 - t0 - kTile), tile, false);  // next tile
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
        csync();
      }
      // Partials: [h][sp] = (m, l, acc[D]).
#pragma unroll
      for (int r = 0; r < kMaxHeadsPerWarp; ++r) {
        const int hh = warp + r * kWarps;
        if (hh >= group) break;
        const int h = kvh * group + hh;
        unsigned long long* w = p.attn_ws + (int64_t(h) * max_splits + sp) * (D + 2);
        if (lane == 0) {
          store_tagged64(w, st_m[r], tag32);
          store_tagged64(w + 1, st_l[r], tag32);
        }
#pragma unroll
        for (int m = 0; m < D / 32; ++m) store_tagged64(w + 2 + lane + 32 * m, acc[r][m], tag32);
      }
    }
  }
  // No grid barrier (session 9): the merge re-reads the partial words it needs until tagged.
  mark(1);
  if (diag && threadIdx.x == 0) diag[18] = global_ns();

  // Phase 2: merge the chunks of each q head: a block per head; every warp finds the max and the
  // weights, warp w sums chunks w, w + kWarps, ..., the block adds the warps' sums in order.
  {
    float* s_f = reinterpret_cast<float*>(s_u);            // [2][max_splits] chunk weights, sums
    float* s_part = s_f + 2 * max_splits;                  // [kWarps][D]
    __shared__ float s_l;
    for (int h = blockIdx.x; h < p.q_heads; h += gridDim.x) {
      const unsigned long long* w = p.attn_ws + int64_t(h) * max_splits * (D + 2);
      if (warp == 0) {
        // (max, sum) of the lane's chunks sp = lane, lane + 32, ...: polled as one batch each.
        float m = -INFINITY;
        for (int sp = lane; sp < splits; sp += 32) {
          float ml[2];
          load_tagged64_batch<2>(w + int64_t(sp) * (D + 2), 1, 2, tag32, ml);
          m = fmaxf(m, ml[0]);
          s_f[sp] = ml[0];
          s_f[max_splits + sp] = ml[1];
        }
        m = warp_max(m);
        float l = 0.0f;
        for (int sp = lane; sp < splits; sp += 32) {  // the lane's own entries: no sync needed
          const float ms = s_f[sp];
          const float f = ms == -INFINITY ? 0.0f : exp2f(ms - m);
          s_f[sp] = f;
          l += s_f[max_splits + sp] * f;
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
        for (int j = 0; j < D / 32; ++j) vals[r][j] = 0.0f;
        if (sp < splits) load_tagged64_batch<D / 32>(w + int64_t(sp) * (D + 2) + 2 + lane, 32, D / 32, tag32, vals[r]);
      }
      csync();  // s_f, s_l
#pragma unroll
      for (int r = 0; r < kMaxPerWarp; ++r) {
        const int sp = warp + r * kWarps;
        if (sp >= splits) break;
#pragma unroll
        for (int j = 0; j < D / 32; ++j) a[j] = fmaf(vals[r][j], s_f[sp], a[j]);
      }
      for (int sp = warp + kMaxPerWarp * kWarps; sp < splits; sp += kWarps) {  // more chunks than kMaxPerWarp per warp
        float v[D / 32];
        load_tagged64_batch<D / 32>(w + int64_t(sp) * (D + 2) + 2 + lane, 32, D / 32, tag32, v);
#pragma unroll
        for (int j = 0; j < D / 32; ++j) a[j] = fmaf(v[j], s_f[sp], a[j]);
      }
#pragma unroll
      for (int j = 0; j < D / 32; ++j) s_part[warp * D + lane + 32 * j] = a[j];
      csync();
      for (int d = threadIdx.x; d < D; d += kThreads) {
        float t = 0.0f;
        for (int ww = 0; ww < kWarps; ++ww) t += s_part[ww * D + d];
        const unsigned w = unsigned(__bfloat16_as_ushort(__float2bfloat16_rn(s_l > 0.0f ? t / s_l : 0.0f))) | (tag << 16);
        asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p.attn_tagged + int64_t(h) * D + d), "r"(w) : "memory");
      }
      csync();
    }
  }
  // No grid barrier (session 8): phase 3 waits for the tagged attn words.
  mark(2);

  // Phase 3: o = attn . Wo^T.
  {
    float* s_a = kCompact ? nullptr : reinterpret_cast<float*>(s_u);  // [QW] (two planes)
    bf16* s_ab = kCompact ? reinterpret_cast<bf16*>(s_u) : reinterpret_cast<bf16*>(s_a + QW);  // [QW] the same as bf16 (mma_stage)
    for (int64_t i = threadIdx.x * 8; i < QW; i += kThreads * 8) {
      uint32_t w[8];
      load_tagged8(p.attn_tagged + i, tag, w);
      float f[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = tagged_value(w[e]);
      if constexpr (!kCompact) store_act8(s_a, QW, i / 8, f);
      *reinterpret_cast<uint4*>(s_ab + i) = make_uint4((w[0] & 0xffffu) | (w[1] << 16), (w[2] & 0xffffu) | (w[3] << 16),
                                                      (w[4] & 0xffffu) | (w[5] << 16), (w[6] & 0xffffu) | (w[7] << 16));
    }
    csync();
    if (diag && threadIdx.x == 0) diag[9] = global_ns();
    g = consume<VH, VI>(mats, kOproj, nullptr, R, g, s_a, 0, s_ab, Sink{kOutTagged, p.o_tagged, nullptr, 0, nullptr, tag}, skip,
                diag ? s_t + 5 : nullptr, diag ? s_t + 6 : nullptr);
    if (diag) {
      csync();
      if (threadIdx.x == 0) diag[21] = global_ns();
    }
  }
  // No grid barrier: phase 4 waits for the tagged o words.
  mark(3);

  // Phase 4: x2 = bf16(x + o), normed2, router logits.
  for (int64_t i = threadIdx.x * 8; i < H; i += kThreads * 8) {
    uint32_t w[8];
    load_tagged8(p.o_tagged + i, tag, w);
    const uint4 o8 = make_uint4((w[0] & 0xffffu) | (w[1] << 16), (w[2] & 0xffffu) | (w[3] << 16),
                                (w[4] & 0xffffu) | (w[5] << 16), (w[6] & 0xffffu) | (w[7] << 16));
    const uint4 r = add_bf16x8(*reinterpret_cast<const uint4*>(s_x + i), o8);
    *reinterpret_cast<uint4*>(s_x + i) = r;
    if (blockIdx.x == 0 && p.rec_attn) *reinterpret_cast<uint4*>(p.rec_attn + i) = r;
  }
  csync();
  if (diag && threadIdx.x == 0) diag[19] = global_ns();
  block_rmsnorm(s_x, p.post_norm, s_n, s_nb, H, p.eps, s_red);
  g = consume<VH, VI>(mats, kRouter, nullptr, R, g, s_n, 0, s_nb, Sink{kOutF32Tagged, p.logits_tagged, nullptr, 0, nullptr, tag},
              skip, nullptr, nullptr);
  // No grid barrier: the routing waits for the tagged logits.
  mark(4);

  // Phase 5: routing (every block, warp 0), handed to the producer, then gate|up for the chosen
  // experts.
  {
    float* s_lg = reinterpret_cast<float*>(s_u);  // [E]
    for (int e = threadIdx.x; e < p.num_experts; e += kThreads) {
      unsigned long long w;
      do
        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(p.logits_tagged + e) : "memory");
      while (unsigned(w >> 32) != tag && (__nanosleep(kPollNs), true));
      s_lg[e] = __uint_as_float(unsigned(w));
    }
    csync();
    if (diag && threadIdx.x == 0) diag[10] = global_ns();
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
      // The specialised kernel routes <= 128 experts with one instantiation (specialised() checks
      // it): 30 KB less code (0x38d00 -> 0x31700 bytes); alone no change, with the counted
      // combine and SwiGLU 2520 us a step against their 2555-2559 (session 13 call 1).
      if constexpr (VH > 0)
        kernels::detail::route_token<4>(rp, s_lg, 0, lane);
      else if (p.num_experts <= 32)
        kernels::detail::route_token<1>(rp, s_lg, 0, lane);
      else if (p.num_experts <= 64)
        kernels::detail::route_token<2>(rp, s_lg, 0, lane);
      else if (p.num_experts <= 128)
        kernels::detail::route_token<4>(rp, s_lg, 0, lane);
      else
        kernels::detail::route_token<8>(rp, s_lg, 0, lane);
      // The producer needs only the ids: released by warp 0 as soon as they are written (the
      // other warps arrived before the routing).
      __syncwarp();
      asm volatile("bar.arrive %0, %1;" ::"n"(kRoutedBar), "n"(kBlockThreads) : "memory");
    } else {
      asm volatile("bar.arrive %0, %1;" ::"n"(kRoutedBar), "n"(kBlockThreads) : "memory");
    }
    csync();
    if (diag && threadIdx.x == 0) {
      diag[11] = global_ns();
    }
  }
  g = consume<VH, VI>(mats, kGateUp, s_ids, R, g, s_n, 0, s_nb, Sink{kOutTagged, p.gu_tagged, nullptr, 0, nullptr, tag}, skip,
              diag ? s_t + 1 : nullptr, diag ? s_t + 3 : nullptr);
  if (kCountedSwiglu && p0.tagged_part) {
    csync();  // the block's gate|up sums stored (program order), then one relaxed count a slot
    if (threadIdx.x == 0) {
      const KindT& kg = s_kinds[kGateUp];
      for (int i = 0; i < kg.nseg; ++i)
        asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(p.barrier + 1 + kg.seg[i].j) : "memory");
    }
  }
  if (diag) {
    csync();
    if (threadIdx.x == 0) {
      diag[4] = s_t[1];
      diag[5] = global_ns();
    }
  }
  // No grid barrier: the SwiGLU below waits for the tagged gate|up values it reads (session 8;
  // grid barrier 6's release waited 1.8 us a layer behind the ring's copies in flight).
  mark(5);
  if (diag && threadIdx.x == 0) diag[16] = global_ns();
  if (l + 1 == L) kernels::detail::allow_next_kernel();

  // Phase 6: SwiGLU of the experts whose down rows the block has (one or two of the K x H rows'
  // slots) into shared memory, then those rows: partials w_j * bf16(row . SwiGLU_j) into p.part
  // [K][H], combined in slot order by the next layer's phase 0 or, after the launch's last layer,
  // into tmp_out below.
  {
    // [slots][I] (two planes per expert) for the block's slots j0, j0 + 1, ... (at most
    // Layout::down_slots, 2 when K <= the blocks), then the same as bf16 (mma_stage)
    float* s_a = kCompact ? nullptr : reinterpret_cast<float*>(s_u);
    // The block's slots j0 .. j1 - 1 (the launch's segment table: no 64-bit divisions here).
    const KindT& kd = s_kinds[kDown];
    const int j0 = kd.nseg > 0 ? kd.seg[0].j : 0, j1 = kd.nseg > 0 ? kd.seg[kd.nseg - 1].j + 1 : 0;
    bf16* s_sb = kCompact ? reinterpret_cast<bf16*>(s_u) : reinterpret_cast<bf16*>(s_a + int64_t(lay.down_slots) * I);
    const int iI = int(I), i_end = (j1 - j0) * iI;
    // (only a block with down rows: one without has j0 = 0, not its slot, and nothing to stage)
    if (kCountedSwiglu && p0.tagged_part && s_gu_writers > 0 && i_end > 0) {
      if (threadIdx.x == 0) {
        unsigned seen;
        for (;;) {
          asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(p.barrier + 1 + j0) : "memory");
          if (seen >= unsigned(s_gu_writers)) break;
          __nanosleep(kPollNs);
        }
      }
      csync();
    }
#pragma unroll 4
    for (int i0 = threadIdx.x * 8; i0 < i_end; i0 += kThreads * 8) {  // I % 8 == 0
      const int jj = i0 / iI, c = i0 - jj * iI, j = j0 + jj;
      // Gate and up words of columns c..c+7 (value | tag), re-read until all carry this layer's tag.
      uint32_t wg[8], wu[8];
      load_tagged8(p.gu_tagged + j * 2 * I + c, tag, wg);
      load_tagged8(p.gu_tagged + j * 2 * I + I + c, tag, wu);
      float o[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float gg = tagged_value(wg[q]), u = tagged_value(wu[q]);
        o[q] = __bfloat162float(__float2bfloat16_rn(gg / (1.0f + __expf(-gg)) * u));  // swiglu.cuh
      }
      if constexpr (!kCompact) store_act8(s_a + (j - j0) * I, I, c / 8, o);
      *reinterpret_cast<uint4*>(s_sb + (j - j0) * I + c) = pack_bf16x8(o);
    }
    csync();
    if (diag && threadIdx.x == 0) diag[17] = global_ns();
    g = consume<VH, VI>(mats, kDown, s_ids, R, g, kCompact ? nullptr : s_a - j0 * I, I, s_sb - j0 * I,
                p0.tagged_part ? Sink{kOutTagged, part, nullptr, 0, nullptr, tag} : Sink{kOutPart, part, nullptr, 0, s_w},
                skip,
                diag ? s_t + 2 : nullptr, diag ? s_t + 4 : nullptr);
  }
  if (kCountedCombine && p0.tagged_part && l + 1 < L) {
    csync();  // the block's down sums stored (program order), then one relaxed count
    if (threadIdx.x == 0) asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(p.barrier) : "memory");
  }
  // Without tagged_part, the layer's one grid barrier: the next layer's phase 0 reads every
  // block's partials, and every buffer exchanged as tagged words is rewritten only after it
  // (session 9). With tagged_part (session 10) only after the launch's last layer (res, tmp_out,
  // the epoch): the next layer's phase 0 polls the partials' tags, and a buffer is rewritten only
  // by stores that depend on every read of it (decode_layer.hpp, "no thin air").
  if (!p0.tagged_part || l + 1 == L) {
    grid_barrier(p.barrier, 1, diag ? diag + 29 : nullptr);
  } else if (diag) {
    csync();
    if (threadIdx.x == 0) diag[29] = diag[30] = global_ns();
  }
  if (l + 1 == L) {
    for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * 8; i < H; i += int64_t(gridDim.x) * kThreads * 8)
      *reinterpret_cast<uint4*>(p.tmp_out + i) =
          p0.tagged_part ? combine8_tagged(reinterpret_cast<const uint32_t*>(part), s_w, K, H, i, tag) : combine8(part, K, H, i);
    if (blockIdx.x == 0)  // x2, the residual after attention (every block read res in layer 0's phase 0)
      for (int64_t i = threadIdx.x * 8; i < H; i += kThreads * 8)
        *reinterpret_cast<uint4*>(p.res + i) = *reinterpret_cast<const uint4*>(s_x + i);
  }
  if (l + 1 == L && blockIdx.x == 0 && threadIdx.x == 0)
    atomicAdd(p0.epoch, 1u);  // every block read it at its start (before this layer's last barrier)
  mark(6);
  if (timed) atomicAdd(p.phase_ns + 7, 1ull);
  if (diag) {
    csync();
    if (threadIdx.x == 0) {
      diag[6] = s_t[2];
      diag[7] = global_ns();
      diag[12] = s_t[3];
      diag[13] = s_t[4];
      diag[20] = s_t[5];
      diag[22] = s_t[6];
      diag[25] = s_t[7];
      s_t[3] = s_t[4] = s_t[6] = s_t[7] = ~0ull;
      if constexpr (kFusedDecodeTraceStages > 0) diag[kFusedDecodeDiagNamed] = g - s_g0c;
    }
  }
  }  // layers
#else
  __trap();  // sm_90 only: launch_fused_decode_layer refuses older devices
#endif
}

// The specialised kernel (kSpecialisedH, kSpecialisedI, head_dim 128) with its compact layout,
// whose attention keeps the scaled q heads in the normed activations' bf16 copy (group x D fp32 <=
// H bf16); other shapes run the general kernel.
bool specialised(const FusedDecodeLayerParams& p) {
  return p.head_dim == 128 && p.hidden == 256 * kSpecialisedH && p.inter == 256 * kSpecialisedI && p.kv_heads > 0 &&
         p.num_experts <= 128 &&
         int64_t(p.q_heads / p.kv_heads) * p.head_dim * 4 <= int64_t(p.hidden) * 2;
}

int64_t scratch_bytes(const FusedDecodeLayerParams& p, int blocks) {
  const bool compact = kCompactLayout && specialised(p);  // bf16 activations only, q in s_nb
  const int64_t D = p.head_dim, group = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 0;
  const int64_t merge = p.kv_heads > 0 ? (2 * (int64_t(blocks + p.kv_heads - 1) / p.kv_heads) + int64_t(kWarps) * D) * 4 : 0;
  const int64_t attn = 2 * kTile * (D + 8) * 2 + (compact ? 0 : group * D * 4);
  const int64_t act = compact ? 2 : 4 + 2;  // bytes an activation: bf16 (and fp32)
  const int64_t oproj = int64_t(p.q_heads) * D * act;
  const int64_t route = int64_t(p.num_experts) * 4;
  const int64_t down = int64_t(down_slots(p, blocks)) * p.inter * act;
  return std::max(std::max(std::max(attn, oproj), std::max(route, down)), merge);
}

constexpr int64_t kMaxSmem = 227 * 1024;      // opt-in shared memory per block (H100 / H200)
constexpr int64_t kDefaultInflight = 128 * 1024;  // weight bytes in flight per block (make_layout)
constexpr int64_t kSpecialisedInflightStages = 3;  // the same for the specialised kernel, in stages
constexpr int64_t kStaticSmem = 3072;         // the kernel's static shared memory, rounded up
int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

Layout make_layout(const FusedDecodeLayerParams& p, int blocks) {
  Layout L;
  const int64_t H = p.hidden, QW = int64_t(p.q_heads) * p.head_dim;
  L.scratch = round_up(kCompactLayout && specialised(p) ? H * 2 + H * 2 : H * 2 + H * 4 + H * 2, 16);  // x, normed (fp32 and bf16)
  L.down_slots = down_slots(p, blocks);
  L.ring = round_up(L.scratch + scratch_bytes(p, blocks), 128);
  const int64_t dflt = kCompactLayout && specialised(p) ? kCompactStageBytes : kMinStageBytes;
  L.stage_bytes = std::max(p.stage_bytes > 0 ? round_up(p.stage_bytes, 128) : dflt,
                           round_up(std::max({H, QW, p.inter}) * 2, 128));
  const int64_t room = kMaxSmem - kStaticSmem - L.ring;
  L.ns = int(std::min<int64_t>(p.max_stages > 0 ? std::min(p.max_stages, kMaxStages) : kMaxStages,
                               room > 0 ? room / L.stage_bytes : 0));
  // Bytes in flight: at most kDefaultInflight of the ring by default. Session 7 (7 grid barriers a
  // layer) measured the whole ring faster than 48 KiB (3853 vs 3956 us a step); session 10 (H200
  // call 11, no barrier between layers, 11 stages of 16 KiB): 64-144 KiB 2885-2889 us, 160 KiB
  // 2916, the whole ring 2945-2946.
  // The specialised kernel (session 13, H200 calls 2-3, the counted combine and SwiGLU): copies in
  // flight queue in front of the exchanges between blocks (every tagged word and counter goes
  // through the same L2 as the weights), so fewer are faster as long as the DRAM stays busy:
  // 1 / 2 / 3 / 4 / 7 stages of 18432 bytes 2891 / 2402 / 2376 / 2462 / 2523 us a step, and o_proj's
  // and the router's copies (needed ~10 us after they are issued, while phases 0-2 exchange) one
  // stage at a time on top: 2345.7 / 2344.2 us (3 stages) vs 2375.2 / 2376.0; q|k|v's two at a
  // time on top of that (call 4): 2331.2 / 2329.1 vs 2338.7 / 2344.3.
  const bool spec = kCompactLayout && specialised(p);
  L.inflight = p.inflight_bytes > 0 ? p.inflight_bytes
               : spec               ? kSpecialisedInflightStages * L.stage_bytes
                                    : kDefaultInflight;
  L.inflight = std::min<int64_t>(L.inflight, int64_t(L.ns) * L.stage_bytes);
  L.inflight_pre = spec ? std::min(L.inflight, L.stage_bytes) : L.inflight;
  L.inflight_qkv = spec ? std::min(L.inflight, 2 * L.stage_bytes) : L.inflight;
  L.total = L.ring + int64_t(L.ns) * L.stage_bytes;
  return L;
}

struct DeviceInfo {
  int sms = 0, major = 0;
};
DeviceInfo device_info(int device) {
  static DeviceInfo cache[64];
  if (device >= 0 && device < 64 && cache[device].sms > 0) return cache[device];
  DeviceInfo d;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
  if (device >= 0 && device < 64) cache[device] = d;
  return d;
}
DeviceInfo current_device() {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  return device_info(device);
}

}  // namespace

int fused_decode_layer_blocks(int device) { return device_info(device).sms; }

int64_t fused_decode_layer_ws_words(int blocks, int q_heads, int kv_heads, int head_dim) {
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
  if (!p.res || !p.tmp_out || !p.part || !p.in_norm || !p.post_norm || !p.wqkv || !p.wo || !p.rope_cs || !p.position ||
      !p.seq_len || !p.k_cache || !p.v_cache || !p.block_table || !p.router || !p.w13 || !p.w2 || !p.qkv_tagged ||
      !p.attn_ws || !p.attn_tagged || !p.o_tagged || !p.logits_tagged || !p.gu_tagged || !p.epoch ||
      !p.barrier)
    return "a required pointer is null";
  const DeviceInfo d = current_device();
  if (d.major < 9) return "compute capability " + s(d.major) + ".x (the weight ring needs sm_90 bulk copies)";
  const Layout L = make_layout(p, d.sms);
  if (L.ns < 2)
    return "shared memory: " + s(L.ring) + " bytes before the weight ring leave room for " + s(L.ns) + " stages of " +
           s(L.stage_bytes) + " bytes (need 2; hidden, top_k x inter, q width or the largest row too large; limit " +
           s(kMaxSmem) + ")";
  return {};
}

void launch_fused_decode_layers(const FusedDecodeStepParams& P, cudaStream_t stream) {
  if (P.num_layers < 1 || P.num_layers > kFusedDecodeMaxLayers)
    throw InputError("fused decode layer: " + std::to_string(P.num_layers) + " layers in one launch (legal: 1.." +
                     std::to_string(kFusedDecodeMaxLayers) + ")");
  const FusedDecodeLayerParams& p = P.layer[0];
  const int blocks = current_device().sms;
  for (int l = 0; l < P.num_layers; ++l) {
    const FusedDecodeLayerParams& q = P.layer[l];
    if (const auto why = fused_decode_layer_unsupported_reason(q); !why.empty())
      throw InputError("fused decode layer " + std::to_string(l) + " of the launch: " + why);
    if (q.hidden != p.hidden || q.q_heads != p.q_heads || q.kv_heads != p.kv_heads || q.head_dim != p.head_dim ||
        q.inter != p.inter || q.num_experts != p.num_experts || q.top_k != p.top_k)
      throw InputError("fused decode layer " + std::to_string(l) + " of the launch: shapes differ from layer 0's");
    // The kernel reads the token's position, context length, RoPE angles and block table once
    // per launch (one token of one sequence).
    if (q.position != p.position || q.seq_len != p.seq_len || q.rope_cs != p.rope_cs ||
        q.block_table != p.block_table || q.block_tokens != p.block_tokens)
      throw InputError("fused decode layer " + std::to_string(l) +
                       " of the launch: position, seq_len, rope_cs or the block table differ from layer 0's "
                       "(a launch serves one token of one sequence)");
    if (q.attn_ws_words < fused_decode_layer_ws_words(blocks, q.q_heads, q.kv_heads, q.head_dim))
      throw InputError("fused decode layer: attention workspace of " + std::to_string(q.attn_ws_words) +
                       " words, need " + std::to_string(fused_decode_layer_ws_words(blocks, q.q_heads, q.kv_heads, q.head_dim)));
  }
  const Layout L = make_layout(p, blocks);
  const std::size_t smem = std::size_t(L.total);
  auto go = [&](auto kernel) {
    MIXSERVE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    int per_sm = 0;
    MIXSERVE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockThreads, smem));
    if (per_sm < 1)
      throw InputError("fused decode layer: no block fits on an SM (" + std::to_string(smem) + " bytes of shared memory)");
    if (!p.cooperative) {
      kernels::detail::launch_kernel(p.pdl, kernel, dim3(unsigned(blocks)), dim3(kBlockThreads), smem, stream, P, L);
      return;
    }
    // A cooperative launch: the runtime refuses it unless every block can be resident at once,
    // which the grid barriers need.
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(blocks));
    cfg.blockDim = dim3(kBlockThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = p.pdl ? 2 : 1;
    MIXSERVE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, P, L));
  };
  if (specialised(p))
    go(fused_decode_layer_kernel<128, kSpecialisedH, kSpecialisedI>);
  else if (p.head_dim == 64)
    go(fused_decode_layer_kernel<64, 0, 0>);
  else
    go(fused_decode_layer_kernel<128, 0, 0>);
  MIXSERVE_LAUNCH_CHECK("fused_decode_layer_kernel");
}

void launch_fused_decode_layer(const FusedDecodeLayerParams& p, cudaStream_t stream) {
  auto P = std::make_unique<FusedDecodeStepParams>();
  P->layer[0] = p;
  P->num_layers = 1;
  launch_fused_decode_layers(*P, stream);
}

}  // namespace mixserve::gpu
