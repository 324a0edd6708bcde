// The cost model counts the executor's launches (core/decode_path.hpp, docs/profile-h200.md
// "What the cost model mirrors"): a step of a small model is captured as a CUDA graph (as the
// executor's decode steps run) and its kernel nodes counted, for decode steps of 1 and 4 tokens
// (the decode kernels), 16 tokens (the dense GEMV's bound passed), a 40-token prefill (four-launch
// permute), a decode with a long context (the attention's split merge), the previous kernels
// (decode_kernels off), and a model with a shared expert and its gate. Per layer: the difference
// between the 3- and 2-layer models' graphs against StepCost::moe_layer_launches; per step: the
// graph's kernel nodes against StepCost::launches. On a mismatch the graph's kernel names are
// printed (a cuBLASLt GEMM of more than one kernel would show there).
#include <doctest/doctest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "mixserve/core/io.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/sim/cost_model.hpp"

using namespace mixserve;
using mixserve::gpu::GpuModel;
using mixserve::gpu::GpuModelConfig;
using mixserve::model::SequenceStep;

namespace {

ModelSpec small_qwen3(int layers) {  // GQA 4/2 heads of 64, per-head QK-norm, 8 experts top-2
  return import_hf_config(
      R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 256, "num_hidden_layers": )" +
          std::to_string(layers) + R"(, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": false})",
      "launch-qwen3/config.json");
}
ModelSpec small_qwen2(int layers) {  // MHA with QKV bias, shared expert with its sigmoid gate
  return import_hf_config(
      R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 256, "num_hidden_layers": )" +
          std::to_string(layers) + R"(, "num_attention_heads": 4, "num_key_value_heads": 4,
    "vocab_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": false, "shared_expert_intermediate_size": 128,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
      "launch-qwen2/config.json");
}

struct Case {
  const char* name;
  int seqs;
  int64_t new_tokens;  // per sequence
  int64_t position;    // tokens already in the cache per sequence
};

std::vector<SequenceStep> batch_of(const Case& c, int vocab) {
  std::vector<SequenceStep> b;
  const int64_t blocks = (c.position + c.new_tokens + 15) / 16;
  for (int s = 0; s < c.seqs; ++s) {
    SequenceStep st;
    for (int64_t t = 0; t < c.new_tokens; ++t) st.tokens.push_back(int32_t((s * 7 + t * 3) % vocab));
    st.position = c.position;
    for (int64_t k = 0; k < blocks; ++k) st.block_table.push_back(int32_t(s * blocks + k));
    b.push_back(st);
  }
  return b;
}

sim::ReplicaBatch replica_of(const Case& c) {
  sim::ReplicaBatch r;
  if (c.new_tokens == 1) {
    r.num_decode = c.seqs;
    r.decode_context = int64_t(c.seqs) * (c.position + 1);
  } else {
    r.num_prefill_seqs = c.seqs;
    r.prefill_tokens = int64_t(c.seqs) * c.new_tokens;
    const double len = double(c.new_tokens);
    r.prefill_attn_pairs = c.seqs * len * (double(c.position) + (len + 1) / 2);
  }
  return r;
}

// Kernel nodes of one captured step (the step is enqueued once uncaptured first: lazy cuBLASLt
// plans). names: the kernels' names, in node order.
int count_kernels(GpuModel& g, const std::vector<SequenceStep>& batch, std::vector<std::string>* names) {
  gpu::Stream stream(0);
  cudaStream_t s = stream.get();
  g.prepare(batch, {});
  g.enqueue(s);
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph = nullptr;
  MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  g.enqueue(s);
  MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  size_t n = 0;
  MIXSERVE_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  MIXSERVE_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &n));
  int kernels = 0;
  for (auto node : nodes) {
    cudaGraphNodeType t;
    MIXSERVE_CUDA_CHECK(cudaGraphNodeGetType(node, &t));
    if (t != cudaGraphNodeTypeKernel) {
      if (names) names->push_back(std::string("(node type ") + std::to_string(int(t)) + ")");
      continue;
    }
    ++kernels;
    if (names) {
      cudaKernelNodeParams kp{};
      const char* nm = nullptr;
      if (cudaGraphKernelNodeGetParams(node, &kp) == cudaSuccess && kp.func != nullptr &&
          cudaFuncGetName(&nm, kp.func) == cudaSuccess && nm != nullptr)
        names->push_back(nm);
      else
        names->push_back("?");
      cudaGetLastError();
    }
  }
  MIXSERVE_CUDA_CHECK(cudaGraphDestroy(graph));
  return kernels;
}

sim::StepCost predicted(const ModelSpec& m, const Case& c, bool decode_kernels) {
  HardwareProfile p = load_profile("h200");
  int sms = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  p.sm_count = sms;  // the attention's split choice depends on it
  ClusterSpec cl;
  cl.name = "one-gpu";
  cl.num_nodes = 1;
  cl.gpus_per_node = 1;
  cl.gpu_model = p.gpu;
  cl.gpu_memory_GiB = p.memory_GiB;
  cl.intra = {"nvlink4", 450.0, 2.0};
  cl.inter = {"none", 50.0, 5.0};
  Layout l;
  sim::CostModelOptions opt;
  opt.decode_kernels = decode_kernels;
  auto cm = sim::make_cost_model("mixserve", m, cl, p, l, opt);
  const std::vector<sim::ReplicaBatch> b{replica_of(c)};
  return cm->step(b, false);
}

void check_model(ModelSpec (*make)(int), const Case& c, bool decode_kernels) {
  GpuModelConfig cfg;
  cfg.decode_kernels = decode_kernels;
  cfg.num_blocks = 256;
  const ModelSpec m2 = make(2), m3 = make(3);
  GpuModel g2(m2, 1, cfg), g3(m3, 1, cfg);
  std::vector<std::string> names;
  const int k2 = count_kernels(g2, batch_of(c, int(m2.vocab_size)), &names);
  const int k3 = count_kernels(g3, batch_of(c, int(m3.vocab_size)), nullptr);
  const sim::StepCost p2 = predicted(m2, c, decode_kernels), p3 = predicted(m3, c, decode_kernels);
  INFO(m2.architecture << " " << c.name << " decode_kernels=" << decode_kernels << ": graph kernels 2 layers "
                       << k2 << ", 3 layers " << k3 << "; cost model " << p2.launches << " / " << p3.launches
                       << ", per MoE layer " << p2.moe_layer_launches);
  std::string list;
  for (const auto& n : names) list += "  " + n + "\n";
  INFO("2-layer graph nodes:\n" << list);
  std::printf("%s %s decode_kernels=%d: per layer graph %d, cost model %.0f; step graph %d, cost model %.0f\n",
              m2.architecture.c_str(), c.name, int(decode_kernels), k3 - k2, p2.moe_layer_launches, k2, p2.launches);
  CHECK(double(k3 - k2) == p3.moe_layer_launches);
  CHECK(double(k2) == p2.launches);
  CHECK(double(k3) == p3.launches);
}

const Case kCases[] = {
    {"decode b=1", 1, 1, 20},  {"decode b=4", 4, 1, 20},    {"decode b=16", 16, 1, 20},
    {"prefill 40", 1, 40, 0},  {"decode b=1 ctx 300", 1, 1, 300},
};

}  // namespace

TEST_CASE("launches: Qwen3-MoE, decode kernels on (the executor's default)") {
  for (const Case& c : kCases) check_model(small_qwen3, c, true);
}

TEST_CASE("launches: Qwen3-MoE, previous kernels (decode_kernels off, as a sharded model)") {
  for (const Case& c : kCases) check_model(small_qwen3, c, false);
}

TEST_CASE("launches: Qwen2-MoE (QKV bias, shared expert with gate)") {
  for (const Case& c : kCases) {
    check_model(small_qwen2, c, true);
    check_model(small_qwen2, c, false);
  }
}
