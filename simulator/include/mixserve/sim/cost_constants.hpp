// Every constant of the analytical cost model, in one commented table (STYLE.md §3: NCCL's
// tuning.cc habit). Nothing else in simulator/ hard-codes an efficiency, latency or byte count;
// change a number here and every view (step costs, memory, paper model, tests) follows.
// Sources are in /work/shared/reference (comm-kernels.md §2, paper.md §13).
#pragma once

namespace mixserve::sim {

struct CostConstants {
  // ---- links (alpha-beta) ------------------------------------------------------------------
  // Fraction of the per-direction line rate a collective achieves. NVLink4: NCCL reaches
  // ~370 of 450 GB/s (protocol overhead ~20%, comm-kernels.md §2.1, nccl-tests#212).
  double intra_link_efficiency = 370.0 / 450.0;
  // ConnectX-7 NDR: 48.5 of 50 GB/s per direction in practice (comm-kernels.md §2.1, #267).
  double inter_link_efficiency = 48.5 / 50.0;
  // Fallback per-message latencies when the cluster file leaves latency_us at 0 (us).
  // NVLink: small-message one-shot AR floor is ~6 us including launch (SGLang, §2.4), of which
  // the link/sync part is taken as 2 us; IB/RoCE: ~5 us one-way verbs + proxy latency.
  double intra_latency_fallback_us = 2.0;
  double inter_latency_fallback_us = 5.0;
  // Fixed cost of launching one collective kernel (us), added once per collective.
  double collective_launch_us = 4.0;
  // One-shot all-reduce (each rank reads every peer's buffer) is used in the node when it is
  // cheaper than ring; libraries cap it at 256 KiB-1 MiB (vLLM, SGLang, comm-kernels.md §3.7).
  double oneshot_allreduce_max_bytes = 1024.0 * 1024.0;

  // ---- compute ----------------------------------------------------------------------------
  // Attention kernels reach a lower fraction of the tensor-core peak than GEMMs
  // (FlashAttention-3 on H100: ~75% of bf16 peak in the best case, less with causal masks and
  // short sequences); applied on top of the profile's gemm_efficiency.
  double attention_vs_gemm_efficiency = 0.6;
  // Decode attention streams the KV cache: fraction of the profile's memory efficiency reached
  // by paged decode kernels (FlashInfer/FlashMLA report 80-90% of HBM bandwidth at long context).
  double attention_decode_mem_efficiency = 0.85;
  // Router top-k / softmax, SiLU*mul, RMSNorm, residual, RoPE, KV write, permute, combine and
  // scatter-add are memory-bound; each launch of the executor (executor/src/model_forward.cpp) is
  // costed as one memory op (bytes read + written) on the profile's measured elementwise table,
  // whose smallest point (a launch-bound kernel) is the floor of every smaller one.
  // Elementwise passes over a [tokens, hidden] activation per decoder layer that the executor
  // runs besides those launches: none (it was 3.0, standing for residual adds and RoPE, before
  // they were costed launch by launch; the executor quantises no activations).
  double extra_elementwise_passes_per_layer = 0.0;

  // ---- memory -----------------------------------------------------------------------------
  // Memory a GPU loses before weights: CUDA context (~0.5 GiB), cuBLAS/cuBLASLt workspaces,
  // NCCL communicators and their internal buffers (~1 GiB at 64 ranks), CUDA-graph pools and
  // allocator fragmentation. vLLM's profiler typically sees 2-4 GiB of non-torch memory on H100.
  double reserved_bytes = 3.0 * 1024.0 * 1024.0 * 1024.0;
  // Live [tokens, hidden] activation buffers at the peak of a layer (residual, normed input,
  // attention output, MoE output) in activation dtype.
  double activation_hidden_buffers = 4.0;
  // Logits are kept in fp32 for the sampled rows (one per sequence).
  double logits_bytes_per_element = 4.0;
};

inline constexpr CostConstants kCostConstants{};

}  // namespace mixserve::sim
