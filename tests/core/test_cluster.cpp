#include <doctest/doctest.h>

#include <algorithm>

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

using namespace mixserve;

namespace {
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

template <class Fn>
void expect_input_error(Fn fn, const std::string& origin, const std::string& key) {
  try {
    fn();
    FAIL("no InputError for key " << key);
  } catch (const InputError& e) {
    INFO(std::string(e.what()));
    CHECK(contains(e.what(), origin));
    CHECK(contains(e.what(), key));
  }
}

std::string replaced(std::string s, const std::string& from, const std::string& to) {
  const auto pos = s.find(from);
  REQUIRE(pos != std::string::npos);
  s.replace(pos, from.size(), to);
  return s;
}
}  // namespace

TEST_CASE("shipped clusters load, name an existing profile and round-trip") {
  const auto names = shipped_clusters();
  // The clusters the planner issue asks for are shipped (others may be added).
  for (const char* required : {"h20-2x8", "ascend910b-4x8", "h100-1x8", "h100-2x8", "h100-4x8",
                               "h100-8x8", "h200-1x8", "h200-2x8", "h200-4x8", "h200-8x8"}) {
    INFO(required);
    CHECK(std::find(names.begin(), names.end(), required) != names.end());
  }
  for (const auto& n : names) {
    INFO(n);
    const ClusterSpec c = load_cluster(n);
    CHECK(c.name == n);
    CHECK(c.world_size() == c.num_nodes * c.gpus_per_node);
    CHECK_NOTHROW(load_profile(c.profile));
    const ClusterSpec b = parse_cluster_yaml(cluster_to_yaml(c), n);
    CHECK(b.name == c.name);
    CHECK(b.num_nodes == c.num_nodes);
    CHECK(b.gpus_per_node == c.gpus_per_node);
    CHECK(b.gpu_model == c.gpu_model);
    CHECK(b.gpu_memory_GiB == c.gpu_memory_GiB);
    CHECK(b.intra.name == c.intra.name);
    CHECK(b.intra.bandwidth_GBps == c.intra.bandwidth_GBps);
    CHECK(b.intra.latency_us == c.intra.latency_us);
    CHECK(b.inter.name == c.inter.name);
    CHECK(b.inter.bandwidth_GBps == c.inter.bandwidth_GBps);
    CHECK(b.inter.latency_us == c.inter.latency_us);
    CHECK(b.nics_per_node == c.nics_per_node);
    CHECK(b.profile == c.profile);
  }
}

TEST_CASE("the paper's clusters and the NIC unit conversion") {
  const ClusterSpec h20 = load_cluster("h20-2x8");
  CHECK(h20.world_size() == 16);
  CHECK(h20.gpu_memory_GiB == 96);
  CHECK(h20.intra.bandwidth_GBps == 450);          // 900 GB/s bidirectional
  CHECK(h20.inter.bandwidth_GBps == 400.0 / 8);    // 400 Gb/s per NIC -> 50 GB/s
  CHECK(h20.inter_bw_per_gpu_GBps() == 50.0);      // 8 NICs shared by 8 GPUs
  const ClusterSpec asc = load_cluster("ascend910b-4x8");
  CHECK(asc.world_size() == 32);
  CHECK(asc.inter.bandwidth_GBps == 25.0);         // RoCE 200 Gb/s
  CHECK(asc.intra.bandwidth_GBps == 60.0);         // HCCS 480 Gb/s
  const ClusterSpec one = load_cluster("h200-1x8");
  CHECK(one.nics_per_node == 0);
  CHECK(one.inter_bw_per_gpu_GBps() == 0.0);
  CHECK(load_cluster("h100-8x8").world_size() == 64);
}

TEST_CASE("cluster reader: non-power-of-two GPU counts allowed, bad sizes rejected") {
  const std::string good = cluster_to_yaml(load_cluster("h200-2x8"));
  const ClusterSpec odd = parse_cluster_yaml(replaced(good, "nodes: 2", "nodes: 3"), "odd.yaml");
  CHECK(odd.world_size() == 24);
  expect_input_error([&] { parse_cluster_yaml(replaced(good, "nodes: 2", "nodes: 0"), "c.yaml"); },
                     "c.yaml", "nodes");
  expect_input_error(
      [&] { parse_cluster_yaml(replaced(good, "gpus_per_node: 8", "gpus_per_node: -8"), "c.yaml"); },
      "c.yaml", "gpus_per_node");
  expect_input_error(
      [&] { parse_cluster_yaml(replaced(good, "bandwidth_Gbps: 400", "bandwidth_Gbps: fast"), "c.yaml"); },
      "c.yaml", "inter_node.bandwidth_Gbps");
  expect_input_error(
      [&] { parse_cluster_yaml(replaced(good, "memory_GiB: 140.4", "memory_GiB: 0"), "c.yaml"); },
      "c.yaml", "gpu.memory_GiB");
  // Two nodes need the inter-node block.
  const auto cut = good.substr(0, good.find("inter_node:")) + "profile: h200-datasheet\n";
  expect_input_error([&] { parse_cluster_yaml(cut, "c.yaml"); }, "c.yaml", "inter_node");
  expect_input_error([&] { parse_cluster_yaml(replaced(good, "profile:", "profiel:"), "c.yaml"); },
                     "c.yaml", "profiel");
  expect_input_error([&] { load_cluster("h300-9x8"); }, "h300-9x8", "h200-2x8");
  expect_input_error([&] { load_cluster("/nonexistent/cluster.yaml"); }, "/nonexistent/cluster.yaml",
                     "not found");
}
