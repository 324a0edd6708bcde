// Device runtime: RAII streams, events and device buffers, a bump-allocating device memory
// arena, and a description of the device and library versions (profile provenance).
// All calls check their status and throw mixserve::RuntimeError (check.hpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include <cuda_runtime_api.h>

namespace mixserve::gpu {

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count_or_zero();

// The calling thread's current CUDA device, put back on destruction (also when an exception
// leaves the scope). Without a CUDA device (CPU tests) there is nothing to keep. Used where one
// thread works on several ranks' devices: Rendezvous::meet (a collective run for every rank on the
// last-arriving thread; the EP2 failure of session 7) and EmulatedRanks' per-rank loops.
class KeepDevice {
 public:
  KeepDevice();
  ~KeepDevice();
  KeepDevice(const KeepDevice&) = delete;
  KeepDevice& operator=(const KeepDevice&) = delete;

 private:
  int device_ = -1;
};

class Stream {
 public:
  explicit Stream(int device = -1);  // -1: the current device
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(o.s_), device_(o.device_) { o.s_ = nullptr; }
  cudaStream_t get() const { return s_; }
  int device() const { return device_; }
  void synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
  int device_ = 0;
};

class Event {
 public:
  Event();  // timing-capable event on the current device
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event(Event&& o) noexcept : e_(o.e_) { o.e_ = nullptr; }
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t s) const;
  // Milliseconds between two recorded, completed events.
  static float elapsed_ms(const Event& start, const Event& stop);

 private:
  cudaEvent_t e_ = nullptr;
};

// One cudaMalloc'd allocation, freed on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  void* get() const { return p_; }
  template <class T> T* as() const { return static_cast<T*>(p_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// A device memory arena: one allocation carved by a bump pointer with a fixed alignment.
// reset() releases every carve at once (the next step reuses the memory). Carving past the
// capacity throws RuntimeError naming the request and what is left.
class DeviceArena {
 public:
  static constexpr std::size_t kAlignBytes = 256;  // cudaMalloc's guarantee; TMA and cuBLASLt like >=16
  explicit DeviceArena(std::size_t capacity_bytes);
  void* carve(std::size_t bytes, const char* what = "buffer");
  template <class T> T* carve_n(std::size_t count, const char* what = "buffer") {
    return static_cast<T*>(carve(count * sizeof(T), what));
  }
  void reset() { used_ = 0; }
  std::size_t used_bytes() const { return used_; }
  std::size_t capacity_bytes() const { return buf_.bytes(); }

 private:
  DeviceBuffer buf_;
  std::size_t used_ = 0;
};

// What the profile's provenance records about the machine.
struct DeviceInfo {
  int device = 0;
  std::string name;            // "NVIDIA H200"
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  double memory_GiB = 0;
  int l2_bytes = 0;
  int sm_clock_MHz = 0;        // max SM clock the driver reports
  int mem_clock_MHz = 0;
  int mem_bus_bits = 0;
  std::map<std::string, std::string> versions;  // driver, cuda_runtime, cublas, cublasLt, nccl
};
DeviceInfo query_device(int device);

}  // namespace mixserve::gpu
