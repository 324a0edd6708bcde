// GPU execution of the MoE communication schedules (moe_comm.hpp, docs/moe-comm.md).
#include "mixserve/gpu/moe_comm.hpp"

#include <algorithm>
#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

namespace {

using kernels::MoeDType;
using kernels::RowView;

constexpr const char* kFused = "fused MoE comm";
constexpr const char* kEp = "EP MoE comm";

// A device buffer of `count` elements of `bytes_each` (at least one byte: no null buffers).
DeviceBuffer alloc(int device, int64_t count, int64_t bytes_each) {
  MIXSERVE_CUDA_CHECK(cudaSetDevice(device));
  return DeviceBuffer(static_cast<std::size_t>(std::max<int64_t>(1, count * bytes_each)));
}

template <class T>
void upload(const DeviceBuffer& dst, const std::vector<T>& src, const char* what) {
  const std::size_t bytes = src.size() * sizeof(T);
  if (bytes > dst.bytes())
    throw RuntimeError(std::string("MoE comm: ") + what + " table of " + std::to_string(bytes) +
                       " bytes exceeds its preallocated " + std::to_string(dst.bytes()));
  if (bytes) MIXSERVE_CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), bytes, cudaMemcpyHostToDevice));
}

char* at(const DeviceBuffer& b, int64_t elems, int eb) { return b.as<char>() + elems * eb; }

RowView view(void* p, int64_t rows, int cols, int slice_cols) {
  RowView v;
  v.data = p;
  v.rows = rows;
  v.cols = cols;
  v.slice_cols = slice_cols;
  return v;
}

void pack(void* src, int64_t src_rows, int src_cols, int src_slice, void* dst, int64_t dst_rows,
          int dst_cols, int dst_slice, const int32_t* index, int64_t rows, int cols, int col0,
          MoeDType t, cudaStream_t s) {
  kernels::PackRowsParams p;
  p.src = view(src, src_rows, src_cols, src_slice);
  p.dst = view(dst, dst_rows, dst_cols, dst_slice);
  p.index = index;
  p.num_rows = rows;
  p.num_cols = cols;
  p.src_col0 = col0;
  p.dtype = t;
  kernels::launch_pack_rows(p, s);
}

void require(bool ok, const char* where, const std::string& key, const std::string& expected,
             const std::string& got) {
  if (!ok) throw_input_error(where, key, expected, got);
}

void check_same_geometry(const sim::CommGeometry& a, const sim::CommGeometry& b, const char* where) {
  const bool same = a.num_ranks == b.num_ranks && a.moe_tp == b.moe_tp && a.moe_ep == b.moe_ep &&
                    a.attn_tp == b.attn_tp && a.attn_dp == b.attn_dp &&
                    a.num_experts == b.num_experts && a.top_k == b.top_k && a.hidden == b.hidden &&
                    a.shared_expert == b.shared_expert;
  require(same, where, "schedule.geo", "the geometry the buffers were sized for",
          "a schedule of another geometry");
}

cudaEvent_t make_event() {
  cudaEvent_t e = nullptr;
  MIXSERVE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void wait_on(cudaStream_t waiter, cudaStream_t signaler, cudaEvent_t e) {
  if (waiter == signaler) return;
  MIXSERVE_CUDA_CHECK(cudaEventRecord(e, signaler));
  MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
}

}  // namespace

// ----------------------------------------------------------------------------- fused

struct FusedMoeComm::Rank {
  int device = 0;
  Stream inter, intra;
  std::vector<cudaEvent_t> ev;
  DeviceBuffer x;          // [cap, h] input rows of the replica (row-major)
  DeviceBuffer xr;         // [Q * cap, h] dispatch receive, slice-major per block
  DeviceBuffer partial;    // [Q * cap, h] expert partial sums, same layout
  DeviceBuffer send_pack;  // [(Q - 1) * cap, h/T] rail send of round i at (i - 1) * cap rows
  DeviceBuffer red;        // [Q * cap, h/T] reduced slice of combine round i at i * cap rows
  DeviceBuffer crecv;      // [Q * cap, h/T] combine rail receive of round i at i * cap rows
  DeviceBuffer y_gather;   // [T, cap, h/T] home slices; slice t accumulates, then all-gather
  DeviceBuffer y;          // [cap, h] output rows (row-major)
  DeviceBuffer idx_own;    // int32 [cap] block 0's source tokens
  DeviceBuffer idx_send;   // int32 [(Q - 1) * cap] route(q -> q + i) at (i - 1) * cap
  DeviceBuffer idx_home;   // int32 [Q * cap] route(q -> q - i) at i * cap
  DeviceBuffer block_off;  // int64 [Q + 1]
  DeviceBuffer pair_off;   // int64 [Q * cap + 1]
  DeviceBuffer pair_expert;// int32 [Q * cap * min(k, E/Q)]
  DeviceBuffer pair_weight;// f64, same
  int64_t n = 0;           // tokens of the replica in the prepared step
  explicit Rank(int dev) : device(dev), inter(dev), intra(dev) {}
  ~Rank() {
    for (cudaEvent_t e : ev) cudaEventDestroy(e);
  }
};

FusedMoeComm::FusedMoeComm(const sim::CommGeometry& geo, int64_t max_tokens_per_replica,
                           kernels::MoeDType dtype, Transport& transport)
    : geo_(geo), cap_(max_tokens_per_replica), dtype_(dtype),
      eb_(kernels::moe_dtype_bytes(dtype)), tr_(transport) {
  // The schedule builder's own checks, on an empty routing.
  std::vector<sim::ReplicaRouting> empty(std::max(geo.moe_ep, 1));
  (void)sim::build_fused_schedule(geo, empty);
  require(cap_ >= 0, kFused, "max_tokens_per_replica", ">= 0", std::to_string(cap_));
  require(transport.num_ranks() == geo.num_ranks, kFused, "transport", 
          std::to_string(geo.num_ranks) + " ranks", std::to_string(transport.num_ranks()));
  require(eb_ > 0, kFused, "dtype", "f64, f32 or bf16", "?");
  const int P = geo.num_ranks, Q = geo.moe_ep, T = geo.moe_tp, h = geo.hidden, hs = h / T;
  const int64_t rows = sim::fused_capacity_rows(geo, cap_);
  // Toy expert pairs: per row its (row, local expert) pairs, plus the shared expert's on the
  // group's own rows (block 0, at most cap_ of them).
  const int64_t pairs = rows * std::min(geo.top_k, geo.experts_per_ep_rank()) + (geo.shared_expert ? cap_ : 0);
  ranks_.resize(P);
  for (int r = 0; r < P; ++r) {
    if (!tr_.is_local(r)) continue;
    const int dev = tr_.device_of(r);
    MIXSERVE_CUDA_CHECK(cudaSetDevice(dev));
    auto rk = std::make_unique<Rank>(dev);
    for (int i = 0; i < 2 * Q + 4; ++i) rk->ev.push_back(make_event());
    rk->x = alloc(dev, cap_ * h, eb_);
    rk->xr = alloc(dev, rows * h, eb_);
    rk->partial = alloc(dev, rows * h, eb_);
    MIXSERVE_CUDA_CHECK(cudaMemset(rk->partial.get(), 0, rk->partial.bytes()));
    rk->send_pack = alloc(dev, std::max(Q - 1, 0) * cap_ * hs, eb_);
    rk->red = alloc(dev, Q * cap_ * hs, eb_);
    rk->crecv = alloc(dev, Q * cap_ * hs, eb_);
    rk->y_gather = alloc(dev, T * cap_ * hs, eb_);
    rk->y = alloc(dev, cap_ * h, eb_);
    rk->idx_own = alloc(dev, cap_, 4);
    rk->idx_send = alloc(dev, std::max(Q - 1, 0) * cap_, 4);
    rk->idx_home = alloc(dev, Q * cap_, 4);
    rk->block_off = alloc(dev, Q + 1, 8);
    rk->pair_off = alloc(dev, rows + 1, 8);
    rk->pair_expert = alloc(dev, pairs, 4);
    rk->pair_weight = alloc(dev, pairs, 8);
    ranks_[r] = std::move(rk);
  }
}

FusedMoeComm::~FusedMoeComm() = default;

cudaStream_t FusedMoeComm::intra(int r) const { return ranks_[r]->intra.get(); }
cudaStream_t FusedMoeComm::inter(int r) const {
  return overlap_ ? ranks_[r]->inter.get() : ranks_[r]->intra.get();
}
std::vector<cudaStream_t> FusedMoeComm::streams(bool inter_leg) const {
  std::vector<cudaStream_t> out(geo_.num_ranks, nullptr);
  for (int r = 0; r < geo_.num_ranks; ++r)
    if (ranks_[r]) out[r] = inter_leg ? inter(r) : intra(r);
  return out;
}

void* FusedMoeComm::input(int rank) const { return ranks_.at(rank)->x.get(); }
void* FusedMoeComm::output(int rank) const { return ranks_.at(rank)->y.get(); }
int64_t FusedMoeComm::num_tokens(int rank) const { return ranks_.at(rank)->n; }
void* FusedMoeComm::received(int rank) const { return ranks_.at(rank)->xr.get(); }
void* FusedMoeComm::partial(int rank) const { return ranks_.at(rank)->partial.get(); }

void FusedMoeComm::prepare(const sim::FusedSchedule& s,
                           std::span<const sim::ReplicaRouting> routing) {
  check_same_geometry(s.geo, geo_, kFused);
  require(static_cast<int>(routing.size()) == s.num_groups, kFused, "routing",
          "one table per replica (" + std::to_string(s.num_groups) + ")", std::to_string(routing.size()));
  for (size_t q = 0; q < routing.size(); ++q)
    require(routing[q].num_tokens >= 0 && routing[q].num_tokens <= cap_, kFused,
            "routing[" + std::to_string(q) + "].num_tokens",
            "in [0, max_tokens_per_replica = " + std::to_string(cap_) + "]",
            std::to_string(routing[q].num_tokens));
  const int Q = s.num_groups, epg = geo_.experts_per_ep_rank();
  for (int q = 0; q < Q; ++q)
    for (int d = 0; d < Q; ++d)
      require(static_cast<int64_t>(s.route_rows(q, d).size()) <= cap_, kFused,
              "step", "at most max_tokens_per_replica = " + std::to_string(cap_) + " tokens per replica",
              std::to_string(s.route_rows(q, d).size()) + " rows from replica " + std::to_string(q));
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const int q = s.group_of(r);
    const sim::ExpertSide& xs = s.expert_side[q];
    rk.n = routing[q].num_tokens;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    std::vector<int32_t> own(xs.row_src_token.begin(), xs.row_src_token.begin() + xs.block_row_offset[1]);
    upload(rk.idx_own, own, "own rows");
    std::vector<int32_t> send, home;
    for (int i = 1; i < Q; ++i) {
      const auto& rt = s.route_rows(q, s.steps[r][i].send_group);
      send.resize(static_cast<size_t>(i - 1) * cap_);
      send.insert(send.end(), rt.begin(), rt.end());
    }
    for (int i = 0; i < Q; ++i) {
      const auto& rt = s.route_rows(q, s.steps[r][i].recv_group);
      home.resize(static_cast<size_t>(i) * cap_);
      home.insert(home.end(), rt.begin(), rt.end());
    }
    upload(rk.idx_send, send, "rail send rows");
    upload(rk.idx_home, home, "home rows");
    upload(rk.block_off, xs.block_row_offset, "block offsets");
    // Pair tables in fold order: per row, its (global expert, weight); with a shared expert the
    // rows of block 0 (the group's own tokens) get one more pair, (toy expert E, 1).
    std::vector<int32_t> pair_local(xs.num_pairs());
    for (int e = 0; e < epg; ++e)
      for (int64_t p = xs.expert_pair_offset[e]; p < xs.expert_pair_offset[e + 1]; ++p) pair_local[p] = e;
    std::vector<int32_t> pe;
    std::vector<double> pw;
    std::vector<int64_t> poff{0};
    for (int64_t row = 0; row < xs.num_rows(); ++row) {
      for (int64_t k = xs.row_pair_offset[row]; k < xs.row_pair_offset[row + 1]; ++k) {
        const int64_t p = xs.row_pairs[k];
        pe.push_back(q * epg + pair_local[p]);
        pw.push_back(xs.pair_weight[p]);
      }
      if (geo_.shared_expert && row < xs.block_row_offset[1]) {
        pe.push_back(geo_.num_experts);
        pw.push_back(1.0);
      }
      poff.push_back(static_cast<int64_t>(pe.size()));
    }
    upload(rk.pair_off, poff, "row pair offsets");
    upload(rk.pair_expert, pe, "pair experts");
    upload(rk.pair_weight, pw, "pair weights");
  }
  s_ = &s;
}

void FusedMoeComm::fork(std::span<const cudaStream_t> main) {
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
    const cudaEvent_t e = ranks_[r]->ev[2 * geo_.moe_ep + 1];
    MIXSERVE_CUDA_CHECK(cudaEventRecord(e, main[r]));
    MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(ranks_[r]->inter.get(), e, 0));
    MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(ranks_[r]->intra.get(), e, 0));
  }
}

void FusedMoeComm::join(std::span<const cudaStream_t> main) {
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
    const cudaEvent_t a = ranks_[r]->ev[2 * geo_.moe_ep + 2], b = ranks_[r]->ev[2 * geo_.moe_ep + 3];
    MIXSERVE_CUDA_CHECK(cudaEventRecord(a, ranks_[r]->inter.get()));
    MIXSERVE_CUDA_CHECK(cudaEventRecord(b, ranks_[r]->intra.get()));
    MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(main[r], a, 0));
    MIXSERVE_CUDA_CHECK(cudaStreamWaitEvent(main[r], b, 0));
  }
}

void FusedMoeComm::dispatch() {
  if (!s_) throw RuntimeError("fused MoE comm: dispatch before prepare");
  const sim::FusedSchedule& s = *s_;
  const int P = geo_.num_ranks, Q = s.num_groups, T = s.group_size, h = geo_.hidden;
  const int hs = s.slice_elems;
  // Round 0 (intra): the group's own rows, already replicated, copied into block 0.
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const sim::ExpertSide& xs = s.expert_side[s.group_of(r)];
    const int64_t n0 = xs.block_row_offset[1];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    pack(rk.x.get(), cap_, h, h, rk.xr.get(), n0, h, hs, rk.idx_own.as<int32_t>(), n0, h, 0,
         dtype_, intra(r));
  }
  const auto inter_streams = streams(true);
  for (int i = 1; i < Q; ++i) {
    std::vector<P2pOp> ops;
    for (int r = 0; r < P; ++r) {
      const sim::FusedStep& st = s.steps[r][i];
      const int t = s.slice_of(r), peer = st.send_peer;
      P2pOp op;
      op.src = r;
      op.dst = peer;
      op.bytes = static_cast<std::size_t>(st.dispatch_send_rows) * hs * eb_;
      if (ranks_[r]) {
        Rank& rk = *ranks_[r];
        MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
        char* buf = at(rk.send_pack, static_cast<int64_t>(i - 1) * cap_ * hs, eb_);
        pack(rk.x.get(), cap_, h, h, buf, st.dispatch_send_rows, hs, hs,
             rk.idx_send.as<int32_t>() + static_cast<int64_t>(i - 1) * cap_,
             st.dispatch_send_rows, hs, t * hs, dtype_, inter(r));
        op.send = buf;
      }
      if (ranks_[peer]) {
        const sim::ExpertSide& ps = s.expert_side[s.group_of(peer)];
        const int64_t off = ps.block_row_offset[i], n = ps.block_row_offset[i + 1] - off;
        if (n != st.dispatch_send_rows)
          throw RuntimeError("fused MoE comm: dispatch round " + std::to_string(i) + " rank " +
                             std::to_string(r) + " sends " + std::to_string(st.dispatch_send_rows) +
                             " rows, rank " + std::to_string(peer) + " expects " + std::to_string(n));
        op.recv = at(ranks_[peer]->xr, off * h + static_cast<int64_t>(t) * n * hs, eb_);
      }
      ops.push_back(op);
    }
    tr_.p2p_round(ops, inter_streams);
    for (int r = 0; r < P; ++r) {
      if (!ranks_[r]) continue;
      MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
      wait_on(intra(r), inter(r), ranks_[r]->ev[i]);
    }
    for (int q = 0; q < Q; ++q) {
      const sim::ExpertSide& xs = s.expert_side[q];
      const int64_t off = xs.block_row_offset[i], n = xs.block_row_offset[i + 1] - off;
      std::vector<int> group;
      std::vector<CollRank> cr;
      for (int u = 0; u < T; ++u) {
        const int r = q * T + u;
        group.push_back(r);
        CollRank c;
        if (ranks_[r]) {
          c.recv = at(ranks_[r]->xr, off * h, eb_);
          c.send = at(ranks_[r]->xr, off * h + static_cast<int64_t>(u) * n * hs, eb_);
          c.stream = intra(r);
        }
        cr.push_back(c);
      }
      tr_.all_gather(group, cr, static_cast<std::size_t>(n) * hs * eb_);
    }
  }
}

void FusedMoeComm::toy_experts() {
  if (!s_) throw RuntimeError("fused MoE comm: experts before prepare");
  require(dtype_ == MoeDType::f64, kFused, "dtype", "f64 for the toy expert", kernels::to_string(dtype_));
  const sim::FusedSchedule& s = *s_;
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const sim::ExpertSide& xs = s.expert_side[s.group_of(r)];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    kernels::ToyExpertParams p;
    p.x = rk.xr.as<double>();
    p.y = rk.partial.as<double>();
    p.num_rows = xs.num_rows();
    p.hidden = geo_.hidden;
    p.slice_cols = s.slice_elems;
    p.block_row_offset = rk.block_off.as<int64_t>();
    p.num_blocks = s.num_groups;
    p.pair_offset = rk.pair_off.as<int64_t>();
    p.pair_expert = rk.pair_expert.as<int32_t>();
    p.pair_weight = rk.pair_weight.as<double>();
    p.tp_rank = s.slice_of(r);
    p.tp = s.group_size;
    kernels::launch_toy_expert(p, intra(r));
  }
}

void FusedMoeComm::combine() {
  if (!s_) throw RuntimeError("fused MoE comm: combine before prepare");
  const sim::FusedSchedule& s = *s_;
  const int P = geo_.num_ranks, Q = s.num_groups, T = s.group_size, h = geo_.hidden;
  const int hs = s.slice_elems;
  // The home slice [n, h/T] of every rank starts at zero; the scatter-adds accumulate into it.
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    MIXSERVE_CUDA_CHECK(cudaMemsetAsync(at(rk.y_gather, static_cast<int64_t>(s.slice_of(r)) * rk.n * hs, eb_),
                                        0, static_cast<std::size_t>(rk.n) * hs * eb_, inter(r)));
  }
  const auto inter_streams = streams(true);
  for (int i : s.combine_order) {
    // Reduce-scatter (intra) of the rows of home (q + i) mod Q: expert-side block (Q - i) mod Q.
    for (int q = 0; q < Q; ++q) {
      const sim::ExpertSide& xs = s.expert_side[q];
      const int b = (Q - i) % Q;
      const int64_t off = xs.block_row_offset[b], n = xs.block_row_offset[b + 1] - off;
      std::vector<int> group;
      std::vector<CollRank> cr;
      for (int u = 0; u < T; ++u) {
        const int r = q * T + u;
        group.push_back(r);
        CollRank c;
        if (ranks_[r]) {
          c.send = at(ranks_[r]->partial, off * h, eb_);
          c.recv = at(ranks_[r]->red, static_cast<int64_t>(i) * cap_ * hs, eb_);
          c.stream = intra(r);
        }
        cr.push_back(c);
      }
      tr_.reduce_scatter(group, cr, static_cast<std::size_t>(n) * hs, dtype_);
    }
    for (int r = 0; r < P; ++r) {
      if (!ranks_[r]) continue;
      MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
      wait_on(inter(r), intra(r), ranks_[r]->ev[Q + i]);
    }
    // Rail: the reduced slice back to its home group (nothing for round 0).
    if (i != 0) {
      std::vector<P2pOp> ops;
      for (int r = 0; r < P; ++r) {
        const sim::FusedStep& st = s.steps[r][i];
        const int peer = st.send_peer;
        P2pOp op;
        op.src = r;
        op.dst = peer;
        op.bytes = static_cast<std::size_t>(st.combine_send_rows) * hs * eb_;
        if (ranks_[r]) op.send = at(ranks_[r]->red, static_cast<int64_t>(i) * cap_ * hs, eb_);
        if (ranks_[peer]) {
          if (s.steps[peer][i].combine_recv_rows != st.combine_send_rows)
            throw RuntimeError("fused MoE comm: combine round " + std::to_string(i) + " rank " +
                               std::to_string(r) + " sends " + std::to_string(st.combine_send_rows) +
                               " rows, rank " + std::to_string(peer) + " expects " +
                               std::to_string(s.steps[peer][i].combine_recv_rows));
          op.recv = at(ranks_[peer]->crecv, static_cast<int64_t>(i) * cap_ * hs, eb_);
        }
        ops.push_back(op);
      }
      tr_.p2p_round(ops, inter_streams);
    }
    // Scatter-add (inter) into the home slice.
    for (int r = 0; r < P; ++r) {
      if (!ranks_[r]) continue;
      Rank& rk = *ranks_[r];
      const sim::FusedStep& st = s.steps[r][i];
      MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
      kernels::ScatterAddParams p;
      p.in = at(i == 0 ? rk.red : rk.crecv, static_cast<int64_t>(i) * cap_ * hs, eb_);
      p.index = rk.idx_home.as<int32_t>() + static_cast<int64_t>(i) * cap_;
      p.y = at(rk.y_gather, static_cast<int64_t>(s.slice_of(r)) * rk.n * hs, eb_);
      p.num_rows = st.combine_recv_rows;
      p.cols = hs;
      p.dtype = dtype_;
      kernels::launch_scatter_add(p, inter(r));
    }
  }
  // Final all-gather (intra) after the last scatter-add, then full rows.
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
    wait_on(intra(r), inter(r), ranks_[r]->ev[2 * Q]);
  }
  for (int q = 0; q < Q; ++q) {
    std::vector<int> group;
    std::vector<CollRank> cr;
    int64_t n = 0;
    for (int u = 0; u < T; ++u) {
      const int r = q * T + u;
      group.push_back(r);
      CollRank c;
      if (ranks_[r]) {
        n = ranks_[r]->n;
        c.recv = ranks_[r]->y_gather.get();
        c.send = at(ranks_[r]->y_gather, static_cast<int64_t>(u) * n * hs, eb_);
        c.stream = intra(r);
      }
      cr.push_back(c);
    }
    tr_.all_gather(group, cr, static_cast<std::size_t>(n) * hs * eb_);
  }
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    pack(rk.y_gather.get(), rk.n, h, hs, rk.y.get(), rk.n, h, h, nullptr, rk.n, h, 0, dtype_, intra(r));
  }
}

// ----------------------------------------------------------------------------- EP (all-to-all)

EpRounds ep_rounds(const sim::EpSchedule& s) {
  const sim::CommGeometry& geo = s.geo;
  const int P = geo.num_ranks, epr = geo.experts_per_ep_rank(), T = geo.moe_tp, A = geo.attn_tp;
  // recv_off[d][src]: where the rows from src start among rank d's received rows.
  std::vector<std::vector<int64_t>> recv_off(static_cast<size_t>(P), std::vector<int64_t>(P + 1, 0));
  for (int d = 0; d < P; ++d)
    for (int src = 0; src < P; ++src) {
      int64_t n = 0;
      for (int e = 0; e < epr; ++e) n += s.ranks[d].recv_counts[static_cast<size_t>(src) * epr + e];
      recv_off[d][src + 1] = recv_off[d][src] + n;
    }
  auto add = [](std::vector<EpTransfer>& round, int src, int dst, int64_t rows, EpBuf sb, int64_t srow, EpBuf rb,
                int64_t rrow) {
    if (rows > 0) round.push_back(EpTransfer{src, dst, rows, sb, srow, rb, rrow});
  };
  EpRounds out;
  // Dispatch 1: rank r's rows for d into d's piece of the gathered rows.
  for (int r = 0; r < P; ++r) {
    const sim::EpRankPlan& rp = s.ranks[r];
    for (int d = 0; d < P; ++d)
      add(out.dispatch_rows, r, d, rp.send_offset[d + 1] - rp.send_offset[d], EpBuf::sendbuf, rp.send_offset[d],
          EpBuf::recvbuf, s.ranks[d].gather_begin + recv_off[d][r]);
  }
  // Dispatch 2: every member sends its received rows to the other members of its EP index, and
  // (shared expert) its source tokens to those of other attention replicas.
  for (int r = 0; r < P; ++r) {
    const sim::EpRankPlan& rp = s.ranks[r];
    for (int u = r - r % T; u < r - r % T + T; ++u) {
      if (u == r) continue;
      add(out.dispatch_gather, r, u, rp.recv_rows(), EpBuf::recvbuf, rp.gather_begin, EpBuf::recvbuf, rp.gather_begin);
      if (s.ranks[u].replica != rp.replica)
        add(out.dispatch_gather, r, u, rp.shared_rows, EpBuf::x, rp.token_begin, EpBuf::recvbuf, rp.shared_begin);
    }
  }
  // Combine 1: in round j member m sends its partials of member (m + j) mod T's piece
  // [shared rows | received rows] to it.
  for (int j = 1; j < T; ++j) {
    std::vector<EpTransfer>& round = out.combine_rs.emplace_back();
    for (int r = 0; r < P; ++r) {
      const int u = r - r % T + (r % T + j) % T;
      const sim::EpRankPlan& up = s.ranks[u];
      add(round, r, u, up.shared_rows, EpBuf::outbuf, up.shared_begin, EpBuf::rsbuf, 0);
      add(round, r, u, up.recv_rows(), EpBuf::outbuf, up.gather_begin, EpBuf::rsbuf, up.shared_rows);
    }
  }
  // Combine 2: rank d returns to r what it received from r (summed over the members when
  // moe_tp > 1: after its shared rows in redbuf; moe_tp 1: at gather_begin in outbuf).
  for (int d = 0; d < P; ++d) {
    const sim::EpRankPlan& dp = s.ranks[d];
    for (int r = 0; r < P; ++r) {
      const sim::EpRankPlan& rp = s.ranks[r];
      add(out.combine_back, d, r, rp.send_offset[d + 1] - rp.send_offset[d], T > 1 ? EpBuf::redbuf : EpBuf::outbuf,
          (T > 1 ? dp.shared_rows : dp.gather_begin) + recv_off[d][r], EpBuf::backbuf, rp.send_offset[d]);
    }
  }
  // Combine 3: split source, the replica's ranks exchange their combined token ranges.
  if (s.source == sim::EpSource::split && A > 1)
    for (int r = 0; r < P; ++r) {
      const sim::EpRankPlan& rp = s.ranks[r];
      for (int u = rp.replica * A; u < (rp.replica + 1) * A; ++u)
        if (u != r)
          add(out.combine_gather, r, u, rp.token_end - rp.token_begin, EpBuf::y, rp.token_begin, EpBuf::y,
              rp.token_begin);
    }
  return out;
}

struct EpMoeComm::Rank {
  int device = 0;
  Stream stream;
  cudaEvent_t ev[3] = {};
  DeviceBuffer x;            // [cap, h] the replica's tokens
  DeviceBuffer sendbuf;      // [cap * k, h] rows by (destination, local expert, token, slot)
  DeviceBuffer recvbuf;      // [recv cap, h] the EP index's rows after the moe-TP all-gather
                             // (EpRankPlan::gather_*): shared expert, the members' source tokens
                             // at their shared_begin; member u's received rows at its
                             // gather_begin, each by (source, local expert)
  DeviceBuffer outbuf;       // [recv cap, h] expert (TP-partial) outputs, same order
  DeviceBuffer rsbuf;        // [recv cap, h] moe_tp > 1: one member's partials of this rank's
                             // piece [shared rows | received rows]
  DeviceBuffer redbuf;       // [recv cap, h] moe_tp > 1: this rank's piece, summed over the members
  DeviceBuffer backbuf;      // [cap * (k + 1), h] outputs back home, in send order; shared
                             // expert: then the summed shared rows of the source tokens
  DeviceBuffer y;            // [cap, h] combined rows
  DeviceBuffer send_counts;  // int64 [P * E/P]
  DeviceBuffer recv_counts;  // int64 [P * E/P]
  DeviceBuffer send_token;   // int32 [cap * k]
  DeviceBuffer comb_off;     // int64 [cap + 1] per source token: its rows in backbuf
  DeviceBuffer comb_row;     // int64 [cap * (k + 1)]
  DeviceBuffer comb_w;       // f64 [cap * (k + 1)]
  DeviceBuffer block_off;    // int64 [2] toy expert: one row-major block
  DeviceBuffer pair_off;     // int64 [recv cap + 1]
  DeviceBuffer pair_expert;  // int32 [recv cap]
  DeviceBuffer pair_w;       // f64 [recv cap]
  std::vector<int64_t> counts_host;  // exchanged recv counts
  int64_t n = 0;
  explicit Rank(int dev) : device(dev), stream(dev) {}
  DeviceBuffer& buffer(EpBuf b) {
    switch (b) {
      case EpBuf::x: return x;
      case EpBuf::sendbuf: return sendbuf;
      case EpBuf::recvbuf: return recvbuf;
      case EpBuf::outbuf: return outbuf;
      case EpBuf::rsbuf: return rsbuf;
      case EpBuf::redbuf: return redbuf;
      case EpBuf::backbuf: return backbuf;
      case EpBuf::y: return y;
    }
    throw RuntimeError("EP MoE comm: unknown buffer");
  }
  ~Rank() {
    for (cudaEvent_t e : ev)
      if (e) cudaEventDestroy(e);
  }
};

EpMoeComm::EpMoeComm(const sim::CommGeometry& geo, int64_t max_tokens_per_replica,
                     sim::EpSource source, kernels::MoeDType dtype, Transport& transport)
    : geo_(geo), cap_(max_tokens_per_replica), source_(source), dtype_(dtype),
      eb_(kernels::moe_dtype_bytes(dtype)), tr_(transport) {
  std::vector<sim::ReplicaRouting> empty(std::max(geo.attn_dp, 1));
  (void)sim::build_ep_schedule(geo, empty, source);
  require(cap_ >= 0, kEp, "max_tokens_per_replica", ">= 0", std::to_string(cap_));
  require(transport.num_ranks() == geo.num_ranks, kEp, "transport",
          std::to_string(geo.num_ranks) + " ranks", std::to_string(transport.num_ranks()));
  const int P = geo.num_ranks, h = geo.hidden, epr = geo.experts_per_ep_rank(), K = geo.top_k;
  const int64_t recv_cap = sim::ep_capacity_rows(geo, cap_, source);
  ranks_.resize(P);
  for (int r = 0; r < P; ++r) {
    if (!tr_.is_local(r)) continue;
    const int dev = tr_.device_of(r);
    MIXSERVE_CUDA_CHECK(cudaSetDevice(dev));
    auto rk = std::make_unique<Rank>(dev);
    for (cudaEvent_t& e : rk->ev) e = make_event();
    rk->x = alloc(dev, cap_ * h, eb_);
    rk->sendbuf = alloc(dev, cap_ * K * h, eb_);
    rk->recvbuf = alloc(dev, recv_cap * h, eb_);
    rk->outbuf = alloc(dev, recv_cap * h, eb_);
    MIXSERVE_CUDA_CHECK(cudaMemset(rk->outbuf.get(), 0, rk->outbuf.bytes()));
    rk->rsbuf = alloc(dev, geo.moe_tp > 1 ? recv_cap * h : 0, eb_);
    rk->redbuf = alloc(dev, geo.moe_tp > 1 ? recv_cap * h : 0, eb_);
    rk->backbuf = alloc(dev, cap_ * (K + 1) * h, eb_);
    rk->y = alloc(dev, cap_ * h, eb_);
    rk->send_counts = alloc(dev, static_cast<int64_t>(P) * epr, 8);
    rk->recv_counts = alloc(dev, static_cast<int64_t>(P) * epr, 8);
    rk->send_token = alloc(dev, cap_ * K, 4);
    rk->comb_off = alloc(dev, cap_ + 1, 8);
    rk->comb_row = alloc(dev, cap_ * (K + 1), 8);
    rk->comb_w = alloc(dev, cap_ * (K + 1), 8);
    rk->block_off = alloc(dev, 2, 8);
    rk->pair_off = alloc(dev, recv_cap + 1, 8);
    rk->pair_expert = alloc(dev, recv_cap, 4);
    rk->pair_w = alloc(dev, recv_cap, 8);
    ranks_[r] = std::move(rk);
  }
}

EpMoeComm::~EpMoeComm() = default;

std::vector<cudaStream_t> EpMoeComm::streams() const {
  std::vector<cudaStream_t> out(geo_.num_ranks, nullptr);
  for (int r = 0; r < geo_.num_ranks; ++r)
    if (ranks_[r]) out[r] = ranks_[r]->stream.get();
  return out;
}

void* EpMoeComm::input(int rank) const { return ranks_.at(rank)->x.get(); }
void* EpMoeComm::received(int rank) const { return ranks_.at(rank)->recvbuf.get(); }
void* EpMoeComm::expert_out(int rank) const { return ranks_.at(rank)->outbuf.get(); }
void* EpMoeComm::output(int rank) const { return ranks_.at(rank)->y.get(); }
int64_t EpMoeComm::num_tokens(int rank) const { return ranks_.at(rank)->n; }

void EpMoeComm::prepare(const sim::EpSchedule& s, std::span<const sim::ReplicaRouting> routing) {
  check_same_geometry(s.geo, geo_, kEp);
  require(s.source == source_, kEp, "schedule.source", "the source the buffers were sized for",
          "another EpSource");
  require(static_cast<int>(routing.size()) == geo_.attn_dp, kEp, "routing",
          "one table per replica (" + std::to_string(geo_.attn_dp) + ")", std::to_string(routing.size()));
  const int P = geo_.num_ranks, epr = geo_.experts_per_ep_rank(), K = geo_.top_k;
  const int64_t recv_cap = sim::ep_capacity_rows(geo_, cap_, source_);
  for (int r = 0; r < P; ++r) {
    const sim::EpRankPlan& rp = s.ranks[r];
    require(routing[rp.replica].num_tokens <= cap_, kEp, "routing[" + std::to_string(rp.replica) + "].num_tokens",
            "at most max_tokens_per_replica = " + std::to_string(cap_), std::to_string(routing[rp.replica].num_tokens));
    require(rp.gather_rows <= recv_cap, kEp, "step", "at most " + std::to_string(recv_cap) +
            " received (and all-gathered) rows per rank (ep_capacity_rows)",
            std::to_string(rp.gather_rows) + " at rank " + std::to_string(r));
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const sim::ReplicaRouting& rt = routing[rp.replica];
    rk.n = rt.num_tokens;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    upload(rk.send_counts, rp.send_counts, "send counts");
    upload(rk.send_token, rp.send_token, "send tokens");
    // Combine: per source token its rows (CSR over tokens [begin, end)) with their weights;
    // with a shared expert also its summed shared row (backbuf row `rows + token - begin`, 1).
    const int64_t rows = rp.send_offset.back();
    const int32_t nb = rp.token_end - rp.token_begin;
    const int extra = rp.shared_rows > 0 ? 1 : 0;
    std::vector<int64_t> off(nb + 1, 0), row(rows + extra * nb);
    std::vector<double> w(rows + extra * nb);
    for (int64_t k = 0; k < rows; ++k) ++off[rp.send_token[k] - rp.token_begin + 1];
    for (int32_t t = 0; t < nb; ++t) off[t + 1] += off[t] + extra;
    std::vector<int64_t> fill(off.begin(), off.end() - 1);
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t j = fill[rp.send_token[k] - rp.token_begin]++;
      row[j] = k;
      w[j] = rt.topk_weights[static_cast<size_t>(rp.send_token[k]) * K + rp.send_slot[k]];
    }
    for (int32_t t = 0; t < nb && extra; ++t) {
      row[fill[t]] = rows + t;
      w[fill[t]] = 1.0;
    }
    upload(rk.comb_off, off, "combine offsets");
    upload(rk.comb_row, row, "combine rows");
    upload(rk.comb_w, w, "combine weights");
    // Toy expert tables: the EP index's rows by (member, source, local expert), one
    // unweighted pair each.
    const int64_t rr = rp.gather_rows;
    const int T = geo_.moe_tp, base = r - r % T;
    std::vector<int64_t> boff{0, rr}, poff(rr + 1);
    std::vector<int32_t> pe;
    std::vector<double> pw(rr, 1.0);
    for (int64_t k = 0; k <= rr; ++k) poff[k] = k;
    pe.assign(rp.shared_total, geo_.num_experts);  // the shared expert: toy expert E
    for (int u = base; u < base + T; ++u)
      for (int src = 0; src < P; ++src)
        for (int e = 0; e < epr; ++e)
          pe.insert(pe.end(), s.ranks[u].recv_counts[static_cast<size_t>(src) * epr + e], (r / T) * epr + e);
    upload(rk.block_off, boff, "block offsets");
    upload(rk.pair_off, poff, "pair offsets");
    upload(rk.pair_expert, pe, "pair experts");
    upload(rk.pair_w, pw, "pair weights");
  }
  rounds_ = ep_rounds(s);
  s_ = &s;
}

void EpMoeComm::fork(std::span<const cudaStream_t> main) {
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
    wait_on(ranks_[r]->stream.get(), main[r], ranks_[r]->ev[0]);
  }
}

void EpMoeComm::join(std::span<const cudaStream_t> main) {
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(ranks_[r]->device));
    wait_on(main[r], ranks_[r]->stream.get(), ranks_[r]->ev[1]);
  }
}

void EpMoeComm::dispatch() {
  if (!s_) throw RuntimeError("EP MoE comm: dispatch before prepare");
  const sim::EpSchedule& s = *s_;
  const int P = geo_.num_ranks, epr = geo_.experts_per_ep_rank(), h = geo_.hidden;
  const auto st = streams();
  // 1. Counts: rows per (destination, local expert), one grouped round.
  std::vector<P2pOp> ops;
  for (int r = 0; r < P; ++r)
    for (int d = 0; d < P; ++d) {
      P2pOp op;
      op.src = r;
      op.dst = d;
      op.bytes = static_cast<std::size_t>(epr) * sizeof(int64_t);
      if (ranks_[r]) op.send = ranks_[r]->send_counts.as<int64_t>() + static_cast<int64_t>(d) * epr;
      if (ranks_[d]) op.recv = ranks_[d]->recv_counts.as<int64_t>() + static_cast<int64_t>(r) * epr;
      ops.push_back(op);
    }
  tr_.p2p_round(ops, st);
  // The receives are sized from the exchanged counts (host sync), checked against the schedule.
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    rk.counts_host.assign(static_cast<size_t>(P) * epr, 0);
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(rk.counts_host.data(), rk.recv_counts.get(),
                                        rk.counts_host.size() * sizeof(int64_t),
                                        cudaMemcpyDeviceToHost, rk.stream.get()));
  }
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    rk.stream.synchronize();
    if (rk.counts_host != s.ranks[r].recv_counts)
      throw RuntimeError("EP MoE comm: rank " + std::to_string(r) +
                         " received counts that differ from the schedule's recv_counts");
  }
  // 2. Pack the (token, expert) rows, 3. one grouped send/recv into this rank's piece of the
  //    gathered rows (offsets from the schedule's recv_counts, equal to the exchanged ones).
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const int64_t rows = s.ranks[r].send_offset.back();
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    pack(rk.x.get(), cap_, h, h, rk.sendbuf.get(), rows, h, h, rk.send_token.as<int32_t>(), rows,
         h, 0, dtype_, rk.stream.get());
  }
  issue(rounds_.dispatch_rows);
  // 4. moe_tp > 1: the members of an EP index all-gather their received rows (uneven pieces:
  //    one grouped send/recv, each piece at its gather_begin on every member). Shared expert:
  //    each member's source tokens at its shared_begin, copied from the input by the members of
  //    its attention replica, sent to the others in the same round.
  const int T = geo_.moe_tp;
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    for (int u = r - r % T; u < r - r % T + T; ++u) {
      const sim::EpRankPlan& up = s.ranks[u];
      if (up.shared_rows > 0 && up.replica == s.ranks[r].replica)
        MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(at(rk.recvbuf, up.shared_begin * h, eb_),
                                            at(rk.x, static_cast<int64_t>(up.token_begin) * h, eb_),
                                            static_cast<std::size_t>(up.shared_rows) * h * eb_,
                                            cudaMemcpyDeviceToDevice, rk.stream.get()));
    }
  }
  issue(rounds_.dispatch_gather);
}

void EpMoeComm::issue(std::span<const EpTransfer> ts) {
  if (ts.empty()) return;
  const int64_t h = geo_.hidden;
  std::vector<P2pOp> ops;
  ops.reserve(ts.size());
  for (const EpTransfer& t : ts) {
    P2pOp op;
    op.src = t.src;
    op.dst = t.dst;
    op.bytes = static_cast<std::size_t>(t.rows * h) * eb_;
    if (ranks_[t.src]) op.send = at(ranks_[t.src]->buffer(t.send_buf), t.send_row * h, eb_);
    if (ranks_[t.dst]) op.recv = at(ranks_[t.dst]->buffer(t.recv_buf), t.recv_row * h, eb_);
    ops.push_back(op);
  }
  tr_.p2p_round(ops, streams());
}

void EpMoeComm::toy_experts() {
  if (!s_) throw RuntimeError("EP MoE comm: experts before prepare");
  require(dtype_ == MoeDType::f64, kEp, "dtype", "f64 for the toy expert", kernels::to_string(dtype_));
  for (int r = 0; r < geo_.num_ranks; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    kernels::ToyExpertParams p;
    p.x = rk.recvbuf.as<double>();
    p.y = rk.outbuf.as<double>();
    p.num_rows = s_->ranks[r].gather_rows;
    p.hidden = geo_.hidden;
    p.slice_cols = geo_.hidden;
    p.block_row_offset = rk.block_off.as<int64_t>();
    p.num_blocks = 1;
    p.pair_offset = rk.pair_off.as<int64_t>();
    p.pair_expert = rk.pair_expert.as<int32_t>();
    p.pair_weight = rk.pair_w.as<double>();
    p.tp_rank = r % geo_.moe_tp;
    p.tp = geo_.moe_tp;
    kernels::launch_toy_expert(p, rk.stream.get());
  }
}

void EpMoeComm::combine() {
  if (!s_) throw RuntimeError("EP MoE comm: combine before prepare");
  const sim::EpSchedule& s = *s_;
  const int P = geo_.num_ranks, h = geo_.hidden, T = geo_.moe_tp;
  // 1. moe_tp > 1: reduce-scatter of the partial sums over the members of an EP index, in
  //    T - 1 rounds (uneven pieces): in round j member m sends its partials of member
  //    (m + j) mod T's piece [shared rows | received rows] to it, which adds them to its sum
  //    (round 1: its own partials + what came in).
  auto sum = [&](Rank& rk, const void* a, const void* b, void* out, int64_t rows) {
    if (rows == 0) return;
    kernels::SumBuffersParams p;
    p.in[0] = a;
    p.in[1] = b;
    p.num_inputs = 2;
    p.out = out;
    p.num_elements = rows * h;
    p.dtype = dtype_;
    kernels::launch_sum_buffers(p, rk.stream.get());
  };
  for (int j = 1; j < T; ++j) {
    issue(rounds_.combine_rs[static_cast<size_t>(j - 1)]);
    for (int r = 0; r < P; ++r) {
      if (!ranks_[r]) continue;
      Rank& rk = *ranks_[r];
      const sim::EpRankPlan& rp = s.ranks[r];
      MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
      const int64_t sh = rp.shared_rows;
      if (j == 1) {
        sum(rk, at(rk.outbuf, rp.shared_begin * h, eb_), rk.rsbuf.get(), rk.redbuf.get(), sh);
        sum(rk, at(rk.outbuf, rp.gather_begin * h, eb_), at(rk.rsbuf, sh * h, eb_), at(rk.redbuf, sh * h, eb_),
            rp.recv_rows());
      } else {
        sum(rk, rk.redbuf.get(), rk.rsbuf.get(), rk.redbuf.get(), sh + rp.recv_rows());
      }
    }
  }
  // 2. The rows go back: rank d returns to r what it received from r (summed over the
  //    members when moe_tp > 1).
  issue(rounds_.combine_back);
  // 3. Weighted combine at home: y[token] = sum over its rows of w * row (+ its summed shared
  //    row, copied behind the returned rows).
  for (int r = 0; r < P; ++r) {
    if (!ranks_[r]) continue;
    Rank& rk = *ranks_[r];
    const sim::EpRankPlan& rp = s.ranks[r];
    MIXSERVE_CUDA_CHECK(cudaSetDevice(rk.device));
    if (rp.shared_rows > 0)
      MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(at(rk.backbuf, rp.send_offset.back() * h, eb_),
                                          T > 1 ? rk.redbuf.get() : at(rk.outbuf, rp.shared_begin * h, eb_),
                                          static_cast<std::size_t>(rp.shared_rows) * h * eb_,
                                          cudaMemcpyDeviceToDevice, rk.stream.get()));
    kernels::WeightedCombineParams p;
    p.in = rk.backbuf.get();
    p.row_offset = rk.comb_off.as<int64_t>();
    p.row = rk.comb_row.as<int64_t>();
    p.weight = rk.comb_w.as<double>();
    p.y = rk.y.get();
    p.token_begin = rp.token_begin;
    p.token_end = rp.token_end;
    p.cols = h;
    p.dtype = dtype_;
    kernels::launch_weighted_combine(p, rk.stream.get());
  }
  // 4. Split source: the replica's ranks exchange their combined token ranges.
  issue(rounds_.combine_gather);
}

}  // namespace mixserve::gpu
