// Float64 CPU references and comparison helpers shared by the GPU tests (STYLE.md §12).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/runtime.hpp"

namespace mixserve::test {

// ||a - b|| / ||b|| over the elements; the caller checks ||b|| > 0 (the reference is not zero).
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}
inline double norm(const std::vector<double>& a) {
  double s = 0;
  for (double v : a) s += v * v;
  return std::sqrt(s);
}
inline bool all_finite(const std::vector<double>& a) {
  for (double v : a)
    if (!std::isfinite(v)) return false;
  return true;
}

template <class T>
std::vector<T> download(const void* d, std::size_t n) {
  std::vector<T> h(n);
  if (n) MIXSERVE_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
template <class T>
void upload(void* d, const std::vector<T>& h) {
  if (!h.empty()) MIXSERVE_CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}
inline std::vector<double> to_double(const std::vector<__nv_bfloat16>& v) {
  std::vector<double> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = double(__bfloat162float(v[i]));
  return o;
}
inline std::vector<double> to_double(const std::vector<__nv_fp8_e4m3>& v) {
  std::vector<double> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = double(float(v[i]));
  return o;
}

}  // namespace mixserve::test
