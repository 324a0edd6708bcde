// Single-GPU forward of the MoE decoder family the CPU reference covers (Qwen3-MoE, Qwen2-MoE,
// Mixtral, OLMoE): bf16 weights and activations, fp32 accumulation, the paged KV cache and the
// step description of model/reference.hpp (sequences with their new tokens, the position of the
// first one and a block table), so one batch can mix chunked prefill and decode.
//
// Per layer (one stream, in order):
//   RMSNorm -> q, k, v GEMMs (cuBLASLt; one fused q|k|v GEMV launch for decode) (+ bias) -> QK-norm (per head, or over the whole
//   projection when the norm weight has that width) -> RoPE -> KV write -> attention (mixed
//   prefill/decode, attention.cuh) -> o GEMM -> residual add + RMSNorm (fused) ->
//   MoE: router logits in fp32 -> softmax top-k -> device permute -> expert gate|up GEMMs ->
//        SwiGLU -> expert down GEMMs -> weighted combine (+ shared expert, optional sigmoid gate)
//   or dense SwiGLU FFN -> residual add.
// Then the final RMSNorm and the LM head (the embedding when tied) for the last token of every
// sequence, or every token (StepOptions::all_logits).
//
// Expert GEMMs, three paths (ExpertPath):
//   cublaslt     ExpertGemm (gemm.hpp): one cuBLASLt GEMM per expert with tokens. Its row counts
//                are host values, so every MoE layer copies the expert counts to the host and
//                synchronises the stream once: such a step cannot be captured in a CUDA graph.
//   device_gemv  launch_grouped_gemv[_v2] (expert_gemm.hpp): one launch per projection for all experts,
//                reading the permute's device-side offsets; no host sync, so the step can be
//                captured in a CUDA graph. CUDA cores, weights re-read per 8 rows of an expert:
//                for decode-sized steps.
//   grouped_gemm launch_grouped_gemm (kernels/grouped_gemm.cuh): tensor-core GEMM, one launch per
//                projection for all experts, tiles scheduled on the device from the offsets; no
//                host sync (graph-capturable). For prefill-sized steps.
//   automatic    device_gemv when tokens * top_k <= device_gemv_max_rows; the cublaslt path on
//                expert_gemm_streams streams (0: one cuBLAS grouped call per projection; -1, -2,
//                -3: the padded batch and the bucketed padded layouts, below) when
//                the routed rows average at least
//                kExpertStreamsMinRowsPerExpert per local expert (core/expert_path.hpp
//                uses_expert_streams: large prefill steps); else grouped_gemm.
// docs/forward.md gives the costs.
//
// Weight layouts on the device: q/k/v/o as Hugging Face [out, in]; the experts of a layer as one
// [E, 2I, H] buffer whose expert e holds gate rows [0, I) then up rows [I, 2I) (SwiGLU reads
// gate | up, swiglu.cuh) and one [E, H, I] down buffer; shared and dense FFNs likewise fused.
//
// Requirements (checked by the constructor, InputError naming the value): head_dim 64 or 128
// (attention.cuh), block size 8/16/32, every GEMM n and k a multiple of 8 (hidden, q and kv widths,
// FFN widths, vocab), experts <= 256, top_k <= 8, softmax scoring without groups or biases.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/expert_path.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/gpu/decode_layer.hpp"
#include "mixserve/gpu/expert_gemm.hpp"
#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/shard.hpp"
#include "mixserve/kernels/attention.cuh"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/weights.hpp"

namespace mixserve::gpu {

enum class ExpertPath { automatic, cublaslt, device_gemv, grouped_gemm };

// Steps with at most this many tokens use the GEMV for the dense projections (decode_kernels).
inline constexpr int64_t kGemvMaxRows = 8;

struct GpuModelConfig {
  int block_size = 16;           // tokens per KV block: 8, 16 or 32
  int num_blocks = 0;            // KV blocks per layer; 0: from kv_memory_fraction
  double kv_memory_fraction = 0.5;  // of the free device memory after weights and activations
  int max_tokens_per_step = 256; // rows of the activation buffers
  int max_seqs_per_step = 64;
  int max_blocks_per_seq = 64;   // columns of the device block table
  ExpertPath expert_path = ExpertPath::automatic;
  int64_t device_gemv_max_rows = kDeviceGemvMaxRows;  // automatic: routed rows (tokens * top_k) up to this
  // Streams the per-expert cuBLASLt GEMMs are spread over (ExpertPath::cublaslt, and automatic
  // where uses_expert_streams); 1: all on the step's stream, one after another (the path before
  // the streams, kept to measure the change in the same run). Each extra stream owns a cuBLASLt
  // workspace (LtGemm::kWorkspaceBytes), allocated on the first step that needs it.
  // kExpertGemmGroupedCall (0): the same per-expert GEMMs as ONE cuBLAS grouped call per
  // projection on the step's stream (cublasGemmGroupedBatchedEx, ExpertGemm::run_grouped_call;
  // a cuBLAS handle made on the first step that needs it).
  // kExpertGemmPaddedBatch (-1): ONE strided-batched cuBLASLt GEMM per projection over all local
  // experts, each expert's rows padded to the largest count rounded up to kExpertPaddedRowAlign
  // (index-only permute, host copy of the counts, kernels/expert_pad.cuh remap + gather,
  // ExpertGemm::run_padded_batch); falls back to kExpertGemmStreams streams when
  // local experts x padded rows exceed the padded capacity below.
  // kExpertGemmBucketed (-2) / kExpertGemmBucketedBatched (-3): each local expert's rows padded up
  // to a multiple of expert_bucket_row_align (index-only permute, host copy of the counts, the
  // padded offsets uploaded, kernels/expert_pad.cuh remap + gather), the experts grouped by padded
  // count, ONE cublasGemmGroupedBatchedEx per projection with one group per distinct count (-2) or
  // one cublasGemmBatchedEx per distinct count (-3) (ExpertGemm::run_bucketed_call). A model
  // built with one of these values gets expert buffers for routed rows + local experts x
  // (align - 1) rows when the bucketed layout can be taken (expert_path cublaslt, or automatic with
  // max_tokens_per_step x top_k reaching uses_expert_streams); a step whose padded rows do not fit
  // (e.g. expert_path switched to cublaslt later) falls back to kExpertGemmStreams streams
  // (GpuModel::padded_batch_counts().fallback counts them).
  // Default kExpertGemmDefault (-3): measured fastest (core/expert_path.hpp).
  int expert_gemm_streams = kExpertGemmDefault;
  // The bucketed layout's row alignment P (1 .. kExpertBucketRowAlignMax): see
  // core/expert_path.hpp kExpertBucketRowAlign. Costs memory only when expert_gemm_streams is -2
  // or -3 at construction.
  int64_t expert_bucket_row_align = kExpertBucketRowAlign;
  // The capacity of kExpertGemmPaddedBatch's padded layout as a multiple of the step's routed
  // rows (max_tokens_per_step * top_k), rounded up to kExpertPaddedRowAlign; the expert
  // activation buffers (permuted_x, gate|up, SwiGLU, expert output) get max(routed rows,
  // capacity) rows. 1.25 holds the largest expert up to ~1.25x the mean count; at 16384 tokens of
  // Qwen3-30B-A3B it adds ~400 MiB. 0 (default: the path is not the default and measured little
  // faster, docs/prefill.md, so no model pays the memory): the padded layout never fits, every
  // layer falls back to the streams.
  double expert_padded_capacity = 0.0;
  // The attention kernel of prefill-sized sequences (attention.cuh AttentionPrefillKernel):
  // pipelined_m32 (4 warps of two 16-row m-tiles; on the H200 1.66x the previous kernel at 8 x 2048,
  // pipelined 1.44x: session 4 call 2), pipelined (8 warps of 16 rows) or registers (the previous one).
  kernels::AttentionPrefillKernel attention_prefill_kernel = kernels::AttentionPrefillKernel::pipelined_m32;
  // The decode kernels (docs/forward.md "Decode step"): steps of <= kGemvMaxRows tokens run the
  // attention projections (one fused q|k|v launch with its bias), the shared/dense FFN and the LM
  // head on the CUDA-core GEMV (expert_gemm.hpp) instead of cuBLASLt; router logits by the same
  // kernel (fp32 out); the grouped expert GEMV over the experts that have rows only; a
  // one-launch permute for decode-sized steps; a layer's residual add fused into the next layer's
  // input RMSNorm. false: the previous kernels, kept to measure the change in the same run.
  // A sharded model (shard below) runs the previous kernels: the decode kernels are verified on
  // the whole model only (docs/distributed.md).
  bool decode_kernels = true;
  // decode_kernels: steps of up to this many tokens take the grouped GEMV of expert_gemm.hpp
  // (with the SwiGLU fused into the down projection), larger ones its previous kernel (v1): on the
  // H200, Qwen3-30B-A3B, v2 was faster at 1 token and 1.6x slower at 64 (docs/forward.md); sizes
  // in between were not measured.
  int64_t grouped_gemv_v2_max_tokens = kGemvMaxRows;
  // decode_kernels, steps of <= kGemvMaxRows tokens that do not record the residual stream: launch
  // the layer's kernels as programmatic dependents of the previous one (kernels/detail/pdl.cuh).
  bool programmatic_launch = true;
  // decode_kernels: the attention's split-KV merge runs inside the attention launch (the last CTA
  // of each group merges; attention.cuh merge_tickets) instead of as a second kernel.
  bool fused_attention_merge = kFusedAttentionMergeDefault;  // off: measured slower (decode_path.hpp)
  // decode_kernels, steps of <= kGemvMaxRows tokens: router logits + top-k + permute in one launch
  // (kernels/moe_route.cuh) instead of the router GEMV, launch_router and launch_permute.
  bool fused_moe_route = kFusedMoeRouteDefault;  // off: measured slower (decode_path.hpp)
  // The GEMV kernel of launch_gemv / launch_grouped_gemv_v2 (expert_gemm.hpp gemv_kernel_for).
  GemvKernel gemv_kernel = GemvKernel::automatic;
  // decode_kernels, steps of one sequence and one token on the whole model: each MoE layer the
  // kernel supports (no shared expert, no q/k/v bias, per-head or no q/k norm) runs as ONE launch
  // (gpu/decode_layer.hpp: a persistent grid with grid barriers between its phases) instead of
  // ~13 (core/decode_path.hpp uses_fused_decode_layer).
  bool fused_decode_layer = kFusedDecodeLayerDefault;
  // Distributed forward (shard.hpp, docs/distributed.md): the rank's shard of the model and the
  // communication its sites call (all-reduce after o_proj and the dense FFN, the MoE exchange of
  // the stage, the pipeline send/recv). Default: the whole model, no communication.
  ShardSpec shard;
  ForwardComm* comm = nullptr;  // required when the shard has more than one rank; not owned
};

struct StepOptions {
  bool all_logits = false;     // logits for every token (else the last token of each sequence)
  bool record_hidden = false;  // copy the residual stream after every attention block and layer
  // Greedy sampling on the device: enqueue() ends with an argmax over every logits row (ties to
  // the lowest id; argmax.hpp) and collect() copies back only those ids (GpuStepOutput::token_ids).
  bool greedy = false;
  // collect() copies the logits back (GpuStepOutput::logits); false leaves them empty.
  bool copy_logits = true;
};

struct GpuStepOutput {
  int64_t num_tokens = 0;
  std::vector<int64_t> seq_offsets;  // first row of each sequence; size batch + 1
  std::vector<int64_t> logit_rows;   // token row of each logits row
  std::vector<float> logits;         // [logit_rows, vocab] (StepOptions::copy_logits)
  std::vector<int32_t> token_ids;    // [logit_rows]: greedy id of each logits row (StepOptions::greedy)
  // [num_layers][num_tokens, hidden] when record_hidden (see model::StepOutput).
  std::vector<std::vector<float>> attn_hidden;
  std::vector<std::vector<float>> layer_hidden;
};

class GpuModel {
 public:
  // Uploads the weights (bf16, fused layouts above) and allocates activations and the KV cache
  // on the current device.
  GpuModel(const model::WeightSet& weights, const GpuModelConfig& cfg);
  // Weights drawn on the device (launch_fill_uniform, seeded; the variances of
  // model::synthetic_weights) for timing models too large to build on the host. Not comparable
  // with the CPU reference value by value.
  GpuModel(const ModelSpec& spec, uint64_t seed, const GpuModelConfig& cfg);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const ModelSpec& spec() const { return spec_; }
  const GpuModelConfig& config() const { return cfg_; }
  const ShardDims& dims() const { return dims_; }  // the shard's slices (whole model: everything)
  int num_blocks() const { return num_blocks_; }
  double weight_bytes() const { return weight_bytes_; }
  cudaStream_t stream() const { return stream_.get(); }
  void set_expert_path(ExpertPath p) { cfg_.expert_path = p; }
  // InputError unless n >= kExpertGemmStreamsMin (core/expert_path.hpp kExpertGemmStreamsLegal),
  // or, for -2 and -3, when the expert buffers cannot hold the bucketed layout (GpuModelConfig).
  void set_expert_gemm_streams(int n);
  // InputError outside 1 .. kExpertBucketRowAlignMax, or when the bucketed path is selected and the
  // buffers cannot hold the layout with this alignment (a model built with align P takes any <= P).
  void set_expert_bucket_row_align(int64_t align);
  // MoE layers run by kExpertGemmPaddedBatch since construction: in the padded layout, and
  // fallen back to the streams because the padded rows exceeded expert_padded_capacity; and by
  // kExpertGemmBucketed[Batched]: layer runs, and the buckets of their gate|up projections summed
  // (buckets / bucketed = the mean host calls per projection of -3, the groups of -2's one call).
  struct PaddedBatchCounts {
    int64_t padded = 0, fallback = 0;
    int64_t bucketed = 0, buckets = 0;
  };
  const PaddedBatchCounts& padded_batch_counts() const { return padded_counts_; }
  void set_attention_prefill_kernel(kernels::AttentionPrefillKernel k) { cfg_.attention_prefill_kernel = k; }
  void set_decode_kernels(bool on) { cfg_.decode_kernels = on && !cfg_.shard.sharded(); }
  void set_grouped_gemv_v2_max_tokens(int64_t t) { cfg_.grouped_gemv_v2_max_tokens = t; }
  void set_programmatic_launch(bool on) { cfg_.programmatic_launch = on; }
  void set_fused_attention_merge(bool on) { cfg_.fused_attention_merge = on; }
  void set_fused_moe_route(bool on) { cfg_.fused_moe_route = on; }
  void set_gemv_kernel(GemvKernel k) { cfg_.gemv_kernel = k; }
  void set_fused_decode_layer(bool on) { cfg_.fused_decode_layer = on; }
  // Layers run by the fused decode layer since construction (tests check that it ran).
  int64_t fused_layers_run() const { return fused_layers_run_; }
  // With MIXSERVE_FUSED_PHASE_TIMING set at construction: the mean time (us) of the fused layer's
  // phases 0..6 over the layers run since the last call (block 0's view; diagnostics), else empty.
  std::vector<double> take_fused_phase_us();
  // MIXSERVE_FUSED_PHASE_TIMING: the fused layer's per-block stamps of the middle MoE layer's last
  // launch ([blocks][8] u64 ns, decode_layer.hpp FusedDecodeLayerParams::diag); empty otherwise.
  std::vector<unsigned long long> fused_layer_diag();

  // Runs one step (prepare + enqueue + synchronise + copy back). InputError on a bad batch (as
  // the reference, plus the limits of the config). A sharded model runs the step of its rank: every
  // rank of the plan must step at once (prepare and enqueue are collective); a DP-attention rank
  // without requests steps with an empty batch. Logits come from the last pipeline stage.
  GpuStepOutput step(const std::vector<model::SequenceStep>& batch, const StepOptions& opt = {});

  // Timing interface: prepare() validates the batch and uploads its metadata; enqueue() runs the
  // forward on `stream` and can be called repeatedly for the same prepared batch (the KV slots of
  // its tokens are rewritten). With the cublaslt expert path it synchronises the stream once per
  // MoE layer; with device_gemv it only enqueues (capturable in a CUDA graph).
  void prepare(const std::vector<model::SequenceStep>& batch, const StepOptions& opt);
  void enqueue(cudaStream_t stream);
  // Waits for `stream` and copies the outputs of the last enqueue of the prepared batch back (the
  // logits and/or the greedy ids, as the batch's StepOptions say).
  GpuStepOutput collect(cudaStream_t stream);
  // Bytes a step of the prepared batch must read at least: the weights it touches (attention,
  // norms, router, routed experts with tokens, shared/dense FFN, LM head) and the KV context.
  // The experts touched are those of the last enqueue on the cublaslt path (0 before one).
  double prepared_min_bytes() const;

  void reset_cache();

 private:
  struct Layer;
  void check_supported() const;
  void allocate(bool from_host, const model::WeightSet* w, uint64_t seed);
  // cuBLASLt, one plan per shape made on first use and kept (gemms_); out_fp32: fp32 output.
  void gemm(const void* act, const void* weight, void* out, int64_t m, int64_t n, int64_t k,
            cudaStream_t s, bool out_fp32 = false);
  // Router logits [T, E] in fp32: the GEMV where core/decode_path.hpp router_uses_gemv (decode
  // kernels, <= kDecodeGemvMaxTokens tokens), the cuBLASLt tensor-core GEMM above that size
  // (launch_linear_fp32 for small steps without the decode kernels, or an expert count cuBLASLt
  // cannot take).
  void router_logits(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int64_t T, cudaStream_t s);
  // gemm(), or the GEMV when decode_kernels and m <= kGemvMaxRows.
  void linear(const void* act, const void* weight, void* out, int64_t m, int64_t n, int64_t k,
              cudaStream_t s);
  void ffn_moe(const Layer& L, const __nv_bfloat16* x, int64_t T, __nv_bfloat16* out, cudaStream_t s);
  // ffn_moe's parts: the router (global top-k ids and weights into the activations), and the
  // routed experts (+ the shared expert when `shared`) on rows with k slots of local expert ids.
  void moe_route(const Layer& L, const __nv_bfloat16* x, int64_t T, cudaStream_t s);
  // local_rows: the routed rows of the shard's experts the automatic path expects (its choice
  // between the grouped GEMM and the per-expert streams is made before the counts are known).
  // permuted: the rows are already permuted (moe_route_permute), no permute launch.
  void moe_experts(const Layer& L, const __nv_bfloat16* x, int64_t T, int K, const int32_t* ids,
                   const float* weights, bool shared, __nv_bfloat16* out, int64_t local_rows, cudaStream_t s,
                   bool permuted = false);
  // kExpertGemmPaddedBatch after the permute and the host copy of the counts: remap slot_row to
  // the padded layout, gather x into it, one strided-batched GEMM per projection, the SwiGLU.
  // dst[r, :] = x[row_token[r], :] (H wide), zero rows for -1 (kernels/expert_pad.cuh gather).
  void gather_token_rows(const __nv_bfloat16* x, const int32_t* row_token, __nv_bfloat16* dst, int64_t rows,
                         cudaStream_t s) const;
  void run_padded_experts(const Layer& L, const __nv_bfloat16* x, int64_t T, int K, const int32_t* ids,
                          int64_t rows_per_expert, cudaStream_t s);
  // kExpertGemmBucketed[Batched] after the permute and the host copy of the counts: padded offsets
  // uploaded, slot_row remapped to the bucketed layout, x gathered into it, the bucketed cuBLAS
  // call(s) per projection, the SwiGLU over every padded row.
  void run_bucketed_experts(const Layer& L, const __nv_bfloat16* x, int64_t T, int K, const int32_t* ids,
                            const std::vector<int64_t>& counts, cudaStream_t s);
  // InputError unless the expert buffers hold the bucketed layout with this alignment.
  // Router logits, top-k and permute in one launch (kernels/moe_route.cuh): decode-sized steps of
  // the whole model (core/decode_path.hpp uses_fused_moe_route).
  void moe_route_permute(const Layer& L, const __nv_bfloat16* x, int64_t T, cudaStream_t s);
  void ffn_dense(const __nv_bfloat16* w13, const __nv_bfloat16* w2, int64_t inter, const __nv_bfloat16* x,
                 int64_t T, __nv_bfloat16* out, cudaStream_t s);
  void moe_block(const Layer& L, int64_t T, cudaStream_t s);  // the MoE of the shard's moe_mode

  ModelSpec spec_;
  GpuModelConfig cfg_;
  ShardDims dims_;
  Stream stream_;
  LtHandle lt_;
  DeviceBuffer lt_workspace_;
  std::vector<DeviceBuffer> owned_;  // every weight and activation allocation
  std::vector<Layer> layers_;
  const __nv_bfloat16* embed_ = nullptr;  // [vocab, hidden]
  const __nv_bfloat16* lm_head_ = nullptr;
  const __nv_bfloat16* final_norm_ = nullptr;
  double weight_bytes_ = 0;
  int num_blocks_ = 0;
  std::vector<DeviceBuffer> k_cache_, v_cache_;  // per layer
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::unique_ptr<LtGemm>> gemms_;  // m, n, k, fp32 out
  std::unique_ptr<ExpertGemm> expert_w13_, expert_w2_;
  std::unique_ptr<StreamFanout> expert_fanout_;  // expert_gemm_streams > 1; made on first use
  PaddedBatchCounts padded_counts_;
  std::unique_ptr<BlasHandle> blas_;  // the cuBLAS grouped / bucketed calls (expert_gemm_streams 0, -2, -3); on first use
  bool pdl_ = false;  // this enqueue launches its decode kernels as programmatic dependents
  int64_t fused_layers_run_ = 0;
  std::unique_ptr<FusedDecodeStepParams> fused_step_;  // the fused launch's parameters (22 KB), reused
  // MIXSERVE_FUSED_STAGE_KB, _STAGES, _INFLIGHT_KB, _EVICT_FIRST=0 and, with _PHASE_TIMING,
  // _SKIP_DOT (experiments): the fused layer's weight ring (decode_layer.hpp stage_bytes,
  // max_stages, inflight_bytes, evict_first, diag_skip_dot).
  int64_t fused_stage_bytes_ = 0;
  int fused_max_stages_ = 0;
  int64_t fused_inflight_bytes_ = 0;
  bool fused_skip_dot_ = false;
  bool fused_evict_first_ = true;  // MIXSERVE_FUSED_EVICT_FIRST=0 turns it off
  bool fused_multirow_ = true;     // MIXSERVE_FUSED_MULTIROW=0 turns it off
  bool fused_mma_ = true;          // MIXSERVE_FUSED_MMA=0 turns it off
  bool fused_cooperative_ = true;  // MIXSERVE_FUSED_COOP=0 turns it off
  bool fused_tagged_part_ = true;  // MIXSERVE_FUSED_TAGGED_PART=0 turns it off (a grid barrier a layer)
  // The fused decode layer's parameters for layer l (decode_layer.hpp); unsupported layers get
  // parameters that fused_decode_layer_unsupported_reason refuses.
  FusedDecodeLayerParams fused_layer_params(const Layer& L, int l, cudaStream_t s) const;

  struct Act;
  std::unique_ptr<Act> act_;
  struct Prepared;
  std::unique_ptr<Prepared> prep_;
};

}  // namespace mixserve::gpu
