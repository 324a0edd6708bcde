// Rank map properties for every legal layout of several clusters (layout.hpp conventions).
#include <doctest/doctest.h>

#include <set>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/planner/search.hpp"

using namespace mixserve;

namespace {
ModelSpec model(int experts, int layers) {
  ModelSpec m;
  m.name = "test";
  m.num_layers = layers;
  m.attention.type = AttentionType::mla;
  m.attention.num_heads = 128;
  m.moe.num_experts = experts;
  m.moe.top_k = 2;
  m.moe.expert_intermediate_size = 2048;
  m.layers.assign(static_cast<size_t>(layers), LayerSpec{});
  return m;
}
}  // namespace

TEST_CASE("stage layer ranges: contiguous, cover every layer, remainder to early stages") {
  // 61 layers over 4 stages: 61 = 4*15 + 1 -> 16, 15, 15, 15.
  const auto r = stage_layer_ranges(61, 4);
  REQUIRE(r.size() == 4);
  CHECK(r[0] == std::pair{0, 16});
  CHECK(r[1] == std::pair{16, 31});
  CHECK(r[3] == std::pair{46, 61});
  for (int layers : {1, 3, 7, 61, 94})
    for (int pp : {1, 2, 4, 8}) {
      if (pp > layers) continue;
      const auto s = stage_layer_ranges(layers, pp);
      REQUIRE(s.size() == static_cast<size_t>(pp));
      CHECK(s.front().first == 0);
      CHECK(s.back().second == layers);
      for (size_t i = 1; i < s.size(); ++i) {
        CHECK(s[i].first == s[i - 1].second);
        const int a = s[i - 1].second - s[i - 1].first, b = s[i].second - s[i].first;
        CHECK(a >= b);
        CHECK(a - b <= 1);
      }
    }
}

TEST_CASE("rank map properties over every enumerated layout") {
  for (auto [nodes, gpus] : {std::pair{1, 8}, std::pair{2, 8}, std::pair{4, 8}, std::pair{2, 4}}) {
    ClusterSpec c;
    c.num_nodes = nodes;
    c.gpus_per_node = gpus;
    const ModelSpec m = model(64, 7);
    for (const Layout& l : planner::enumerate_layouts(c.world_size())) {
      if (planner::first_structural_failure(m, c, l)) continue;
      CAPTURE(l.name());
      CAPTURE(nodes);
      const auto map = build_rank_map(c, m, l);
      REQUIRE(map.size() == static_cast<size_t>(c.world_size()));
      // Every (node, gpu) exactly once.
      std::set<std::pair<int, int>> seen;
      for (const auto& r : map) {
        CHECK(r.node < nodes);
        CHECK(r.local_gpu < gpus);
        seen.insert({r.node, r.local_gpu});
      }
      CHECK(seen.size() == map.size());
      const int stage = l.stage_size();
      for (int s = 0; s < l.pp; ++s) {
        // TP groups (attention and MoE) sit inside one node whenever tp <= G.
        for (const auto& r : map) {
          if (r.pp_stage != s) continue;
          for (const auto& q : map) {
            if (q.pp_stage != s) continue;
            if (l.attn_tp <= gpus && q.attn_dp_rank == r.attn_dp_rank) CHECK(q.node == r.node);
            if (l.moe_tp <= gpus && q.moe_ep_rank == r.moe_ep_rank) CHECK(q.node == r.node);
          }
        }
        // Each MoE TP index forms one EP group: together they own every expert exactly once.
        for (int t = 0; t < l.moe_tp; ++t) {
          std::vector<int> owned(static_cast<size_t>(m.moe.num_experts), 0);
          int members = 0;
          for (const auto& r : map) {
            if (r.pp_stage != s || r.moe_tp_rank != t) continue;
            ++members;
            for (int e = r.expert_begin; e < r.expert_end; ++e) ++owned[static_cast<size_t>(e)];
          }
          CHECK(members == l.moe_ep);
          for (int o : owned) CHECK(o == 1);
        }
        // Coordinates are in range and each (attn_tp, attn_dp) pair appears once per stage.
        std::set<std::pair<int, int>> attn, moe;
        for (const auto& r : map) {
          if (r.pp_stage != s) continue;
          CHECK(r.attn_tp_rank < l.attn_tp);
          CHECK(r.attn_dp_rank < l.attn_dp);
          CHECK(r.layer_begin < r.layer_end);
          attn.insert({r.attn_tp_rank, r.attn_dp_rank});
          moe.insert({r.moe_tp_rank, r.moe_ep_rank});
        }
        CHECK(attn.size() == static_cast<size_t>(stage));
        CHECK(moe.size() == static_cast<size_t>(stage));
      }
    }
  }
}

TEST_CASE("the MixServe hybrid on 2x8: TP in the node, EP across nodes, 128 experts each") {
  ClusterSpec c;
  c.num_nodes = 2;
  c.gpus_per_node = 8;
  const ModelSpec m = model(256, 61);
  Layout l;
  l.attn_tp = l.moe_tp = 8;
  l.attn_dp = l.moe_ep = 2;
  l.moe_comm = MoeComm::fused;
  CHECK(l.name() == "attn TP8xDP2 | moe TP8xEP2 | PP1 | fused");
  const auto map = build_rank_map(c, m, l);
  CHECK(map[11].node == 1);
  CHECK(map[11].local_gpu == 3);
  CHECK(map[11].moe_tp_rank == 3);
  CHECK(map[11].moe_ep_rank == 1);
  CHECK(map[11].expert_begin == 128);
  CHECK(map[11].expert_end == 256);
  CHECK(map[11].layer_end == 61);
}

TEST_CASE("build_rank_map rejects illegal layouts with InputError") {
  ClusterSpec c;
  c.num_nodes = 2;
  c.gpus_per_node = 8;
  const ModelSpec m = model(6, 4);
  Layout l;
  l.attn_tp = 8, l.attn_dp = 2, l.moe_tp = 4, l.moe_ep = 4;  // 6 experts over EP4
  CHECK_THROWS_AS(build_rank_map(c, m, l), InputError);
  l.moe_ep = 2, l.moe_tp = 8;
  CHECK_NOTHROW(build_rank_map(c, m, l));
  l.attn_tp = 3;
  CHECK_THROWS_AS(build_rank_map(c, m, l), InputError);
  l.attn_tp = 4;  // 4*2 = 8 != 16
  CHECK_THROWS_AS(build_rank_map(c, m, l), InputError);
  l.attn_tp = 8, l.pp = 8, l.attn_dp = 1, l.moe_tp = 2, l.moe_ep = 1;  // pp 8 > 4 layers... world 16
  l.attn_tp = 2;
  CHECK_THROWS_AS(build_rank_map(c, m, l), InputError);
}
