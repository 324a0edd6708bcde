// Ranks-as-threads execution of the MoE communication schedules (host_exec.hpp).
#include "mixserve/sim/host_exec.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {

// ----------------------------------------------------------------------------- toy expert

namespace {
double toy_a(int m, int j) { return static_cast<double>((m + 2 * j) % 3 - 1); }
double toy_b(int e, int m, int c) { return static_cast<double>((e + m + c) % 3); }

void toy_add(int expert, int m_begin, int m_end, int c_begin, int c_end,
             std::span<const double> x, double scale, std::span<double> y) {
  const int h = static_cast<int>(x.size());
  for (int c = c_begin; c < c_end; ++c) y[c] += scale * (expert + 1) * x[c];
  for (int m = m_begin; m < m_end; ++m) {
    double u = 0;
    for (int j = 0; j < h; ++j) u += toy_a(m, j) * x[j];
    if (u == 0) continue;
    for (int c = 0; c < h; ++c) y[c] += scale * toy_b(expert, m, c) * u;
  }
}
}  // namespace

void toy_expert_full(int expert, std::span<const double> x, std::span<double> y) {
  for (double& v : y) v = 0;
  toy_add(expert, 0, kToyIntermediate, 0, static_cast<int>(x.size()), x, 1.0, y);
}

void toy_expert_partial_add(int expert, int tp_rank, int tp, std::span<const double> x,
                            double scale, std::span<double> y) {
  const int h = static_cast<int>(x.size());
  const int mi = kToyIntermediate / tp, hs = h / tp;
  toy_add(expert, tp_rank * mi, (tp_rank + 1) * mi, tp_rank * hs, (tp_rank + 1) * hs, x, scale, y);
}

std::vector<double> reference_moe(const ReplicaRouting& routing, int top_k, int hidden,
                                  std::span<const double> x, int shared_expert) {
  std::vector<double> y(static_cast<size_t>(routing.num_tokens) * hidden, 0.0), f(hidden);
  for (int tok = 0; tok < routing.num_tokens; ++tok) {
    auto xr = x.subspan(static_cast<size_t>(tok) * hidden, hidden);
    if (shared_expert >= 0) {
      toy_expert_full(shared_expert, xr, f);
      for (int c = 0; c < hidden; ++c) y[static_cast<size_t>(tok) * hidden + c] += f[c];
    }
    for (int j = 0; j < top_k; ++j) {
      const int e = routing.topk_ids[static_cast<size_t>(tok) * top_k + j];
      if (e < 0) continue;
      toy_expert_full(e, xr, f);
      const double w = routing.topk_weights[static_cast<size_t>(tok) * top_k + j];
      for (int c = 0; c < hidden; ++c) y[static_cast<size_t>(tok) * hidden + c] += w * f[c];
    }
  }
  return y;
}

// ----------------------------------------------------------------------------- transport

namespace {

using Buf = std::vector<double>;
constexpr double kPoison = std::numeric_limits<double>::quiet_NaN();

enum class Phase : int { dispatch = 0, combine = 1, counts = 2, final_all_gather = 3 };
enum class Kind : int { rail = 0, all_gather = 1, reduce_scatter = 2, final_all_gather = 3, a2a = 4 };

struct Tag {
  Phase phase;
  int round;
  Kind kind;
  auto operator<=>(const Tag&) const = default;
  std::string str() const {
    return "phase " + std::to_string(static_cast<int>(phase)) + " round " +
           std::to_string(round) + " kind " + std::to_string(static_cast<int>(kind));
  }
};

// One mailbox per destination rank, keyed by (source rank, tag). Sends never block (the
// receiver's buffer is preallocated in the real executor; here the message is moved in).
class Transport {
 public:
  Transport(const CommGeometry& geo, int rounds, double timeout_s)
      : geo_(geo), boxes_(geo.num_ranks), timeout_(timeout_s),
        dispatch_(geo.num_ranks, std::vector<RankRoundBytes>(rounds)),
        combine_(geo.num_ranks, std::vector<RankRoundBytes>(rounds)),
        final_(geo.num_ranks, std::vector<RankRoundBytes>(1)) {}

  void send(int src, int dst, Tag tag, Buf data) {
    if (tag.phase != Phase::counts) {
      auto& per_round = (tag.phase == Phase::dispatch   ? dispatch_
                         : tag.phase == Phase::combine  ? combine_
                                                        : final_)[src];
      if (tag.round < 0 || tag.round >= static_cast<int>(per_round.size()))
        throw RuntimeError("host transport: round " + std::to_string(tag.round) + " out of range");
      const double bytes = static_cast<double>(data.size()) * geo_.elem_bytes;
      // Only the sending rank's threads touch its counters, one thread per phase at a time;
      // the lock keeps the two streams of one rank apart.
      std::lock_guard lk(count_mu_);
      (geo_.node_of(src) != geo_.node_of(dst) ? per_round[tag.round].inter_bytes
                                              : per_round[tag.round].intra_bytes) += bytes;
    }
    Box& b = boxes_[dst];
    {
      std::lock_guard lk(b.mu);
      if (!b.msgs.emplace(std::make_pair(src, tag), std::move(data)).second)
        throw RuntimeError("host transport: duplicate message " + std::to_string(src) + " -> " +
                           std::to_string(dst) + " " + tag.str());
    }
    b.cv.notify_all();
  }

  Buf recv(int dst, int src, Tag tag) {
    Box& b = boxes_[dst];
    std::unique_lock lk(b.mu);
    const auto key = std::make_pair(src, tag);
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_));
    while (true) {
      if (abort_.load()) throw RuntimeError("host transport: aborted (another rank failed)");
      auto it = b.msgs.find(key);
      if (it != b.msgs.end()) {
        Buf out = std::move(it->second);
        b.msgs.erase(it);
        return out;
      }
      if (b.cv.wait_until(lk, deadline) == std::cv_status::timeout && !b.msgs.count(key))
        throw RuntimeError("host transport: rank " + std::to_string(dst) + " waited " +
                           std::to_string(timeout_) + " s for rank " + std::to_string(src) +
                           " " + tag.str());
    }
  }

  void abort() {
    abort_.store(true);
    for (auto& b : boxes_) {
      std::lock_guard lk(b.mu);
      b.cv.notify_all();
    }
  }
  bool aborted() const { return abort_.load(); }
  double timeout_s() const { return timeout_; }

  // Messages left in any mailbox after a run: a schedule that sends what nobody receives.
  size_t undelivered() {
    size_t n = 0;
    for (auto& b : boxes_) {
      std::lock_guard lk(b.mu);
      n += b.msgs.size();
    }
    return n;
  }

  std::vector<std::vector<RankRoundBytes>> take_dispatch() { return std::move(dispatch_); }
  std::vector<std::vector<RankRoundBytes>> take_combine() { return std::move(combine_); }
  std::vector<RankRoundBytes> take_final() {
    std::vector<RankRoundBytes> out;
    for (const auto& f : final_) out.push_back(f[0]);
    return out;
  }

 private:
  struct Box {
    std::mutex mu;
    std::condition_variable cv;
    std::map<std::pair<int, Tag>, Buf> msgs;
  };
  const CommGeometry& geo_;
  std::vector<Box> boxes_;
  double timeout_;
  std::atomic<bool> abort_{false};
  std::mutex count_mu_;
  std::vector<std::vector<RankRoundBytes>> dispatch_, combine_, final_;
};

// Per-rank completion flags between its two streams (the CUDA events of the GPU executor).
class Flags {
 public:
  Flags(int n, Transport& tr) : done_(n, false), tr_(tr) {}
  void set(int i) {
    {
      std::lock_guard lk(mu_);
      done_[i] = true;
    }
    cv_.notify_all();
  }
  void wait(int i) {
    std::unique_lock lk(mu_);
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(tr_.timeout_s()));
    while (!done_[i]) {
      if (tr_.aborted()) throw RuntimeError("host executor: aborted (another rank failed)");
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && !done_[i])
        throw RuntimeError("host executor: stream flag " + std::to_string(i) + " never set");
    }
  }
  void abort_wake() { cv_.notify_all(); }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> done_;
  Transport& tr_;
};

// Runs fn(rank, stream) on n_ranks * streams threads; the first failure aborts the transport
// (waking every waiter) and is rethrown with the rank that raised it.
template <class Fn>
void run_threads(Transport& tr, int n_ranks, int streams, Fn&& fn,
                 const std::vector<Flags*>& flags = {}) {
  std::mutex err_mu;
  std::exception_ptr first;
  std::string where;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n_ranks) * streams);
  for (int r = 0; r < n_ranks; ++r)
    for (int st = 0; st < streams; ++st)
      threads.emplace_back([&, r, st] {
        try {
          fn(r, st);
        } catch (...) {
          {
            std::lock_guard lk(err_mu);
            if (!first) {
              first = std::current_exception();
              where = "rank " + std::to_string(r) + " stream " + std::to_string(st);
            }
          }
          tr.abort();
          for (Flags* f : flags) f->abort_wake();
        }
      });
  for (auto& t : threads) t.join();
  if (first) {
    try {
      std::rethrow_exception(first);
    } catch (const std::exception& e) {
      throw RuntimeError("host executor, " + where + ": " + e.what());
    }
  }
  if (size_t n = tr.undelivered(); n != 0)
    throw RuntimeError("host executor: " + std::to_string(n) + " messages never received");
}

void check_inputs(const CommGeometry& g, std::span<const ReplicaRouting> routing,
                  std::span<const std::vector<double>> inputs) {
  if (inputs.size() != routing.size())
    throw_input_error("host executor", "inputs",
                      "one table per replica (" + std::to_string(routing.size()) + ")",
                      std::to_string(inputs.size()));
  for (size_t q = 0; q < inputs.size(); ++q)
    if (inputs[q].size() != static_cast<size_t>(routing[q].num_tokens) * g.hidden)
      throw_input_error("host executor", "inputs[" + std::to_string(q) + "]",
                        "num_tokens * hidden = " +
                            std::to_string(static_cast<int64_t>(routing[q].num_tokens) * g.hidden) +
                            " elements",
                        std::to_string(inputs[q].size()));
}

}  // namespace

// ----------------------------------------------------------------------------- fused

HostExecResult run_fused_on_host(const FusedSchedule& s, std::span<const ReplicaRouting> routing,
                                 std::span<const std::vector<double>> inputs, double timeout_s) {
  const CommGeometry& g = s.geo;
  check_inputs(g, routing, inputs);
  const int P = g.num_ranks, Q = s.num_groups, T = s.group_size, h = g.hidden;
  const int hs = s.slice_elems, epg = g.experts_per_ep_rank();
  if (kToyIntermediate % T != 0)
    throw_input_error("host executor", "moe_tp",
                      "a divisor of the toy expert's width " + std::to_string(kToyIntermediate),
                      std::to_string(T));

  Transport tr(g, Q, timeout_s);
  struct RankState {
    Buf x;                 // [n_q, h] the replica's tokens (replicated input)
    Buf xr;                // [rows, h] dispatch receive buffer (expert side)
    Buf partial;           // [rows, h] folded, weighted partial sums of this TP rank
    std::vector<Buf> red;  // per combine round i: [rs_rows, h/T] reduced slice t
    Buf y_slice;           // [n_q, h/T] home slice accumulator
    Buf y;                 // [n_q, h] output after the final all-gather
  };
  std::vector<RankState> st(P);
  std::vector<std::unique_ptr<Flags>> dflags, cflags;
  std::vector<Flags*> all_flags;
  for (int r = 0; r < P; ++r) {
    const int q = r / T;
    const int64_t rows = s.expert_side[q].num_rows(), n = routing[q].num_tokens;
    st[r].x = inputs[q];
    st[r].xr.assign(rows * h, kPoison);
    st[r].partial.assign(rows * h, 0.0);
    st[r].red.resize(Q);
    st[r].y_slice.assign(n * hs, 0.0);
    st[r].y.assign(n * h, kPoison);
    dflags.push_back(std::make_unique<Flags>(Q, tr));
    cflags.push_back(std::make_unique<Flags>(Q + 1, tr));  // [Q]: all scatter-adds done
    all_flags.push_back(dflags.back().get());
    all_flags.push_back(cflags.back().get());
  }

  // [rows_idx.size(), h/T]: columns [col0, col0 + h/T) of the chosen rows of src [*, src_h].
  auto slice_rows = [hs](const Buf& src, int src_h, std::span<const int64_t> rows_idx, int col0) {
    Buf out(rows_idx.size() * hs);
    for (size_t i = 0; i < rows_idx.size(); ++i)
      for (int c = 0; c < hs; ++c)
        out[i * hs + c] = src[static_cast<size_t>(rows_idx[i]) * src_h + col0 + c];
    return out;
  };
  auto expect_size = [](const Buf& b, int64_t n, const char* what, int round) {
    if (static_cast<int64_t>(b.size()) != n)
      throw RuntimeError(std::string(what) + " round " + std::to_string(round) + ": got " +
                         std::to_string(b.size()) + " elements, expected " + std::to_string(n));
  };

  // Stream 0 ("inter"): the rail rounds of dispatch and combine and the home scatter-add.
  auto inter_stream = [&](int r) {
    const int q = r / T, t = r % T;
    RankState& rs = st[r];
    const ExpertSide& xs = s.expert_side[q];
    for (int i = 1; i < Q; ++i) {
      const FusedStep& fs = s.steps[r][i];
      const auto& rows = s.route_rows(q, fs.send_group);
      const std::vector<int64_t> idx(rows.begin(), rows.end());
      tr.send(r, fs.send_peer, {Phase::dispatch, i, Kind::rail}, slice_rows(rs.x, h, idx, t * hs));
      const Buf in = tr.recv(r, fs.recv_peer, {Phase::dispatch, i, Kind::rail});
      const int64_t r0 = xs.block_row_offset[i], n = xs.block_row_offset[i + 1] - r0;
      expect_size(in, n * hs, "dispatch rail", i);
      for (int64_t k = 0; k < n; ++k)
        for (int c = 0; c < hs; ++c) rs.xr[(r0 + k) * h + t * hs + c] = in[k * hs + c];
      dflags[r]->set(i);
    }
    for (int i : s.combine_order) {
      const FusedStep& fs = s.steps[r][i];
      cflags[r]->wait(i);
      Buf in;
      if (i == 0) {
        in = std::move(rs.red[0]);
      } else {
        tr.send(r, fs.send_peer, {Phase::combine, i, Kind::rail}, std::move(rs.red[i]));
        in = tr.recv(r, fs.recv_peer, {Phase::combine, i, Kind::rail});
      }
      const auto& home_rows = s.route_rows(q, fs.recv_group);
      expect_size(in, static_cast<int64_t>(home_rows.size()) * hs, "combine rail", i);
      for (size_t k = 0; k < home_rows.size(); ++k)
        for (int c = 0; c < hs; ++c)
          rs.y_slice[static_cast<size_t>(home_rows[k]) * hs + c] += in[k * hs + c];
    }
    cflags[r]->set(Q);
  };

  // Stream 1 ("intra"): dispatch all-gathers, the experts, combine reduce-scatters, final AG.
  auto intra_stream = [&](int r) {
    const int q = r / T, t = r % T;
    RankState& rs = st[r];
    const ExpertSide& xs = s.expert_side[q];
    // Round 0: the group's own tokens are already full rows on every rank.
    for (int64_t k = 0; k < xs.block_row_offset[1]; ++k)
      for (int c = 0; c < h; ++c)
        rs.xr[k * h + c] = rs.x[static_cast<size_t>(xs.row_src_token[k]) * h + c];
    for (int i = 1; i < Q; ++i) {
      dflags[r]->wait(i);
      const int64_t r0 = xs.block_row_offset[i], n = xs.block_row_offset[i + 1] - r0;
      std::vector<int64_t> idx(n);
      for (int64_t k = 0; k < n; ++k) idx[k] = r0 + k;
      const Buf mine = slice_rows(rs.xr, h, idx, t * hs);
      for (int u = 0; u < T; ++u)
        if (u != t) tr.send(r, q * T + u, {Phase::dispatch, i, Kind::all_gather}, mine);
      for (int u = 0; u < T; ++u) {
        if (u == t) continue;
        const Buf in = tr.recv(r, q * T + u, {Phase::dispatch, i, Kind::all_gather});
        expect_size(in, n * hs, "dispatch all-gather", i);
        for (int64_t k = 0; k < n; ++k)
          for (int c = 0; c < hs; ++c) rs.xr[(r0 + k) * h + u * hs + c] = in[k * hs + c];
      }
    }
    // Experts, grouped by local expert; each pair's weighted partial folds into its row.
    std::vector<int64_t> pair_to_row(xs.num_pairs());
    for (int64_t row = 0; row < xs.num_rows(); ++row)
      for (int64_t p = xs.row_pair_offset[row]; p < xs.row_pair_offset[row + 1]; ++p)
        pair_to_row[xs.row_pairs[p]] = row;
    for (int e = 0; e < epg; ++e)
      for (int64_t p = xs.expert_pair_offset[e]; p < xs.expert_pair_offset[e + 1]; ++p) {
        const int64_t row = xs.pair_row[p];
        if (pair_to_row[p] != row)
          throw RuntimeError("expert side: pair " + std::to_string(p) + " folds into row " +
                             std::to_string(pair_to_row[p]) + ", reads row " +
                             std::to_string(row));
        toy_expert_partial_add(q * epg + e, t, T,
                               std::span<const double>(rs.xr).subspan(row * h, h),
                               xs.pair_weight[p],
                               std::span<double>(rs.partial).subspan(row * h, h));
      }
    // The shared expert (toy expert E, weight 1): this TP rank's partial on the group's own
    // tokens, expert-side block 0 (every token of the replica when geo.shared_expert).
    if (g.shared_expert)
      for (int64_t row = 0; row < xs.block_row_offset[1]; ++row)
        toy_expert_partial_add(g.num_experts, t, T, std::span<const double>(rs.xr).subspan(row * h, h), 1.0,
                               std::span<double>(rs.partial).subspan(row * h, h));
    // Combine: reduce-scatter the rows of home (q + i) mod Q, round by round in combine_order.
    for (int i : s.combine_order) {
      const FusedStep& fs = s.steps[r][i];
      const int b = fs.combine_send_block;
      const int64_t r0 = xs.block_row_offset[b], n = xs.block_row_offset[b + 1] - r0;
      std::vector<int64_t> idx(n);
      for (int64_t k = 0; k < n; ++k) idx[k] = r0 + k;
      for (int u = 0; u < T; ++u)
        if (u != t)
          tr.send(r, q * T + u, {Phase::combine, i, Kind::reduce_scatter},
                  slice_rows(rs.partial, h, idx, u * hs));
      Buf acc = slice_rows(rs.partial, h, idx, t * hs);
      for (int u = 0; u < T; ++u) {
        if (u == t) continue;
        const Buf in = tr.recv(r, q * T + u, {Phase::combine, i, Kind::reduce_scatter});
        expect_size(in, n * hs, "combine reduce-scatter", i);
        for (size_t k = 0; k < acc.size(); ++k) acc[k] += in[k];
      }
      rs.red[i] = std::move(acc);
      cflags[r]->set(i);
    }
    cflags[r]->wait(Q);
    const int64_t n = routing[q].num_tokens;
    for (int u = 0; u < T; ++u)
      if (u != t)
        tr.send(r, q * T + u, {Phase::final_all_gather, 0, Kind::final_all_gather}, rs.y_slice);
    for (int64_t k = 0; k < n; ++k)
      for (int c = 0; c < hs; ++c) rs.y[k * h + t * hs + c] = rs.y_slice[k * hs + c];
    for (int u = 0; u < T; ++u) {
      if (u == t) continue;
      const Buf in = tr.recv(r, q * T + u, {Phase::final_all_gather, 0, Kind::final_all_gather});
      expect_size(in, n * hs, "final all-gather", 0);
      for (int64_t k = 0; k < n; ++k)
        for (int c = 0; c < hs; ++c) rs.y[k * h + u * hs + c] = in[k * hs + c];
    }
  };

  run_threads(tr, P, 2, [&](int r, int stream) {
    if (stream == 0) inter_stream(r);
    else intra_stream(r);
  }, all_flags);

  HostExecResult res;
  for (auto& rs : st) res.rank_output.push_back(std::move(rs.y));
  res.dispatch_bytes = tr.take_dispatch();
  res.combine_bytes = tr.take_combine();
  res.final_ag_bytes = tr.take_final();
  return res;
}

// ----------------------------------------------------------------------------- EP (all-to-all)

HostExecResult run_ep_on_host(const EpSchedule& s, std::span<const ReplicaRouting> routing,
                              std::span<const std::vector<double>> inputs, double timeout_s) {
  const CommGeometry& g = s.geo;
  check_inputs(g, routing, inputs);
  const int P = g.num_ranks, A = g.attn_tp, K = g.top_k, h = g.hidden;
  const int epr = g.experts_per_ep_rank();
  if (kToyIntermediate % g.moe_tp != 0 || h % g.moe_tp != 0)
    throw_input_error("host executor", "moe_tp",
                      "a divisor of the toy expert's width " + std::to_string(kToyIntermediate) +
                          " and of hidden " + std::to_string(h),
                      std::to_string(g.moe_tp));
  Transport tr(g, 1, timeout_s);
  std::vector<Buf> out(P);

  run_threads(tr, P, 1, [&](int r, int) {
    const EpRankPlan& rp = s.ranks[r];
    const ReplicaRouting& rt = routing[rp.replica];
    const Buf& x = inputs[rp.replica];
    // 1. Counts exchange: rows per (destination, local expert).
    for (int d = 0; d < P; ++d) {
      if (d == r) continue;
      Buf c(rp.send_counts.begin() + static_cast<int64_t>(d) * epr,
            rp.send_counts.begin() + static_cast<int64_t>(d + 1) * epr);
      tr.send(r, d, {Phase::counts, 0, Kind::a2a}, std::move(c));
    }
    std::vector<int64_t> recv_counts(static_cast<size_t>(P) * epr);
    for (int src = 0; src < P; ++src) {
      Buf c = src == r ? Buf(rp.send_counts.begin() + static_cast<int64_t>(r) * epr,
                             rp.send_counts.begin() + static_cast<int64_t>(r + 1) * epr)
                       : tr.recv(r, src, {Phase::counts, 0, Kind::a2a});
      for (int e = 0; e < epr; ++e)
        recv_counts[static_cast<size_t>(src) * epr + e] = static_cast<int64_t>(c[e]);
    }
    if (recv_counts != rp.recv_counts)
      throw RuntimeError("exchanged counts differ from the schedule's recv_counts");
    // 2. Dispatch: full rows of (token, slot) pairs, one grouped send/recv.
    auto rows_for = [&](int d) {
      Buf m(static_cast<size_t>(rp.send_offset[d + 1] - rp.send_offset[d]) * h);
      for (int64_t k = rp.send_offset[d]; k < rp.send_offset[d + 1]; ++k)
        for (int c = 0; c < h; ++c)
          m[(k - rp.send_offset[d]) * h + c] = x[static_cast<size_t>(rp.send_token[k]) * h + c];
      return m;
    };
    for (int d = 0; d < P; ++d)
      if (d != r) tr.send(r, d, {Phase::dispatch, 0, Kind::a2a}, rows_for(d));
    std::vector<Buf> got(P);
    for (int src = 0; src < P; ++src) {
      got[src] = src == r ? rows_for(r) : tr.recv(r, src, {Phase::dispatch, 0, Kind::a2a});
      int64_t n = 0;
      for (int e = 0; e < epr; ++e) n += recv_counts[static_cast<size_t>(src) * epr + e];
      if (static_cast<int64_t>(got[src].size()) != n * h)
        throw RuntimeError("dispatch from rank " + std::to_string(src) + ": " +
                           std::to_string(got[src].size() / h) + " rows, counts said " +
                           std::to_string(n));
    }
    // 3. moe-TP all-gather: the EP index's rows on every member, member u's received rows at
    //    its gather_begin (the schedule gives every member's layout); then the experts, this
    //    member's TP slice, on all of them; their partial sums are reduce-scattered back so
    //    this rank holds the summed rows it received (moe_tp == 1: the rows and the full
    //    expert). Rows of one (member, source) are grouped by local expert in count order.
    //    With a shared expert the gathered rows start with the members' source tokens: members
    //    of this rank's replica hold them already (copied), the others' come with the
    //    all-gather; every member adds its TP slice of the shared expert (toy expert E, weight
    //    1) on them, and the reduce-scatter returns each its own tokens' sum.
    const int T = g.moe_tp, m = r % T, base = r - m, ep_index = r / T;
    Buf own;
    for (int src = 0; src < P; ++src) own.insert(own.end(), got[src].begin(), got[src].end());
    const Buf own_src(x.begin() + static_cast<int64_t>(rp.token_begin) * h,
                      x.begin() + static_cast<int64_t>(rp.token_begin + rp.shared_rows) * h);
    for (int u = base; u < base + T; ++u) {
      if (u == r) continue;
      tr.send(r, u, {Phase::dispatch, 0, Kind::all_gather}, own);
      if (rp.shared_rows > 0 && s.ranks[u].replica != rp.replica)
        tr.send(r, u, {Phase::dispatch, 0, Kind::rail}, own_src);
    }
    Buf gathered(static_cast<size_t>(rp.gather_rows) * h, kPoison);
    for (int u = base; u < base + T; ++u) {
      const EpRankPlan& up = s.ranks[u];
      const Buf in = u == r ? own : tr.recv(r, u, {Phase::dispatch, 0, Kind::all_gather});
      if (static_cast<int64_t>(in.size()) != up.recv_rows() * h)
        throw RuntimeError("moe-TP all-gather from rank " + std::to_string(u) + ": size mismatch");
      std::copy(in.begin(), in.end(), gathered.begin() + up.gather_begin * h);
      if (up.shared_rows == 0) continue;
      Buf src_rows;
      if (up.replica == rp.replica) {
        src_rows.assign(x.begin() + static_cast<int64_t>(up.token_begin) * h,
                        x.begin() + static_cast<int64_t>(up.token_begin + up.shared_rows) * h);
      } else {
        src_rows = tr.recv(r, u, {Phase::dispatch, 0, Kind::rail});
      }
      if (static_cast<int64_t>(src_rows.size()) != up.shared_rows * h)
        throw RuntimeError("shared-expert rows of rank " + std::to_string(u) + ": size mismatch");
      std::copy(src_rows.begin(), src_rows.end(), gathered.begin() + up.shared_begin * h);
    }
    Buf partial(gathered.size(), 0.0);
    for (int64_t row = 0; row < rp.shared_total; ++row)
      toy_expert_partial_add(g.num_experts, m, T, std::span<const double>(gathered).subspan(row * h, h), 1.0,
                             std::span<double>(partial).subspan(row * h, h));
    for (int u = base; u < base + T; ++u) {
      const EpRankPlan& up = s.ranks[u];
      int64_t row = up.gather_begin;
      for (int src = 0; src < P; ++src)
        for (int e = 0; e < epr; ++e)
          for (int64_t k = 0; k < up.recv_counts[static_cast<size_t>(src) * epr + e]; ++k, ++row)
            toy_expert_partial_add(ep_index * epr + e, m, T,
                                   std::span<const double>(gathered).subspan(row * h, h), 1.0,
                                   std::span<double>(partial).subspan(row * h, h));
    }
    // A member's piece of the reduce-scatter: its shared rows, then its received rows.
    auto piece = [&](const EpRankPlan& up) {
      Buf b(partial.begin() + up.shared_begin * h, partial.begin() + (up.shared_begin + up.shared_rows) * h);
      b.insert(b.end(), partial.begin() + up.gather_begin * h,
               partial.begin() + (up.gather_begin + up.recv_rows()) * h);
      return b;
    };
    for (int u = base; u < base + T; ++u)
      if (u != r) tr.send(r, u, {Phase::combine, 0, Kind::reduce_scatter}, piece(s.ranks[u]));
    Buf red = piece(rp);
    for (int u = base; u < base + T; ++u) {
      if (u == r) continue;
      const Buf in = tr.recv(r, u, {Phase::combine, 0, Kind::reduce_scatter});
      if (in.size() != red.size())
        throw RuntimeError("moe-TP reduce-scatter from rank " + std::to_string(u) + ": size mismatch");
      for (size_t i = 0; i < red.size(); ++i) red[i] += in[i];
    }
    // red: [shared_rows | recv_rows()] summed over the members.
    // The summed rows go back to their sources, unweighted.
    int64_t back_row = rp.shared_rows;
    for (int src = 0; src < P; ++src) {
      const int64_t n = static_cast<int64_t>(got[src].size()) / h;
      Buf y(red.begin() + back_row * h, red.begin() + (back_row + n) * h);
      back_row += n;
      if (src == r) got[src] = std::move(y);
      else tr.send(r, src, {Phase::combine, 0, Kind::a2a}, std::move(y));
    }
    // 4. Combine at home: y[token] += w * row, for the rows this rank sent out.
    Buf& yo = out[r];
    yo.assign(static_cast<size_t>(rt.num_tokens) * h, kPoison);
    for (int tok = rp.token_begin; tok < rp.token_end; ++tok)
      for (int c = 0; c < h; ++c)
        yo[static_cast<size_t>(tok) * h + c] =
            rp.shared_rows > 0 ? red[static_cast<size_t>(tok - rp.token_begin) * h + c] : 0.0;
    for (int d = 0; d < P; ++d) {
      const Buf back = d == r ? std::move(got[r]) : tr.recv(r, d, {Phase::combine, 0, Kind::a2a});
      const int64_t n = rp.send_offset[d + 1] - rp.send_offset[d];
      if (static_cast<int64_t>(back.size()) != n * h)
        throw RuntimeError("combine from rank " + std::to_string(d) + ": size mismatch");
      for (int64_t k = 0; k < n; ++k) {
        const int64_t row = rp.send_offset[d] + k;
        const int tok = rp.send_token[row];
        const double w = rt.topk_weights[static_cast<size_t>(tok) * K + rp.send_slot[row]];
        for (int c = 0; c < h; ++c) yo[static_cast<size_t>(tok) * h + c] += w * back[k * h + c];
      }
    }
    // 5. Split source: all-gather the combined rows inside the attention replica.
    if (s.source == EpSource::split && A > 1) {
      const int base = rp.replica * A;
      Buf mine(yo.begin() + static_cast<int64_t>(rp.token_begin) * h,
               yo.begin() + static_cast<int64_t>(rp.token_end) * h);
      for (int u = base; u < base + A; ++u)
        if (u != r) tr.send(r, u, {Phase::combine, 0, Kind::final_all_gather}, mine);
      for (int u = base; u < base + A; ++u) {
        if (u == r) continue;
        const Buf in = tr.recv(r, u, {Phase::combine, 0, Kind::final_all_gather});
        const EpRankPlan& up = s.ranks[u];
        if (static_cast<int64_t>(in.size()) != static_cast<int64_t>(up.token_end - up.token_begin) * h)
          throw RuntimeError("final all-gather from rank " + std::to_string(u) + ": size mismatch");
        std::copy(in.begin(), in.end(), yo.begin() + static_cast<int64_t>(up.token_begin) * h);
      }
    }
  });

  HostExecResult res;
  res.rank_output = std::move(out);
  res.dispatch_bytes = tr.take_dispatch();
  res.combine_bytes = tr.take_combine();
  return res;
}

}  // namespace mixserve::sim
