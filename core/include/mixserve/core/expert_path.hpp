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
// the device offsets, no host sync). The per-expert cuBLASLt path (one GEMM per expert with a host
// copy of the counts) is still selectable in the executor (ExpertPath::cublaslt) but never
// automatic.
inline constexpr int64_t kDeviceGemvMaxRows = 512;

inline constexpr bool uses_device_gemv(int64_t routed_rows) { return routed_rows <= kDeviceGemvMaxRows; }
inline constexpr bool uses_grouped_gemm(int64_t routed_rows) { return !uses_device_gemv(routed_rows); }

// The GEMV kernels (executor/expert_gemm.hpp: launch_gemv, launch_grouped_gemv[_v2]) stage an
// activation row in shared memory, so their inner size k is a multiple of 8 up to kGemvMaxK
// (the executor static_asserts its kGroupedGemvMaxK against it). A projection whose k does not
// fit runs on the GEMM instead (Mixtral's expert down projection, k = 14336; Qwen2-57B's shared
// expert down, k = 20480).
inline constexpr int64_t kGemvMaxK = 8192;
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
//   "grouped:<dist>" - the tensor-core grouped GEMM, one launch, no graph (as a prefill step
//                    runs it; mixserve-profile expert_gemv).
inline constexpr std::string_view kExpertGemvTag = "gemv:";
inline constexpr std::string_view kExpertEagerTag = "eager:";
inline constexpr std::string_view kExpertGroupedTag = "grouped:";

}  // namespace mixserve
