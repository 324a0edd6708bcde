// Greedy sampling on the device: the index of the largest value of every row of a [rows, vocab]
// bf16 matrix (the LM head's logits), ties to the lowest index (as std::max_element, the CPU
// argmax it replaces). NaNs are skipped; a row of NaNs only gives index 0.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace mixserve::gpu {

// out[r] = argmax over logits[r * vocab, (r + 1) * vocab). One CTA per row; rows may be 0.
// InputError for rows < 0 or vocab < 1 or vocab > INT32_MAX.
void launch_argmax_rows(const __nv_bfloat16* logits, int64_t rows, int64_t vocab, int32_t* out,
                        cudaStream_t stream);

}  // namespace mixserve::gpu
