#include "mixserve/gpu/runtime.hpp"

#include <fmt/format.h>

#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

KeepDevice::KeepDevice() {
  if (cudaGetDevice(&device_) != cudaSuccess) {
    device_ = -1;
    (void)cudaGetLastError();  // no device: not an error of the caller's next launch
  }
}
KeepDevice::~KeepDevice() {
  if (device_ >= 0) (void)cudaSetDevice(device_);
}

int device_count_or_zero() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

Stream::Stream(int device) {
  if (device >= 0) MIXSERVE_CUDA_CHECK(cudaSetDevice(device));
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&device_));
  MIXSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
}
Stream::~Stream() {
  if (s_) cudaStreamDestroy(s_);
}
void Stream::synchronize() const { MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s_)); }

Event::Event() { MIXSERVE_CUDA_CHECK(cudaEventCreate(&e_)); }
Event::~Event() {
  if (e_) cudaEventDestroy(e_);
}
void Event::record(cudaStream_t s) const { MIXSERVE_CUDA_CHECK(cudaEventRecord(e_, s)); }
float Event::elapsed_ms(const Event& start, const Event& stop) {
  float ms = 0;
  MIXSERVE_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, stop.e_));
  return ms;
}

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes > 0) MIXSERVE_CUDA_CHECK(cudaMalloc(&p_, bytes));
}
DeviceBuffer::~DeviceBuffer() {
  if (p_) cudaFree(p_);
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_) cudaFree(p_);
    p_ = o.p_;
    bytes_ = o.bytes_;
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

DeviceArena::DeviceArena(std::size_t capacity_bytes) : buf_(capacity_bytes) {}

void* DeviceArena::carve(std::size_t bytes, const char* what) {
  const std::size_t begin = (used_ + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
  if (begin + bytes > buf_.bytes())
    throw RuntimeError(fmt::format("device arena: cannot carve {} bytes for {} ({} of {} bytes used)",
                                   bytes, what, used_, buf_.bytes()));
  used_ = begin + bytes;
  return static_cast<char*>(buf_.get()) + begin;
}

namespace {
std::string version_string(int v, int major_div, int minor_div) {
  return fmt::format("{}.{}", v / major_div, (v % major_div) / minor_div);
}
}  // namespace

DeviceInfo query_device(int device) {
  DeviceInfo info;
  info.device = device;
  cudaDeviceProp prop{};
  MIXSERVE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  info.name = prop.name;
  info.sm_count = prop.multiProcessorCount;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  info.memory_GiB = static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0);
  info.l2_bytes = prop.l2CacheSize;
  int khz = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device));
  info.sm_clock_MHz = khz / 1000;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
  info.mem_clock_MHz = khz / 1000;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&info.mem_bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
  int v = 0;
  MIXSERVE_CUDA_CHECK(cudaDriverGetVersion(&v));
  info.versions["cuda_driver_api"] = version_string(v, 1000, 10);
  MIXSERVE_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  info.versions["cuda_runtime"] = version_string(v, 1000, 10);
  const std::size_t lt = cublasLtGetVersion();
  info.versions["cublasLt"] = fmt::format("{}.{}.{}", lt / 10000, (lt % 10000) / 100, lt % 100);
#if MIXSERVE_HAVE_NCCL
  int nv = 0;
  MIXSERVE_NCCL_CHECK(ncclGetVersion(&nv));
  info.versions["nccl"] = fmt::format("{}.{}.{}", nv / 10000, (nv % 10000) / 100, nv % 100);
#endif
  return info;
}

}  // namespace mixserve::gpu
