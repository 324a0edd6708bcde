// EpMoeComm's transport rounds (ep_rounds, built on the host) against the schedule: every rank
// sends exactly EpRankPlan::dispatch_bytes in the dispatch rounds and combine_bytes in the
// combine rounds (what StageTransport counts on the GPU and the cost model costs), and no round
// writes a row twice or outside its buffer. No device needed (label unit).
#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "../comm/comm_test_util.hpp"
#include "mixserve/gpu/moe_comm.hpp"

namespace {

using mixserve::gpu::EpBuf;
using mixserve::gpu::EpRounds;
using mixserve::gpu::EpTransfer;
using mixserve::sim::CommGeometry;
using mixserve::sim::EpSchedule;
using mixserve::sim::EpSource;

const char* buf_name(EpBuf b) {
  switch (b) {
    case EpBuf::x: return "x";
    case EpBuf::sendbuf: return "sendbuf";
    case EpBuf::recvbuf: return "recvbuf";
    case EpBuf::outbuf: return "outbuf";
    case EpBuf::rsbuf: return "rsbuf";
    case EpBuf::redbuf: return "redbuf";
    case EpBuf::backbuf: return "backbuf";
    case EpBuf::y: return "y";
  }
  return "?";
}

// Rows buffer `b` of rank r holds in this step (EpMoeComm::Rank's layout, moe_comm.hpp).
int64_t buf_rows(const EpSchedule& s, std::span<const mixserve::sim::ReplicaRouting> routing, int r, EpBuf b) {
  const auto& rp = s.ranks[std::size_t(r)];
  switch (b) {
    case EpBuf::x:
    case EpBuf::y: return routing[std::size_t(rp.replica)].num_tokens;
    case EpBuf::sendbuf:
    case EpBuf::backbuf: return rp.send_offset.back();
    case EpBuf::recvbuf:
    case EpBuf::outbuf: return rp.gather_rows;
    case EpBuf::rsbuf:
    case EpBuf::redbuf: return rp.shared_rows + rp.recv_rows();
  }
  return 0;
}

struct Sent {
  std::vector<double> dispatch, combine;  // bytes per rank, copies to itself left out
};

// Checks one round's transfers (rows > 0, inside both buffers, no receive row written twice)
// and adds the bytes each rank sends to `bytes`. Returns the number of faults.
int check_round(const EpSchedule& s, std::span<const mixserve::sim::ReplicaRouting> routing,
                const std::vector<EpTransfer>& round, std::vector<double>& bytes, const std::string& what) {
  int faults = 0;
  const double row_bytes = double(s.geo.hidden) * s.geo.elem_bytes;
  std::vector<std::tuple<int, int, int64_t, int64_t>> written;  // (dst, buf, begin, end)
  for (const EpTransfer& t : round) {
    std::ostringstream id;
    id << what << ": " << t.rows << " rows " << t.src << ":" << buf_name(t.send_buf) << "[" << t.send_row << "] -> "
       << t.dst << ":" << buf_name(t.recv_buf) << "[" << t.recv_row << "]";
    if (t.rows <= 0 || t.send_row < 0 || t.recv_row < 0 ||
        t.send_row + t.rows > buf_rows(s, routing, t.src, t.send_buf) ||
        t.recv_row + t.rows > buf_rows(s, routing, t.dst, t.recv_buf)) {
      if (++faults <= 3) FAIL_CHECK(id.str() << " is empty or outside a buffer");
    }
    if (t.src != t.dst) bytes[std::size_t(t.src)] += double(t.rows) * row_bytes;
    written.emplace_back(t.dst, int(t.recv_buf), t.recv_row, t.recv_row + t.rows);
  }
  std::sort(written.begin(), written.end());
  for (std::size_t i = 1; i < written.size(); ++i) {
    const auto& [d0, b0, lo0, hi0] = written[i - 1];
    const auto& [d1, b1, lo1, hi1] = written[i];
    if (d0 == d1 && b0 == b1 && lo1 < hi0 && ++faults <= 3)
      FAIL_CHECK(what << ": rank " << d1 << " " << buf_name(EpBuf(b1)) << " rows [" << lo1 << ", " << hi1
                      << ") written twice in one round");
  }
  return faults;
}

Sent sent_bytes(const EpSchedule& s, std::span<const mixserve::sim::ReplicaRouting> routing, const EpRounds& rr,
                const std::string& what, int& faults) {
  const std::size_t P = std::size_t(s.geo.num_ranks);
  Sent b{std::vector<double>(P, 0.0), std::vector<double>(P, 0.0)};
  faults += check_round(s, routing, rr.dispatch_rows, b.dispatch, what + " dispatch rows");
  faults += check_round(s, routing, rr.dispatch_gather, b.dispatch, what + " dispatch all-gather");
  for (std::size_t j = 0; j < rr.combine_rs.size(); ++j)
    faults += check_round(s, routing, rr.combine_rs[j], b.combine, what + " combine RS round " + std::to_string(j + 1));
  faults += check_round(s, routing, rr.combine_back, b.combine, what + " combine rows back");
  faults += check_round(s, routing, rr.combine_gather, b.combine, what + " combine final exchange");
  return b;
}

}  // namespace

TEST_CASE("EP executor rounds send exactly the schedule's dispatch and combine bytes (every moe_tp, attn_tp, "
          "shared expert, source)") {
  using mixserve::test::kAllRoutings;
  const int E = 16, k = 4, hidden = 8;
  std::mt19937_64 rng(20261129);
  int cases = 0, faults = 0, byte_mismatches = 0, with_rs = 0;
  for (const auto& [N, G] : {std::pair{1, 4}, std::pair{2, 2}, std::pair{2, 4}}) {
    const int P = N * G;
    for (int attn_tp = 1; attn_tp <= P; attn_tp *= 2)
      for (int moe_tp = 1; moe_tp <= P; moe_tp *= 2) {
        if (E % (P / moe_tp) != 0) continue;
        for (bool shared : {false, true})
          for (EpSource source : {EpSource::split, EpSource::replicated})
            for (auto kind : kAllRoutings) {
              CommGeometry g;
              g.num_ranks = P;
              g.gpus_per_node = G;
              g.attn_tp = attn_tp;
              g.attn_dp = P / attn_tp;
              g.moe_tp = moe_tp;
              g.moe_ep = P / moe_tp;
              g.num_experts = E;
              g.top_k = k;
              g.hidden = hidden;
              g.elem_bytes = 2;
              g.shared_expert = shared;
              // Uneven replicas, awkward sizes: 0, 1, primes.
              static constexpr int kTokens[] = {13, 1, 7, 0, 11, 5, 3, 17};
              std::vector<mixserve::sim::ReplicaRouting> routing;
              for (int q = 0; q < g.attn_dp; ++q)
                routing.push_back(mixserve::test::make_routing(kind, q, kTokens[q % 8], E, k, rng));
              const EpSchedule s = mixserve::sim::build_ep_schedule(g, routing, source);
              const EpRounds rr = mixserve::gpu::ep_rounds(s);
              std::ostringstream what;
              what << "P" << P << " G" << G << " attn TP" << attn_tp << " moe TP" << moe_tp << "xEP" << g.moe_ep
                   << (shared ? " shared" : "") << (source == EpSource::split ? " split " : " replicated ")
                   << mixserve::test::to_string(kind);
              CHECK_MESSAGE(rr.combine_rs.size() == std::size_t(moe_tp - 1), what.str() << ": RS rounds");
              const Sent b = sent_bytes(s, routing, rr, what.str(), faults);
              for (int r = 0; r < P; ++r) {
                const auto& rp = s.ranks[std::size_t(r)];
                const double want_d = rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes;
                const double want_c = rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes;
                if (b.dispatch[std::size_t(r)] != want_d || b.combine[std::size_t(r)] != want_c) {
                  if (++byte_mismatches <= 4)
                    FAIL_CHECK(what.str() << " rank " << r << ": rounds send dispatch " << b.dispatch[std::size_t(r)]
                                          << " combine " << b.combine[std::size_t(r)]
                                          << " bytes; the schedule counts " << want_d << " and " << want_c);
                }
              }
              with_rs += moe_tp > 1;
              ++cases;
            }
      }
  }
  CHECK(faults == 0);
  CHECK(byte_mismatches == 0);
  CHECK(with_rs > 0);
  MESSAGE(cases << " schedules, " << with_rs << " with moe_tp > 1");
}
