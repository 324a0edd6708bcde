// Cluster specification: nodes, GPUs, links. Bandwidths are per GPU (or per NIC) per direction.
#pragma once
#include <string>

namespace mixserve {

struct LinkSpec {
  std::string name;          // "nvlink4", "infiniband-ndr", "roce", "hccs"
  double bandwidth_GBps = 0; // bytes/s / 1e9, per direction (per GPU for intra, per NIC for inter)
  double latency_us = 0;     // one-way small-message latency
};

struct ClusterSpec {
  std::string name;
  int num_nodes = 1;
  int gpus_per_node = 1;
  std::string gpu_model;     // "H200", "H20", "Ascend-910B"
  double gpu_memory_GiB = 0; // per GPU, as the device reports it
  LinkSpec intra;            // NVLink / HCCS, per GPU per direction
  LinkSpec inter;            // per NIC per direction
  int nics_per_node = 0;     // 0 when num_nodes == 1
  std::string profile;       // hardware profile name or path

  int world_size() const { return num_nodes * gpus_per_node; }
  // Inter-node bandwidth one GPU can use when all GPUs of the node send at once.
  double inter_bw_per_gpu_GBps() const {
    return gpus_per_node > 0 ? inter.bandwidth_GBps * nics_per_node / gpus_per_node : 0.0;
  }
};

}  // namespace mixserve
