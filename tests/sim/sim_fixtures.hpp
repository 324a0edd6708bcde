// Specs built in code for the simulator tests and benchmark, so they do not depend on the
// shipped YAML files. Numbers: DeepSeek-R1 config.json (huggingface.co/deepseek-ai/DeepSeek-R1),
// H200 SXM datasheet (989 bf16 / 1979 fp8 dense TFLOP/s, 4.8 TB/s HBM3e, 141 GB), NVLink4
// 450 GB/s per direction, ConnectX-7 400 Gb/s = 50 GB/s per NIC, 8 NICs per node.
#pragma once
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"

namespace mixserve::test {

inline ModelSpec deepseek_r1() {
  ModelSpec m;
  m.name = "deepseek-r1";
  m.architecture = "DeepseekV3ForCausalLM";
  m.hidden_size = 7168;
  m.num_layers = 61;
  m.vocab_size = 129280;
  m.dense_intermediate_size = 18432;
  m.attention.type = AttentionType::mla;
  m.attention.num_heads = 128;
  m.attention.num_kv_heads = 128;
  m.attention.head_dim = 192;
  m.attention.q_lora_rank = 1536;
  m.attention.kv_lora_rank = 512;
  m.attention.qk_nope_head_dim = 128;
  m.attention.qk_rope_head_dim = 64;
  m.attention.v_head_dim = 128;
  m.moe.num_experts = 256;
  m.moe.top_k = 8;
  m.moe.expert_intermediate_size = 2048;
  m.moe.num_shared_experts = 1;
  m.moe.shared_intermediate_size = 2048;
  m.moe.scoring = Scoring::sigmoid;
  m.layers.assign(61, LayerSpec{});
  for (int i = 0; i < 3; ++i) m.layers[size_t(i)].moe = false;
  m.weight_dtype = DType::fp8_block;
  m.expert_weight_dtype = DType::fp8_block;
  m.max_position_embeddings = 163840;
  return m;
}

// Qwen3-235B-A22B: GQA 64 heads / 4 KV heads, 94 MoE layers, 128 experts top-8.
inline ModelSpec qwen3_235b() {
  ModelSpec m;
  m.name = "qwen3-235b-a22b";
  m.hidden_size = 4096;
  m.num_layers = 94;
  m.vocab_size = 151936;
  m.attention.type = AttentionType::gqa;
  m.attention.num_heads = 64;
  m.attention.num_kv_heads = 4;
  m.attention.head_dim = 128;
  m.attention.qk_norm = true;
  m.moe.num_experts = 128;
  m.moe.top_k = 8;
  m.moe.expert_intermediate_size = 1536;
  m.layers.assign(94, LayerSpec{});
  return m;
}

inline HardwareProfile h200_datasheet(double launch_us = 3.0) {
  HardwareProfile p;
  p.name = "h200-test";
  p.gpu = "H200";
  p.source = "datasheet";
  p.sm_count = 132;
  p.memory_GiB = 141.0 * 1e9 / 1073741824.0;
  p.peak_tflops_bf16 = 989;
  p.peak_tflops_fp8 = 1979;
  p.peak_tflops_fp32 = 67;
  p.mem_bw_GBps = 4800;
  p.gemm_efficiency = 0.7;
  p.mem_efficiency = 0.8;
  p.kernel_launch_us = launch_us;
  return p;
}

inline ClusterSpec h200_cluster(int nodes, int gpus = 8) {
  ClusterSpec c;
  c.name = "h200-test";
  c.num_nodes = nodes;
  c.gpus_per_node = gpus;
  c.gpu_model = "H200";
  c.gpu_memory_GiB = 141.0 * 1e9 / 1073741824.0;
  c.intra = {"nvlink4", 450.0, 2.0};
  c.inter = {"infiniband-ndr", 50.0, 5.0};
  c.nics_per_node = nodes > 1 ? gpus : 0;
  return c;
}

inline Layout layout(int attn_tp, int attn_dp, int moe_tp, int moe_ep, int pp, MoeComm comm) {
  Layout l;
  l.attn_tp = attn_tp;
  l.attn_dp = attn_dp;
  l.moe_tp = moe_tp;
  l.moe_ep = moe_ep;
  l.pp = pp;
  l.moe_comm = comm;
  return l;
}

// Every legal layout of `m` on `world` GPUs with degrees powers of two (the planner's space).
inline std::vector<Layout> all_layouts(const ModelSpec& m, int world) {
  std::vector<Layout> out;
  for (int pp = 1; pp <= world && pp <= m.num_layers; pp *= 2) {
    const int S = world / pp;
    for (int at = 1; at <= S; at *= 2) {
      if (m.attention.num_heads % at != 0) continue;
      for (int mt = 1; mt <= S; mt *= 2) {
        const int ep = S / mt;
        if (m.moe.num_experts % ep != 0 || m.moe.expert_intermediate_size % mt != 0) continue;
        const MoeComm comms[] = {MoeComm::tp_allreduce, MoeComm::nccl_a2a, MoeComm::rs_a2a_ag,
                                 MoeComm::fused};
        for (MoeComm c : comms) {
          if ((ep == 1) != (c == MoeComm::tp_allreduce)) continue;
          out.push_back(layout(at, S / at, mt, ep, pp, c));
        }
      }
    }
  }
  return out;
}

}  // namespace mixserve::test
