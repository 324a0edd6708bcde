// Builders of the MoE communication schedules (comm_schedule.hpp, docs/comm-schedules.md).
#include "mixserve/sim/comm_schedule.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {
namespace {

constexpr const char* kWhere = "comm schedule";

int mod(int a, int n) { return ((a % n) + n) % n; }

void require(bool ok, const std::string& key, const std::string& expected, const std::string& got) {
  if (!ok) throw_input_error(kWhere, key, expected, got);
}

void check_common(const CommGeometry& g) {
  require(g.num_ranks >= 1, "num_ranks", ">= 1", std::to_string(g.num_ranks));
  require(g.gpus_per_node >= 1, "gpus_per_node", ">= 1", std::to_string(g.gpus_per_node));
  require(g.hidden >= 1, "hidden", ">= 1", std::to_string(g.hidden));
  require(g.top_k >= 1, "top_k", ">= 1", std::to_string(g.top_k));
  require(g.elem_bytes > 0, "elem_bytes", "> 0", std::to_string(g.elem_bytes));
  require(g.moe_tp >= 1 && g.moe_ep >= 1 && g.moe_tp * g.moe_ep == g.num_ranks, "moe_tp*moe_ep",
          "== num_ranks (" + std::to_string(g.num_ranks) + ")",
          std::to_string(g.moe_tp) + "*" + std::to_string(g.moe_ep));
  require(g.attn_tp >= 1 && g.attn_dp >= 1 && g.attn_tp * g.attn_dp == g.num_ranks,
          "attn_tp*attn_dp", "== num_ranks (" + std::to_string(g.num_ranks) + ")",
          std::to_string(g.attn_tp) + "*" + std::to_string(g.attn_dp));
  require(g.num_experts >= 1 && g.num_experts % g.moe_ep == 0, "num_experts",
          "a positive multiple of moe_ep (" + std::to_string(g.moe_ep) + ")",
          std::to_string(g.num_experts));
}

void check_routing(const CommGeometry& g, std::span<const ReplicaRouting> routing, int replicas) {
  require(static_cast<int>(routing.size()) == replicas, "routing",
          "one table per attention replica (" + std::to_string(replicas) + ")",
          std::to_string(routing.size()));
  for (size_t q = 0; q < routing.size(); ++q) {
    const auto& rt = routing[q];
    const std::string key = "routing[" + std::to_string(q) + "]";
    const size_t slots = static_cast<size_t>(rt.num_tokens) * g.top_k;
    require(rt.num_tokens >= 0, key + ".num_tokens", ">= 0", std::to_string(rt.num_tokens));
    require(rt.topk_ids.size() == slots, key + ".topk_ids", std::to_string(slots) + " entries",
            std::to_string(rt.topk_ids.size()));
    require(rt.topk_weights.size() == slots, key + ".topk_weights",
            std::to_string(slots) + " entries", std::to_string(rt.topk_weights.size()));
    for (size_t i = 0; i < slots; ++i)
      if (rt.topk_ids[i] < -1 || rt.topk_ids[i] >= g.num_experts)
        require(false, key + ".topk_ids[" + std::to_string(i) + "]",
                "an expert id in [-1, " + std::to_string(g.num_experts) + ")",
                std::to_string(rt.topk_ids[i]));
  }
}

// (T-1)/T of `rows` full rows: what one rank sends in an all-gather or reduce-scatter over T.
double collective_bytes(const CommGeometry& g, int64_t rows, int group_size) {
  return static_cast<double>(rows) * g.hidden * g.elem_bytes * (group_size - 1) / group_size;
}

void add_bytes(RankRoundBytes& b, bool inter, double bytes) {
  (inter ? b.inter_bytes : b.intra_bytes) += bytes;
}

RoundBytesSummary summarize(const std::vector<const RankRoundBytes*>& per_rank) {
  RoundBytesSummary s;
  if (per_rank.empty()) return s;
  for (const auto* b : per_rank) {
    s.inter_bytes_max = std::max(s.inter_bytes_max, b->inter_bytes);
    s.intra_bytes_max = std::max(s.intra_bytes_max, b->intra_bytes);
    s.inter_bytes_mean += b->inter_bytes;
    s.intra_bytes_mean += b->intra_bytes;
  }
  s.inter_bytes_mean /= static_cast<double>(per_rank.size());
  s.intra_bytes_mean /= static_cast<double>(per_rank.size());
  return s;
}

}  // namespace

CommGeometry make_comm_geometry(const ClusterSpec& c, const ModelSpec& m, const Layout& l) {
  CommGeometry g;
  g.num_ranks = l.stage_size();
  g.gpus_per_node = c.gpus_per_node;
  g.attn_tp = l.attn_tp;
  g.attn_dp = l.attn_dp;
  g.moe_tp = l.moe_tp;
  g.moe_ep = l.moe_ep;
  g.num_experts = m.moe.num_experts;
  g.top_k = m.moe.top_k;
  g.hidden = m.hidden_size;
  g.elem_bytes = dtype_bytes(m.activation_dtype);
  g.shared_expert = m.moe.has_shared_expert();
  check_common(g);
  return g;
}

// ----------------------------------------------------------------------------- fused

FusedSchedule build_fused_schedule(const CommGeometry& geo,
                                   std::span<const ReplicaRouting> routing) {
  check_common(geo);
  require(geo.attn_tp == geo.moe_tp && geo.attn_dp == geo.moe_ep, "attn_tp/attn_dp",
          "attn_tp == moe_tp and attn_dp == moe_ep (fused schedule, d_DP == d_EP)",
          std::to_string(geo.attn_tp) + "/" + std::to_string(geo.attn_dp));
  require(geo.hidden % geo.moe_tp == 0, "hidden",
          "a multiple of moe_tp (" + std::to_string(geo.moe_tp) + ")", std::to_string(geo.hidden));
  require(geo.gpus_per_node % geo.moe_tp == 0, "moe_tp",
          "a divisor of gpus_per_node (" + std::to_string(geo.gpus_per_node) +
              "): a TP group inside one node",
          std::to_string(geo.moe_tp));
  check_routing(geo, routing, geo.moe_ep);

  FusedSchedule s;
  s.geo = geo;
  const int Q = geo.moe_ep, T = geo.moe_tp, K = geo.top_k;
  const int epg = geo.experts_per_ep_rank();
  s.num_groups = Q;
  s.group_size = T;
  s.slice_elems = geo.hidden / T;

  // Destination group of every top-k slot (-1: empty slot), one division per slot.
  std::vector<std::vector<int32_t>> slot_group(Q);
  for (int src = 0; src < Q; ++src) {
    const auto& ids = routing[src].topk_ids;
    slot_group[src].resize(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) slot_group[src][i] = ids[i] < 0 ? -1 : ids[i] / epg;
  }

  // route[s][d]: distinct tokens of replica s with an expert in group d, ascending.
  s.route.assign(static_cast<size_t>(Q) * Q, {});
  for (int src = 0; src < Q; ++src) {
    const auto& rt = routing[src];
    std::vector<int> last_token(Q, -1);
    for (int tok = 0; tok < rt.num_tokens; ++tok) {
      if (geo.shared_expert) {  // the shared expert: every token in its own group's block 0
        last_token[src] = tok;
        s.route[static_cast<size_t>(src) * Q + src].push_back(tok);
      }
      for (int j = 0; j < K; ++j) {
        const int d = slot_group[src][static_cast<size_t>(tok) * K + j];
        if (d < 0) continue;
        if (last_token[d] != tok) {
          last_token[d] = tok;
          s.route[static_cast<size_t>(src) * Q + d].push_back(tok);
        }
      }
    }
  }

  // Expert side of each group.
  s.expert_side.resize(Q);
  for (int d = 0; d < Q; ++d) {
    ExpertSide& x = s.expert_side[d];
    x.block_row_offset.assign(Q + 1, 0);
    // Per row, its (local expert, weight) pairs in top-k slot order.
    std::vector<int32_t> row_expert;
    std::vector<double> row_weight;
    std::vector<int64_t> row_off{0};
    for (int i = 0; i < Q; ++i) {
      const int src = mod(d - i, Q);
      const auto& rt = routing[src];
      for (int32_t tok : s.route_rows(src, d)) {
        x.row_src_token.push_back(tok);
        for (int j = 0; j < K; ++j) {
          if (slot_group[src][static_cast<size_t>(tok) * K + j] != d) continue;
          const int e = rt.topk_ids[static_cast<size_t>(tok) * K + j];
          row_expert.push_back(e - d * epg);
          row_weight.push_back(rt.topk_weights[static_cast<size_t>(tok) * K + j]);
        }
        row_off.push_back(static_cast<int64_t>(row_expert.size()));
      }
      x.block_row_offset[i + 1] = static_cast<int64_t>(x.row_src_token.size());
    }
    // Group the pairs by local expert (counting sort, stable in row order).
    const int64_t rows = x.num_rows(), pairs = static_cast<int64_t>(row_expert.size());
    x.expert_pair_offset.assign(epg + 1, 0);
    for (int32_t e : row_expert) ++x.expert_pair_offset[e + 1];
    for (int e = 0; e < epg; ++e) x.expert_pair_offset[e + 1] += x.expert_pair_offset[e];
    std::vector<int64_t> fill(x.expert_pair_offset.begin(), x.expert_pair_offset.end() - 1);
    x.pair_row.assign(pairs, 0);
    x.pair_weight.assign(pairs, 0.0);
    x.row_pair_offset = row_off;
    x.row_pairs.assign(pairs, 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t p = row_off[r]; p < row_off[r + 1]; ++p) {
        const int64_t slot = fill[row_expert[p]]++;
        x.pair_row[slot] = r;
        x.pair_weight[slot] = row_weight[p];
        x.row_pairs[p] = slot;
      }
  }

  // Per-rank steps and bytes.
  const double slice_row_bytes = static_cast<double>(s.slice_elems) * geo.elem_bytes;
  s.steps.assign(geo.num_ranks, std::vector<FusedStep>(Q));
  s.final_ag_bytes.assign(geo.num_ranks, {});
  for (int r = 0; r < geo.num_ranks; ++r) {
    const int q = r / T, t = r % T;
    const int64_t home_tokens = routing[q].num_tokens;
    for (int i = 0; i < Q; ++i) {
      FusedStep& st = s.steps[r][i];
      st.round = i;
      st.send_group = mod(q + i, Q);
      st.recv_group = mod(q - i, Q);
      st.combine_send_block = mod(Q - i, Q);
      if (i > 0) {
        st.send_peer = st.send_group * T + t;
        st.recv_peer = st.recv_group * T + t;
        st.send_inter_node = geo.node_of(st.send_peer) != geo.node_of(r);
        st.recv_inter_node = geo.node_of(st.recv_peer) != geo.node_of(r);
      }
      const int64_t from_me = static_cast<int64_t>(s.route_rows(q, st.send_group).size());
      const int64_t to_me = static_cast<int64_t>(s.route_rows(st.recv_group, q).size());
      const int64_t rs_rows = static_cast<int64_t>(s.route_rows(st.send_group, q).size());
      st.combine_rs_rows = rs_rows;
      st.combine_recv_rows = static_cast<int64_t>(s.route_rows(q, st.recv_group).size());
      if (i > 0) {
        // Dispatch: rail send of round i, then the all-gather of the rows received in round i.
        st.dispatch_send_rows = from_me;
        st.dispatch_recv_rows = to_me;
        add_bytes(st.dispatch_bytes, st.send_inter_node, from_me * slice_row_bytes);
        add_bytes(st.dispatch_bytes, false, collective_bytes(geo, to_me, T));
        // Combine: the reduced slice of the rows of home send_group goes back on the rail.
        st.combine_send_rows = rs_rows;
        add_bytes(st.combine_bytes, st.send_inter_node, rs_rows * slice_row_bytes);
      }
      add_bytes(st.combine_bytes, false, collective_bytes(geo, rs_rows, T));
    }
    add_bytes(s.final_ag_bytes[r], false, collective_bytes(geo, home_tokens, T));
  }
  for (int i = 1; i < Q; ++i) s.combine_order.push_back(i);
  s.combine_order.push_back(0);
  s.dispatch_rounds.resize(Q);
  s.combine_rounds.resize(Q);
  for (int i = 0; i < Q; ++i) {
    std::vector<const RankRoundBytes*> d, c;
    for (int r = 0; r < geo.num_ranks; ++r) {
      d.push_back(&s.steps[r][i].dispatch_bytes);
      c.push_back(&s.steps[r][i].combine_bytes);
    }
    s.dispatch_rounds[i] = summarize(d);
    s.combine_rounds[i] = summarize(c);
  }
  std::vector<const RankRoundBytes*> f;
  for (const auto& b : s.final_ag_bytes) f.push_back(&b);
  s.final_ag = summarize(f);
  return s;
}

int64_t fused_capacity_rows(const CommGeometry& geo, int64_t max_tokens_per_replica) {
  return max_tokens_per_replica * geo.moe_ep;
}

// ----------------------------------------------------------------------------- EP (all-to-all)

int64_t EpRankPlan::recv_rows() const {
  int64_t n = 0;
  for (int64_t c : recv_counts) n += c;
  return n;
}

EpSchedule build_ep_schedule(const CommGeometry& geo, std::span<const ReplicaRouting> routing,
                             EpSource source) {
  check_common(geo);
  check_routing(geo, routing, geo.attn_dp);

  EpSchedule s;
  s.geo = geo;
  s.source = source;
  const int P = geo.num_ranks, A = geo.attn_tp, K = geo.top_k, T = geo.moe_tp;
  const int epr = geo.experts_per_ep_rank();
  const double row_bytes = static_cast<double>(geo.hidden) * geo.elem_bytes;
  s.ranks.resize(P);
  for (int r = 0; r < P; ++r) {
    EpRankPlan& rp = s.ranks[r];
    rp.replica = r / A;
    const auto& rt = routing[rp.replica];
    const int a = r % A;
    if (source == EpSource::split) {
      rp.token_begin = static_cast<int32_t>(static_cast<int64_t>(a) * rt.num_tokens / A);
      rp.token_end = static_cast<int32_t>(static_cast<int64_t>(a + 1) * rt.num_tokens / A);
    } else {
      rp.token_begin = 0;
      rp.token_end = rt.num_tokens;
    }
    // Bucket rows by (destination rank, local expert), keeping (token, slot) order inside.
    // Expert e lives on EP index e / epr; its member of this rank's moe-TP index m = r % T is
    // rank (e / epr) * T + m, whose bucket of local expert e % epr is at that rank * epr.
    const int m = r % T;
    auto bucket = [&](int e) { return ((e / epr) * T + m) * epr + e % epr; };
    rp.send_counts.assign(static_cast<size_t>(P) * epr, 0);
    for (int tok = rp.token_begin; tok < rp.token_end; ++tok)
      for (int j = 0; j < K; ++j) {
        const int e = rt.topk_ids[static_cast<size_t>(tok) * K + j];
        if (e >= 0) ++rp.send_counts[bucket(e)];
      }
    std::vector<int64_t> fill(rp.send_counts.size() + 1, 0);
    for (size_t b = 0; b < rp.send_counts.size(); ++b) fill[b + 1] = fill[b] + rp.send_counts[b];
    const int64_t rows = fill.back();
    rp.send_offset.assign(P + 1, 0);
    for (int d = 0; d <= P; ++d) rp.send_offset[d] = fill[static_cast<size_t>(d) * epr];
    rp.send_token.assign(rows, 0);
    rp.send_slot.assign(rows, 0);
    for (int tok = rp.token_begin; tok < rp.token_end; ++tok)
      for (int j = 0; j < K; ++j) {
        const int e = rt.topk_ids[static_cast<size_t>(tok) * K + j];
        if (e < 0) continue;
        const int64_t slot = fill[bucket(e)]++;
        rp.send_token[slot] = tok;
        rp.send_slot[slot] = j;
      }
    for (int d = 0; d < P; ++d) {
      if (d == r) continue;
      const bool inter = geo.node_of(d) != geo.node_of(r);
      const double b = (rp.send_offset[d + 1] - rp.send_offset[d]) * row_bytes;
      add_bytes(rp.dispatch_bytes, inter, b);
    }
  }
  // recv_counts[s * epr + e] of rank d = send_counts[d * epr + e] of rank s.
  for (int d = 0; d < P; ++d) {
    EpRankPlan& rp = s.ranks[d];
    rp.recv_counts.assign(static_cast<size_t>(P) * epr, 0);
    for (int src = 0; src < P; ++src)
      for (int e = 0; e < epr; ++e)
        rp.recv_counts[static_cast<size_t>(src) * epr + e] =
            s.ranks[src].send_counts[static_cast<size_t>(d) * epr + e];
  }
  // moe-TP all-gather of the received rows (dispatch) and its reduce-scatter (combine): every
  // member sends its received rows to the T - 1 others, and each other member u its partial
  // sums of u's received rows.
  // With a shared expert the members' source tokens come first (their shared-expert rows):
  // all-gathered only to the members of other attention replicas, reduce-scattered to all.
  for (EpRankPlan& rp : s.ranks) rp.shared_rows = geo.shared_expert ? rp.token_end - rp.token_begin : 0;
  for (int d = 0; d < P; ++d) {
    EpRankPlan& rp = s.ranks[d];
    const int base = (d / T) * T;
    for (int u = base; u < base + T; ++u) {
      if (u == d) rp.shared_begin = rp.gather_rows;
      rp.gather_rows += s.ranks[u].shared_rows;
    }
    rp.shared_total = rp.gather_rows;
    for (int u = base; u < base + T; ++u) {
      if (u == d) rp.gather_begin = rp.gather_rows;
      rp.gather_rows += s.ranks[u].recv_rows();
    }
    for (int u = base; u < base + T; ++u) {
      if (u == d) continue;
      const bool inter = geo.node_of(u) != geo.node_of(d);
      const EpRankPlan& up = s.ranks[u];
      const int64_t shared_ag = up.replica == rp.replica ? 0 : rp.shared_rows;
      add_bytes(rp.dispatch_bytes, inter, (rp.recv_rows() + shared_ag) * row_bytes);
      add_bytes(rp.combine_bytes, inter, (up.recv_rows() + up.shared_rows) * row_bytes);
    }
  }
  for (int d = 0; d < P; ++d) {
    EpRankPlan& rp = s.ranks[d];
    // Combine sends back what was received.
    for (int src = 0; src < P; ++src) {
      if (src == d) continue;
      int64_t n = 0;
      for (int e = 0; e < epr; ++e) n += rp.recv_counts[static_cast<size_t>(src) * epr + e];
      add_bytes(rp.combine_bytes, geo.node_of(src) != geo.node_of(d), n * row_bytes);
    }
    if (source == EpSource::split && A > 1) {
      // Final all-gather inside the attention replica: each rank sends its combined rows to
      // the A-1 others.
      const double b = static_cast<double>(rp.token_end - rp.token_begin) * row_bytes;
      for (int peer = rp.replica * A; peer < (rp.replica + 1) * A; ++peer)
        if (peer != d) add_bytes(rp.combine_bytes, geo.node_of(peer) != geo.node_of(d), b);
    }
  }
  std::vector<const RankRoundBytes*> d, c;
  for (const auto& rp : s.ranks) {
    d.push_back(&rp.dispatch_bytes);
    c.push_back(&rp.combine_bytes);
  }
  s.dispatch = summarize(d);
  s.combine = summarize(c);
  return s;
}

int64_t ep_capacity_rows(const CommGeometry& geo, int64_t max_tokens_per_replica,
                         EpSource source) {
  // After the moe-TP all-gather a rank holds every row sent to its EP index: each source token
  // (of one rank, split) sends at most min(k, E/moe_ep) rows there.
  const int64_t rows_per_token = std::min(geo.top_k, geo.experts_per_ep_rank());
  const int64_t copies = source == EpSource::replicated ? geo.attn_tp : 1;
  // Shared expert: the moe_tp members' source tokens, at most a replica's each.
  const int64_t shared = geo.shared_expert ? geo.moe_tp * max_tokens_per_replica : 0;
  return max_tokens_per_replica * geo.attn_dp * rows_per_token * copies + shared;
}

}  // namespace mixserve::sim
