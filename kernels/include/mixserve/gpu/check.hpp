// One error-check family for CUDA, cuBLAS and NCCL calls (STYLE.md §10).
// MIXSERVE_CUDA_CHECK(expr), MIXSERVE_CUBLAS_CHECK(expr), MIXSERVE_NCCL_CHECK(expr) expand to one
// overloaded check(status, expr, file, line) that throws mixserve::RuntimeError carrying the
// expression, file:line, the numeric code, its name and text, the current device and (for NCCL)
// ncclGetLastError(). Library code never prints; only main() catches.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "mixserve/core/error.hpp"

#if MIXSERVE_HAVE_NCCL
#include <nccl.h>
#endif

namespace mixserve::gpu {

void check(cudaError_t status, const char* expr, const char* file, int line);
void check(cublasStatus_t status, const char* expr, const char* file, int line);
#if MIXSERVE_HAVE_NCCL
void check(ncclResult_t status, const char* expr, const char* file, int line);
#endif

// The launch error of the last kernel (cudaGetLastError), checked like any call.
void check_last_launch(const char* what, const char* file, int line);

}  // namespace mixserve::gpu

#define MIXSERVE_CUDA_CHECK(expr) ::mixserve::gpu::check((expr), #expr, __FILE__, __LINE__)
#define MIXSERVE_CUBLAS_CHECK(expr) ::mixserve::gpu::check((expr), #expr, __FILE__, __LINE__)
#define MIXSERVE_NCCL_CHECK(expr) ::mixserve::gpu::check((expr), #expr, __FILE__, __LINE__)
#define MIXSERVE_LAUNCH_CHECK(what) ::mixserve::gpu::check_last_launch((what), __FILE__, __LINE__)
