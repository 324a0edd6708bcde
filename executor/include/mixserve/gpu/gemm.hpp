// cuBLASLt GEMMs in the layout of a linear layer, and grouped expert GEMMs built on them.
//
//   out[m, n] = act[m, k] · weight[n, k]^T      (row-major; bf16 output, fp32 accumulation)
//
// dtypes (mixserve::DType): bf16 (bf16 operands); fp8_e4m3 (e4m3 operands, one fp32 scale each,
// per tensor); fp8_block (e4m3 operands with DeepSeek-style scales: one fp32 per 1x128 block of
// the activations and per 128x128 block of the weights, see the *_scale_count helpers).
// cuBLAS sees the weight as its A (transposed) and the activations as its B, so out is D in
// column-major n x m, i.e. row-major [m, n].
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "mixserve/core/types.hpp"

namespace mixserve::gpu {

inline constexpr int64_t kFp8BlockSize = 128;  // DeepSeek-V3 quantisation block

struct GemmShape {
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::bf16;
  bool out_fp32 = false;  // fp32 output (bf16 operands only), e.g. the router logits
  // Strided batch (bf16 only): `batch` GEMMs of the same m, n, k in one cuBLASLt call, GEMM b
  // reading act + b*m*k and weight + b*n*k (stacked [batch, n, k] weights, e.g. an MoE layer's
  // experts) and writing out + b*m*n. ExpertGemm::run_padded_batch.
  int64_t batch = 1;
};

// "" when the shape can run, else why not (dtype unsupported, k or n not a multiple of the
// alignment cuBLASLt needs: 8 elements for bf16, 16 for fp8).
std::string gemm_unsupported_reason(const GemmShape& s);

// Rows the activation and output buffers must have: fp8_block rounds m up to a multiple of 4
// (cuBLASLt's VEC128 scale layout); other dtypes use m.
int64_t gemm_rows_padded(const GemmShape& s);
// fp8_block activation scales: [ceil(k/128)][rows_padded], token index fastest.
int64_t act_scale_count(const GemmShape& s);
int64_t act_scale_index(const GemmShape& s, int64_t row, int64_t k_block);
// fp8_block weight scales: [ceil(n/128)][round_up(ceil(k/128), 4)], k block fastest
// (DeepSeek's weight_scale_inv [n/128, k/128] with the k blocks padded to a multiple of 4).
int64_t weight_scale_count(const GemmShape& s);
int64_t weight_scale_index(const GemmShape& s, int64_t n_block, int64_t k_block);

struct GemmOperands {
  const void* act = nullptr;            // [rows_padded, k]
  const void* weight = nullptr;         // [n, k]
  void* out = nullptr;                  // [rows_padded, n] bf16 (fp32 with GemmShape::out_fp32)
  const float* act_scale = nullptr;     // fp8: device scalar (fp8_e4m3) or act_scale_count floats
  const float* weight_scale = nullptr;  // fp8: device scalar (fp8_e4m3) or weight_scale_count floats
};

class LtHandle {
 public:
  LtHandle();
  ~LtHandle();
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
  cublasLtHandle_t get() const { return h_; }

 private:
  cublasLtHandle_t h_ = nullptr;
};

// A cuBLAS (not cuBLASLt) handle: ExpertGemm::run_grouped_call's cublasGemmGroupedBatchedEx.
class BlasHandle {
 public:
  BlasHandle();
  ~BlasHandle();
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// One planned GEMM: descriptors and the heuristic's algorithm are chosen once at construction.
class LtGemm {
 public:
  static constexpr std::size_t kWorkspaceBytes = 32u << 20;
  LtGemm(const LtHandle& h, const GemmShape& s, void* workspace, std::size_t workspace_bytes);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;
  void run(const GemmOperands& ops, cudaStream_t stream) const;
  // The same GEMM with another workspace of the planned size (one per concurrent stream).
  void run(const GemmOperands& ops, cudaStream_t stream, void* workspace) const;
  const GemmShape& shape() const { return s_; }
  double flops() const { return 2.0 * double(s_.batch) * double(s_.m) * double(s_.n) * double(s_.k); }

 private:
  cublasLtHandle_t h_;
  GemmShape s_;
  void* workspace_;
  std::size_t workspace_bytes_;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
};

// Fork/join of independent work over several streams: fork(s) makes the side streams wait for
// the work enqueued on s so far, stream(i) is s itself for i == 0 and side stream i otherwise,
// join(s) makes s wait for everything the side streams got since. Each stream has its own
// cuBLASLt workspace of workspace_bytes() (concurrent GEMMs must not share one).
class StreamFanout {
 public:
  StreamFanout(int num_streams, std::size_t workspace_bytes);
  ~StreamFanout();
  StreamFanout(const StreamFanout&) = delete;
  StreamFanout& operator=(const StreamFanout&) = delete;
  int size() const { return num_streams_; }
  std::size_t workspace_bytes() const { return workspace_bytes_; }
  void fork(cudaStream_t s);
  cudaStream_t stream(int i) const { return i == 0 ? origin_ : side_[std::size_t(i - 1)]; }
  void* workspace(int i) const { return static_cast<char*>(workspace_) + std::size_t(i) * workspace_bytes_; }
  void join(cudaStream_t s);

 private:
  int num_streams_;
  std::size_t workspace_bytes_;
  void* workspace_ = nullptr;                // [num_streams][workspace_bytes]
  std::vector<cudaStream_t> side_;           // num_streams - 1 non-blocking streams
  std::vector<cudaEvent_t> done_;            // per side stream, recorded at join
  cudaEvent_t forked_ = nullptr;
  cudaStream_t origin_ = nullptr;            // the stream of the last fork
  void release();
};

// How ExpertGemm::run_bucketed_call issues its buckets (core/expert_path.hpp kExpertGemmBucketed,
// kExpertGemmBucketedBatched).
enum class BucketIssue {
  grouped_call,        // ONE cublasGemmGroupedBatchedEx, one group per bucket
  batched_per_bucket,  // one cublasGemmBatchedEx per bucket
};

// Grouped expert GEMM: for every expert e with tokens, out[rows of e] = act[rows of e] · W_e^T.
// Rows are grouped by expert in order (the permuted layout after dispatch); experts with no
// tokens launch nothing. One cuBLASLt GEMM per non-empty expert, back to back on one stream
// (planned once per distinct row count). Token counts are host values: see DESIGN.md pitfalls.
class ExpertGemm {
 public:
  ExpertGemm(const LtHandle& h, int num_experts, int64_t n, int64_t k, DType dtype,
             void* workspace, std::size_t workspace_bytes);
  ~ExpertGemm();
  void set_counts(const std::vector<int64_t>& tokens_per_expert);
  // Row offset of each expert's first row (rows of fp8_block experts are padded to 4).
  const std::vector<int64_t>& row_offsets() const { return offsets_; }
  int64_t total_rows() const { return total_rows_; }
  // act [total_rows, k]; weights [E, n, k]; out [total_rows, n]; scales: fp8_e4m3 one act scalar
  // and E weight scalars kScaleStrideFloats apart (cuBLASLt wants 16-byte aligned scale
  // pointers); fp8_block per-expert scale blocks laid out back to back.
  static constexpr int64_t kScaleStrideFloats = 4;
  void run(const void* act, const void* weights, void* out, const float* act_scale,
           const float* weight_scale, cudaStream_t stream) const;
  // The same GEMMs spread over fan's streams (forked from `stream` and joined back to it): each
  // non-empty expert goes to the stream with the fewest rows so far, in expert order. The plans
  // were made for this ExpertGemm's workspace_bytes, so fan's per-stream workspace must be at
  // least that big.
  void run(const void* act, const void* weights, void* out, const float* act_scale,
           const float* weight_scale, cudaStream_t stream, StreamFanout& fan) const;
  // The same GEMMs as ONE cuBLAS call, cublasGemmGroupedBatchedEx (cuBLAS >= 12.5): one group
  // of one GEMM per non-empty expert (the groups differ in m), bf16 operands and output, fp32
  // compute, on `stream` with this ExpertGemm's workspace. bf16 only (InputError otherwise).
  // The per-expert A/B/C pointer arrays must be in device memory: they are written into pinned
  // host memory and copied by cudaMemcpyAsync on `stream`, only when the counts (set_counts) or
  // the buffers changed since the last call. Before rewriting them the host waits for the
  // previous grouped call of this ExpertGemm to finish (in the executor it has: the next layer's
  // count copy synchronises the stream first).
  void run_grouped_call(const void* act, const void* weights, void* out, cudaStream_t stream,
                        const BlasHandle& blas);
  // The same GEMMs as ONE strided-batched cuBLASLt call over all num_experts experts, each expert's
  // rows padded to rows_per_expert: act [E * rows_per_expert, k] with expert e's rows at
  // e * rows_per_expert (rows past its count are pad rows; their outputs are computed and never
  // read), weights [E, n, k], out [E * rows_per_expert, n]. Planned once per distinct
  // rows_per_expert (kept, as the per-expert plans are). Does not use set_counts. bf16 only (InputError otherwise);
  // rows_per_expert = 0 runs nothing.
  void run_padded_batch(const void* act, const void* weights, void* out, int64_t rows_per_expert,
                        cudaStream_t stream);
  // The GEMMs of the bucketed padded layout (core/expert_path.hpp kExpertGemmBucketed): expert e
  // has padded_counts[e] rows (0: none; the executor passes its count rounded up to the bucket
  // alignment) starting at row poff[e] = sum over e' < e of padded_counts[e'] of act
  // [sum, k] and out [sum, n]; weights [E, n, k]. The experts with rows are grouped by padded
  // count, one "bucket" per distinct count, ascending; each bucket is a batch of GEMMs of the same
  // shape (A = W_e, B = act + poff[e] * k, C = out + poff[e] * n; the transposes and leading
  // dimensions of run_grouped_call), run as ONE cublasGemmGroupedBatchedEx with group_count =
  // buckets (BucketIssue::grouped_call) or one cublasGemmBatchedEx per bucket
  // (batched_per_bucket), on `stream` with this ExpertGemm's workspace. Rows past an expert's real
  // count are computed like the others (their outputs are for the caller to ignore). The pointer
  // arrays are built and uploaded as run_grouped_call's (pinned host memory, cudaMemcpyAsync on
  // `stream`, only when padded_counts or the buffers changed, after waiting for the previous
  // bucketed call of this ExpertGemm to finish). Does not use set_counts. bf16 only; InputError
  // for a padded count < 0 or > INT_MAX, or a padded_counts size other than num_experts. Returns
  // the number of buckets (host calls: 1 or that many; 0 runs nothing).
  int run_bucketed_call(const void* act, const void* weights, void* out, const std::vector<int64_t>& padded_counts,
                        cudaStream_t stream, const BlasHandle& blas, BucketIssue issue = BucketIssue::grouped_call);
  int64_t act_scale_offset(int e) const { return act_scale_offsets_[e]; }
  double flops() const;

 private:
  const LtHandle& h_;
  int num_experts_;
  int64_t n_, k_;
  DType dtype_;
  void* workspace_;
  std::size_t workspace_bytes_;
  std::vector<int64_t> counts_, offsets_, act_scale_offsets_;
  int64_t total_rows_ = 0;
  std::map<int64_t, std::unique_ptr<LtGemm>> plans_;
  std::map<int64_t, std::unique_ptr<LtGemm>> padded_plans_;  // run_padded_batch's, by rows_per_expert
  uint64_t counts_generation_ = 0;  // bumped by set_counts: run_grouped_call re-uploads its arrays
  struct GroupedCall;                // run_grouped_call's / run_bucketed_call's arrays; made on first call
  std::unique_ptr<GroupedCall> grouped_call_, bucketed_call_;
  GemmOperands operands(int e, const void* act, const void* weights, void* out, const float* act_scale,
                        const float* weight_scale) const;
};

}  // namespace mixserve::gpu
