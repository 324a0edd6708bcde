#include "mixserve/gpu/check.hpp"

#include <fmt/format.h>

namespace mixserve::gpu {
namespace {

int current_device_or_minus_one() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error this query may have set
    return -1;
  }
  return dev;
}

[[noreturn]] void fail(const char* lib, int code, const char* name, const char* text,
                       const char* expr, const char* file, int line, const std::string& extra = {}) {
  throw RuntimeError(fmt::format("{} error {} ({}: {}) in `{}` at {}:{} on device {}{}", lib, code,
                                 name, text, expr, file, line, current_device_or_minus_one(),
                                 extra));
}

}  // namespace

void check(cudaError_t status, const char* expr, const char* file, int line) {
  if (status == cudaSuccess) return;
  fail("CUDA", static_cast<int>(status), cudaGetErrorName(status), cudaGetErrorString(status), expr,
       file, line);
}

void check(cublasStatus_t status, const char* expr, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail("cuBLAS", static_cast<int>(status), cublasGetStatusName(status),
       cublasGetStatusString(status), expr, file, line);
}

#if MIXSERVE_HAVE_NCCL
void check(ncclResult_t status, const char* expr, const char* file, int line) {
  if (status == ncclSuccess || status == ncclInProgress) return;
  const char* last = ncclGetLastError(nullptr);
  fail("NCCL", static_cast<int>(status), "ncclResult_t", ncclGetErrorString(status), expr, file,
       line, last && *last ? fmt::format(" (last NCCL error: {})", last) : std::string{});
}
#endif

void check_last_launch(const char* what, const char* file, int line) {
  check(cudaGetLastError(), what, file, line);
}

}  // namespace mixserve::gpu
