#include "mixserve/kernels/moe_pack.cuh"
#include "mixserve/kernels/detail/device_support.hpp"

#include <algorithm>
#include <string>

#include <cuda_bf16.h>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::kernels {

namespace {
constexpr int kThreads = 256;

unsigned grid_for(int64_t work) {
  int device = 0, sms = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(sms) * 16)));
}

bool view_ok(const RowView& v) {
  return v.data && v.rows >= 0 && v.cols > 0 && v.slice_cols > 0 && v.cols % v.slice_cols == 0;
}

__device__ __forceinline__ int64_t view_offset(const RowView& v, int64_t r, int c) {
  return int64_t(c / v.slice_cols) * v.rows * v.slice_cols + r * v.slice_cols + c % v.slice_cols;
}

template <class T> struct Acc { using type = T; };
template <> struct Acc<__nv_bfloat16> { using type = float; };
template <class T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) { return *p; }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <class T> __device__ __forceinline__ T store(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Moves elements as opaque words of the element's size.
template <class W>
static __global__ void pack_rows_kernel(PackRowsParams p) {
  const int64_t n = p.num_rows * p.num_cols;
  const auto* src = static_cast<const W*>(p.src.data);
  auto* dst = static_cast<W*>(p.dst.data);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i / p.num_cols;
    const int c = static_cast<int>(i % p.num_cols);
    const int64_t r = p.index ? p.index[k] : k;
    dst[view_offset(p.dst, k, c)] = src[view_offset(p.src, r, p.src_col0 + c)];
  }
}

template <class T>
static __global__ void sum_buffers_kernel(SumBuffersParams p) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.num_elements;
       i += int64_t(gridDim.x) * blockDim.x) {
    typename Acc<T>::type acc = 0;
    for (int j = 0; j < p.num_inputs; ++j) acc += load(static_cast<const T*>(p.in[j]) + i);
    static_cast<T*>(p.out)[i] = store<T>(acc);
  }
}

template <class T>
static __global__ void scatter_add_kernel(ScatterAddParams p) {
  const int64_t n = p.num_rows * p.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = i / p.cols;
    const int c = static_cast<int>(i % p.cols);
    T* y = static_cast<T*>(p.y) + int64_t(p.index[k]) * p.cols + c;
    *y = store<T>(load(y) + load(static_cast<const T*>(p.in) + i));
  }
}

template <class T>
static __global__ void weighted_combine_kernel(WeightedCombineParams p) {
  const int64_t n = int64_t(p.token_end - p.token_begin) * p.cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / p.cols;
    const int c = static_cast<int>(i % p.cols);
    typename Acc<T>::type acc = 0;
    for (int64_t j = p.row_offset[t]; j < p.row_offset[t + 1]; ++j)
      acc += static_cast<typename Acc<T>::type>(p.weight[j]) *
             load(static_cast<const T*>(p.in) + p.row[j] * p.cols + c);
    static_cast<T*>(p.y)[(p.token_begin + t) * p.cols + c] = store<T>(acc);
  }
}

// sim/host_exec.cpp's toy weights: A[m][j] = (m + 2j) % 3 - 1, B[e][m][c] = (e + m + c) % 3.
__device__ __forceinline__ double toy_a(int m, int j) { return double((m + 2 * j) % 3 - 1); }
__device__ __forceinline__ double toy_b(int e, int m, int c) { return double((e + m + c) % 3); }

// One block per row: u_m over the row (block reduction), then every column of the output.
static __global__ void toy_expert_kernel(ToyExpertParams p) {
  __shared__ double u[kToyIntermediate];
  const int64_t r = blockIdx.x;
  int b = 0;
  while (b + 1 < p.num_blocks && p.block_row_offset[b + 1] <= r) ++b;
  const int64_t r0 = p.block_row_offset[b], rows_b = p.block_row_offset[b + 1] - r0;
  const int64_t base = r0 * p.hidden;
  auto at = [&](int c) {
    return base + int64_t(c / p.slice_cols) * rows_b * p.slice_cols + (r - r0) * p.slice_cols +
           c % p.slice_cols;
  };
  const int mi = kToyIntermediate / p.tp, hs = p.hidden / p.tp;
  const int m0 = p.tp_rank * mi, c_lo = p.tp_rank * hs, c_hi = c_lo + hs;
  if (threadIdx.x < kToyIntermediate) u[threadIdx.x] = 0;
  __syncthreads();
  for (int m = m0; m < m0 + mi; ++m) {
    double s = 0;
    for (int j = threadIdx.x; j < p.hidden; j += blockDim.x) s += toy_a(m, j) * p.x[at(j)];
    atomicAdd(&u[m - m0], s);  // exact: small integers
  }
  __syncthreads();
  for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
    double acc = 0;
    for (int64_t q = p.pair_offset[r]; q < p.pair_offset[r + 1]; ++q) {
      const int e = p.pair_expert[q];
      const double w = p.pair_weight[q];
      if (c >= c_lo && c < c_hi) acc += w * (e + 1) * p.x[at(c)];
      for (int m = m0; m < m0 + mi; ++m) acc += w * toy_b(e, m, c) * u[m - m0];
    }
    p.y[at(c)] = acc;
  }
}

template <template <class> class K, class P>
void dispatch_dtype(MoeDType t, unsigned grid, const P& p, cudaStream_t s, const char* what) {
  switch (t) {
    case MoeDType::f64: K<double>::run(grid, p, s); break;
    case MoeDType::f32: K<float>::run(grid, p, s); break;
    case MoeDType::bf16: K<__nv_bfloat16>::run(grid, p, s); break;
    default:
      throw InputError(std::string(what) + ": dtype " + std::to_string(static_cast<int>(t)) +
                       " unsupported (legal: f64, f32, bf16)");
  }
  MIXSERVE_LAUNCH_CHECK(what);
}
template <class T> struct SumK {
  static void run(unsigned g, const SumBuffersParams& p, cudaStream_t s) { sum_buffers_kernel<T><<<g, kThreads, 0, s>>>(p); }
};
template <class T> struct ScatterK {
  static void run(unsigned g, const ScatterAddParams& p, cudaStream_t s) { scatter_add_kernel<T><<<g, kThreads, 0, s>>>(p); }
};
template <class T> struct CombineK {
  static void run(unsigned g, const WeightedCombineParams& p, cudaStream_t s) { weighted_combine_kernel<T><<<g, kThreads, 0, s>>>(p); }
};

bool dtype_ok(MoeDType t) { return t == MoeDType::f64 || t == MoeDType::f32 || t == MoeDType::bf16; }
}  // namespace

int moe_dtype_bytes(MoeDType t) {
  switch (t) {
    case MoeDType::f64: return 8;
    case MoeDType::f32: return 4;
    case MoeDType::bf16: return 2;
  }
  return 0;
}
const char* to_string(MoeDType t) {
  switch (t) {
    case MoeDType::f64: return "f64";
    case MoeDType::f32: return "f32";
    case MoeDType::bf16: return "bf16";
  }
  return "?";
}

bool is_supported(const PackRowsParams& p, int device) {
  if (p.num_rows < 0 || p.num_cols < 0 || !dtype_ok(p.dtype)) return false;
  if (p.num_rows == 0 || p.num_cols == 0) return detail::device_is_sm80_or_newer(device);
  return view_ok(p.src) && view_ok(p.dst) && p.src_col0 >= 0 && p.src_col0 + p.num_cols <= p.src.cols &&
         p.num_cols <= p.dst.cols && p.num_rows <= p.dst.rows && detail::device_is_sm80_or_newer(device);
}

void launch_pack_rows(const PackRowsParams& p, cudaStream_t stream) {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  if (!is_supported(p, device))
    throw InputError("pack_rows: unsupported parameters (rows " + std::to_string(p.num_rows) +
                     ", cols " + std::to_string(p.num_cols) + " from column " +
                     std::to_string(p.src_col0) + " of " + std::to_string(p.src.cols) +
                     "; need set pointers, slice_cols dividing cols, the columns inside src, SM >= 8.0)");
  if (p.num_rows == 0 || p.num_cols == 0) return;
  const unsigned g = grid_for(p.num_rows * p.num_cols);
  switch (moe_dtype_bytes(p.dtype)) {
    case 8: pack_rows_kernel<unsigned long long><<<g, kThreads, 0, stream>>>(p); break;
    case 4: pack_rows_kernel<unsigned int><<<g, kThreads, 0, stream>>>(p); break;
    default: pack_rows_kernel<unsigned short><<<g, kThreads, 0, stream>>>(p); break;
  }
  MIXSERVE_LAUNCH_CHECK("pack_rows_kernel");
}

bool is_supported(const SumBuffersParams& p, int device) {
  if (p.num_elements < 0 || p.num_inputs < 0 || p.num_inputs > kMaxSumInputs || !dtype_ok(p.dtype)) return false;
  if (p.num_elements == 0) return detail::device_is_sm80_or_newer(device);
  if (!p.out) return false;
  for (int j = 0; j < p.num_inputs; ++j)
    if (!p.in[j]) return false;
  return detail::device_is_sm80_or_newer(device);
}

void launch_sum_buffers(const SumBuffersParams& p, cudaStream_t stream) {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  if (!is_supported(p, device))
    throw InputError("sum_buffers: " + std::to_string(p.num_inputs) + " inputs of " +
                     std::to_string(p.num_elements) + " elements unsupported (need 0.." +
                     std::to_string(kMaxSumInputs) + " set inputs, out set, SM >= 8.0)");
  if (p.num_elements == 0) return;
  dispatch_dtype<SumK>(p.dtype, grid_for(p.num_elements), p, stream, "sum_buffers_kernel");
}

bool is_supported(const ScatterAddParams& p, int device) {
  if (p.num_rows < 0 || p.cols < 0 || !dtype_ok(p.dtype)) return false;
  if (p.num_rows == 0 || p.cols == 0) return detail::device_is_sm80_or_newer(device);
  return p.in && p.index && p.y && detail::device_is_sm80_or_newer(device);
}

void launch_scatter_add(const ScatterAddParams& p, cudaStream_t stream) {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  if (!is_supported(p, device))
    throw InputError("scatter_add: rows " + std::to_string(p.num_rows) + ", cols " +
                     std::to_string(p.cols) + " unsupported (need set pointers, SM >= 8.0)");
  if (p.num_rows == 0 || p.cols == 0) return;
  dispatch_dtype<ScatterK>(p.dtype, grid_for(p.num_rows * p.cols), p, stream, "scatter_add_kernel");
}

bool is_supported(const WeightedCombineParams& p, int device) {
  if (p.token_end < p.token_begin || p.token_begin < 0 || p.cols < 0 || !dtype_ok(p.dtype)) return false;
  if (p.token_end == p.token_begin || p.cols == 0) return detail::device_is_sm80_or_newer(device);
  return p.in && p.row_offset && p.row && p.weight && p.y && detail::device_is_sm80_or_newer(device);
}

void launch_weighted_combine(const WeightedCombineParams& p, cudaStream_t stream) {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  if (!is_supported(p, device))
    throw InputError("weighted_combine: tokens [" + std::to_string(p.token_begin) + ", " +
                     std::to_string(p.token_end) + "), cols " + std::to_string(p.cols) +
                     " unsupported (need begin <= end, set pointers, SM >= 8.0)");
  if (p.token_end == p.token_begin || p.cols == 0) return;
  dispatch_dtype<CombineK>(p.dtype, grid_for(int64_t(p.token_end - p.token_begin) * p.cols), p,
                           stream, "weighted_combine_kernel");
}

bool is_supported(const ToyExpertParams& p, int device) {
  if (p.num_rows < 0 || p.tp < 1 || p.tp_rank < 0 || p.tp_rank >= p.tp) return false;
  if (kToyIntermediate % p.tp != 0) return false;
  if (p.num_rows == 0) return detail::device_is_sm80_or_newer(device);
  return p.x && p.y && p.hidden > 0 && p.hidden % p.tp == 0 && p.slice_cols > 0 &&
         p.hidden % p.slice_cols == 0 && p.block_row_offset && p.num_blocks >= 1 &&
         p.pair_offset && p.pair_expert && p.pair_weight && detail::device_is_sm80_or_newer(device);
}

void launch_toy_expert(const ToyExpertParams& p, cudaStream_t stream) {
  int device = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device));
  if (!is_supported(p, device))
    throw InputError("toy_expert: rows " + std::to_string(p.num_rows) + ", hidden " +
                     std::to_string(p.hidden) + ", tp " + std::to_string(p.tp_rank) + "/" +
                     std::to_string(p.tp) + " unsupported (need tp dividing " +
                     std::to_string(kToyIntermediate) + " and hidden, set pointers, SM >= 8.0)");
  if (p.num_rows == 0) return;
  if (p.num_rows > 0x7fffffff) throw InputError("toy_expert: more than 2^31 rows");
  toy_expert_kernel<<<static_cast<unsigned>(p.num_rows), 128, 0, stream>>>(p);
  MIXSERVE_LAUNCH_CHECK("toy_expert_kernel");
}

}  // namespace mixserve::kernels
