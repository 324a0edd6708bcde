// One launch per MoE layer for a decode step of ONE sequence and ONE token (batch 1), on the
// whole GPU: a persistent grid (one block per SM: 11 consumer warps + 1 producer warp) that runs the
// layer's phases with grid-wide barriers between them instead of ~13 dependent launches
// (docs/forward.md "Fused decode layer"):
//   0  x = bf16(res + tmp_in) (tmp_in null: x = res; in a launch's later layers res is the block's
//      own x2 of the previous layer and tmp_in that layer's partials combined, see 6),
//      normed = RMSNorm(x) * in_norm                                                (every block)
//      q | k | v = normed . Wqkv^T, stored tagged                     (rows over the blocks)
//   -- no barrier (session 9): the attention re-reads the q|k|v words it needs until tagged
//   1  attention: QK-norm and RoPE of q (per head) and of the new k, the new k / v written to the
//      paged cache, softmax(scale q . K^T) V over the context split into chunks: partials
//      (max, sum, acc) per q head and chunk, stored tagged      (work items = kv heads x chunks)
//   -- no barrier (session 9): the merge re-reads its head's partial words until tagged
//   2  merge of the chunks' partials -> attn [q_heads * head_dim] bf16      (a block per q head)
//   -- no barrier (session 8): phase 3 re-reads the attn words it needs until tagged (below)
//   3  o = attn . Wo^T                                                        (rows over the blocks)
//   -- no barrier: phase 4 waits for the tagged o words
//   4  x2 = bf16(x + o), normed2 = RMSNorm(x2) * post_norm (every block); router logits (fp32)
//   -- no barrier: the routing waits for the tagged logits
//   5  top-k (every block: routing as router.cuh, softmax top-k, optional renormalisation)
//      gu = normed2 . W13[e]^T for the k experts, stored tagged with the layer (rows over the blocks)
//   -- no barrier (session 8): each block's SwiGLU re-reads the gu values it needs until they
//      carry this layer's tag (value and tag in one 32-bit word, relaxed stores and loads)
//   6  part[j][d] = bf16(bf16(silu(g_j) * u_j) . W2[e_j][d]), stored tagged (the K x H rows over
//      the blocks)
//   -- no barrier (session 10) except after the launch's last layer: the next layer's phase 0
//      re-reads the partial words until tagged
//      tmp_out[d] = bf16(sum_j w_j * part[j][d]) (slot order): the next layer of the launch does
//      this in its phase 0, adding it to x2; after the last layer every block writes its columns
// (res = x2 of the last layer is written by block 0 after the last barrier.)
// So on return res holds the residual after attention and tmp_out the MoE output, the contract of
// GpuModel's decode kernels (the next layer's input norm adds them). The same formulas and bf16
// rounding points as the unfused kernels (rmsnorm.cuh, the QK-norm/RoPE kernel, the grouped GEMV
// with the SwiGLU fused, combine.cuh); fp32 sums possibly in a different order, so not guaranteed
// bit-identical to them (on Qwen3-30B-A3B the first 24 of 48 layers were, session 7).
//
// Weights (session 6): each block's rows of q|k|v, o_proj, router, and (once routed) gate|up and
// down stream through a ring of shared-memory stages (cp.async.bulk completing on mbarriers) fed by
// the producer warp, which runs ahead of the consumers across their grid barriers: the o_proj rows
// arrive during the attention, the down rows while gate|up is summed. Each stage slot has one
// consumer warp. At most `inflight_bytes` are outstanding per block (session 13: fewer, because
// copies in flight delay the exchanges between blocks); the copies carry an L2
// evict_first policy. The stream code is out of line (the kernel inlined everything and ran at
// ~350 KB of code). Session 7: a warp sums up to 8 rows of a stage at once with its activations in
// registers and one reduction (multirow); gate|up and down rows are both split over the blocks as
// runs of the K experts' rows (one or two experts per block). Session 11: 11 consumer warps, and
// rows of k = 256 m summed on the tensor cores (mma), the activations kept as bf16 too. Session 12:
// the blocks' segments computed once per launch; down rows shared out by expert (a block's rows
// are one expert's); the specialised kernel keeps only bf16 activations (compact layout) and
// streams 18432-byte stages. Session 13: the next layer's combine and the SwiGLU wait on a
// counter of the writing blocks, then read the tagged words once; the specialised kernel keeps 3
// stages in flight (q|k|v 2, o_proj and the router 1): copies in flight delay the exchanges.
//
// The executor launches all consecutive supported layers of a step at once
// (launch_fused_decode_layers), so the producer streams the next layer's q|k|v rows while the
// consumers still sum the down rows.
//
// Measured on the H200 (docs/forward.md): correct against the float64 reference; the 48-layer b=1
// step of Qwen3-30B-A3B takes ~2326-2332 us against ~4055 us with the unfused decode kernels
// (session 13; 62.2-62.4% of the copy bandwidth; the launch runs a kernel specialised for its hidden /
// expert widths, decode_layer.cu kSpecialisedH). The phases without weights (attention, merge,
// routing) and the waits between phases are most of the gap in a layer's ~48.5 us; a grid barrier's release
// waits ~1-2.5 us while the block's weight copies are in flight (session 8's stamps): all 7
// barriers of session 7 are now tagged words instead (q|k|v, attention partials, attn, o, logits,
// gu, the experts' partials: bf16 or fp32 bits with a layer tag in one relaxed store; sessions
// 8-10), one grid barrier is left after the launch's last layer.
// Why a writer may reuse a buffer without a barrier (session 10): every value a block stores in
// layer l + 1 depends (data dependencies through the tagged words it read) on the partials of
// every block of layer l, and each of those depends on every read of layer l's buffers; the PTX
// memory model's "no thin air" axiom (dependencies and observed values form no cycle) then forbids
// a layer-l read from seeing a layer-(l + 1) store. The experts' partials, read in the next layer
// and rewritten in the one after, alternate between two buffers by layer parity.
// GpuModelConfig::fused_decode_layer stays off by default (mixserve-run bench --fused-decode-layer);
// the cost model predicts it from the profile's measured per-layer points (HardwareProfile::
// fused_decode_layer, mixserve-profile fused-layer) when told it runs.
//
// Sync contract: stream order; with pdl the launch may start while the previous kernel finishes
// (the producer issues weight copies before the consumers' wait). The grid barrier needs every block
// resident at once: the launch uses one block per SM and checks with the occupancy calculator;
// with `cooperative` (the executor's default since session 7) the runtime refuses the launch unless
// every block fits at once; without it, kernels of other streams (or MPS clients) that hold SMs
// could keep blocks out and deadlock it. The layout
// assumes 227 KiB of opt-in shared memory (H100/H200); the device's SM count and compute
// capability are cached per device. `barrier` must be zero at launch (the executor clears the
// step's counters with one memset before the layers) and is left at 1 x blocks.
// Requirements: sm_90 (bulk copies; the reason names older devices); head_dim 64 or 128; q_heads a
// multiple of kv_heads; hidden, q width and expert width multiples of 8; num_experts <=
// kRouterMaxExperts and top_k <= 8; 16-byte aligned weights and buffers; a ring of >= 2 stages.
#pragma once
#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

inline constexpr int kFusedDecodeMaxTopK = 8;
// A diagnostic build (-DMIXSERVE_FUSED_TRACE_STAGES=N, off by default) also records, for the stamped
// layer, each of a block's first N ring stages: producer issue, consumer arrival, consumer done, kind.
#ifndef MIXSERVE_FUSED_TRACE_STAGES
#define MIXSERVE_FUSED_TRACE_STAGES 0
#endif
inline constexpr int kFusedDecodeTraceStages = MIXSERVE_FUSED_TRACE_STAGES;
inline constexpr int kFusedDecodeDiagNamed = 31;  // named stamps per block (FusedDecodeLayerParams::diag)
// per block: the named stamps, then (trace builds) the stage count and 4 words a stage
inline constexpr int kFusedDecodeDiagStamps =
    kFusedDecodeDiagNamed + (kFusedDecodeTraceStages > 0 ? 4 + 4 * kFusedDecodeTraceStages : 0);

struct FusedDecodeLayerParams {
  // Residual stream and outputs.
  __nv_bfloat16* res = nullptr;           // [H]: x in, x2 out
  // [H] previous layer's FFN output, or null (first layer); read by a launch's first layer only.
  const __nv_bfloat16* tmp_in = nullptr;
  // [H] this layer's MoE output (may alias tmp_in); written by a launch's last layer only.
  __nv_bfloat16* tmp_out = nullptr;
  __nv_bfloat16* rec_in = nullptr;        // [H] or null: x (the previous layer's output) recorded
  __nv_bfloat16* rec_attn = nullptr;      // [H] or null: x2 recorded
  int64_t hidden = 0;
  float eps = 1e-6f;
  const __nv_bfloat16* in_norm = nullptr;    // [H]
  const __nv_bfloat16* post_norm = nullptr;  // [H]
  // Attention.
  const __nv_bfloat16* wqkv = nullptr;    // [(q_heads + 2 kv_heads) * head_dim, H]
  const __nv_bfloat16* q_norm = nullptr;  // [head_dim] or null (then k_norm null too)
  const __nv_bfloat16* k_norm = nullptr;
  const __nv_bfloat16* wo = nullptr;      // [H, q_heads * head_dim]
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  float softmax_scale = 0.0f;             // 0: 1 / sqrt(head_dim)
  const float* rope_cs = nullptr;         // [head_dim]: cos | sin of the token's angles
  const int32_t* position = nullptr;      // [1] the token's position (device)
  const int32_t* seq_len = nullptr;       // [1] context length including the token (device)
  __nv_bfloat16* k_cache = nullptr;       // [num_blocks, block_tokens, kv_heads, head_dim]
  __nv_bfloat16* v_cache = nullptr;
  const int32_t* block_table = nullptr;   // the sequence's row of the block table
  int block_tokens = 16;
  // MoE.
  const __nv_bfloat16* router = nullptr;  // [E, H]
  const __nv_bfloat16* w13 = nullptr;     // [E, 2I, H]: gate rows then up rows
  const __nv_bfloat16* w2 = nullptr;      // [E, H, I]
  int num_experts = 0, top_k = 0;
  int64_t inter = 0;                      // I
  bool renormalize = false;
  float routed_scaling = 1.0f;
  // Scratch (device): written and read inside the launch, exchanged between the blocks without
  // grid barriers (sessions 8-9) as tagged words: bf16 bits | tag << 16 (u32), the logits fp32 bits
  // | tag << 32 with a 16-bit tag, the attention partials fp32 bits | tag << 32 with a 32-bit tag;
  // all filled with 0xff bytes when allocated (a tag no launch's first layer uses).
  uint32_t* qkv_tagged = nullptr;         // [(q_heads + 2 kv_heads) * head_dim] q | k | v
  unsigned long long* attn_ws = nullptr;  // [q_heads, max chunks, head_dim + 2] (max, sum, acc) per chunk
  int64_t attn_ws_words = 0;
  uint32_t* attn_tagged = nullptr;        // [q_heads * head_dim]
  uint32_t* o_tagged = nullptr;           // [H]
  unsigned long long* logits_tagged = nullptr;  // [E]
  // [top_k, 2I] gate|up values tagged with the layer (bf16 bits | tag << 16): the SwiGLU waits on
  // the tags instead of a grid barrier. Filled with 0xff bytes when allocated (a tag no launch's
  // first layer uses).
  uint32_t* gu_tagged = nullptr;
  unsigned* epoch = nullptr;              // [1] launches so far (layer 0's), zero when allocated
  // [2, top_k, H] the experts' down outputs by layer parity: tagged words (bf16 bits | tag << 16,
  // unweighted) with tagged_part, else floats weighted by the routing. Filled with 0xff bytes.
  float* part = nullptr;
  unsigned* barrier = nullptr;            // 1 + kFusedDecodeMaxTopK counters, zero at launch
  bool pdl = false;
  // Diagnostics or null: block 0 adds the time of phases 0..6 (ns, from its view: its work plus
  // its wait at the barrier that ends the phase) to [0..6] and counts the layer in [7].
  unsigned long long* phase_ns = nullptr;
  // The weight ring: stage size in bytes (0: 16896 bytes, 18432 for the specialised kernel's compact
  // layout; at least one weight row) and stage count (0: as many as shared memory holds, at most 32).
  // Experiments: docs/forward.md.
  int64_t stage_bytes = 0;
  int max_stages = 0;
  // weight bytes in flight per block at most (0: the specialised kernel 3 stages, q|k|v's copies
  // 2, o_proj's and the router's 1; else 128 KiB; at most the whole ring)
  int64_t inflight_bytes = 0;
  // multirow: a stage of several rows of k = 256 m (m <= 8) summed with the activations in
  // registers and one warp reduction per 8 rows (else one per row; measured in docs/forward.md).
  bool multirow = true;
  // mma: rows of k = 256 m summed on the tensor cores (mma.sync m16n8k16, fp32 accumulators; session
  // 11), before multirow (MIXSERVE_FUSED_MMA=0 turns it off).
  bool mma = true;
  // A cooperative launch (the runtime checks that all blocks fit at once; the grid barriers need it).
  bool cooperative = true;
  // Diagnostics or null: [blocks][kFusedDecodeDiagStamps] u64 for this layer: globaltimer stamps 0 the
  // producer's start of the layer, 1 the consumers' start, 2 last q|k|v stage arrival, 3 routing seen by the producer, 4 last
  // gate|up arrival, 5 gate|up done, 6 last down arrival, 7 end, 8 q|k|v summed, 9 the
  // tagged attn read, 10 the tagged logits read, 11 routing done, 12 first gate|up arrival, 13
  // first down arrival, 14 last down copy issued, 15 last gate|up copy issued, 16 gate|up done,
  // 17 the SwiGLU staged, 18 attention partials stored, 19 the tagged o read, 20 last o_proj stage
  // arrival, 21 o_proj summed, 22 first o_proj stage arrival, 23 the residual combined, 24 normed,
  // 25 first q|k|v stage arrival, 29-30 before and after the arrival
  // (release) of the layer's grid barrier (26-28 unused). diag_skip_dot
  // skips the dot products (zeros: WRONG results; times the weight stream alone).
  unsigned long long* diag = nullptr;
  bool diag_skip_dot = false;
  bool evict_first = true;  // the weight copies with an L2 evict_first policy
  // The experts' partials stored as tagged words (bf16 | tag << 16; the next layer's phase 0
  // applies the block's own routing weights and polls the tags): no grid barrier between the
  // layers of a launch, one after its last layer (session 10: 3021-3025 us against 3091 us with
  // the barrier in one H200 run, docs/forward.md). false: float partials and a grid barrier after
  // every layer (MIXSERVE_FUSED_TAGGED_PART=0).
  bool tagged_part = true;
};

// Consecutive layers in ONE launch (session 6): the layers one after another inside the kernel
// (without tagged_part a grid barrier between them: the barrier counter of layer l < last is left
// at 1 x blocks), the
// weight ring running on from one layer's down rows into the next one's q|k|v rows. Every layer's
// shapes must equal layer 0's; layer 0's pdl, evict_first, ring sizes and diagnostics switches
// apply to the launch. Passed by value as the kernel's parameter (__grid_constant__, < 32 KB).
inline constexpr int kFusedDecodeMaxLayers = 64;
struct FusedDecodeStepParams {
  FusedDecodeLayerParams layer[kFusedDecodeMaxLayers];
  int num_layers = 0;
};
static_assert(sizeof(FusedDecodeStepParams) <= 32000, "kernel parameters are limited to 32 KB");

// Blocks of the launch on `device` (one per SM), and the attention workspace it needs (64-bit words).
int fused_decode_layer_blocks(int device);
int64_t fused_decode_layer_ws_words(int blocks, int q_heads, int kv_heads, int head_dim);
// "" when the shapes are supported (the device is not checked), else why not, naming the legal values.
std::string fused_decode_layer_unsupported_reason(const FusedDecodeLayerParams& p);
// Throws mixserve::InputError naming the unsupported parameter; launch errors are checked.
void launch_fused_decode_layer(const FusedDecodeLayerParams& p, cudaStream_t stream);
void launch_fused_decode_layers(const FusedDecodeStepParams& p, cudaStream_t stream);

}  // namespace mixserve::gpu
