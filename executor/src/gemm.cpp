#include "mixserve/gpu/gemm.hpp"

#include <algorithm>
#include <limits>
#include <utility>

#include <fmt/format.h>

#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
bool is_fp8(DType d) { return d == DType::fp8_e4m3 || d == DType::fp8_block; }
int64_t elem_bytes(DType d) { return is_fp8(d) ? 1 : 2; }
}  // namespace

std::string gemm_unsupported_reason(const GemmShape& s) {
  if (s.dtype != DType::bf16 && s.dtype != DType::fp8_e4m3 && s.dtype != DType::fp8_block)
    return fmt::format("dtype {} is not one of bf16, fp8, fp8_block128", to_string(s.dtype));
  if (s.out_fp32 && s.dtype != DType::bf16) return "fp32 output is for bf16 operands only";
  if (s.m < 1 || s.n < 1 || s.k < 1) return fmt::format("m, n, k must be >= 1 (got {}, {}, {})", s.m, s.n, s.k);
  if (s.batch < 1 || s.batch > std::numeric_limits<int32_t>::max())
    return fmt::format("batch={} must be in [1, 2^31 - 1]", s.batch);
  if (s.batch > 1 && s.dtype != DType::bf16) return "a strided batch is for bf16 operands only";
  const int64_t align = is_fp8(s.dtype) ? 16 : 8;  // 16-byte rows
  if (s.k % align != 0) return fmt::format("k={} is not a multiple of {}", s.k, align);
  if (s.n % align != 0) return fmt::format("n={} is not a multiple of {}", s.n, align);
  return {};
}

int64_t gemm_rows_padded(const GemmShape& s) {
  return s.dtype == DType::fp8_block ? round_up(s.m, 4) : s.m;
}
int64_t act_scale_count(const GemmShape& s) {
  return ceil_div(s.k, kFp8BlockSize) * gemm_rows_padded(s);
}
int64_t act_scale_index(const GemmShape& s, int64_t row, int64_t k_block) {
  return k_block * gemm_rows_padded(s) + row;
}
int64_t weight_scale_count(const GemmShape& s) {
  return ceil_div(s.n, kFp8BlockSize) * round_up(ceil_div(s.k, kFp8BlockSize), 4);
}
int64_t weight_scale_index(const GemmShape& s, int64_t n_block, int64_t k_block) {
  return n_block * round_up(ceil_div(s.k, kFp8BlockSize), 4) + k_block;
}

LtHandle::LtHandle() { MIXSERVE_CUBLAS_CHECK(cublasLtCreate(&h_)); }
LtHandle::~LtHandle() {
  if (h_) cublasLtDestroy(h_);
}

BlasHandle::BlasHandle() { MIXSERVE_CUBLAS_CHECK(cublasCreate(&h_)); }
BlasHandle::~BlasHandle() {
  if (h_) cublasDestroy(h_);
}

LtGemm::LtGemm(const LtHandle& h, const GemmShape& s, void* workspace, std::size_t workspace_bytes)
    : h_(h.get()), s_(s), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  if (const auto why = gemm_unsupported_reason(s); !why.empty())
    throw InputError(fmt::format("GEMM m={} n={} k={} {}: {}", s.m, s.n, s.k, to_string(s.dtype), why));
  const cudaDataType_t in_type = is_fp8(s.dtype) ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  const int64_t rows = gemm_rows_padded(s);
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  if (s.dtype == DType::fp8_block) {
    const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;  // weight
    const int32_t b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;      // activations
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)));
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)));
  }
  if (is_fp8(s.dtype)) {
    // The heuristic needs the scale pointers set; real ones are set again in run().
    const void* placeholder = workspace_;
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &placeholder, sizeof(placeholder)));
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &placeholder, sizeof(placeholder)));
  }
  // A = weight: k x n column-major (ld k), transposed. B = act: k x rows (ld k). D: n x rows (ld n).
  MIXSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_, in_type, s.k, s.n, s.k));
  MIXSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_, in_type, s.k, rows, s.k));
  MIXSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d_, s.out_fp32 ? CUDA_R_32F : CUDA_R_16BF, s.n, rows, s.n));
  if (s.batch > 1) {
    // Strided batch: A steps one [n, k] weight, B one [rows, k] activation block, D one [rows, n] block.
    const int32_t count = static_cast<int32_t>(s.batch);
    const int64_t a_stride = s.n * s.k, b_stride = rows * s.k, d_stride = rows * s.n;
    for (auto [layout, stride] : {std::pair{a_, a_stride}, std::pair{b_, b_stride}, std::pair{d_, d_stride}}) {
      MIXSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      MIXSERVE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }
  cublasLtMatmulPreference_t pref = nullptr;
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h_, desc_, a_, b_, d_, d_, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  MIXSERVE_CUBLAS_CHECK(st);
  if (found == 0)
    throw RuntimeError(fmt::format("cuBLASLt has no algorithm for GEMM m={} n={} k={} {}", s.m, s.n,
                                   s.k, to_string(s.dtype)));
  algo_ = result.algo;
}

LtGemm::~LtGemm() {
  if (d_) cublasLtMatrixLayoutDestroy(d_);
  if (b_) cublasLtMatrixLayoutDestroy(b_);
  if (a_) cublasLtMatrixLayoutDestroy(a_);
  if (desc_) cublasLtMatmulDescDestroy(desc_);
}

void LtGemm::run(const GemmOperands& ops, cudaStream_t stream, void* workspace) const {
  // The scale pointers live in the matmul descriptor, so one LtGemm must not run on two host
  // threads at once (each thread plans its own).
  if (is_fp8(s_.dtype)) {
    if (!ops.act_scale || !ops.weight_scale) throw RuntimeError("fp8 GEMM run without scale pointers");
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ops.weight_scale, sizeof(ops.weight_scale)));
    MIXSERVE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &ops.act_scale, sizeof(ops.act_scale)));
  }
  const float alpha = 1.0f, beta = 0.0f;
  MIXSERVE_CUBLAS_CHECK(cublasLtMatmul(h_, desc_, &alpha, ops.weight, a_, ops.act, b_, &beta, ops.out, d_,
                                       ops.out, d_, &algo_, workspace, workspace_bytes_, stream));
}

void LtGemm::run(const GemmOperands& ops, cudaStream_t stream) const { run(ops, stream, workspace_); }

StreamFanout::StreamFanout(int num_streams, std::size_t workspace_bytes)
    : num_streams_(num_streams), workspace_bytes_(workspace_bytes) {
  if (num_streams < 1) throw InputError(fmt::format("stream fan-out: num_streams={} must be >= 1", num_streams));
  // Release what was made if a later call throws (the destructor does not run then).
  struct Guard {
    StreamFanout* f;
    bool armed = true;
    ~Guard() {
      if (armed) f->release();
    }
  } guard{this};
  MIXSERVE_CUDA_CHECK(cudaMalloc(&workspace_, std::size_t(num_streams) * workspace_bytes));
  MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming));
  for (int i = 1; i < num_streams; ++i) {
    side_.push_back(nullptr);
    MIXSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&side_.back(), cudaStreamNonBlocking));
    done_.push_back(nullptr);
    MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&done_.back(), cudaEventDisableTiming));
  }
  guard.armed = false;
}

StreamFanout::~StreamFanout() { release(); }

void StreamFanout::release() {
  for (cudaEvent_t e : done_)
    if (e) cudaEventDestroy(e);
  for (cudaStream_t st : side_)
    if (st) cudaStreamDestroy(st);
  done_.clear();
  side_.clear();
  if (forked_) cudaEventDestroy(forked_);
  forked_ = nullptr;
  if (workspace_) cudaFree(workspace_);
  workspace_ = nullptr;
}

void StreamFanout::fork(cudaStream_t s) {
  origin_ = s;
  if (side_.empty()) return;
  MIXSERVE_CUDA_CHECK(cudaEventRecord(forked_, s));
  for (cudaStream_t st : side_) MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(st, forked_, 0));
}

void StreamFanout::join(cudaStream_t s) {
  for (std::size_t i = 0; i < side_.size(); ++i) {
    MIXSERVE_CUDA_CHECK(cudaEventRecord(done_[i], side_[i]));
    MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(s, done_[i], 0));
  }
}

ExpertGemm::ExpertGemm(const LtHandle& h, int num_experts, int64_t n, int64_t k, DType dtype,
                       void* workspace, std::size_t workspace_bytes)
    : h_(h), num_experts_(num_experts), n_(n), k_(k), dtype_(dtype), workspace_(workspace),
      workspace_bytes_(workspace_bytes) {
  if (num_experts < 1) throw InputError(fmt::format("expert GEMM: num_experts={} must be >= 1", num_experts));
  if (const auto why = gemm_unsupported_reason({1, n, k, dtype}); !why.empty())
    throw InputError(fmt::format("expert GEMM n={} k={} {}: {}", n, k, to_string(dtype), why));
}

// run_grouped_call's and run_bucketed_call's arrays. Host arrays (cuBLAS reads them during the
// call): one entry per group. Pointer arrays: [A x problems][B x problems][C x problems] (problems:
// the GEMMs of all groups, group by group), pinned on the host, copied to the device.
struct ExpertGemm::GroupedCall {
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha, beta;
  const void** host_ptrs = nullptr;  // pinned, [3 * num_experts]
  void** dev_ptrs = nullptr;         // device, [3 * num_experts]
  cudaEvent_t done = nullptr;        // recorded after the last call that read dev_ptrs
  bool pending = false;              // done was recorded
  // What dev_ptrs holds: the buffers and counts it was built for.
  const void* act = nullptr;
  const void* weights = nullptr;
  void* out = nullptr;
  uint64_t generation = 0;
  std::vector<int64_t> padded_counts;  // run_bucketed_call
  int problems = 0;                    // pointers per array in dev_ptrs
  bool uploaded = false;

  explicit GroupedCall(int num_experts) {
    // Release what was made if a later call throws (the destructor does not run then).
    struct Guard {
      GroupedCall* g;
      bool armed = true;
      ~Guard() {
        if (armed) g->release();
      }
    } guard{this};
    const std::size_t bytes = std::size_t(3) * std::size_t(num_experts) * sizeof(void*);
    MIXSERVE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_ptrs), bytes));
    MIXSERVE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_ptrs), bytes));
    MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    guard.armed = false;
  }
  ~GroupedCall() { release(); }
  // The parameters every group shares (n and group_size are per group, set by the caller).
  // cuBLAS is column-major: as in LtGemm, A = W_e (k x n, ld k) transposed, B = the expert's
  // activation rows (k x rows, ld k), C = its output rows (n x rows, ld n), i.e. row-major
  // [rows, n] = act . W_e^T. cuBLAS's m is our n, its n the expert's (padded) row count.
  void set_shared(std::size_t groups, int64_t n, int64_t k) {
    trans_a.assign(groups, CUBLAS_OP_T);
    trans_b.assign(groups, CUBLAS_OP_N);
    m.assign(groups, int(n));
    this->k.assign(groups, int(k));
    lda.assign(groups, int(k));
    ldb.assign(groups, int(k));
    ldc.assign(groups, int(n));
    alpha.assign(groups, 1.0f);
    beta.assign(groups, 0.0f);
  }
  GroupedCall(const GroupedCall&) = delete;
  GroupedCall& operator=(const GroupedCall&) = delete;
  void release() {
    if (done) cudaEventDestroy(done);
    if (dev_ptrs) cudaFree(dev_ptrs);
    if (host_ptrs) cudaFreeHost(host_ptrs);
    done = nullptr;
    dev_ptrs = nullptr;
    host_ptrs = nullptr;
  }
};

ExpertGemm::~ExpertGemm() = default;

void ExpertGemm::set_counts(const std::vector<int64_t>& tokens_per_expert) {
  if (static_cast<int>(tokens_per_expert.size()) != num_experts_)
    throw InputError(fmt::format("expert GEMM: {} token counts for {} experts", tokens_per_expert.size(), num_experts_));
  counts_ = tokens_per_expert;
  offsets_.assign(num_experts_, 0);
  act_scale_offsets_.assign(num_experts_, 0);
  int64_t row = 0, scale = 0;
  for (int e = 0; e < num_experts_; ++e) {
    const int64_t c = counts_[e];
    if (c < 0) throw InputError(fmt::format("expert GEMM: expert {} has {} tokens", e, c));
    offsets_[e] = row;
    act_scale_offsets_[e] = scale;
    if (c == 0) continue;
    const GemmShape s{c, n_, k_, dtype_};
    row += gemm_rows_padded(s);
    if (dtype_ == DType::fp8_block) scale += act_scale_count(s);
    if (!plans_.count(c)) plans_.emplace(c, std::make_unique<LtGemm>(h_, s, workspace_, workspace_bytes_));
  }
  total_rows_ = row;
  ++counts_generation_;
}

GemmOperands ExpertGemm::operands(int e, const void* act, const void* weights, void* out, const float* act_scale,
                                  const float* weight_scale) const {
  const int64_t eb = elem_bytes(dtype_);
  GemmOperands ops;
  ops.act = static_cast<const char*>(act) + offsets_[e] * k_ * eb;
  ops.weight = static_cast<const char*>(weights) + int64_t(e) * n_ * k_ * eb;
  ops.out = static_cast<char*>(out) + offsets_[e] * n_ * 2;
  if (dtype_ == DType::fp8_e4m3) {
    ops.act_scale = act_scale;
    ops.weight_scale = weight_scale + e * kScaleStrideFloats;
  } else if (dtype_ == DType::fp8_block) {
    ops.act_scale = act_scale + act_scale_offsets_[e];
    ops.weight_scale = weight_scale + e * weight_scale_count({1, n_, k_, dtype_});
  }
  return ops;
}

void ExpertGemm::run(const void* act, const void* weights, void* out, const float* act_scale,
                     const float* weight_scale, cudaStream_t stream) const {
  for (int e = 0; e < num_experts_; ++e) {
    if (counts_[e] == 0) continue;
    plans_.at(counts_[e])->run(operands(e, act, weights, out, act_scale, weight_scale), stream);
  }
}

void ExpertGemm::run(const void* act, const void* weights, void* out, const float* act_scale,
                     const float* weight_scale, cudaStream_t stream, StreamFanout& fan) const {
  if (fan.workspace_bytes() < workspace_bytes_)
    throw InputError(fmt::format("expert GEMM: stream workspace of {} bytes, the plans need {}",
                                 fan.workspace_bytes(), workspace_bytes_));
  fan.fork(stream);
  // Least-loaded stream first (ties to the lowest index): balances skewed counts, and with
  // uniform ones is round-robin.
  std::vector<int64_t> load(std::size_t(fan.size()), 0);
  for (int e = 0; e < num_experts_; ++e) {
    if (counts_[e] == 0) continue;
    const auto i = std::size_t(std::min_element(load.begin(), load.end()) - load.begin());
    load[i] += counts_[e];
    plans_.at(counts_[e])->run(operands(e, act, weights, out, act_scale, weight_scale), fan.stream(int(i)),
                               fan.workspace(int(i)));
  }
  fan.join(stream);
}

void ExpertGemm::run_padded_batch(const void* act, const void* weights, void* out, int64_t rows_per_expert,
                                  cudaStream_t stream) {
  if (dtype_ != DType::bf16)
    throw InputError(fmt::format("expert GEMM padded batch: dtype {} (bf16 only)", to_string(dtype_)));
  if (rows_per_expert < 0)
    throw InputError(fmt::format("expert GEMM padded batch: rows_per_expert={} must be >= 0", rows_per_expert));
  if (rows_per_expert == 0) return;
  auto& plan = padded_plans_[rows_per_expert];
  if (!plan) {
    GemmShape s{rows_per_expert, n_, k_, dtype_};
    s.batch = num_experts_;
    plan = std::make_unique<LtGemm>(h_, s, workspace_, workspace_bytes_);
  }
  GemmOperands ops;
  ops.act = act;
  ops.weight = weights;
  ops.out = out;
  plan->run(ops, stream);
}

void ExpertGemm::run_grouped_call(const void* act, const void* weights, void* out, cudaStream_t stream,
                                  const BlasHandle& blas) {
  if (dtype_ != DType::bf16)
    throw InputError(fmt::format("expert GEMM: the cuBLAS grouped call runs bf16 only (got {})", to_string(dtype_)));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (n_ > kIntMax || k_ > kIntMax)
    throw InputError(fmt::format("expert GEMM: the cuBLAS grouped call needs n, k <= {} (got {}, {})", kIntMax, n_, k_));
  if (static_cast<int>(counts_.size()) != num_experts_)
    throw InputError("expert GEMM: run_grouped_call before set_counts");
  if (!grouped_call_) grouped_call_ = std::make_unique<GroupedCall>(num_experts_);
  GroupedCall& g = *grouped_call_;
  const bool stale = !g.uploaded || g.generation != counts_generation_ || g.act != act || g.weights != weights ||
                     g.out != out;
  if (stale) {
    // The previous call may still read dev_ptrs (and its copy read host_ptrs).
    if (g.pending) MIXSERVE_CUDA_CHECK(cudaEventSynchronize(g.done));
    g.n.clear();
    int groups = 0;
    for (int e = 0; e < num_experts_; ++e) {
      if (counts_[e] == 0) continue;
      if (counts_[e] > kIntMax)
        throw InputError(fmt::format("expert GEMM: expert {} has {} rows, the cuBLAS grouped call takes <= {}", e,
                                     counts_[e], kIntMax));
      g.n.push_back(int(counts_[e]));
      ++groups;
    }
    const std::size_t G = std::size_t(groups);
    g.set_shared(G, n_, k_);  // cuBLAS's n: the expert's row count (g.n, above)
    g.group_size.assign(G, 1);
    std::size_t i = 0;
    for (int e = 0; e < num_experts_; ++e) {
      if (counts_[e] == 0) continue;
      const GemmOperands ops = operands(e, act, weights, out, nullptr, nullptr);
      g.host_ptrs[i] = ops.weight;
      g.host_ptrs[G + i] = ops.act;
      g.host_ptrs[2 * G + i] = ops.out;
      ++i;
    }
    if (G > 0)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(g.dev_ptrs, g.host_ptrs, 3 * G * sizeof(void*), cudaMemcpyHostToDevice,
                                          stream));
    g.act = act;
    g.weights = weights;
    g.out = out;
    g.generation = counts_generation_;
    g.problems = groups;
    g.uploaded = true;
  }
  const int groups = static_cast<int>(g.group_size.size());
  if (groups == 0) return;
  const std::size_t G = std::size_t(groups);
  const cublasHandle_t h = blas.get();
  // cublasSetStream resets the handle's workspace to cuBLAS's default pool: set ours after it.
  MIXSERVE_CUBLAS_CHECK(cublasSetStream(h, stream));
  MIXSERVE_CUBLAS_CHECK(cublasSetWorkspace(h, workspace_, workspace_bytes_));
  MIXSERVE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      h, g.trans_a.data(), g.trans_b.data(), g.m.data(), g.n.data(), g.k.data(), g.alpha.data(),
      g.dev_ptrs, CUDA_R_16BF, g.lda.data(), g.dev_ptrs + G, CUDA_R_16BF, g.ldb.data(),
      g.beta.data(), g.dev_ptrs + 2 * G, CUDA_R_16BF, g.ldc.data(), groups, g.group_size.data(),
      CUBLAS_COMPUTE_32F));
  MIXSERVE_CUDA_CHECK(cudaEventRecord(g.done, stream));
  g.pending = true;
}

int ExpertGemm::run_bucketed_call(const void* act, const void* weights, void* out,
                                  const std::vector<int64_t>& padded_counts, cudaStream_t stream,
                                  const BlasHandle& blas, BucketIssue issue) {
  if (dtype_ != DType::bf16)
    throw InputError(fmt::format("expert GEMM: the bucketed cuBLAS call runs bf16 only (got {})", to_string(dtype_)));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (n_ > kIntMax || k_ > kIntMax)
    throw InputError(fmt::format("expert GEMM: the bucketed cuBLAS call needs n, k <= {} (got {}, {})", kIntMax, n_, k_));
  if (static_cast<int>(padded_counts.size()) != num_experts_)
    throw InputError(fmt::format("expert GEMM: {} padded counts for {} experts", padded_counts.size(), num_experts_));
  if (!bucketed_call_) bucketed_call_ = std::make_unique<GroupedCall>(num_experts_);
  GroupedCall& g = *bucketed_call_;
  const bool stale = !g.uploaded || g.padded_counts != padded_counts || g.act != act || g.weights != weights ||
                     g.out != out;
  if (stale) {
    // Buckets: padded count -> its experts, in expert order; row starts in expert order.
    std::map<int64_t, std::vector<int>> buckets;
    std::vector<int64_t> start(std::size_t(num_experts_), 0);
    int64_t row = 0;
    for (int e = 0; e < num_experts_; ++e) {
      const int64_t c = padded_counts[std::size_t(e)];
      if (c < 0 || c > kIntMax)
        throw InputError(fmt::format("expert GEMM: expert {} has {} padded rows (bucketed call: 0 .. {})", e, c, kIntMax));
      start[std::size_t(e)] = row;
      row += c;
      if (c > 0) buckets[c].push_back(e);
    }
    // The previous call may still read dev_ptrs (and its copy read host_ptrs).
    if (g.pending) MIXSERVE_CUDA_CHECK(cudaEventSynchronize(g.done));
    const std::size_t G = buckets.size();
    g.n.clear();
    g.group_size.clear();
    int problems = 0;
    for (const auto& [rows, experts] : buckets) {
      g.n.push_back(int(rows));  // cuBLAS's n: the bucket's padded row count (run_grouped_call's comment)
      g.group_size.push_back(int(experts.size()));
      problems += int(experts.size());
    }
    g.set_shared(G, n_, k_);
    const std::size_t P = std::size_t(problems);
    std::size_t i = 0;
    for (const auto& [rows, experts] : buckets)
      for (int e : experts) {
        g.host_ptrs[i] = static_cast<const char*>(weights) + int64_t(e) * n_ * k_ * 2;
        g.host_ptrs[P + i] = static_cast<const char*>(act) + start[std::size_t(e)] * k_ * 2;
        g.host_ptrs[2 * P + i] = static_cast<char*>(out) + start[std::size_t(e)] * n_ * 2;
        ++i;
      }
    if (P > 0)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(g.dev_ptrs, g.host_ptrs, 3 * P * sizeof(void*), cudaMemcpyHostToDevice,
                                          stream));
    g.act = act;
    g.weights = weights;
    g.out = out;
    g.padded_counts = padded_counts;
    g.problems = problems;
    g.uploaded = true;
  }
  const int groups = static_cast<int>(g.group_size.size());
  if (groups == 0) return 0;
  const std::size_t P = std::size_t(g.problems);
  const cublasHandle_t h = blas.get();
  // cublasSetStream resets the handle's workspace to cuBLAS's default pool: set ours after it.
  MIXSERVE_CUBLAS_CHECK(cublasSetStream(h, stream));
  MIXSERVE_CUBLAS_CHECK(cublasSetWorkspace(h, workspace_, workspace_bytes_));
  if (issue == BucketIssue::grouped_call) {
    MIXSERVE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        h, g.trans_a.data(), g.trans_b.data(), g.m.data(), g.n.data(), g.k.data(), g.alpha.data(),
        g.dev_ptrs, CUDA_R_16BF, g.lda.data(), g.dev_ptrs + P, CUDA_R_16BF, g.ldb.data(),
        g.beta.data(), g.dev_ptrs + 2 * P, CUDA_R_16BF, g.ldc.data(), groups, g.group_size.data(),
        CUBLAS_COMPUTE_32F));
  } else {
    const float alpha = 1.0f, beta = 0.0f;
    std::size_t first = 0;  // the bucket's first problem in the pointer arrays
    for (int b = 0; b < groups; ++b) {
      MIXSERVE_CUBLAS_CHECK(cublasGemmBatchedEx(
          h, CUBLAS_OP_T, CUBLAS_OP_N, int(n_), g.n[std::size_t(b)], int(k_), &alpha, g.dev_ptrs + first,
          CUDA_R_16BF, int(k_), g.dev_ptrs + P + first, CUDA_R_16BF, int(k_), &beta, g.dev_ptrs + 2 * P + first,
          CUDA_R_16BF, int(n_), g.group_size[std::size_t(b)], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      first += std::size_t(g.group_size[std::size_t(b)]);
    }
  }
  MIXSERVE_CUDA_CHECK(cudaEventRecord(g.done, stream));
  g.pending = true;
  return groups;
}

double ExpertGemm::flops() const {
  double f = 0;
  for (int64_t c : counts_) f += 2.0 * double(c) * double(n_) * double(k_);
  return f;
}

}  // namespace mixserve::gpu
