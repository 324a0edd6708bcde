// Single-GPU MoE decoder forward: see model_forward.hpp.
#include "mixserve/gpu/model_forward.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <string>

#include <fmt/format.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/gpu/argmax.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/decode_layer.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/gpu/model_forward_kernels.hpp"
#include "mixserve/kernels/attention.cuh"
#include "mixserve/kernels/combine.cuh"
#include "mixserve/kernels/elementwise.cuh"
#include "mixserve/kernels/expert_pad.cuh"
#include "mixserve/kernels/fill.cuh"
#include "mixserve/kernels/grouped_gemm.cuh"
#include "mixserve/kernels/kv_cache.cuh"
#include "mixserve/kernels/moe_route.cuh"
#include "mixserve/kernels/permute.cuh"
#include "mixserve/kernels/rmsnorm.cuh"
#include "mixserve/kernels/rope.cuh"
#include "mixserve/kernels/router.cuh"
#include "mixserve/kernels/swiglu.cuh"
#include "mixserve/model/bf16.hpp"

namespace mixserve::gpu {

using bf16 = __nv_bfloat16;
namespace names = model::names;
using model::FfnProj;

struct GpuModel::Layer {
  const bf16 *in_norm = nullptr, *post_norm = nullptr;
  const bf16 *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;  // [out, in]
  const bf16 *bq = nullptr, *bk = nullptr, *bv = nullptr;                 // [out] or null
  const bf16 *q_norm = nullptr, *k_norm = nullptr;                        // or null
  int q_norm_width = 0, k_norm_width = 0;  // head_dim (per head) or the projection width
  bool moe = false;
  const bf16* router = nullptr;      // [E, H]
  const bf16* w13 = nullptr;         // [E, 2I, H]: per expert gate rows then up rows
  const bf16* w2 = nullptr;          // [E, H, I]
  const bf16* shared_w13 = nullptr;  // [2S, H]
  const bf16* shared_w2 = nullptr;   // [H, S]
  const bf16* shared_gate = nullptr; // [1, H]
  const bf16* dense_w13 = nullptr;   // [2D, H]
  const bf16* dense_w2 = nullptr;    // [H, D]
};

struct GpuModel::Act {
  bf16 *res = nullptr, *normed = nullptr, *tmp = nullptr;      // [T, H]
  bf16 *q = nullptr, *attn = nullptr;                          // [T, q_width]
  bf16 *k = nullptr, *v = nullptr;                             // [T, kv_width]
  bf16* permuted_x = nullptr;                                  // [T * top_k, H]
  bf16* gu = nullptr;                                          // [rows, 2 * inter] (max over FFNs)
  bf16* ffn_act = nullptr;                                     // [rows, inter]
  bf16* expert_out = nullptr;                                  // [T * top_k, H]
  bf16* shared_out = nullptr;                                  // [Tm, H]
  bf16 *moe_in = nullptr, *moe_out = nullptr;                  // [stage * T, H]: gathered MoE mode
  bf16* last_x = nullptr;                                      // [T, H]
  bf16* logits = nullptr;                                      // [T, vocab]
  float *router_logits = nullptr, *topk_w = nullptr, *shared_gate = nullptr;
  float* rope_cs = nullptr;                                    // [T, head_dim] cos | sin
  int32_t *topk_ids = nullptr, *counts = nullptr, *offsets = nullptr, *slot_row = nullptr,
          *permuted_token = nullptr;
  int32_t* padded_token = nullptr;  // [expert_rows]: kExpertGemmPaddedBatch's padded row -> token
  int64_t padded_capacity = 0;      // kExpertGemmPaddedBatch: padded rows allowed (<= expert_rows)
  int64_t routed_rows = 0;          // max MoE rows x top_k: what the per-expert paths can route
  int64_t expert_rows = 0;          // rows of permuted_x, gu, ffn_act, expert_out (>= routed rows)
  // kExpertGemmBucketed[Batched]: each local expert's first padded row, [E_local + 1], on the device
  // and in pinned host memory; bucket_offsets_copied is recorded after each upload, so the host
  // does not rewrite the pinned array while a copy from it may still be pending.
  int32_t* bucket_offsets = nullptr;
  int32_t* bucket_offsets_host = nullptr;
  cudaEvent_t bucket_offsets_copied = nullptr;
  bool bucket_offsets_pending = false;
  void* permute_ws = nullptr;
  std::size_t permute_ws_bytes = 0;
  int32_t *tokens = nullptr, *positions = nullptr, *token_seq = nullptr;  // [T]
  int32_t *q_start = nullptr, *seq_lens = nullptr;                        // [S + 1], [S]
  int32_t* block_table = nullptr;                                         // [S, max_blocks_per_seq]
  int32_t* logit_index = nullptr;                                         // [T]
  int32_t* counts_host = nullptr;                                         // pinned [E]
  int32_t* sampled = nullptr;                                             // [T] greedy ids
  int32_t* sampled_host = nullptr;                                        // pinned [T]
  DeviceBuffer attn_ws;
  DeviceBuffer route_ticket;  // int32 [1] of the fused router + permute, zero between launches
  DeviceBuffer attn_tickets;  // int32 [S, kv_heads, q_tiles] of the fused split merge, zero between launches
  DeviceBuffer hidden_rec;  // [2, L, T, H] bf16 when recording
  // The fused batch-1 decode layer (decode_layer.hpp): scratch, and one grid-barrier counter per
  // layer (zeroed by one memset per step that runs it). Empty when the model cannot take it.
  DeviceBuffer fused_qkv, fused_ws, fused_part, fused_barrier, fused_gu, fused_epoch;
  DeviceBuffer fused_attn, fused_o_tagged, fused_logits;  // tagged words (decode_layer.hpp)
  DeviceBuffer fused_phase_ns;  // [8] u64 when MIXSERVE_FUSED_PHASE_TIMING is set (diagnostics)
  DeviceBuffer fused_diag;      // [blocks][kFusedDecodeDiagStamps] u64 with it: one layer's per-block stamps
  int64_t fused_ws_words = 0;
  ~Act() {
    if (bucket_offsets_copied) cudaEventDestroy(bucket_offsets_copied);
    if (bucket_offsets_host) cudaFreeHost(bucket_offsets_host);
    if (counts_host) cudaFreeHost(counts_host);
    if (sampled_host) cudaFreeHost(sampled_host);
  }
};

struct GpuModel::Prepared {
  int64_t T = 0;
  int S = 0;
  int max_q_len = 0, max_seq_len = 0;
  int64_t context_tokens = 0;  // sum of seq_lens
  int64_t moe_tokens = 0;      // gathered MoE mode: rows per stage member (largest replica's T)
  std::vector<int64_t> seq_offsets, logit_rows;
  bool record = false;
  bool greedy = false, copy_logits = true;
  std::vector<int> experts_touched;  // per layer, from the last enqueue
};

namespace {

// The cost model counts these launches from core/decode_path.hpp's rules and constants.
static_assert(kGemvMaxRows == kDecodeGemvMaxTokens);
static_assert(kGroupedGemvMaxK == kGemvMaxK, "core/expert_path.hpp gemv_k_fits mirrors the GEMV kernels' k limit");
static_assert(kernels::kPermuteSingleLaunchMaxPairs == kPermuteSingleLaunchMaxPairsCore);
static_assert(kernels::kMoeRouteMaxTokens == kDecodeGemvMaxTokens, "uses_fused_moe_route's bound is the kernel's");
static_assert(kernels::kMoeRouteMaxTokens * kernels::kRouterMaxTopK <= kernels::kPermuteSingleLaunchMaxPairs,
              "the fused router's permute is the single-launch form");

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Half-width of the uniform distribution and its centre for a tensor (model::synthetic_weights).
void init_range(const std::string& name, int64_t fan_in, float& centre, float& half) {
  centre = 0.0f;
  if (ends_with(name, "norm.weight") || ends_with(name, "layernorm.weight")) {
    centre = 1.0f;
    half = 0.1f;
  } else if (ends_with(name, ".bias")) {
    half = 0.1f;
  } else if (name == names::embed()) {
    half = std::sqrt(3.0f);
  } else {
    half = static_cast<float>(std::sqrt(3.0 / double(fan_in)));
  }
}

}  // namespace

GpuModel::GpuModel(const model::WeightSet& weights, const GpuModelConfig& cfg)
    : spec_(weights.spec()), cfg_(cfg), dims_(shard_dims(spec_, cfg.shard)), lt_workspace_(LtGemm::kWorkspaceBytes) {
  cfg_.decode_kernels = decode_kernels_enabled(cfg_.decode_kernels, cfg_.shard.sharded());  // core/decode_path.hpp
  check_supported();
  allocate(true, &weights, 0);
}

GpuModel::GpuModel(const ModelSpec& spec, uint64_t seed, const GpuModelConfig& cfg)
    : spec_(spec), cfg_(cfg), dims_(shard_dims(spec_, cfg.shard)), lt_workspace_(LtGemm::kWorkspaceBytes) {
  cfg_.decode_kernels = decode_kernels_enabled(cfg_.decode_kernels, cfg_.shard.sharded());  // core/decode_path.hpp
  check_supported();
  allocate(false, nullptr, seed);
}

GpuModel::~GpuModel() = default;

void GpuModel::check_supported() const {
  (void)model::expected_tensors(spec_);  // InputError outside the family
  const auto& a = spec_.attention;
  const auto& e = spec_.moe;
  auto bad = [&](const std::string& what, int64_t v, const std::string& legal) {
    throw InputError(fmt::format("GPU forward of {}: {}={} not supported ({})", spec_.name, what, v, legal));
  };
  if (a.type == AttentionType::mla) bad("attention MLA", 1, "GQA/MHA only");
  if (cfg_.expert_gemm_streams < kExpertGemmStreamsMin)
    bad("expert_gemm_streams", cfg_.expert_gemm_streams, std::string(kExpertGemmStreamsLegal));
  if (cfg_.expert_bucket_row_align < 1 || cfg_.expert_bucket_row_align > kExpertBucketRowAlignMax)
    bad("expert_bucket_row_align", cfg_.expert_bucket_row_align,
        fmt::format("1 .. {} rows", kExpertBucketRowAlignMax));
  if (!(cfg_.expert_padded_capacity >= 0.0 && cfg_.expert_padded_capacity <= 64.0))
    throw InputError(fmt::format("GPU forward of {}: expert_padded_capacity={} not supported (0 .. 64)",
                                 spec_.name, cfg_.expert_padded_capacity));
  if (std::find(kernels::kAttentionHeadDims.begin(), kernels::kAttentionHeadDims.end(), a.head_dim) ==
      kernels::kAttentionHeadDims.end())
    bad("head_dim", a.head_dim, "64 or 128");
  if (std::find(kernels::kKvBlockTokens.begin(), kernels::kKvBlockTokens.end(), cfg_.block_size) ==
      kernels::kKvBlockTokens.end())
    bad("block_size", cfg_.block_size, "8, 16 or 32");
  if (a.sliding_window > 0) bad("sliding_window", a.sliding_window, "none");
  auto mult8 = [&](const char* what, int64_t v) {
    if (v % 8 != 0) bad(what, v, "a multiple of 8 for cuBLASLt");
  };
  mult8("hidden_size", spec_.hidden_size);
  mult8("q_width", spec_.q_width());
  mult8("vocab_size", spec_.vocab_size);
  if (spec_.num_dense_layers() > 0) mult8("dense_intermediate_size", spec_.dense_intermediate_size);
  if (spec_.num_moe_layers() > 0) {
    mult8("expert_intermediate_size", e.expert_intermediate_size);
    if (e.shared_intermediate_size > 0) mult8("shared_intermediate_size", e.shared_intermediate_size);
    if ((2 * e.expert_intermediate_size) % kGroupedGemvColsPerBlock != 0 ||
        spec_.hidden_size % kGroupedGemvColsPerBlock != 0)
      bad("expert GEMV widths (2 * expert_intermediate_size, hidden_size)", 2 * e.expert_intermediate_size,
          "multiples of 16 for the device GEMV path");
    if (e.num_experts > kernels::kRouterMaxExperts) bad("num_experts", e.num_experts, "<= 256");
    if (e.top_k > kernels::kRouterMaxTopK) bad("top_k", e.top_k, "<= 8");
    if (e.scoring != Scoring::softmax || e.topk_before_softmax || e.n_group > 1 || e.router_bias ||
        e.score_correction_bias || e.expert_bias)
      bad("routing variant", 1, "softmax top-k without groups or biases");
  }
  if (spec_.hidden_size > kLinearFp32MaxWidth) bad("hidden_size", spec_.hidden_size, "<= 16384");
  // The shard's own widths feed the GEMMs too (shard.hpp).
  const ShardSpec& sh = cfg_.shard;
  if (sh.sharded() && !cfg_.comm) throw InputError("GPU forward: a sharded model needs a ForwardComm (GpuModelConfig::comm)");
  if (sh.attn_tp > 1 || sh.moe_tp > 1) {
    mult8("q width of the shard", int64_t(dims_.q_heads) * a.head_dim);
    if (spec_.num_dense_layers() > 0) mult8("dense FFN width of the shard", dims_.dense);
    if (spec_.num_moe_layers() > 0) {
      mult8("expert width of the shard", dims_.inter);
      if (dims_.shared > 0) mult8("shared-expert width of the shard", dims_.shared);
      if ((2 * dims_.inter) % kGroupedGemvColsPerBlock != 0)
        bad("2 * expert width of the shard", 2 * dims_.inter, "a multiple of 16 for the device GEMV path");
    }
  }
  if (cfg_.max_tokens_per_step < 1 || cfg_.max_seqs_per_step < 1 || cfg_.max_blocks_per_seq < 1)
    throw InputError(fmt::format("GPU forward: max_tokens_per_step={} max_seqs_per_step={} max_blocks_per_seq={} "
                                 "(each must be >= 1)",
                                 cfg_.max_tokens_per_step, cfg_.max_seqs_per_step, cfg_.max_blocks_per_seq));
  if (cfg_.num_blocks < 0 || !(cfg_.kv_memory_fraction > 0.0 && cfg_.kv_memory_fraction < 1.0))
    throw InputError(fmt::format("GPU forward: num_blocks={} kv_memory_fraction={} (need >= 0 and in (0, 1))",
                                 cfg_.num_blocks, cfg_.kv_memory_fraction));
}

void GpuModel::allocate(bool from_host, const model::WeightSet* w, uint64_t seed) {
  const ModelSpec& m = spec_;
  const ShardDims& sd = dims_;
  const int64_t hd = m.attention.head_dim;
  const int64_t H = m.hidden_size, QW = sd.q_heads * hd, KVW = sd.kv_heads * hd;
  const int E = m.moe.num_experts, K = m.moe.top_k, El = sd.experts;
  const int64_t I = sd.inter, S = sd.shared, D = sd.dense;
  const int64_t T = cfg_.max_tokens_per_step;
  // The planner's memory model counts the MoE buffers below (and moe_comm.cpp's) exactly:
  // sim::executor_moe_buffers (simulator/src/executor_buffers.cpp) mirrors their sizes; change it
  // with them.
  // Rows of the MoE buffers: the stage's gathered tokens in the gathered mode.
  int64_t Tm = T * (cfg_.shard.moe_mode == MoeMode::gathered ? cfg_.shard.stage_size : 1);
  if (cfg_.shard.moe_sched != MoeSched::none && m.num_moe_layers() > 0) {
    // The expert step of a scheduled MoE layer runs on the received rows (ShardSpec::moe_sched):
    // fused, the group's rows of every replica (fused_capacity_rows); EP, every replica's
    // (token, local expert) rows of the EP index with one slot each (ep_capacity_rows), within
    // rows * K below.
    const int Q = cfg_.shard.stage_size / cfg_.shard.moe_tp;
    const int64_t dp = cfg_.shard.stage_size / cfg_.shard.attn_tp, epr = El;
    // A shared expert adds the moe-TP group's source tokens (at most moe_tp * T) to the EP rows,
    // and runs on them as the leading rows of the step (one slot each).
    const int64_t shared_rows = S > 0 ? int64_t(cfg_.shard.moe_tp) * T : 0;
    const int64_t sched_rows =
        cfg_.shard.moe_sched == MoeSched::ep
            ? std::max(shared_rows, (dp * T * std::min<int64_t>(K, epr) + shared_rows + std::max(K, 1) - 1) /
                                        std::max(K, 1))
            : Q * T;
    Tm = std::max(Tm, sched_rows);
  }
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& t : model::expected_tensors(m)) shapes[t.name] = t.shape;
  cudaStream_t s = stream_.get();

  auto alloc = [&](std::size_t bytes) -> void* {
    owned_.emplace_back(std::max<std::size_t>(bytes, 16));
    return owned_.back().get();
  };
  // The concatenation of the named tensors' blocks (rows [r0, r1) x columns [c0, c1) of each,
  // row-major; -1: to the end; 1-D tensors are one column) as one device buffer: the shard.
  struct Part {
    std::string name;
    int64_t r0 = 0, r1 = -1, c0 = 0, c1 = -1;
    Part(std::string n, int64_t a = 0, int64_t b = -1, int64_t c = 0, int64_t d = -1)
        : name(std::move(n)), r0(a), r1(b), c0(c), c1(d) {}
  };
  auto fused = [&](std::vector<Part> parts) -> const bf16* {
    int64_t numel = 0;
    for (auto& p : parts) {
      if (!shapes.count(p.name)) throw RuntimeError(fmt::format("GPU forward: tensor {} not expected", p.name));
      const auto& sh = shapes[p.name];
      const int64_t rows = sh[0], cols = sh.size() > 1 ? sh[1] : 1;
      if (p.r1 < 0) p.r1 = rows;
      if (p.c1 < 0) p.c1 = cols;
      if (p.r0 < 0 || p.r1 > rows || p.r0 >= p.r1 || p.c0 < 0 || p.c1 > cols || p.c0 >= p.c1)
        throw RuntimeError(fmt::format("GPU forward: shard [{}, {}) x [{}, {}) of {} [{}, {}]", p.r0, p.r1, p.c0, p.c1,
                                       p.name, rows, cols));
      numel += (p.r1 - p.r0) * (p.c1 - p.c0);
    }
    auto* dst = static_cast<bf16*>(alloc(std::size_t(numel) * 2));
    weight_bytes_ += double(numel) * 2;
    if (from_host) {
      int64_t off = 0;
      std::vector<uint16_t> block;
      for (const auto& p : parts) {
        const auto& t = w->at(p.name);
        const int64_t cols = t.shape.size() > 1 ? t.shape[1] : 1, width = p.c1 - p.c0;
        block.resize(std::size_t((p.r1 - p.r0) * width));
        for (int64_t r = p.r0; r < p.r1; ++r)
          std::copy_n(t.bf16.begin() + std::ptrdiff_t(r * cols + p.c0), width,
                      block.begin() + std::ptrdiff_t((r - p.r0) * width));
        MIXSERVE_CUDA_CHECK(cudaMemcpy(dst + off, block.data(), block.size() * 2, cudaMemcpyHostToDevice));
        off += int64_t(block.size());
      }
    } else {
      float centre = 0, half = 0;
      init_range(parts[0].name, shapes[parts[0].name].back(), centre, half);
      kernels::FillParams f;
      f.data = dst;
      f.num_elements = numel;
      f.dtype = DType::bf16;
      f.seed = seed ^ std::hash<std::string>{}(parts[0].name);
      f.lo = centre - half;
      f.hi = centre + half;
      kernels::launch_fill_uniform(f, s);
    }
    return dst;
  };
  auto one = [&](const std::string& n) { return fused({Part(n)}); };
  auto opt = [&](const std::string& n) -> const bf16* { return shapes.count(n) ? one(n) : nullptr; };

  embed_ = one(names::embed());
  final_norm_ = one(names::final_norm());
  lm_head_ = m.tie_word_embeddings ? embed_ : one(names::lm_head());
  const model::Family fam = model::family_of(m);
  layers_.resize(m.num_layers);
  // Rows of q (the shard's query heads) and of k/v (its KV heads), columns of o.
  const int64_t q0 = sd.q_head0 * hd, q1 = q0 + QW, kv0 = sd.kv_head0 * hd, kv1 = kv0 + KVW;
  for (int l = sd.layer_begin; l < sd.layer_end; ++l) {
    Layer& L = layers_[l];
    L.in_norm = one(names::input_norm(l));
    L.post_norm = one(names::post_attn_norm(l));
    // q, k, v (and their biases) in one buffer, rows q then k then v (the shard's heads): a
    // fused [QW + 2 KVW, H] weight for the one-launch q|k|v GEMV.
    L.wq = fused({Part(names::attn(l, "q_proj"), q0, q1), Part(names::attn(l, "k_proj"), kv0, kv1),
                  Part(names::attn(l, "v_proj"), kv0, kv1)});
    L.wk = L.wq + QW * H;
    L.wv = L.wk + KVW * H;
    L.wo = fused({Part(names::attn(l, "o_proj"), 0, -1, q0, q1)});
    if (shapes.count(names::attn(l, "q_proj", "bias"))) {
      L.bq = fused({Part(names::attn(l, "q_proj", "bias"), q0, q1), Part(names::attn(l, "k_proj", "bias"), kv0, kv1),
                    Part(names::attn(l, "v_proj", "bias"), kv0, kv1)});
      L.bk = L.bq + QW;
      L.bv = L.bk + KVW;
    }
    if (shapes.count(names::attn(l, "q_norm"))) {
      L.q_norm = one(names::attn(l, "q_norm"));
      L.k_norm = one(names::attn(l, "k_norm"));
      L.q_norm_width = static_cast<int>(shapes[names::attn(l, "q_norm")][0]);
      L.k_norm_width = static_cast<int>(shapes[names::attn(l, "k_norm")][0]);
    }
    L.moe = m.layers[l].moe;
    if (L.moe) {
      L.router = one(names::router(fam, l));
      // The shard's experts; of each, gate and up rows [inter0, inter0 + I), down columns.
      std::vector<Part> w13, w2;
      for (int e = sd.expert0; e < sd.expert0 + El; ++e) {
        w13.emplace_back(names::expert(fam, l, e, FfnProj::gate), sd.inter0, sd.inter0 + I);
        w13.emplace_back(names::expert(fam, l, e, FfnProj::up), sd.inter0, sd.inter0 + I);
        w2.emplace_back(names::expert(fam, l, e, FfnProj::down), 0, -1, sd.inter0, sd.inter0 + I);
      }
      L.w13 = fused(w13);
      L.w2 = fused(w2);
      if (S > 0 && cfg_.shard.shared_expert) {
        L.shared_w13 = fused({Part(names::shared_expert(l, FfnProj::gate), sd.shared0, sd.shared0 + S),
                              Part(names::shared_expert(l, FfnProj::up), sd.shared0, sd.shared0 + S)});
        L.shared_w2 = fused({Part(names::shared_expert(l, FfnProj::down), 0, -1, sd.shared0, sd.shared0 + S)});
        L.shared_gate = opt(names::shared_expert_gate(l));
      }
    } else {
      L.dense_w13 = fused({Part(names::dense(l, FfnProj::gate), sd.dense0, sd.dense0 + D),
                           Part(names::dense(l, FfnProj::up), sd.dense0, sd.dense0 + D)});
      L.dense_w2 = fused({Part(names::dense(l, FfnProj::down), 0, -1, sd.dense0, sd.dense0 + D)});
    }
  }

  // Activations, poisoned (0xffff is a bf16/fp32 NaN, -1 as int32) so that a row the forward fails
  // to write shows up as NaN in the outputs.
  const std::size_t first_activation = owned_.size();
  act_ = std::make_unique<Act>();
  Act& A = *act_;
  auto bf = [&](int64_t n) { return static_cast<bf16*>(alloc(std::size_t(n) * 2)); };
  auto i32 = [&](int64_t n) { return static_cast<int32_t*>(alloc(std::size_t(n) * 4)); };
  auto f32 = [&](int64_t n) { return static_cast<float*>(alloc(std::size_t(n) * 4)); };
  const int64_t rows = Tm * std::max(K, 1);
  // The expert buffers hold the routed rows, or the padded layout of kExpertGemmPaddedBatch up to
  // expert_padded_capacity times them (rounded up to the padded row alignment), or, when the model
  // is built for the bucketed path, its largest layout (every local expert's rows rounded up to
  // expert_bucket_row_align: at most El x (align - 1) more rows).
  A.padded_capacity = expert_padded_rows(static_cast<int64_t>(std::ceil(cfg_.expert_padded_capacity * double(rows))));
  A.routed_rows = rows;
  A.expert_rows = std::max(rows, A.padded_capacity);
  // (Only when a step can take the bucketed layout: the cuBLASLt path, or automatic at rows where
  // uses_expert_streams picks the per-expert path; a decode-sized model pays nothing.)
  const bool bucket_reachable =
      cfg_.expert_path == ExpertPath::cublaslt || (cfg_.expert_path == ExpertPath::automatic && uses_expert_streams(rows, El));
  if (is_bucketed_expert_gemm(cfg_.expert_gemm_streams) && bucket_reachable)
    A.expert_rows = std::max(A.expert_rows, expert_bucket_capacity(rows, El, cfg_.expert_bucket_row_align));
  const int64_t xrows = A.expert_rows;
  int64_t gu_elems = 0, act_elems = 0;
  if (m.num_moe_layers() > 0) {
    gu_elems = std::max(xrows * 2 * I, Tm * 2 * S);
    act_elems = std::max(xrows * I, Tm * S);
  }
  if (m.num_dense_layers() > 0) {
    gu_elems = std::max(gu_elems, T * 2 * D);
    act_elems = std::max(act_elems, T * D);
  }
  A.res = bf(T * H);
  A.normed = bf(T * H);
  A.tmp = bf(T * H);
  A.q = bf(T * QW);
  A.attn = bf(T * QW);
  A.k = bf(T * KVW);
  A.v = bf(T * KVW);
  A.gu = bf(gu_elems);
  A.ffn_act = bf(act_elems);
  A.shared_out = bf(Tm * H);
  A.last_x = bf(T * H);
  A.logits = bf(T * m.vocab_size);
  A.tokens = i32(T);
  A.positions = i32(T);
  A.rope_cs = f32(T * m.attention.head_dim);
  A.token_seq = i32(T);
  A.logit_index = i32(T);
  A.sampled = i32(T);
  MIXSERVE_CUDA_CHECK(cudaMallocHost(&A.sampled_host, std::size_t(T) * 4));
  A.q_start = i32(cfg_.max_seqs_per_step + 1);
  A.seq_lens = i32(cfg_.max_seqs_per_step);
  A.block_table = i32(int64_t(cfg_.max_seqs_per_step) * cfg_.max_blocks_per_seq);
  if (m.num_moe_layers() > 0) {
    A.permuted_x = bf(xrows * H);   // [expert_rows, H]
    A.expert_out = bf(xrows * H);   // [expert_rows, H]
    A.padded_token = i32(xrows);
    A.router_logits = f32(Tm * E);
    A.topk_w = f32(rows);
    A.shared_gate = f32(Tm);
    A.topk_ids = i32(rows);
    A.counts = i32(El);
    A.offsets = i32(El + 1);
    A.bucket_offsets = i32(El + 1);
    A.slot_row = i32(rows);
    A.permuted_token = i32(rows);
    A.permute_ws_bytes = kernels::permute_workspace_bytes(Tm, K, El);
    A.permute_ws = alloc(A.permute_ws_bytes);
    if (cfg_.shard.moe_mode == MoeMode::gathered) {
      A.moe_in = bf(Tm * H);
      A.moe_out = bf(Tm * H);
    }
    MIXSERVE_CUDA_CHECK(cudaMallocHost(&A.counts_host, std::size_t(El) * 4));
    MIXSERVE_CUDA_CHECK(cudaMallocHost(&A.bucket_offsets_host, std::size_t(El + 1) * 4));
    MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&A.bucket_offsets_copied, cudaEventDisableTiming));
    expert_w13_ = std::make_unique<ExpertGemm>(lt_, El, 2 * I, H, DType::bf16, lt_workspace_.get(),
                                               lt_workspace_.bytes());
    expert_w2_ = std::make_unique<ExpertGemm>(lt_, El, H, I, DType::bf16, lt_workspace_.get(),
                                              lt_workspace_.bytes());
  }

  for (std::size_t i = first_activation; i < owned_.size(); ++i)
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(owned_[i].get(), 0xff, owned_[i].bytes(), s));
  A.route_ticket = DeviceBuffer(sizeof(int32_t));  // zeroed once; every launch leaves it zero
  MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.route_ticket.get(), 0, sizeof(int32_t), s));
  if (cfg_.decode_kernels && m.num_moe_layers() > 0) {
    int device = 0;
    MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
    const int blocks = fused_decode_layer_blocks(device);
    A.fused_ws_words = fused_decode_layer_ws_words(blocks, dims_.q_heads, dims_.kv_heads, m.attention.head_dim);
    A.fused_qkv = DeviceBuffer(std::size_t(QW + 2 * KVW) * sizeof(uint32_t));
    A.fused_ws = DeviceBuffer(std::size_t(A.fused_ws_words) * sizeof(unsigned long long));
    A.fused_part = DeviceBuffer(2 * std::size_t(m.moe.top_k) * std::size_t(H) * sizeof(float));
    A.fused_gu = DeviceBuffer(std::size_t(m.moe.top_k) * std::size_t(2 * I) * sizeof(uint32_t));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.fused_gu.get(), 0xff, A.fused_gu.bytes(), s));  // decode_layer.hpp gu_tagged
    A.fused_attn = DeviceBuffer(std::size_t(QW) * sizeof(uint32_t));
    A.fused_o_tagged = DeviceBuffer(std::size_t(H) * sizeof(uint32_t));
    A.fused_logits = DeviceBuffer(std::size_t(m.moe.num_experts) * sizeof(unsigned long long));
    for (DeviceBuffer* b : {&A.fused_attn, &A.fused_o_tagged, &A.fused_logits, &A.fused_qkv, &A.fused_ws, &A.fused_part})
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(b->get(), 0xff, b->bytes(), s));  // no launch's tag
    A.fused_epoch = DeviceBuffer(sizeof(unsigned));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.fused_epoch.get(), 0, A.fused_epoch.bytes(), s));
    A.fused_barrier = DeviceBuffer(std::size_t(m.num_layers) * (1 + kFusedDecodeMaxTopK) * sizeof(unsigned));
    if (const char* e = std::getenv("MIXSERVE_FUSED_STAGE_KB"); e && *e) fused_stage_bytes_ = std::atoll(e) * 1024;
    if (const char* e = std::getenv("MIXSERVE_FUSED_STAGE_BYTES"); e && *e) fused_stage_bytes_ = std::atoll(e);
    if (const char* e = std::getenv("MIXSERVE_FUSED_STAGES"); e && *e) fused_max_stages_ = std::atoi(e);
    if (const char* e = std::getenv("MIXSERVE_FUSED_INFLIGHT_KB"); e && *e) fused_inflight_bytes_ = std::atoll(e) * 1024;
    if (const char* e = std::getenv("MIXSERVE_FUSED_EVICT_FIRST"); e && *e == '0') fused_evict_first_ = false;
    if (const char* e = std::getenv("MIXSERVE_FUSED_MULTIROW"); e && *e == '0') fused_multirow_ = false;
    if (const char* e = std::getenv("MIXSERVE_FUSED_MMA"); e && *e == '0') fused_mma_ = false;
    if (const char* e = std::getenv("MIXSERVE_FUSED_COOP"); e && *e == '0') fused_cooperative_ = false;
    if (const char* e = std::getenv("MIXSERVE_FUSED_TAGGED_PART"); e && *e == '0') fused_tagged_part_ = false;
    if (const char* e = std::getenv("MIXSERVE_FUSED_PHASE_TIMING"); e && *e && *e != '0') {
      // Diagnostics only: the weight stream timed without its arithmetic (wrong results).
      if (const char* z = std::getenv("MIXSERVE_FUSED_SKIP_DOT"); z && *z && *z != '0') fused_skip_dot_ = true;
      A.fused_phase_ns = DeviceBuffer(8 * sizeof(unsigned long long));
      A.fused_diag = DeviceBuffer(std::size_t(blocks) * kFusedDecodeDiagStamps * sizeof(unsigned long long));
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.fused_diag.get(), 0, A.fused_diag.bytes(), s));
      MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.fused_phase_ns.get(), 0, A.fused_phase_ns.bytes(), s));
    }
  }
  // KV cache: [num_blocks, block, kv_heads, head_dim] per layer for K and for V.
  const std::size_t block_bytes = std::size_t(cfg_.block_size) * std::size_t(KVW) * 2;
  num_blocks_ = cfg_.num_blocks;
  if (num_blocks_ == 0) {
    std::size_t free_b = 0, total_b = 0;
    MIXSERVE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    num_blocks_ = static_cast<int>(std::min<double>(
        double(free_b) * cfg_.kv_memory_fraction / (2.0 * (sd.layer_end - sd.layer_begin) * double(block_bytes)),
        1 << 30));
    if (num_blocks_ < 1)
      throw RuntimeError(fmt::format("GPU forward: no device memory left for the KV cache ({} bytes free)", free_b));
  }
  k_cache_.resize(std::size_t(m.num_layers));  // the stage's layers only
  v_cache_.resize(std::size_t(m.num_layers));
  for (int l = sd.layer_begin; l < sd.layer_end; ++l) {
    k_cache_[l] = DeviceBuffer(std::size_t(num_blocks_) * block_bytes);
    v_cache_[l] = DeviceBuffer(std::size_t(num_blocks_) * block_bytes);
  }
  reset_cache();
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
}

void GpuModel::reset_cache() {
  for (std::size_t l = 0; l < k_cache_.size(); ++l) {
    if (k_cache_[l].bytes() == 0) continue;  // a layer of another pipeline stage
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(k_cache_[l].get(), 0, k_cache_[l].bytes(), stream_.get()));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(v_cache_[l].get(), 0, v_cache_[l].bytes(), stream_.get()));
  }
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
}

void GpuModel::gemm(const void* act, const void* weight, void* out, int64_t m, int64_t n, int64_t k,
                    cudaStream_t s, bool out_fp32) {
  if (m == 0) return;
  auto key = std::make_tuple(m, n, k, out_fp32);
  auto it = gemms_.find(key);
  if (it == gemms_.end())
    it = gemms_.emplace(key, std::make_unique<LtGemm>(lt_, GemmShape{m, n, k, DType::bf16, out_fp32},
                                                      lt_workspace_.get(), lt_workspace_.bytes()))
             .first;
  GemmOperands ops;
  ops.act = act;
  ops.weight = weight;
  ops.out = out;
  it->second->run(ops, s);
}

void GpuModel::linear(const void* act, const void* weight, void* out, int64_t m, int64_t n, int64_t k,
                      cudaStream_t s) {
  if (m == 0) return;
  if (!dense_gemv_for(cfg_.decode_kernels, m, k)) return gemm(act, weight, out, m, n, k, s);
  GemvParams g;
  g.kernel = cfg_.gemv_kernel;
  g.act = static_cast<const bf16*>(act);
  g.weights = static_cast<const bf16*>(weight);
  g.seg[0] = {out, n};
  g.num_rows = m;
  g.n = n;
  g.k = k;
  g.pdl = pdl_;
  launch_gemv(g, s);
}

void GpuModel::router_logits(const bf16* x, const bf16* w, float* out, int64_t T, cudaStream_t s) {
  const int64_t E = spec_.moe.num_experts, H = spec_.hidden_size;
  if (T == 0) return;
  // core/decode_path.hpp router_uses_gemv: the GEMV with the decode kernels up to
  // kDecodeGemvMaxTokens tokens; above, the tensor-core cuBLASLt GEMM (fp32 out): the GEMV re-reads
  // the router weights per 8 rows and cost 767 us per layer at 16384 tokens (docs/prefill.md).
  if (router_uses_gemv(cfg_.decode_kernels, T) && gemv_k_fits(H)) {
    GemvParams rg;
    rg.kernel = cfg_.gemv_kernel;
    rg.act = x;
    rg.weights = w;
    rg.seg[0] = {out, E};
    rg.out_fp32 = true;
    rg.num_rows = T;
    rg.n = E;
    rg.k = H;
    rg.pdl = pdl_;
    launch_gemv(rg, s);
  } else if (T <= kDecodeGemvMaxTokens ||
             !gemm_unsupported_reason(GemmShape{T, E, H, DType::bf16, true}).empty()) {
    // Decode kernels off (the previous kernels) or an expert count cuBLASLt cannot take (n % 8).
    launch_linear_fp32(x, w, out, T, static_cast<int>(E), static_cast<int>(H), s);
  } else {
    gemm(x, w, out, T, E, H, s, true);  // tensor cores, fp32 out
  }
}

void GpuModel::prepare(const std::vector<model::SequenceStep>& batch, const StepOptions& opt) {
  const ModelSpec& m = spec_;
  // A DP-attention rank without requests still steps through the MoE layers with its stage.
  if (batch.empty() && cfg_.shard.moe_mode != MoeMode::gathered) throw InputError("GPU forward: empty batch");
  if (int(batch.size()) > cfg_.max_seqs_per_step)
    throw InputError(fmt::format("GPU forward: {} sequences, max_seqs_per_step={}", batch.size(),
                                 cfg_.max_seqs_per_step));
  auto p = std::make_unique<Prepared>();
  p->S = static_cast<int>(batch.size());
  std::vector<int32_t> tokens, positions, token_seq, q_start{0}, seq_lens, logit_index;
  std::vector<int32_t> table(std::size_t(p->S) * cfg_.max_blocks_per_seq, 0);
  std::set<int32_t> used_blocks;
  for (int s = 0; s < p->S; ++s) {
    const auto& q = batch[s];
    p->seq_offsets.push_back(int64_t(tokens.size()));
    if (q.tokens.empty()) throw InputError(fmt::format("GPU forward: sequence {} has no new tokens", s));
    if (q.position < 0) throw InputError(fmt::format("GPU forward: sequence {} position {} < 0", s, q.position));
    const int64_t ctx = q.position + int64_t(q.tokens.size());
    const int64_t need_blocks = (ctx + cfg_.block_size - 1) / cfg_.block_size;
    if (int64_t(q.block_table.size()) < need_blocks)
      throw InputError(fmt::format("GPU forward: sequence {} needs {} blocks for {} tokens, block table has {}", s,
                                   need_blocks, ctx, q.block_table.size()));
    if (need_blocks > cfg_.max_blocks_per_seq)
      throw InputError(fmt::format("GPU forward: sequence {} needs {} blocks, max_blocks_per_seq={}", s, need_blocks,
                                   cfg_.max_blocks_per_seq));
    for (int64_t b = 0; b < need_blocks; ++b) {
      const int32_t blk = q.block_table[b];
      if (blk < 0 || blk >= num_blocks_)
        throw InputError(fmt::format("GPU forward: sequence {} block {} = {} outside [0, {})", s, b, blk, num_blocks_));
      if (!used_blocks.insert(blk).second)
        throw InputError(fmt::format("GPU forward: block {} used twice in the step (sequence {})", blk, s));
      table[std::size_t(s) * cfg_.max_blocks_per_seq + b] = blk;
    }
    for (std::size_t i = 0; i < q.tokens.size(); ++i) {
      if (q.tokens[i] < 0 || q.tokens[i] >= m.vocab_size)
        throw InputError(fmt::format("GPU forward: sequence {} token {} id {} outside [0, {})", s, i, q.tokens[i],
                                     m.vocab_size));
      if (opt.all_logits) logit_index.push_back(int32_t(tokens.size()));
      tokens.push_back(q.tokens[i]);
      positions.push_back(static_cast<int32_t>(q.position + int64_t(i)));
      token_seq.push_back(s);
    }
    if (!opt.all_logits) logit_index.push_back(int32_t(tokens.size()) - 1);
    q_start.push_back(int32_t(tokens.size()));
    seq_lens.push_back(static_cast<int32_t>(ctx));
    p->max_q_len = std::max(p->max_q_len, int(q.tokens.size()));
    p->max_seq_len = std::max<int>(p->max_seq_len, static_cast<int>(ctx));
    p->context_tokens += ctx;
  }
  p->T = int64_t(tokens.size());
  p->seq_offsets.push_back(p->T);
  if (p->T > cfg_.max_tokens_per_step)
    throw InputError(fmt::format("GPU forward: {} tokens, max_tokens_per_step={}", p->T, cfg_.max_tokens_per_step));
  for (auto r : logit_index) p->logit_rows.push_back(r);
  p->record = opt.record_hidden;
  p->greedy = opt.greedy;
  p->copy_logits = opt.copy_logits;
  Act& A = *act_;
  cudaStream_t s = stream_.get();
  auto up = [&](int32_t* dst, const std::vector<int32_t>& v) {
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(dst, v.data(), v.size() * 4, cudaMemcpyHostToDevice, s));
  };
  if (cfg_.shard.moe_mode == MoeMode::gathered && m.num_moe_layers() > 0)
    p->moe_tokens = cfg_.comm->max_over(CommGroup::stage, p->T, s);
  up(A.tokens, tokens);
  up(A.positions, positions);
  up(A.token_seq, token_seq);
  up(A.q_start, q_start);
  up(A.seq_lens, seq_lens);
  up(A.block_table, table);
  up(A.logit_index, logit_index);
  // Attention workspace for this batch shape.
  kernels::AttentionParams ap;
  ap.cache.head_dim = m.attention.head_dim;
  ap.cache.kv_heads = dims_.kv_heads;
  ap.cache.block_tokens = cfg_.block_size;
  ap.num_seqs = p->S;
  ap.num_tokens = p->T;
  ap.q_heads = dims_.q_heads;
  ap.max_q_len = p->max_q_len;
  ap.max_seq_len = p->max_seq_len;
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  const std::size_t ws = p->T > 0 ? kernels::attention_workspace_bytes(ap, device) : 0;
  if (ws > A.attn_ws.bytes()) A.attn_ws = DeviceBuffer(ws);
  const std::size_t tickets = p->T > 0 ? kernels::attention_merge_tickets(ap, device) * sizeof(int32_t) : 0;
  if (tickets > A.attn_tickets.bytes()) {  // zeroed once; every attention launch leaves them zero
    A.attn_tickets = DeviceBuffer(tickets);
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.attn_tickets.get(), 0, tickets, s));
  }
  if (p->record) {
    const std::size_t rec = 2 * std::size_t(m.num_layers) * std::size_t(p->T) * std::size_t(m.hidden_size) * 2;
    if (rec > A.hidden_rec.bytes()) A.hidden_rec = DeviceBuffer(rec);
  }
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  prep_ = std::move(p);
}

void GpuModel::ffn_dense(const bf16* w13, const bf16* w2, int64_t inter, const bf16* x, int64_t T, bf16* out,
                         cudaStream_t s) {
  Act& A = *act_;
  const int64_t H = spec_.hidden_size;
  linear(x, w13, A.gu, T, 2 * inter, H, s);  // [T, 2I]: gate | up
  if (dense_gemv_for(cfg_.decode_kernels, T, inter)) {  // SwiGLU applied while the GEMV stages its input
    GemvParams g;
    g.kernel = cfg_.gemv_kernel;
    g.act = A.gu;
    g.swiglu_act = true;
    g.weights = w2;
    g.seg[0] = {out, H};
    g.num_rows = T;
    g.n = H;
    g.k = inter;
    g.pdl = pdl_;
    launch_gemv(g, s);
    return;
  }
  kernels::SwigluParams sw;
  sw.gate_up = A.gu;
  sw.out = A.ffn_act;
  sw.num_rows = T;
  sw.inter = inter;
  kernels::launch_swiglu(sw, s);
  linear(A.ffn_act, w2, out, T, H, inter, s);
}

void GpuModel::moe_block(const Layer& L, int64_t T, cudaStream_t s) {
  Act& A = *act_;
  const int64_t H = spec_.hidden_size;
  if (cfg_.shard.moe_sched != MoeSched::none) {
    // The plan's MoE communication by schedule (EP dispatch/combine, fused AG-Dispatch /
    // RS-Combine): the router on this rank's rows, the stage's dispatch, the routed experts on
    // the received rows (their slots as top-k ids and weights), the combine back into tmp.
    const int64_t Ts = cfg_.shard.moe_mode == MoeMode::gathered ? prep_->moe_tokens : T;
    if (Ts == 0) return;
    if (T > 0) moe_route(L, A.normed, T, s);
    const MoeExpertRows r = cfg_.comm->moe_dispatch(A.normed, A.topk_ids, A.topk_w, T, Ts, s);
    // The leading shared_rows rows (the group's own tokens) also get the shared expert's TP
    // slice; the schedule's reduce-scatter sums it with the routed partials.
    const int64_t sh = std::min(r.shared_rows, r.rows);
    const std::size_t touched0 = prep_->experts_touched.size();
    if (sh > 0) {
      if (!L.shared_w13)
        throw RuntimeError("scheduled MoE: shared-expert rows on a rank without the shared expert's shard");
      moe_experts(L, r.x, sh, r.k, r.ids, r.weights, true, r.out, sh * r.k, s);  // slots of local experts
    }
    if (r.rows > sh)
      moe_experts(L, r.x + sh * H, r.rows - sh, r.k, r.ids + sh * r.k, r.weights + sh * r.k, false,
                  r.out + sh * H, (r.rows - sh) * r.k, s);
    // One experts_touched entry per layer: the larger of the two calls' counts (their experts may
    // overlap; the entry is a lower bound of the distinct experts read, prepared_min_bytes).
    if (prep_->experts_touched.size() == touched0 + 2) {
      const int second = prep_->experts_touched.back();
      prep_->experts_touched.pop_back();
      prep_->experts_touched.back() = std::max(prep_->experts_touched.back(), second);
    }
    cfg_.comm->moe_combine(A.tmp, T, s);
    return;
  }
  switch (cfg_.shard.moe_mode) {
    case MoeMode::none:
      ffn_moe(L, A.normed, T, A.tmp, s);
      return;
    case MoeMode::replicated:  // same tokens on every rank of the stage: partial sums, all-reduced
      if (T == 0) return;
      ffn_moe(L, A.normed, T, A.tmp, s);
      cfg_.comm->all_reduce(CommGroup::stage, A.tmp, T * H, s);
      return;
    case MoeMode::gathered: {  // DP replicas: gather the stage's rows, own experts, reduce-scatter
      const int64_t Tm = prep_->moe_tokens;
      if (Tm == 0) return;
      const int u = cfg_.comm->group_index(CommGroup::stage), G = cfg_.comm->group_size(CommGroup::stage);
      bf16* mine = A.moe_in + std::size_t(u) * std::size_t(Tm * H);  // [Tm, H]: rows >= T zero
      if (T > 0)
        MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(mine, A.normed, std::size_t(T * H) * 2, cudaMemcpyDeviceToDevice, s));
      if (Tm > T) MIXSERVE_CUDA_CHECK(cudaMemsetAsync(mine + T * H, 0, std::size_t((Tm - T) * H) * 2, s));
      cfg_.comm->all_gather(CommGroup::stage, A.moe_in, std::size_t(Tm * H) * 2, s);  // [G * Tm, H]
      ffn_moe(L, A.moe_in, G * Tm, A.moe_out, s);
      cfg_.comm->reduce_scatter(CommGroup::stage, A.moe_out, A.tmp, Tm * H, s);  // [Tm, H]: own rows
      return;
    }
  }
}

void GpuModel::ffn_moe(const Layer& L, const bf16* x, int64_t T, bf16* out, cudaStream_t s) {
  const int E = spec_.moe.num_experts, K = spec_.moe.top_k, El = dims_.experts;
  if (El == E && uses_fused_moe_route(cfg_.decode_kernels, T, cfg_.fused_moe_route)) {
    moe_route_permute(L, x, T, s);  // logits, top-k and permute in one launch
    moe_experts(L, x, T, K, act_->topk_ids, act_->topk_w, true, out, T * K, s, true);  // El == E
    return;
  }
  moe_route(L, x, T, s);
  // Expert parallel: ids relative to the shard's first expert; the permute drops the others.
  if (El < E) launch_offset_ids(act_->topk_ids, T * K, -dims_.expert0, s);
  // The ids cover all E experts; the shard's El get their share of the routed rows on average.
  moe_experts(L, x, T, K, act_->topk_ids, act_->topk_w, true, out, T * K * El / E, s);
}

void GpuModel::moe_route(const Layer& L, const bf16* x, int64_t T, cudaStream_t s) {
  Act& A = *act_;
  const ModelSpec& m = spec_;
  const int E = m.moe.num_experts, K = m.moe.top_k;
  // Router: fp32 logits [T, E] -> top-k ids and weights.
  router_logits(x, L.router, A.router_logits, T, s);
  kernels::RouterParams rp;
  rp.logits = A.router_logits;
  rp.topk_ids = A.topk_ids;
  rp.topk_weights = A.topk_w;
  rp.num_tokens = T;
  rp.num_experts = E;
  rp.top_k = K;
  rp.scoring = kernels::RouterScoring::softmax_topk;
  rp.renormalize = m.moe.norm_topk_prob;
  rp.routed_scaling = static_cast<float>(m.moe.routed_scaling_factor);
  rp.pdl = pdl_;
  kernels::launch_router(rp, s);
}

void GpuModel::moe_route_permute(const Layer& L, const bf16* x, int64_t T, cudaStream_t s) {
  Act& A = *act_;
  const ModelSpec& m = spec_;
  kernels::MoeRouteParams mr;
  mr.weights = L.router;
  mr.logits = A.router_logits;
  mr.router.topk_ids = A.topk_ids;
  mr.router.topk_weights = A.topk_w;
  mr.router.num_tokens = T;
  mr.router.num_experts = m.moe.num_experts;
  mr.router.top_k = m.moe.top_k;
  mr.router.scoring = kernels::RouterScoring::softmax_topk;
  mr.router.renormalize = m.moe.norm_topk_prob;
  mr.router.routed_scaling = static_cast<float>(m.moe.routed_scaling_factor);
  mr.permute.topk_ids = A.topk_ids;
  mr.permute.x = x;
  mr.permute.permuted_x = A.permuted_x;
  mr.permute.expert_counts = A.counts;
  mr.permute.expert_offsets = A.offsets;
  mr.permute.slot_row = A.slot_row;
  mr.permute.permuted_token = A.permuted_token;
  mr.permute.num_tokens = T;
  mr.permute.top_k = m.moe.top_k;
  mr.permute.num_experts = m.moe.num_experts;
  mr.permute.hidden = m.hidden_size;
  mr.ticket = A.route_ticket.as<int32_t>();
  mr.pdl = pdl_;
  kernels::launch_moe_route(mr, s);
}

void GpuModel::set_expert_gemm_streams(int n) {
  if (n < kExpertGemmStreamsMin)
    throw InputError(fmt::format("expert GEMM streams: {} not supported ({})", n, kExpertGemmStreamsLegal));
  // No room check for the bucketed values: a step whose padded rows exceed the buffers falls back
  // to the streams (moe_experts), and the default is bucketed, so this must work on any model.
  if (n == cfg_.expert_gemm_streams) return;
  cfg_.expert_gemm_streams = n;
  expert_fanout_.reset();  // the next step that needs it makes one with n streams
}

void GpuModel::set_expert_bucket_row_align(int64_t align) {
  if (align < 1 || align > kExpertBucketRowAlignMax)
    throw InputError(fmt::format("expert_bucket_row_align: {} not supported (1 .. {} rows)", align,
                                 kExpertBucketRowAlignMax));
  // No room check: a step whose bucketed layout does not fit the buffers falls back to the streams
  // (the default expert_gemm_streams is bucketed, so this must work on any model).
  cfg_.expert_bucket_row_align = align;
}

void GpuModel::moe_experts(const Layer& L, const bf16* x, int64_t T, int K, const int32_t* ids,
                           const float* weights, bool shared, bf16* out, int64_t local_rows, cudaStream_t s,
                           bool permuted) {
  Act& A = *act_;
  const ModelSpec& m = spec_;
  const int64_t H = m.hidden_size, I = dims_.inter, S = (shared && L.shared_w13) ? dims_.shared : 0;
  const int El = dims_.experts;
  // automatic: the GEMV's row limit, and both projections' k must fit the GEMV
  // (core/expert_path.hpp uses_device_gemv(rows, hidden, inter), the cost model's rule).
  const bool gemv = cfg_.expert_path == ExpertPath::device_gemv ||
                    (cfg_.expert_path == ExpertPath::automatic && T * K <= cfg_.device_gemv_max_rows &&
                     gemv_k_fits(H) && gemv_k_fits(I));
  // Above the GEMV rows, automatic takes the per-expert cuBLASLt GEMMs on several streams for large
  // steps (core/expert_path.hpp uses_expert_streams, the cost model's and profiler's rule) and the
  // device-offset grouped GEMM (no host sync) otherwise.
  const bool per_expert = cfg_.expert_path == ExpertPath::cublaslt ||
                          (cfg_.expert_path == ExpertPath::automatic && !gemv && uses_expert_streams(local_rows, El));
  const bool tensor_core_grouped = !gemv && !per_expert;
  // The padded batched GEMM gathers the rows itself (into its padded layout, or in expert order
  // when it falls back), so its permute writes the index maps only.
  const bool padded_batch = per_expert && cfg_.expert_gemm_streams == kExpertGemmPaddedBatch;
  // The bucketed layout likewise (a step whose padded rows exceed the buffers falls back).
  const bool bucketed = per_expert && is_bucketed_expert_gemm(cfg_.expert_gemm_streams);
  // The weighted sum of each token's expert rows (through slot_row: expert-ordered or padded rows)
  // plus the shared expert.
  auto combine = [&] {
    kernels::CombineParams cp;
    cp.expert_out = A.expert_out;
    cp.slot_row = A.slot_row;
    cp.topk_weights = weights;
    cp.shared_out = S > 0 ? A.shared_out : nullptr;
    cp.shared_gate = (S > 0 && L.shared_gate) ? A.shared_gate : nullptr;
    cp.out = out;
    cp.num_tokens = T;
    cp.top_k = K;
    cp.hidden = H;
    cp.pdl = pdl_ && gemv;  // the other paths may end in a host copy rather than a kernel
    kernels::launch_combine(cp, s);
  };
  // Shared expert first (it reuses the FFN scratch buffers).
  if (S > 0) {
    ffn_dense(L.shared_w13, L.shared_w2, S, x, T, A.shared_out, s);
    if (L.shared_gate) launch_linear_fp32(x, L.shared_gate, A.shared_gate, T, 1, static_cast<int>(H), s);
  }
  // Permute into expert-contiguous rows (device-side counts and offsets), unless the fused router
  // launch did (moe_route_permute).
  if (!permuted) {
    kernels::PermuteParams pp;
    pp.topk_ids = ids;
    pp.x = (padded_batch || bucketed) ? nullptr : x;
    pp.permuted_x = A.permuted_x;
    pp.expert_counts = A.counts;
    pp.expert_offsets = A.offsets;
    pp.slot_row = A.slot_row;
    pp.permuted_token = A.permuted_token;
    pp.workspace = A.permute_ws;
    pp.workspace_bytes = A.permute_ws_bytes;
    pp.num_tokens = T;
    pp.top_k = K;
    pp.num_experts = El;
    pp.hidden = H;
    pp.allow_single_launch = cfg_.decode_kernels;  // one launch: permute_launches (core/decode_path.hpp)
    pp.pdl = pdl_;
    kernels::launch_permute(pp, s);
  }
  kernels::SwigluParams sw;
  sw.gate_up = A.gu;
  sw.out = A.ffn_act;
  sw.inter = I;
  if (gemv) {
    // All experts in one launch per projection; rows from the device offsets (no host sync).
    GroupedGemvParams g;
    g.kernel = cfg_.gemv_kernel;
    g.act = A.permuted_x;
    g.weights = L.w13;
    g.out = A.gu;  // [T * K, 2I]
    g.expert_offsets = A.offsets;
    g.num_experts = El;
    g.n = 2 * I;
    g.k = H;
    g.max_rows = T * K;             // routed rows
    g.max_rows_per_expert = T;      // a token picks distinct experts
    g.pdl = pdl_;
    const bool v2 = uses_grouped_gemv_v2(cfg_.decode_kernels, T, cfg_.grouped_gemv_v2_max_tokens);
    auto grouped = v2 ? launch_grouped_gemv_v2 : launch_grouped_gemv;
    grouped(g, s);
    if (v2) {
      g.act = A.gu;  // SwiGLU applied while the down GEMV stages its rows
      g.swiglu_act = true;
      // Its predecessor is the gate|up GEMV over the same offsets, written by the permute before:
      // the down GEMV may look up its experts and prefetch their weights before it waits.
      g.offsets_before_previous = true;
    } else {
      sw.num_rows = T * K;
      sw.num_rows_device = A.offsets + El;
      kernels::launch_swiglu(sw, s);
      g.act = A.ffn_act;
    }
    g.weights = L.w2;
    g.out = A.expert_out;  // [T * K, H]
    g.n = H;
    g.k = I;
    grouped(g, s);
  } else if (tensor_core_grouped) {
    // Tensor-core grouped GEMM: one launch per projection for all experts, tiles scheduled on the
    // device from the permute's offsets (no host sync). experts_touched is not recorded (it
    // would need the counts on the host).
    kernels::GroupedGemmParams g;
    g.act = A.permuted_x;
    g.weights = L.w13;
    g.out = A.gu;  // [T * K, 2I]
    g.expert_offsets = A.offsets;
    g.num_experts = El;
    g.n = 2 * I;
    g.k = H;
    kernels::launch_grouped_gemm(g, s);
    sw.num_rows = T * K;
    sw.num_rows_device = A.offsets + El;
    kernels::launch_swiglu(sw, s);
    g.act = A.ffn_act;
    g.weights = L.w2;
    g.out = A.expert_out;  // [T * K, H]
    g.n = H;
    g.k = I;
    kernels::launch_grouped_gemm(g, s);
  } else {
    // Host copy of the counts: ExpertGemm plans one cuBLASLt GEMM per expert with tokens.
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(A.counts_host, A.counts, std::size_t(El) * 4, cudaMemcpyDeviceToHost, s));
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<int64_t> counts(El);
    int touched = 0;
    for (int e = 0; e < El; ++e) {
      counts[e] = A.counts_host[e];
      touched += counts[e] > 0;
    }
    prep_->experts_touched.push_back(touched);
    int64_t bucket_total = 0;  // the bucketed layout's rows (a step that does not fit them falls back)
    if (bucketed)
      for (int e = 0; e < El; ++e) bucket_total += expert_bucket_rows(counts[e], cfg_.expert_bucket_row_align);
    if (bucketed && bucket_total <= A.expert_rows) {
      run_bucketed_experts(L, x, T, K, ids, counts, s);
      combine();
      return;
    }
    if (bucketed) ++padded_counts_.fallback;
    expert_w13_->set_counts(counts);
    expert_w2_->set_counts(counts);
    const int64_t rows = expert_w13_->total_rows();
    if (padded_batch) {
      const int64_t padded = El * expert_padded_rows(*std::max_element(counts.begin(), counts.end()));
      if (padded <= A.padded_capacity) {
        ++padded_counts_.padded;
        run_padded_experts(L, x, T, K, ids, padded / El, s);
        combine();
        return;
      }
      ++padded_counts_.fallback;
    }
    // A padded or bucketed layout that did not fit falls back to the per-expert GEMMs on
    // kExpertGemmStreams streams: the index-only permute left the rows to gather, in expert order.
    if ((padded_batch || bucketed) && !permuted) {
      gather_token_rows(x, A.permuted_token, A.permuted_x, rows, s);  // [rows, H]
    }
    const int streams = (padded_batch || bucketed) ? kExpertGemmStreams : cfg_.expert_gemm_streams;
    const bool grouped_call = streams == kExpertGemmGroupedCall;
    if (grouped_call && !blas_) blas_ = std::make_unique<BlasHandle>();
    if (streams > 1 && !expert_fanout_) expert_fanout_ = std::make_unique<StreamFanout>(streams, lt_workspace_.bytes());
    if (grouped_call) {
      // One cuBLAS grouped call per projection for all the experts with rows.
      expert_w13_->run_grouped_call(A.permuted_x, L.w13, A.gu, s, *blas_);  // [rows, 2I]
    } else if (expert_fanout_) {
      // Each projection's expert GEMMs forked over the streams and joined back to s.
      expert_w13_->run(A.permuted_x, L.w13, A.gu, nullptr, nullptr, s, *expert_fanout_);  // [rows, 2I]
    } else {
      expert_w13_->run(A.permuted_x, L.w13, A.gu, nullptr, nullptr, s);
    }
    sw.num_rows = rows;
    if (rows > 0) kernels::launch_swiglu(sw, s);
    if (grouped_call) {
      expert_w2_->run_grouped_call(A.ffn_act, L.w2, A.expert_out, s, *blas_);  // [rows, H]
    } else if (expert_fanout_) {
      expert_w2_->run(A.ffn_act, L.w2, A.expert_out, nullptr, nullptr, s, *expert_fanout_);  // [rows, H]
    } else {
      expert_w2_->run(A.ffn_act, L.w2, A.expert_out, nullptr, nullptr, s);
    }
  }
  combine();
}

void GpuModel::gather_token_rows(const bf16* x, const int32_t* row_token, bf16* dst, int64_t rows,
                                 cudaStream_t s) const {
  kernels::GatherRowsParams gp;
  gp.x = x;
  gp.row_token = row_token;  // -1: a zero row
  gp.dst = dst;
  gp.num_rows = rows;
  gp.hidden = spec_.hidden_size;
  kernels::launch_gather_rows(gp, s);
}

void GpuModel::run_padded_experts(const Layer& L, const bf16* x, int64_t T, int K, const int32_t* ids,
                                  int64_t rows_per_expert, cudaStream_t s) {
  Act& A = *act_;
  const int64_t I = dims_.inter;
  const int El = dims_.experts;
  if (rows_per_expert == 0) return;  // no local rows: every slot_row is -1, the combine adds nothing
  const int64_t padded = El * rows_per_expert;
  // slot_row -> padded rows, and the padded row -> token map.
  kernels::PadExpertRowsParams pr;
  pr.topk_ids = ids;
  pr.expert_counts = A.counts;
  pr.expert_offsets = A.offsets;
  pr.permuted_token = A.permuted_token;
  pr.slot_row = A.slot_row;
  pr.padded_token = A.padded_token;  // [El * rows_per_expert]
  pr.num_tokens = T;
  pr.top_k = K;
  pr.num_experts = El;
  pr.rows_per_expert = rows_per_expert;
  kernels::launch_pad_expert_rows(pr, s);
  // Token rows into the padded layout; pad rows zero.
  gather_token_rows(x, A.padded_token, A.permuted_x, padded, s);  // [El * rows_per_expert, H]
  expert_w13_->run_padded_batch(A.permuted_x, L.w13, A.gu, rows_per_expert, s);  // [padded, 2I]
  kernels::SwigluParams sw;
  sw.gate_up = A.gu;
  sw.out = A.ffn_act;  // [padded, I]
  sw.num_rows = padded;
  sw.inter = I;
  kernels::launch_swiglu(sw, s);
  expert_w2_->run_padded_batch(A.ffn_act, L.w2, A.expert_out, rows_per_expert, s);  // [padded, H]
}

FusedDecodeLayerParams GpuModel::fused_layer_params(const Layer& L, int l, cudaStream_t) const {
  const Act& A = *act_;
  const ModelSpec& m = spec_;
  FusedDecodeLayerParams fp;
  // Layers the kernel does not cover keep the unfused kernels: dense FFNs, shared experts, q/k/v
  // bias, q/k norms over the whole projection (OLMoE). An empty pointer fails the reason check.
  const bool per_head_norm = !L.q_norm || (L.q_norm_width == m.attention.head_dim && L.k_norm_width == m.attention.head_dim);
  if (!L.moe || L.shared_w13 || L.bq || !per_head_norm) return fp;
  fp.res = A.res;
  fp.tmp_out = A.tmp;
  fp.hidden = m.hidden_size;
  fp.eps = static_cast<float>(m.rms_norm_eps);
  fp.in_norm = L.in_norm;
  fp.post_norm = L.post_norm;
  fp.wqkv = L.wq;  // fused [q | k | v] rows (allocate(): wk and wv point into it)
  fp.q_norm = L.q_norm;
  fp.k_norm = L.k_norm;
  fp.wo = L.wo;
  fp.q_heads = dims_.q_heads;
  fp.kv_heads = dims_.kv_heads;
  fp.head_dim = m.attention.head_dim;
  fp.rope_cs = A.rope_cs;
  fp.position = A.positions;
  fp.seq_len = A.seq_lens;
  fp.k_cache = k_cache_[l].as<bf16>();
  fp.v_cache = v_cache_[l].as<bf16>();
  fp.block_table = A.block_table;  // sequence 0's row
  fp.block_tokens = cfg_.block_size;
  fp.router = L.router;
  fp.w13 = L.w13;
  fp.w2 = L.w2;
  fp.num_experts = m.moe.num_experts;
  fp.top_k = m.moe.top_k;
  fp.inter = dims_.inter;
  fp.renormalize = m.moe.norm_topk_prob;
  fp.routed_scaling = static_cast<float>(m.moe.routed_scaling_factor);
  fp.qkv_tagged = A.fused_qkv.as<uint32_t>();
  fp.attn_ws = A.fused_ws.as<unsigned long long>();
  fp.attn_ws_words = A.fused_ws_words;
  fp.attn_tagged = A.fused_attn.as<uint32_t>();
  fp.o_tagged = A.fused_o_tagged.as<uint32_t>();
  fp.part = A.fused_part.as<float>();
  fp.logits_tagged = A.fused_logits.as<unsigned long long>();
  fp.gu_tagged = A.fused_gu.as<uint32_t>();
  fp.epoch = A.fused_epoch.as<unsigned>();
  fp.barrier = A.fused_barrier.as<unsigned>() + int64_t(l) * (1 + kFusedDecodeMaxTopK);
  fp.phase_ns = A.fused_phase_ns.as<unsigned long long>();
  if (l == (dims_.layer_begin + dims_.layer_end) / 2) fp.diag = A.fused_diag.as<unsigned long long>();
  fp.stage_bytes = fused_stage_bytes_;
  fp.max_stages = fused_max_stages_;
  fp.inflight_bytes = fused_inflight_bytes_;
  fp.diag_skip_dot = fused_skip_dot_;
  fp.evict_first = fused_evict_first_;
  fp.multirow = fused_multirow_;
  fp.mma = fused_mma_;
  fp.cooperative = fused_cooperative_;
  fp.tagged_part = fused_tagged_part_;
  return fp;
}

std::vector<double> GpuModel::take_fused_phase_us() {
  Act& A = *act_;
  if (A.fused_phase_ns.bytes() == 0) return {};
  unsigned long long h[8] = {};
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  MIXSERVE_CUDA_CHECK(cudaMemcpy(h, A.fused_phase_ns.get(), sizeof(h), cudaMemcpyDeviceToHost));
  MIXSERVE_CUDA_CHECK(cudaMemset(A.fused_phase_ns.get(), 0, sizeof(h)));
  std::vector<double> us(7, 0.0);
  for (int i = 0; i < 7; ++i) us[std::size_t(i)] = h[7] ? double(h[i]) / double(h[7]) / 1e3 : 0.0;
  return us;
}

std::vector<unsigned long long> GpuModel::fused_layer_diag() {
  Act& A = *act_;
  if (A.fused_diag.bytes() == 0) return {};
  std::vector<unsigned long long> h(A.fused_diag.bytes() / sizeof(unsigned long long));
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  MIXSERVE_CUDA_CHECK(cudaMemcpy(h.data(), A.fused_diag.get(), A.fused_diag.bytes(), cudaMemcpyDeviceToHost));
  return h;
}

void GpuModel::run_bucketed_experts(const Layer& L, const bf16* x, int64_t T, int K, const int32_t* ids,
                                    const std::vector<int64_t>& counts, cudaStream_t s) {
  Act& A = *act_;
  const int64_t I = dims_.inter, align = cfg_.expert_bucket_row_align;
  const int El = dims_.experts;
  // Each expert's rows rounded up to the alignment, and their prefix sums (the padded offsets).
  std::vector<int64_t> padded(counts.size());
  int64_t total = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    padded[e] = expert_bucket_rows(counts[e], align);
    total += padded[e];
  }
  if (total > A.expert_rows)  // moe_experts checked the room (else it fell back to the streams)
    throw RuntimeError(fmt::format("bucketed expert GEMM: {} padded rows, the buffers hold {}", total, A.expert_rows));
  ++padded_counts_.bucketed;
  if (total == 0) return;  // no local rows: every slot_row is -1, the combine adds nothing
  // The previous layer's upload may still be reading the pinned offsets (in a step it has finished:
  // the count copy above synchronised the stream; the event makes it a rule, not a coincidence).
  if (A.bucket_offsets_pending) MIXSERVE_CUDA_CHECK(cudaEventSynchronize(A.bucket_offsets_copied));
  A.bucket_offsets_host[0] = 0;
  for (int e = 0; e < El; ++e)
    A.bucket_offsets_host[e + 1] = static_cast<int32_t>(A.bucket_offsets_host[e] + padded[std::size_t(e)]);
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(A.bucket_offsets, A.bucket_offsets_host, std::size_t(El + 1) * 4,
                                      cudaMemcpyHostToDevice, s));
  MIXSERVE_CUDA_CHECK(cudaEventRecord(A.bucket_offsets_copied, s));
  A.bucket_offsets_pending = true;
  // slot_row -> padded rows, and the padded row -> token map.
  kernels::PadExpertRowsParams pr;
  pr.topk_ids = ids;
  pr.expert_counts = A.counts;
  pr.expert_offsets = A.offsets;
  pr.permuted_token = A.permuted_token;
  pr.slot_row = A.slot_row;
  pr.padded_token = A.padded_token;  // [total]
  pr.num_tokens = T;
  pr.top_k = K;
  pr.num_experts = El;
  pr.padded_offsets = A.bucket_offsets;
  pr.num_padded_rows = total;
  kernels::launch_pad_expert_rows(pr, s);
  // Token rows into the padded layout; pad rows zero.
  gather_token_rows(x, A.padded_token, A.permuted_x, total, s);  // [total, H]
  if (!blas_) blas_ = std::make_unique<BlasHandle>();
  const BucketIssue issue = cfg_.expert_gemm_streams == kExpertGemmBucketedBatched ? BucketIssue::batched_per_bucket
                                                                                   : BucketIssue::grouped_call;
  padded_counts_.buckets += expert_w13_->run_bucketed_call(A.permuted_x, L.w13, A.gu, padded, s, *blas_, issue);  // [total, 2I]
  kernels::SwigluParams sw;
  sw.gate_up = A.gu;
  sw.out = A.ffn_act;  // [total, I]
  sw.num_rows = total;
  sw.inter = I;
  kernels::launch_swiglu(sw, s);
  expert_w2_->run_bucketed_call(A.ffn_act, L.w2, A.expert_out, padded, s, *blas_, issue);  // [total, H]
}

void GpuModel::enqueue(cudaStream_t s) {
  if (!prep_) throw InputError("GPU forward: enqueue() before prepare()");
  Prepared& P = *prep_;
  P.experts_touched.clear();
  // Programmatic dependent launches (kernels/detail/pdl.cuh) only where every predecessor is one of
  // our kernels: decode-sized steps (no cuBLASLt in the layers) that do not record the residual
  // stream (device copies in the chain).
  pdl_ = uses_programmatic_launch(cfg_.decode_kernels, cfg_.programmatic_launch, P.T) && !P.record;
  Act& A = *act_;
  const ModelSpec& m = spec_;
  const auto& at = m.attention;
  const int64_t T = P.T, H = m.hidden_size, QW = int64_t(dims_.q_heads) * at.head_dim,
                KVW = int64_t(dims_.kv_heads) * at.head_dim;
  const float eps = static_cast<float>(m.rms_norm_eps);
  const bool attn_tp = cfg_.shard.attn_tp > 1;
  if (dims_.first_stage) {
    if (T > 0) launch_gather_rows(embed_, A.tokens, A.res, T, H, s);
  } else {
    cfg_.comm->recv_prev_stage(A.res, std::size_t(T * H) * 2, s);
  }
  if (cfg_.decode_kernels && T > 0)  // the tokens' RoPE angles once per step (the fused QK-norm/RoPE reads them)
    launch_rope_table(A.positions, A.rope_cs, T, at.head_dim, static_cast<float>(m.rope_theta), s);
  // The fused batch-1 decode layer (decode_layer.hpp) for the MoE layers it supports: one
  // sequence, one token, the whole model; its grid-barrier counters zeroed once per step.
  // (Only where the experts would run on the device GEMV anyway: a forced cublaslt or grouped_gemm
  // expert path keeps the unfused kernels.)
  // A layer's closing residual add, res += tmp (with the decode kernels only after the stage's last
  // layer: the next layer's norm adds it otherwise), and its record.
  auto close_layer = [&](int l) {
    const std::size_t plane = std::size_t(T) * std::size_t(H);
    kernels::AxpbyParams ax;
    ax.x = A.res;
    ax.y = A.tmp;
    ax.out = A.res;
    ax.num_elements = T * H;
    kernels::launch_axpby(ax, s);
    if (P.record)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(A.hidden_rec.as<bf16>() + (std::size_t(m.num_layers) + l) * plane, A.res,
                                          plane * 2, cudaMemcpyDeviceToDevice, s));
  };
  const bool fused_layer_now = uses_fused_decode_layer(cfg_.decode_kernels, cfg_.fused_decode_layer, T, P.S) &&
                               A.fused_barrier.bytes() > 0 && dims_.experts == m.moe.num_experts &&
                               (cfg_.expert_path == ExpertPath::automatic || cfg_.expert_path == ExpertPath::device_gemv);
  if (fused_layer_now) MIXSERVE_CUDA_CHECK(cudaMemsetAsync(A.fused_barrier.get(), 0, A.fused_barrier.bytes(), s));
  for (int l = dims_.layer_begin; l < dims_.layer_end; ++l) {
    const Layer& L = layers_[l];
    if (T == 0) {  // an idle DP-attention rank: only the stage's MoE exchange
      if (L.moe) moe_block(L, T, s);
      continue;
    }
    const std::size_t plane = std::size_t(T) * std::size_t(H);
    // decode_kernels: the previous layer's residual add (res += tmp) is fused into this norm.
    const bool fused_residual = cfg_.decode_kernels && l > dims_.layer_begin;
    if (fused_layer_now) {
      // This layer and the supported layers after it in one launch (decode_layer.hpp
      // launch_fused_decode_layers): the weight stream runs on from layer to layer.
      if (!fused_step_) fused_step_ = std::make_unique<FusedDecodeStepParams>();
      FusedDecodeStepParams& FP = *fused_step_;
      FP.num_layers = 0;
      int last = l;
      for (int k = l; k < dims_.layer_end && FP.num_layers < kFusedDecodeMaxLayers; ++k) {
        FusedDecodeLayerParams fp = fused_layer_params(layers_[k], k, s);
        if (!fused_decode_layer_unsupported_reason(fp).empty()) break;
        const bool residual_k = cfg_.decode_kernels && k > dims_.layer_begin;
        fp.tmp_in = residual_k ? A.tmp : nullptr;
        fp.rec_in = residual_k && P.record
                        ? A.hidden_rec.as<bf16>() + (std::size_t(m.num_layers) + k - 1) * plane
                        : nullptr;
        fp.rec_attn = P.record ? A.hidden_rec.as<bf16>() + std::size_t(k) * plane : nullptr;
        fp.pdl = pdl_ && k > 0;
        FP.layer[FP.num_layers++] = fp;
        last = k;
      }
      if (FP.num_layers > 0) {
        launch_fused_decode_layers(FP, s);
        fused_layers_run_ += FP.num_layers;
        l = last;
        if (l + 1 == dims_.layer_end) close_layer(l);  // else the next layer's norm adds tmp
        continue;
      }
    }
    kernels::RmsNormParams rn;
    rn.x = fused_residual ? A.tmp : A.res;
    if (fused_residual) {
      rn.residual = A.res;
      rn.residual_out = A.res;
    }
    rn.weight = L.in_norm;
    rn.pdl = pdl_ && l > 0;
    rn.out = A.normed;
    rn.num_rows = T;
    rn.width = static_cast<int>(H);
    rn.eps = eps;
    kernels::launch_rmsnorm(rn, s);
    if (fused_residual && P.record)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(A.hidden_rec.as<bf16>() + (std::size_t(m.num_layers) + l - 1) * plane,
                                          A.res, plane * 2, cudaMemcpyDeviceToDevice, s));
    if (dense_gemv_for(cfg_.decode_kernels, T, H)) {
      GemvParams g;  // one launch: fused [QW + 2 KVW, H] weight, bias in the epilogue
      g.kernel = cfg_.gemv_kernel;
      g.act = A.normed;
      g.weights = L.wq;
      g.bias = L.bq;
      g.seg[0] = {A.q, QW};
      g.seg[1] = {A.k, KVW};
      g.seg[2] = {A.v, KVW};
      g.num_segments = 3;
      g.num_rows = T;
      g.n = QW + 2 * KVW;
      g.k = H;
      g.pdl = pdl_;
      launch_gemv(g, s);
    } else {
      gemm(A.normed, L.wq, A.q, T, QW, H, s);
      gemm(A.normed, L.wk, A.k, T, KVW, H, s);
      gemm(A.normed, L.wv, A.v, T, KVW, H, s);
      if (L.bq) {
        launch_add_bias(A.q, L.bq, T, QW, s);
        launch_add_bias(A.k, L.bk, T, KVW, s);
        launch_add_bias(A.v, L.bv, T, KVW, s);
      }
    }
    kernels::PagedKvCache cache;
    cache.k = k_cache_[l].as<bf16>();
    cache.v = v_cache_[l].as<bf16>();
    cache.block_table = A.block_table;
    cache.num_blocks = num_blocks_;
    cache.block_tokens = cfg_.block_size;
    cache.kv_heads = dims_.kv_heads;
    cache.head_dim = at.head_dim;
    cache.max_blocks_per_seq = cfg_.max_blocks_per_seq;
    const bool per_head_norm = !L.q_norm || (L.q_norm_width == at.head_dim && L.k_norm_width == at.head_dim);
    if (uses_fused_qk_rope_kv(cfg_.decode_kernels, per_head_norm)) {
      QkNormRopeKvParams qk;  // QK-norm + RoPE + KV write in one launch
      qk.q = A.q;
      qk.k = A.k;
      qk.v = A.v;
      qk.q_norm = L.q_norm;
      qk.k_norm = L.k_norm;
      qk.positions = A.positions;
      qk.token_seq = A.token_seq;
      qk.k_cache = cache.k;
      qk.v_cache = cache.v;
      qk.block_table = A.block_table;
      qk.block_tokens = cfg_.block_size;
      qk.max_blocks_per_seq = cfg_.max_blocks_per_seq;
      qk.num_tokens = T;
      qk.q_heads = dims_.q_heads;
      qk.kv_heads = dims_.kv_heads;
      qk.head_dim = at.head_dim;
      qk.theta = static_cast<float>(m.rope_theta);
      qk.eps = eps;
      qk.rope_cs = A.rope_cs;
      qk.pdl = pdl_;
      launch_qk_norm_rope_kv(qk, s);
    } else {
      if (L.q_norm) {
        kernels::RmsNormParams qn;
        qn.x = A.q;
        qn.out = A.q;
        qn.weight = L.q_norm;
        qn.num_rows = T * QW / L.q_norm_width;
        qn.width = L.q_norm_width;
        qn.eps = eps;
        kernels::launch_rmsnorm(qn, s);
        qn.x = A.k;
        qn.out = A.k;
        qn.weight = L.k_norm;
        qn.num_rows = T * KVW / L.k_norm_width;
        qn.width = L.k_norm_width;
        kernels::launch_rmsnorm(qn, s);
      }
      kernels::RopeParams rp;
      rp.q = A.q;
      rp.k = A.k;
      rp.positions = A.positions;
      rp.num_tokens = T;
      rp.num_q_heads = dims_.q_heads;
      rp.num_kv_heads = dims_.kv_heads;
      rp.head_dim = at.head_dim;
      rp.rotary_dim = at.head_dim;
      rp.theta = static_cast<float>(m.rope_theta);
      kernels::launch_rope(rp, s);
      kernels::KvWriteParams kw;
      kw.cache = cache;
      kw.k_new = A.k;
      kw.v_new = A.v;
      kw.token_seq = A.token_seq;
      kw.token_pos = A.positions;
      kw.num_tokens = T;
      kernels::launch_kv_write(kw, s);
    }
    kernels::AttentionParams ap;
    ap.q = A.q;
    ap.out = A.attn;
    ap.cache = cache;
    ap.q_start = A.q_start;
    ap.seq_lens = A.seq_lens;
    ap.num_seqs = P.S;
    ap.num_tokens = T;
    ap.q_heads = dims_.q_heads;
    ap.max_q_len = P.max_q_len;
    ap.max_seq_len = P.max_seq_len;
    ap.workspace = A.attn_ws.get();
    ap.workspace_bytes = A.attn_ws.bytes();
    if (uses_fused_attention_merge(cfg_.decode_kernels, cfg_.fused_attention_merge)) {
      ap.merge_tickets = A.attn_tickets.as<int32_t>();  // split merge inside the attention launch
      ap.merge_tickets_count = A.attn_tickets.bytes() / sizeof(int32_t);
    }
    ap.prefill_kernel = cfg_.attention_prefill_kernel;
    kernels::launch_attention(ap, s);
    linear(A.attn, L.wo, A.tmp, T, H, QW, s);
    if (attn_tp) cfg_.comm->all_reduce(CommGroup::attn_tp, A.tmp, T * H, s);  // heads' partial sums
    // res += attn_out (bf16), normed = RMSNorm(res).
    kernels::RmsNormParams pn;
    pn.x = A.tmp;
    pn.residual = A.res;
    pn.residual_out = A.res;
    pn.weight = L.post_norm;
    pn.pdl = pdl_;
    pn.out = A.normed;
    pn.num_rows = T;
    pn.width = static_cast<int>(H);
    pn.eps = eps;
    kernels::launch_rmsnorm(pn, s);
    if (P.record)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(A.hidden_rec.as<bf16>() + std::size_t(l) * plane, A.res, plane * 2,
                                          cudaMemcpyDeviceToDevice, s));
    if (L.moe) {
      moe_block(L, T, s);
    } else {
      ffn_dense(L.dense_w13, L.dense_w2, dims_.dense, A.normed, T, A.tmp, s);
      if (attn_tp) cfg_.comm->all_reduce(CommGroup::attn_tp, A.tmp, T * H, s);
    }
    if (cfg_.decode_kernels && l + 1 < dims_.layer_end) continue;  // added by the next layer's norm
    close_layer(l);
  }
  if (!dims_.last_stage) {
    cfg_.comm->send_next_stage(A.res, std::size_t(T * H) * 2, s);
    return;
  }
  const int64_t R = int64_t(P.logit_rows.size());
  if (R == 0) return;
  launch_gather_rows(A.res, A.logit_index, A.last_x, R, H, s);
  kernels::RmsNormParams fn;
  fn.x = A.last_x;
  fn.out = A.last_x;
  fn.weight = final_norm_;
  fn.num_rows = R;
  fn.width = static_cast<int>(H);
  fn.eps = eps;
  kernels::launch_rmsnorm(fn, s);
  gemm(A.last_x, lm_head_, A.logits, R, m.vocab_size, H, s);  // cuBLASLt: ~4.2 TB/s at m = 1 (measured)
  if (P.greedy) launch_argmax_rows(A.logits, R, m.vocab_size, A.sampled, s);
}

GpuStepOutput GpuModel::step(const std::vector<model::SequenceStep>& batch, const StepOptions& opt) {
  prepare(batch, opt);
  enqueue(stream_.get());
  return collect(stream_.get());
}

GpuStepOutput GpuModel::collect(cudaStream_t s) {
  if (!prep_) throw InputError("GPU forward: collect() before prepare()");
  const Prepared& P = *prep_;
  const ModelSpec& m = spec_;
  GpuStepOutput out;
  out.num_tokens = P.T;
  out.seq_offsets = P.seq_offsets;
  out.logit_rows = P.logit_rows;
  auto widen = [](const std::vector<uint16_t>& h) {
    std::vector<float> f(h.size());
    for (std::size_t i = 0; i < h.size(); ++i) f[i] = model::bf16_to_f32(h[i]);
    return f;
  };
  // Logits and greedy ids live on the last pipeline stage only.
  const std::size_t R = dims_.last_stage ? P.logit_rows.size() : 0;
  std::vector<uint16_t> host(P.copy_logits ? R * std::size_t(m.vocab_size) : 0);
  if (!host.empty())
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(host.data(), act_->logits, host.size() * 2, cudaMemcpyDeviceToHost, s));
  if (P.greedy && R > 0)
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(act_->sampled_host, act_->sampled, R * 4, cudaMemcpyDeviceToHost, s));
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  out.logits = widen(host);
  if (P.greedy) out.token_ids.assign(act_->sampled_host, act_->sampled_host + R);
  if (P.record) {
    const std::size_t plane = std::size_t(P.T) * std::size_t(m.hidden_size);
    std::vector<uint16_t> rec(2 * std::size_t(m.num_layers) * plane);
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(rec.data(), act_->hidden_rec.get(), rec.size() * 2, cudaMemcpyDeviceToHost, s));
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
    for (int l = 0; l < m.num_layers; ++l) {
      out.attn_hidden.push_back(widen({rec.begin() + std::ptrdiff_t(l * plane),
                                       rec.begin() + std::ptrdiff_t((l + 1) * plane)}));
      out.layer_hidden.push_back(widen({rec.begin() + std::ptrdiff_t((m.num_layers + l) * plane),
                                        rec.begin() + std::ptrdiff_t((m.num_layers + l + 1) * plane)}));
    }
  }
  return out;
}

double GpuModel::prepared_min_bytes() const {
  if (!prep_) return 0.0;
  const ModelSpec& m = spec_;
  const double hd = m.attention.head_dim, H = m.hidden_size, QW = dims_.q_heads * hd, KVW = dims_.kv_heads * hd;
  const double I = double(dims_.inter), S = double(dims_.shared), D = double(dims_.dense), E = m.moe.num_experts;
  double b = 0;
  std::size_t moe_i = 0;
  for (int l = dims_.layer_begin; l < dims_.layer_end; ++l) {
    b += 2.0 * (2 * H * QW + 2 * H * KVW + 2 * H);  // q, o, k, v, norms
    if (layers_[l].moe) {
      const double touched = moe_i < prep_->experts_touched.size() ? prep_->experts_touched[moe_i] : 0;
      ++moe_i;
      b += 2.0 * (E * H + touched * 3 * H * I + 3 * H * S);
    } else {
      b += 2.0 * 3 * H * D;
    }
    b += 2.0 * 2 * KVW * double(prep_->context_tokens);  // K and V context read
  }
  if (dims_.last_stage) b += 2.0 * double(m.vocab_size) * H;  // LM head
  return b;
}

}  // namespace mixserve::gpu
