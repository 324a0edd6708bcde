// Cluster files (configs/clusters/<name>.yaml). Schema (version 1):
//   version, name, nodes, gpus_per_node, gpu {model, memory_GiB},
//   intra_node {link, bandwidth_GBps (gigaBYTES/s per GPU per direction), latency_us},
//   inter_node {link, nics_per_node, bandwidth_Gbps (gigaBITS/s per NIC per direction, as NIC
//               vendors quote it; stored as GB/s = Gbps / 8), latency_us}   (required if nodes > 1)
//   profile (hardware profile name or path).
// GPU counts need not be powers of two (the planner rejects layouts that do not divide them).
#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "yaml_util.hpp"

namespace mixserve {

using detail::fmt_num;
using detail::YamlMap;

namespace {
constexpr double kBitsPerByte = 8.0;
}

ClusterSpec parse_cluster_yaml(const std::string& text, const std::string& origin) {
  const YamlMap root(detail::yaml_parse(text, origin), origin, "");
  root.allow_keys({"version", "name", "nodes", "gpus_per_node", "gpu", "intra_node", "inter_node",
                   "profile"});
  if (root.has("version") && root.integer("version") != 1)
    root.fail("version", "1", std::to_string(root.integer("version")));
  ClusterSpec c;
  c.name = root.str("name");
  c.num_nodes = root.positive_int("nodes");
  c.gpus_per_node = root.positive_int("gpus_per_node");

  const YamlMap gpu = root.map("gpu");
  gpu.allow_keys({"model", "memory_GiB"});
  c.gpu_model = gpu.str("model");
  c.gpu_memory_GiB = gpu.positive_num("memory_GiB");

  const YamlMap intra = root.map("intra_node");
  intra.allow_keys({"link", "bandwidth_GBps", "latency_us"});
  c.intra.name = intra.str("link");
  c.intra.bandwidth_GBps = intra.positive_num("bandwidth_GBps");
  c.intra.latency_us = intra.nonneg_num("latency_us", 0.0);

  if (root.has("inter_node")) {
    const YamlMap inter = root.map("inter_node");
    inter.allow_keys({"link", "nics_per_node", "bandwidth_Gbps", "latency_us"});
    c.inter.name = inter.str("link");
    c.nics_per_node = inter.positive_int("nics_per_node");
    c.inter.bandwidth_GBps = inter.positive_num("bandwidth_Gbps") / kBitsPerByte;
    c.inter.latency_us = inter.nonneg_num("latency_us", 0.0);
  } else if (c.num_nodes > 1) {
    root.fail("inter_node", "a map {link, nics_per_node, bandwidth_Gbps, latency_us} when nodes > 1",
              "missing");
  }
  c.profile = root.str("profile");
  return c;
}

std::string cluster_to_yaml(const ClusterSpec& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "version" << YAML::Value << 1;
  out << YAML::Key << "name" << YAML::Value << c.name;
  out << YAML::Key << "nodes" << YAML::Value << c.num_nodes;
  out << YAML::Key << "gpus_per_node" << YAML::Value << c.gpus_per_node;
  out << YAML::Key << "gpu" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << c.gpu_model;
  out << YAML::Key << "memory_GiB" << YAML::Value << fmt_num(c.gpu_memory_GiB);
  out << YAML::EndMap;
  out << YAML::Key << "intra_node" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "link" << YAML::Value << c.intra.name;
  out << YAML::Key << "bandwidth_GBps" << YAML::Value << fmt_num(c.intra.bandwidth_GBps);
  out << YAML::Key << "latency_us" << YAML::Value << fmt_num(c.intra.latency_us);
  out << YAML::EndMap;
  if (c.nics_per_node > 0) {
    out << YAML::Key << "inter_node" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "link" << YAML::Value << c.inter.name;
    out << YAML::Key << "nics_per_node" << YAML::Value << c.nics_per_node;
    out << YAML::Key << "bandwidth_Gbps" << YAML::Value
        << fmt_num(c.inter.bandwidth_GBps * kBitsPerByte);
    out << YAML::Key << "latency_us" << YAML::Value << fmt_num(c.inter.latency_us);
    out << YAML::EndMap;
  }
  out << YAML::Key << "profile" << YAML::Value << c.profile;
  out << YAML::EndMap;
  if (!out.good()) throw RuntimeError(fmt::format("cluster_to_yaml: {}", out.GetLastError()));
  return std::string(out.c_str()) + "\n";
}

std::vector<std::string> shipped_clusters() { return detail::list_shipped("configs/clusters"); }

ClusterSpec load_cluster(const std::string& name_or_path) {
  const auto path = detail::resolve_shipped(name_or_path, "configs/clusters", "cluster");
  return parse_cluster_yaml(read_text_file(path), path.string());
}

}  // namespace mixserve
