// Which expert kernel the executor runs for a step, read by the executor (model_forward.cpp,
// ExpertPath::automatic) and by the cost model (simulator/cost_model.cpp), so the two always
// agree; and the tags of the profile's expert points that say which kernel was timed.
#pragma once
#include <cstdint>
#include <string_view>

namespace mixserve {

// Routed rows (tokens * top_k) up to which the executor runs the device-side grouped expert GEMV
// (executor/expert_gemm.hpp: no host sync, CUDA-graph capturable); above it, the tensor-core
// grouped GEMM (kernels/grouped_gemm.cuh: one launch per projection for all experts, rows from
// the device offsets, no host sync), except for the large steps below.
inline constexpr int64_t kDeviceGemvMaxRows = 512;

inline constexpr bool uses_device_gemv(int64_t routed_rows) { return routed_rows <= kDeviceGemvMaxRows; }
inline constexpr bool uses_grouped_gemm(int64_t routed_rows) { return !uses_device_gemv(routed_rows); }

// Large steps: when the routed rows per local expert average at least this many, the automatic
// path runs one cuBLASLt GEMM per non-empty expert (host copy of the counts + stream sync),
// spread over kExpertGemmStreams CUDA streams (gpu::ExpertGemm with a gpu::StreamFanout). At
// ~1024 rows an expert's GEMM fills only about a third of an H200's SMs, so on one stream the
// per-expert path idles the GPU; concurrent GEMMs fill it, and cuBLAS's TMA/warp-specialised
// kernels beat the grouped GEMM (413 TFLOP/s at 8 x 2048 tokens, docs/prefill.md). Not
// graph-capturable (host sync): decode-sized steps never reach it. The threshold sits between
// the 2048-token chunk of Qwen3-30B-A3B (128 rows per expert, where the grouped GEMM is 5.7x
// the serial per-expert path) and the 8 x 2048 step (1024 rows); see docs/prefill.md for what
// was measured. ExpertPath::cublaslt runs the same per-expert GEMMs at every row count.
inline constexpr int64_t kExpertStreamsMinRowsPerExpert = 512;
// 2: on the H200 the 8 x 2048 Qwen3-30B-A3B step took 22.64 ms on 2 streams, 23.16 on 4, 23.37
// on 8 and 23.92 on 1 (session 4 call 2, docs/prefill.md): the host issuing 128 cuBLASLt calls per
// projection, not the GPU, bounds it.
inline constexpr int kExpertGemmStreams = 2;
// The value of GpuModelConfig::expert_gemm_streams that runs the per-expert GEMMs as ONE cuBLAS
// grouped call per projection (cublasGemmGroupedBatchedEx, gpu::ExpertGemm::run_grouped_call)
// instead of one cuBLASLt call per expert: the host issues 1 call, not 128. Not the default: on the
// H200 it was slower than the streams (8 x 2048 step: 29.98 vs 22.48 ms; cuBLAS runs the groups
// one after another), docs/prefill.md.
inline constexpr int kExpertGemmGroupedCall = 0;
// The value of GpuModelConfig::expert_gemm_streams that runs the per-expert GEMMs as ONE
// strided-batched cuBLASLt GEMM per projection over all local experts, each expert's rows padded
// to a common count (gpu::ExpertGemm::run_padded_batch, kernels/expert_pad.cuh): the host issues
// 1 call, not 128, and cuBLAS sees one large GEMM. When the padded rows do not fit the buffers
// (GpuModelConfig::expert_padded_capacity) the step falls back to kExpertGemmStreams streams.
// Not the default: on the H200 (session 4 call 6) the 8 x 2048 step took 22.04 ms against 22.60 on
// 2 streams with 21 of 28 layer runs padded at capacity 1.25, and at 48 layers most layers fell
// back (the largest expert above 1.25x the mean), docs/prefill.md.
inline constexpr int kExpertGemmPaddedBatch = -1;
// The values of GpuModelConfig::expert_gemm_streams that run the per-expert GEMMs on the bucketed
// padded layout: each local expert's rows padded up to a multiple of P
// (GpuModelConfig::expert_bucket_row_align, kExpertBucketRowAlign by default; expert e's rows
// start at sum over e' < e of round_up(count[e'], P)), the experts grouped by their padded count,
// one group per distinct padded count (a "bucket"):
//   kExpertGemmBucketed (-2):        ONE cublasGemmGroupedBatchedEx call per projection, one group
//                                    per bucket (gpu::ExpertGemm::run_bucketed_call, BucketIssue::
//                                    grouped_call): the host issues 1 call, not 128.
//   kExpertGemmBucketedBatched (-3): one cublasGemmBatchedEx per bucket (BucketIssue::
//                                    batched_per_bucket): as many host calls as buckets.
// The padded rows never exceed the routed rows + local experts x (P - 1), so unlike
// kExpertGemmPaddedBatch the layout always fits once the buffers are sized for it (the model is
// built for it, see GpuModelConfig). Measured on the H200 (session 5 call 9, docs/prefill.md): at
// 16384 tokens of Qwen3-30B-A3B gate|up 1197 us (-3, P = 128, 5 buckets, +5.6% rows) vs 1536 on
// 2 streams and 2930 for -2 (cuBLAS runs the grouped call's groups one after another); down 657
// vs 938; the 4-layer 8 x 2048 step 20.43 ms = 52.5% of the cuBLAS peak vs 22.46 ms on 2 streams.
// So kExpertGemmDefault is -3 with P = 128.
inline constexpr int kExpertGemmBucketed = -2;
inline constexpr int kExpertGemmBucketedBatched = -3;
// GpuModelConfig::expert_gemm_streams by default (the per-expert path of large steps); the
// profiler's expert points at uses_expert_streams rows time the same (profiler/src/expert_gemv.cpp).
inline constexpr int kExpertGemmDefault = kExpertGemmBucketedBatched;
inline constexpr bool is_bucketed_expert_gemm(int expert_gemm_streams) {
  return expert_gemm_streams == kExpertGemmBucketed || expert_gemm_streams == kExpertGemmBucketedBatched;
}
// The smallest legal value of expert_gemm_streams and the legal values in words: the one text every
// validation message of the switch quotes.
inline constexpr int kExpertGemmStreamsMin = kExpertGemmBucketedBatched;
inline constexpr std::string_view kExpertGemmStreamsLegal =
    ">= 1 streams, 0 for the cuBLAS grouped call, -1 for the padded batched GEMM, -2 for the bucketed "
    "grouped call or -3 for the bucketed batched calls";
// P of the bucketed layout. 128: a tensor-core kernel with 128-row tiles runs a partial last
// tile as a whole one, so padding to 128 adds no tile it would not run anyway, and ~1024-row
// experts fall into few buckets; 64 halves the pad rows and about doubles the buckets. Neither is
// measured yet: the bench times both (docs/prefill.md).
inline constexpr int64_t kExpertBucketRowAlign = 128;
inline constexpr int64_t kExpertBucketRowAlignMax = 4096;
inline constexpr int64_t expert_bucket_rows(int64_t count, int64_t align) {
  return (count + align - 1) / align * align;
}
// Rows the bucketed layout can need for `routed_rows` rows over `num_local_experts` experts: every
// expert with rows wastes at most align - 1 pad rows, and at most min(experts, rows) have rows.
inline constexpr int64_t expert_bucket_capacity(int64_t routed_rows, int64_t num_local_experts, int64_t align) {
  return routed_rows + (num_local_experts < routed_rows ? num_local_experts : routed_rows) * (align - 1);
}
// Rows per expert of the padded layout: the largest expert's count rounded up to this.
inline constexpr int64_t kExpertPaddedRowAlign = 16;
inline constexpr int64_t expert_padded_rows(int64_t max_count) {
  return (max_count + kExpertPaddedRowAlign - 1) / kExpertPaddedRowAlign * kExpertPaddedRowAlign;
}

inline constexpr bool uses_expert_streams(int64_t routed_rows, int64_t num_local_experts) {
  return num_local_experts > 0 && uses_grouped_gemm(routed_rows) &&
         routed_rows >= kExpertStreamsMinRowsPerExpert * num_local_experts;
}

// The GEMV kernels (executor/expert_gemm.hpp: launch_gemv, launch_grouped_gemv[_v2]) stage their
// activation rows in shared memory, R rows of k bf16 at a time, so their inner size k is a
// multiple of 8 up to kGemvMaxK (the executor static_asserts its kGroupedGemvMaxK against it). The
// launcher picks the row chunk R (1, 2, 4, 8) whose R x k x 2 bytes, with the kernel's other
// shared memory, fit the device's opt-in shared memory per block (227 KiB on the H100/H200);
// experts with more rows loop over chunks. At k = 32768 one chunk of 2 rows fits on an H200 and
// one row on any SM >= 8.0. The limit was 8192 until session 5: Mixtral-8x7B's expert down
// projection (k = 14336) and Qwen2-57B-A14B's shared expert down (k = 20480) then ran on the GEMM.
// Measured on the H200 with ncu, Mixtral's batch-1 down projection on the tensor-core grouped GEMM
// (2 routed rows, 32 tiles of 128x256 on 132 SMs) took 211 us per layer where streaming its 235 MB
// at ~4 TB/s takes ~60 us, and the profile's grouped point for it (255-282 us) made the cost model
// over-predict the step by 13%. A projection whose k does not fit runs on the GEMM.
inline constexpr int64_t kGemvMaxK = 32768;
inline constexpr bool gemv_k_fits(int64_t k) { return k >= 8 && k % 8 == 0 && k <= kGemvMaxK; }

// The automatic expert path with the model's shapes: the device GEMV needs both projections'
// k (hidden for gate|up, the expert width for down) to fit; otherwise the tensor-core grouped GEMM.
inline constexpr bool uses_device_gemv(int64_t routed_rows, int64_t hidden, int64_t expert_inter) {
  return uses_device_gemv(routed_rows) && gemv_k_fits(hidden) && gemv_k_fits(expert_inter);
}
inline constexpr bool uses_grouped_gemm(int64_t routed_rows, int64_t hidden, int64_t expert_inter) {
  return !uses_device_gemv(routed_rows, hidden, expert_inter);
}

// ExpertGemmPoint::distribution prefixes naming the timed implementation. Untagged points are
// cuBLASLt GEMMs per non-empty expert inside a CUDA graph (mixserve-profile experts).
//   "gemv:<dist>"  - the device grouped GEMV, inside a CUDA graph (mixserve-profile expert_gemv);
//   "eager:<dist>" - the executor's cuBLASLt path as it runs: device->host copy of the counts,
//                    stream sync, per-expert plans, one GEMM per non-empty expert, no graph;
//   "grouped:<dist>" - the executor's automatic path above the GEMV rows, no graph (as a prefill
//                    step runs it; mixserve-profile expert_gemv): the tensor-core grouped GEMM,
//                    one launch, or, where uses_expert_streams, the per-expert default
//                    (kExpertGemmDefault: the bucketed layout, one batched call per bucket) with the
//                    host copy of the counts.
// Known gap: the "eager:" points time the per-expert GEMMs on kExpertGemmStreams streams, while
// an executor forced onto ExpertPath::cublaslt now takes kExpertGemmDefault (bucketed: every
// expert with rows padded to 128, wasteful at decode sizes) unless expert_gemm_streams is set;
// the automatic path (the default) is not affected.
inline constexpr std::string_view kExpertGemvTag = "gemv:";
inline constexpr std::string_view kExpertEagerTag = "eager:";
inline constexpr std::string_view kExpertGroupedTag = "grouped:";

}  // namespace mixserve
