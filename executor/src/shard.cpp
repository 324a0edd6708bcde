// Shards, plan checks and the transport-backed forward communication: see shard.hpp.
#include "mixserve/gpu/shard.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/moe_comm.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/sim/executor_buffers.hpp"

namespace mixserve::gpu {

ShardDims shard_dims(const ModelSpec& m, const ShardSpec& s) {
  ShardDims d;
  const auto& a = m.attention;
  auto bad = [&](const std::string& what) {
    throw InputError(fmt::format("shard of {}: {}", m.name, what));
  };
  if (s.attn_tp < 1 || s.attn_rank < 0 || s.attn_rank >= s.attn_tp)
    bad(fmt::format("attention TP rank {} of {}", s.attn_rank, s.attn_tp));
  if (s.moe_tp < 1 || s.moe_rank < 0 || s.moe_rank >= s.moe_tp)
    bad(fmt::format("MoE TP rank {} of {}", s.moe_rank, s.moe_tp));
  const int tp = s.attn_tp;
  if (a.num_heads % tp != 0) bad(fmt::format("query heads {} not divisible by attention TP {}", a.num_heads, tp));
  d.q_heads = a.num_heads / tp;
  d.q_head0 = s.attn_rank * d.q_heads;
  if (a.num_kv_heads % tp == 0) {
    d.kv_heads = a.num_kv_heads / tp;
    d.kv_head0 = s.attn_rank * d.kv_heads;
  } else if (tp % a.num_kv_heads == 0) {
    d.kv_heads = 1;  // replicated on tp / KV ranks
    d.kv_head0 = s.attn_rank / (tp / a.num_kv_heads);
  } else {
    bad(fmt::format("KV heads {} and attention TP {}: neither divides the other", a.num_kv_heads, tp));
  }
  if (tp > 1 && a.qk_norm && model::family_of(m) == model::Family::olmoe)
    bad(fmt::format("QK-norm over the whole projection needs attention TP 1 (got {})", tp));
  const int E = m.moe.num_experts;
  d.expert0 = s.expert_begin;
  d.experts = (s.expert_end < 0 ? E : s.expert_end) - s.expert_begin;
  if (m.num_moe_layers() > 0 && (d.expert0 < 0 || d.experts < 1 || d.expert0 + d.experts > E))
    bad(fmt::format("expert range [{}, {}) outside [0, {})", s.expert_begin, s.expert_end, E));
  auto split = [&](int64_t width, int parts, int index, const char* what, int64_t& begin, int64_t& count) {
    if (width == 0) return;
    if (width % parts != 0) bad(fmt::format("{} {} not divisible by TP {}", what, width, parts));
    count = width / parts;
    begin = index * count;
  };
  if (m.num_moe_layers() > 0) {
    split(m.moe.expert_intermediate_size, s.moe_tp, s.moe_rank, "expert width", d.inter0, d.inter);
    split(m.moe.shared_intermediate_size, s.moe_tp, s.moe_rank, "shared-expert width", d.shared0, d.shared);
  }
  if (m.num_dense_layers() > 0) split(m.dense_intermediate_size, tp, s.attn_rank, "dense FFN width", d.dense0, d.dense);
  d.layer_begin = s.layer_begin;
  d.layer_end = s.layer_end < 0 ? m.num_layers : s.layer_end;
  if (d.layer_begin < 0 || d.layer_begin >= d.layer_end || d.layer_end > m.num_layers)
    bad(fmt::format("layer range [{}, {}) outside [0, {}]", s.layer_begin, s.layer_end, m.num_layers));
  d.first_stage = d.layer_begin == 0;
  d.last_stage = d.layer_end == m.num_layers;
  return d;
}

ShardSpec shard_for_rank(const Layout& l, const RankInfo& info, const ModelSpec& m) {
  ShardSpec s;
  s.attn_tp = l.attn_tp;
  s.attn_rank = info.attn_tp_rank;
  s.moe_tp = l.moe_tp;
  s.moe_rank = info.moe_tp_rank;
  s.expert_begin = info.expert_begin;
  s.expert_end = info.expert_end;
  if (m.num_moe_layers() == 0) s.expert_begin = 0, s.expert_end = -1;
  s.layer_begin = info.layer_begin;
  s.layer_end = info.layer_end;
  s.moe_sched = moe_sched_for(l, m);
  // The exchange sums every rank's output over the stage: one EP index adds the shared expert.
  // A schedule runs it in every moe-TP group on the group's own tokens.
  s.shared_expert = s.moe_sched != MoeSched::none || info.moe_ep_rank == 0;
  s.stage_size = l.stage_size();
  s.num_stages = l.pp;
  s.moe_mode = l.stage_size() == 1 ? MoeMode::none : (l.attn_dp == 1 ? MoeMode::replicated : MoeMode::gathered);
  return s;
}

const char* to_string(MoeSched s) {
  switch (s) {
    case MoeSched::none: return "none";
    case MoeSched::ep: return "ep";
    case MoeSched::fused: return "fused";
    case MoeSched::rs_a2a_ag: return "rs-a2a-ag";
  }
  return "?";
}

MoeSched moe_sched_for(const Layout& l, const ModelSpec& m) {
  // One decision for the executor and the planner's memory model (sim/executor_buffers.hpp).
  switch (sim::executor_moe_path(l, m)) {
    case sim::ExecutorMoePath::ep: return MoeSched::ep;  // build_ep_schedule: any moe_tp
    case sim::ExecutorMoePath::fused: return MoeSched::fused;
    case sim::ExecutorMoePath::rs_a2a_ag: return MoeSched::rs_a2a_ag;
    case sim::ExecutorMoePath::exchange: return MoeSched::none;
  }
  return MoeSched::none;
}

void check_plan_for_run(const Plan& p, const ModelSpec& model, const LaunchShape& launch) {
  const Layout& l = p.chosen.layout;
  const std::string name = l.name();
  if (l.world_size() != launch.world_size)
    throw InputError(fmt::format("plan layout '{}' needs {} ranks; launched with {}", name, l.world_size(),
                                 launch.world_size));
  if (int(p.rank_map.size()) != l.world_size())
    throw InputError(fmt::format("plan rank_map has {} ranks; layout '{}' has {}", p.rank_map.size(), name,
                                 l.world_size()));
  if (p.cluster.world_size() != l.world_size())
    throw InputError(fmt::format("plan cluster '{}' has {} GPUs; layout '{}' has {} ranks", p.cluster.name,
                                 p.cluster.world_size(), name, l.world_size()));
  if (launch.gpus_available < launch.gpus_needed)
    throw InputError(fmt::format("plan layout '{}' needs {} GPU(s) in this process; {} visible", name,
                                 launch.gpus_needed, launch.gpus_available));
  const ModelSpec& pm = p.model;
  auto same = [&](const char* what, int64_t a, int64_t b) {
    if (a != b)
      throw InputError(fmt::format("plan is for model '{}' ({}={}); running '{}' ({}={})", pm.name, what, a,
                                   model.name, what, b));
  };
  same("hidden_size", pm.hidden_size, model.hidden_size);
  same("num_layers", pm.num_layers, model.num_layers);
  same("num_heads", pm.attention.num_heads, model.attention.num_heads);
  same("num_kv_heads", pm.attention.num_kv_heads, model.attention.num_kv_heads);
  same("num_experts", pm.moe.num_experts, model.moe.num_experts);
  same("expert_intermediate_size", pm.moe.expert_intermediate_size, model.moe.expert_intermediate_size);
  same("vocab_size", pm.vocab_size, model.vocab_size);
  const auto want = build_rank_map(p.cluster, pm, l);
  for (std::size_t r = 0; r < want.size(); ++r) {
    const RankInfo &a = p.rank_map[r], &b = want[r];
    if (a.rank != b.rank || a.attn_tp_rank != b.attn_tp_rank || a.attn_dp_rank != b.attn_dp_rank ||
        a.moe_tp_rank != b.moe_tp_rank || a.moe_ep_rank != b.moe_ep_rank || a.expert_begin != b.expert_begin ||
        a.expert_end != b.expert_end || a.layer_begin != b.layer_begin || a.layer_end != b.layer_end ||
        a.pp_stage != b.pp_stage)
      throw InputError(fmt::format("plan rank_map[{}] differs from the rank map of layout '{}'", r, name));
  }
  for (const auto& info : want) (void)shard_dims(model, shard_for_rank(l, info, model));
}

// ----------------------------------------------------------------------------- scheduled MoE (host)

int64_t routing_words(int64_t stage_tokens, int top_k) { return 1 + 2 * stage_tokens * int64_t(top_k); }

std::vector<sim::ReplicaRouting> unpack_routing(std::span<const int32_t> gathered, int stage_size, int attn_tp,
                                                int64_t stage_tokens, int top_k) {
  const int64_t words = routing_words(stage_tokens, top_k);
  if (attn_tp < 1 || stage_size % attn_tp != 0 || int64_t(gathered.size()) != words * stage_size)
    throw InputError(fmt::format("routing exchange: {} words for {} ranks of {} (attention TP {})", gathered.size(),
                                 stage_size, words, attn_tp));
  std::vector<sim::ReplicaRouting> out(std::size_t(stage_size / attn_tp));
  for (int r = 0; r < stage_size; ++r) {
    const int32_t* piece = gathered.data() + std::size_t(r) * std::size_t(words);
    const int32_t n = piece[0];
    if (n < 0 || n > stage_tokens)
      throw InputError(fmt::format("routing exchange: rank {} of the stage has {} tokens (at most {})", r, n,
                                   stage_tokens));
    sim::ReplicaRouting& rt = out[std::size_t(r / attn_tp)];
    if (r % attn_tp != 0) {
      if (n != rt.num_tokens)
        throw RuntimeError(fmt::format("routing exchange: rank {} has {} tokens, its replica's first rank {}", r, n,
                                       rt.num_tokens));
      continue;
    }
    const std::size_t nk = std::size_t(n) * std::size_t(top_k);
    rt.num_tokens = n;
    rt.topk_ids.assign(piece + 1, piece + 1 + nk);
    rt.topk_weights.resize(nk);
    const int32_t* wbits = piece + 1 + stage_tokens * top_k;
    for (std::size_t i = 0; i < nk; ++i) {
      float f;
      std::memcpy(&f, wbits + i, sizeof f);
      rt.topk_weights[i] = f;
    }
  }
  return out;
}

ExpertSlots fused_expert_slots(const sim::ExpertSide& xs, int top_k) {
  ExpertSlots o;
  o.k = top_k;
  o.rows = xs.num_rows();
  o.ids.assign(std::size_t(o.rows) * std::size_t(top_k), -1);
  o.weights.assign(o.ids.size(), 0.f);
  std::vector<int> used(std::size_t(o.rows), 0);
  const int El = int(xs.expert_pair_offset.size()) - 1;
  for (int e = 0; e < El; ++e)
    for (int64_t p = xs.expert_pair_offset[std::size_t(e)]; p < xs.expert_pair_offset[std::size_t(e) + 1]; ++p) {
      const int64_t row = xs.pair_row[std::size_t(p)];
      int& u = used[std::size_t(row)];
      if (u >= top_k)
        throw RuntimeError(fmt::format("fused expert slots: row {} has more than top_k = {} pairs", row, top_k));
      o.ids[std::size_t(row) * std::size_t(top_k) + std::size_t(u)] = e;
      o.weights[std::size_t(row) * std::size_t(top_k) + std::size_t(u)] = float(xs.pair_weight[std::size_t(p)]);
      ++u;
    }
  return o;
}

ExpertSlots ep_expert_slots(const sim::EpSchedule& s, int rank) {
  const sim::EpRankPlan& rp = s.ranks.at(std::size_t(rank));
  const int P = s.geo.num_ranks, epr = s.geo.experts_per_ep_rank(), T = s.geo.moe_tp;
  ExpertSlots o;
  o.k = 1;
  o.rows = rp.gather_rows;  // the EP index's rows: shared rows, every member's received rows
  o.ids.assign(std::size_t(rp.shared_total), -1);
  for (int u = rank - rank % T; u < rank - rank % T + T; ++u) {
    const sim::EpRankPlan& up = s.ranks.at(std::size_t(u));
    for (int src = 0; src < P; ++src)
      for (int e = 0; e < epr; ++e)
        o.ids.insert(o.ids.end(), std::size_t(up.recv_counts[std::size_t(src) * std::size_t(epr) + std::size_t(e)]), e);
  }
  o.weights.assign(o.ids.size(), 1.f);
  return o;
}

MoeBytes schedule_bytes(const sim::FusedSchedule& s, int rank) {
  MoeBytes b;
  for (const sim::FusedStep& st : s.steps.at(std::size_t(rank))) {
    b.dispatch += st.dispatch_bytes.inter_bytes + st.dispatch_bytes.intra_bytes;
    b.combine += st.combine_bytes.inter_bytes + st.combine_bytes.intra_bytes;
  }
  const sim::RankRoundBytes& f = s.final_ag_bytes.at(std::size_t(rank));
  b.combine += f.inter_bytes + f.intra_bytes;
  return b;
}

MoeBytes schedule_bytes(const sim::EpSchedule& s, int rank) {
  const sim::EpRankPlan& rp = s.ranks.at(std::size_t(rank));
  return MoeBytes{rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes,
                  rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes};
}

// ----------------------------------------------------------------------------- stage MoE

StageMoe::StageMoe(const sim::CommGeometry& geo, MoeSched sched, int64_t max_tokens_per_replica, Transport& world,
                   int first_rank)
    : geo_(geo), sched_(sched), cap_(max_tokens_per_replica) {
  tr_ = std::make_unique<StageTransport>(world, first_rank, geo.num_ranks);
  switch (sched) {
    case MoeSched::fused:
    case MoeSched::rs_a2a_ag:
      fused_ = std::make_unique<FusedMoeComm>(geo, cap_, kernels::MoeDType::bf16, *tr_);
      fused_->set_overlap(sched == MoeSched::fused);
      break;
    case MoeSched::ep:
      ep_ = std::make_unique<EpMoeComm>(geo, cap_, sim::EpSource::split, kernels::MoeDType::bf16, *tr_);
      break;
    case MoeSched::none:
      throw InputError("stage MoE: no schedule (moe_sched none)");
  }
}

StageMoe::~StageMoe() = default;

int64_t StageMoe::max_expert_rows() const {
  return fused_ ? sim::fused_capacity_rows(geo_, cap_) : sim::ep_capacity_rows(geo_, cap_, sim::EpSource::split);
}
void* StageMoe::input(int rank) const { return fused_ ? fused_->input(rank) : ep_->input(rank); }
void* StageMoe::output(int rank) const { return fused_ ? fused_->output(rank) : ep_->output(rank); }
const void* StageMoe::received(int rank) const { return fused_ ? fused_->received(rank) : ep_->received(rank); }
void* StageMoe::expert_out(int rank) const { return fused_ ? fused_->partial(rank) : ep_->expert_out(rank); }
const sim::FusedSchedule* StageMoe::fused_schedule() const { return fused_ ? &fs_ : nullptr; }

ExpertSlots StageMoe::expert_slots(int rank) const {
  if (fused_) {
    const sim::ExpertSide& xs = fs_.expert_side.at(std::size_t(fs_.group_of(rank)));
    ExpertSlots o = fused_expert_slots(xs, geo_.top_k);
    o.shared_rows = geo_.shared_expert ? xs.block_row_offset.at(1) : 0;  // block 0: the replica's tokens
    return o;
  }
  ExpertSlots o = ep_expert_slots(es_, rank);
  o.shared_rows = es_.ranks.at(std::size_t(rank)).shared_total;
  return o;
}

void StageMoe::dispatch(std::vector<sim::ReplicaRouting> routing, std::span<const cudaStream_t> main) {
  routing_ = std::move(routing);
  const int P = geo_.num_ranks;
  pending_.clear();
  before_.assign(std::size_t(P), 0);
  for (int r = 0; r < P; ++r) before_[std::size_t(r)] = tr_->bytes_sent(r);
  if (fused_) {
    fs_ = sim::build_fused_schedule(geo_, routing_);
    fused_->prepare(fs_, routing_);
    fused_->fork(main);
    fused_->dispatch();
    fused_->join(main);
  } else {
    es_ = sim::build_ep_schedule(geo_, routing_, sim::EpSource::split);
    ep_->prepare(es_, routing_);
    ep_->fork(main);
    ep_->dispatch();
    ep_->join(main);
  }
  for (int r = 0; r < P; ++r) {
    if (!tr_->is_local(r)) continue;
    MoeBytesRecord rec;
    rec.rank = r;
    rec.moved.dispatch = tr_->bytes_sent(r) - before_[std::size_t(r)];
    rec.scheduled = fused_ ? schedule_bytes(fs_, r) : schedule_bytes(es_, r);
    if (ep_) {  // the counts round: (destination, local expert) counts to every other rank
      rec.counts = double(P - 1) * geo_.experts_per_ep_rank() * double(sizeof(int64_t));
      rec.moved.dispatch -= rec.counts;
    }
    pending_.push_back(rec);
    before_[std::size_t(r)] = tr_->bytes_sent(r);
  }
}

void StageMoe::combine(std::span<const cudaStream_t> main) {
  if (fused_) {
    fused_->fork(main);
    fused_->combine();
    fused_->join(main);
  } else {
    ep_->fork(main);
    ep_->combine();
    ep_->join(main);
  }
  for (MoeBytesRecord& rec : pending_) {
    rec.moved.combine = tr_->bytes_sent(rec.rank) - before_[std::size_t(rec.rank)];
    if (records_.size() < kMaxRecords) records_.push_back(rec);  // a long bench keeps the first ones
  }
  pending_.clear();
}

// ----------------------------------------------------------------------------- rendezvous


void Rendezvous::meet(const std::vector<int>& group, int index, const void* arg,
                      const std::function<void(std::span<const void* const>)>& fn) {
  std::unique_lock<std::mutex> lk(mu_);
  if (aborted_) throw RuntimeError("rendezvous aborted (another rank failed)");
  Meeting& m = meetings_[group];
  if (m.args.size() != group.size()) m.args.assign(group.size(), nullptr);
  m.args[std::size_t(index)] = arg;
  if (++m.arrived == int(group.size())) {
    m.error = nullptr;
    try {
      const KeepDevice keep;  // fn switches to every rank's device (runtime.hpp)
      fn(m.args);  // under the lock: transport calls of different groups never interleave
    } catch (...) {
      m.error = std::current_exception();
    }
    m.arrived = 0;
    ++m.generation;
    cv_.notify_all();
    if (m.error) std::rethrow_exception(m.error);
    return;
  }
  const uint64_t gen = m.generation;
  cv_.wait(lk, [&] { return m.generation != gen || aborted_; });
  if (m.generation == gen) throw RuntimeError("rendezvous aborted (another rank failed)");
  if (m.error) std::rethrow_exception(m.error);
}

void Rendezvous::abort() {
  std::lock_guard<std::mutex> lk(mu_);
  aborted_ = true;
  cv_.notify_all();
}

// ----------------------------------------------------------------------------- transport comm

TransportComm::TransportComm(Transport& attn, Transport& stage, const Layout& layout, int rank,
                             Rendezvous* rendezvous, int64_t max_elements)
    : attn_tr_(attn), stage_tr_(stage), layout_(layout), rank_(rank), rdv_(rendezvous), max_elements_(max_elements) {
  if (rank < 0 || rank >= layout.world_size())
    throw InputError(fmt::format("rank {} not in plan (world={})", rank, layout.world_size()));
  for (const Transport* t : {&attn, &stage})
    if (t->num_ranks() != layout.world_size())
      throw InputError(fmt::format("{} transport of {} ranks for a layout of {}", t->name(), t->num_ranks(),
                                   layout.world_size()));
  const int S = layout.stage_size(), base = (rank / S) * S, q = rank - base;
  for (int i = 0; i < S; ++i) stage_group_.push_back(base + i);
  const int d = q / layout.attn_tp;
  for (int i = 0; i < layout.attn_tp; ++i) attn_group_.push_back(base + d * layout.attn_tp + i);
  MIXSERVE_CUDA_CHECK(cudaMalloc(&scratch_, std::size_t(std::max<int64_t>(max_elements, 8)) * 2));
  MIXSERVE_CUDA_CHECK(cudaMalloc(&counts_dev_, std::size_t(S) * sizeof(int64_t)));
}

TransportComm::~TransportComm() {
  cudaFree(scratch_);
  cudaFree(counts_dev_);
  cudaFree(route_dev_);
  cudaFree(xrow_);
  cudaFree(yrow_);
  cudaFree(ids_dev_);
  cudaFree(w_dev_);
}

const std::vector<int>& TransportComm::group(CommGroup g) const {
  return g == CommGroup::attn_tp ? attn_group_ : stage_group_;
}
int TransportComm::group_size(CommGroup g) const { return int(group(g).size()); }
int TransportComm::group_index(CommGroup g) const {
  const auto& v = group(g);
  return int(std::find(v.begin(), v.end(), rank_) - v.begin());
}

namespace {
// Runs op(ranks) with every member's CollRank: through the rendezvous (one thread per rank), or
// directly with only this rank's entry set (a transport holding one rank).
void collective(Rendezvous* rdv, const std::vector<int>& group, int index, const CollRank& mine,
                const std::function<void(std::span<const CollRank>)>& op) {
  if (!rdv) {
    std::vector<CollRank> ranks(group.size());
    ranks[std::size_t(index)] = mine;
    op(ranks);
    return;
  }
  rdv->meet(group, index, &mine, [&](std::span<const void* const> args) {
    std::vector<CollRank> ranks;
    for (const void* a : args) ranks.push_back(*static_cast<const CollRank*>(a));
    op(ranks);
  });
}
}  // namespace

void TransportComm::all_reduce(CommGroup g, __nv_bfloat16* x, int64_t count, cudaStream_t s) {
  const auto& grp = group(g);
  const int G = int(grp.size());
  if (G == 1 || count == 0) return;
  if (count % G != 0)
    throw InputError(fmt::format("all-reduce of {} elements over {} ranks (need a multiple)", count, G));
  if (count / G > max_elements_)
    throw InputError(fmt::format("all-reduce of {} elements: scratch holds {}", count / G, max_elements_));
  const std::size_t chunk = std::size_t(count / G);
  CollRank rs{x, scratch_, s};
  collective(rdv_, grp, group_index(g), rs, [&](std::span<const CollRank> ranks) {
    tr(g).reduce_scatter(grp, ranks, chunk, kernels::MoeDType::bf16);
    std::vector<CollRank> ag;  // the summed chunk back into every member's x
    for (const CollRank& r : ranks) ag.push_back(CollRank{r.recv, const_cast<void*>(r.send), r.stream});
    tr(g).all_gather(grp, ag, chunk * 2);
  });
}

void TransportComm::all_gather(CommGroup g, void* buf, std::size_t bytes_per_rank, cudaStream_t s) {
  const auto& grp = group(g);
  if (grp.size() == 1 || bytes_per_rank == 0) return;
  const int u = group_index(g);
  CollRank me{static_cast<char*>(buf) + std::size_t(u) * bytes_per_rank, buf, s};
  collective(rdv_, grp, u, me, [&](std::span<const CollRank> ranks) { tr(g).all_gather(grp, ranks, bytes_per_rank); });
}

void TransportComm::reduce_scatter(CommGroup g, const __nv_bfloat16* send, __nv_bfloat16* recv, int64_t count,
                                   cudaStream_t s) {
  const auto& grp = group(g);
  if (count == 0) return;
  if (grp.size() == 1) {
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(recv, send, std::size_t(count) * 2, cudaMemcpyDeviceToDevice, s));
    return;
  }
  CollRank me{send, recv, s};
  collective(rdv_, grp, group_index(g), me, [&](std::span<const CollRank> ranks) {
    tr(g).reduce_scatter(grp, ranks, std::size_t(count), kernels::MoeDType::bf16);
  });
}

int64_t TransportComm::max_over(CommGroup g, int64_t v, cudaStream_t s) {
  const auto& grp = group(g);
  if (grp.size() == 1) return v;
  const int u = group_index(g);
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(counts_dev_ + u, &v, sizeof v, cudaMemcpyHostToDevice, s));
  all_gather(g, counts_dev_, sizeof(int64_t), s);
  std::vector<int64_t> all(grp.size());
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(all.data(), counts_dev_, all.size() * sizeof(int64_t),
                                      cudaMemcpyDeviceToHost, s));
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));
  return *std::max_element(all.begin(), all.end());
}

void TransportComm::p2p(int src, int dst, const void* send, void* recv, std::size_t bytes, cudaStream_t s) {
  if (bytes == 0) return;
  struct Side {
    const void* send;
    void* recv;
    cudaStream_t stream;
  };
  const Side mine{send, recv, s};
  auto issue = [&](const Side& a, const Side& b) {  // a: the sender's side, b: the receiver's
    std::vector<cudaStream_t> streams(std::size_t(stage_tr_.num_ranks()), nullptr);
    if (a.stream) streams[std::size_t(src)] = a.stream;
    if (b.stream) streams[std::size_t(dst)] = b.stream;
    const P2pOp op{src, dst, a.send, b.recv, bytes};
    stage_tr_.p2p_round(std::span<const P2pOp>(&op, 1), streams);
  };
  if (!rdv_) {
    if (rank_ == src)
      issue(mine, Side{nullptr, nullptr, nullptr});
    else
      issue(Side{nullptr, nullptr, nullptr}, mine);
    return;
  }
  rdv_->meet({src, dst}, rank_ == src ? 0 : 1, &mine, [&](std::span<const void* const> args) {
    issue(*static_cast<const Side*>(args[0]), *static_cast<const Side*>(args[1]));
  });
}

// ----------------------------------------------------------------------------- scheduled MoE

MoeExpertRows ForwardComm::moe_dispatch(const __nv_bfloat16*, const int32_t*, const float*, int64_t, int64_t,
                                        cudaStream_t) {
  throw RuntimeError("this ForwardComm has no scheduled MoE communication");
}
void ForwardComm::moe_combine(__nv_bfloat16*, int64_t, cudaStream_t) {
  throw RuntimeError("this ForwardComm has no scheduled MoE communication");
}

void TransportComm::set_stage_moe(StageMoe* moe, int top_k) {
  moe_ = moe;
  top_k_ = top_k;
  if (!moe) return;
  if (moe->geometry().num_ranks != int(stage_group_.size()))
    throw InputError(fmt::format("stage MoE of {} ranks for a stage of {}", moe->geometry().num_ranks,
                                 stage_group_.size()));
  const int64_t S = int64_t(stage_group_.size()), H = moe->geometry().hidden;
  const int64_t rows = std::max<int64_t>(moe->max_expert_rows(), 1);
  const int64_t words = routing_words(moe->max_tokens(), top_k);
  MIXSERVE_CUDA_CHECK(cudaMalloc(&route_dev_, std::size_t(S * words) * 4));
  MIXSERVE_CUDA_CHECK(cudaMalloc(&ids_dev_, std::size_t(rows * top_k) * 4));
  MIXSERVE_CUDA_CHECK(cudaMalloc(&w_dev_, std::size_t(rows * top_k) * 4));
  if (moe->fused_schedule()) {
    MIXSERVE_CUDA_CHECK(cudaMalloc(&xrow_, std::size_t(rows * H) * 2));
    MIXSERVE_CUDA_CHECK(cudaMalloc(&yrow_, std::size_t(rows * H) * 2));
  }
}

namespace {
// Row-major [rows, h] <-> the fused expert side's slice-major blocks ([T][n_i][h/T] at
// block_row_offset[i] * h): one 2-D copy per (block, slice).
void fused_rows_copy(const sim::FusedSchedule& fs, const sim::ExpertSide& xs, const void* src, void* dst,
                     bool to_row_major, cudaStream_t s) {
  const std::size_t h = std::size_t(fs.geo.hidden), hs = std::size_t(fs.slice_elems), eb = 2;
  for (int i = 0; i < fs.num_groups; ++i) {
    const std::size_t off = std::size_t(xs.block_row_offset[std::size_t(i)]);
    const std::size_t n = std::size_t(xs.block_row_offset[std::size_t(i) + 1]) - off;
    if (n == 0) continue;
    for (int t = 0; t < fs.group_size; ++t) {
      const std::size_t rm = (off * h + std::size_t(t) * hs) * eb;           // row-major
      const std::size_t sm = (off * h + std::size_t(t) * n * hs) * eb;       // slice-major
      if (to_row_major)
        MIXSERVE_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst) + rm, h * eb,
                                              static_cast<const char*>(src) + sm, hs * eb, hs * eb, n,
                                              cudaMemcpyDeviceToDevice, s));
      else
        MIXSERVE_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst) + sm, hs * eb,
                                              static_cast<const char*>(src) + rm, h * eb, hs * eb, n,
                                              cudaMemcpyDeviceToDevice, s));
    }
  }
}

struct MoeArrival {
  int index = 0;  // in the stage
  cudaStream_t stream = nullptr;
};
}  // namespace

MoeExpertRows TransportComm::moe_dispatch(const __nv_bfloat16* x, const int32_t* topk_ids, const float* topk_w,
                                          int64_t T, int64_t T_stage, cudaStream_t s) {
  if (!moe_) throw RuntimeError(fmt::format("rank {}: scheduled MoE without a StageMoe", rank_));
  const sim::CommGeometry& geo = moe_->geometry();
  const int K = top_k_, S = int(stage_group_.size()), u = group_index(CommGroup::stage);
  const int64_t H = geo.hidden;
  if (T > T_stage || T_stage > moe_->max_tokens())
    throw InputError(fmt::format("scheduled MoE: {} tokens (stage {}), buffers for {}", T, T_stage,
                                 moe_->max_tokens()));
  // 1. The routing of every rank of the stage on the host: all-gather, then a copy back.
  const int64_t words = routing_words(T_stage, K);
  int32_t* mine = route_dev_ + std::size_t(u) * std::size_t(words);
  const int32_t count = int32_t(T);
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(mine, &count, 4, cudaMemcpyHostToDevice, s));
  if (T > 0) {
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(mine + 1, topk_ids, std::size_t(T * K) * 4, cudaMemcpyDeviceToDevice, s));
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(mine + 1 + T_stage * K, topk_w, std::size_t(T * K) * 4,
                                        cudaMemcpyDeviceToDevice, s));
  }
  all_gather(CommGroup::stage, route_dev_, std::size_t(words) * 4, s);
  route_host_.resize(std::size_t(S * words));
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(route_host_.data(), route_dev_, route_host_.size() * 4,
                                      cudaMemcpyDeviceToHost, s));
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(s));  // also: every earlier use of the MoE buffers is done
  auto routing = unpack_routing(route_host_, S, layout_.attn_tp, T_stage, K);
  // 2. This rank's rows into the executor's input, then the stage's dispatch (once, for all).
  if (T > 0)
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(moe_->input(u), x, std::size_t(T * H) * 2, cudaMemcpyDeviceToDevice, s));
  const MoeArrival me{u, s};
  auto run = [&](std::span<const void* const> args) {
    std::vector<cudaStream_t> main(std::size_t(S), nullptr);
    for (const void* a : args) {
      const auto* m = static_cast<const MoeArrival*>(a);
      main[std::size_t(m->index)] = m->stream;
    }
    moe_->dispatch(std::move(routing), main);
  };
  if (rdv_) {
    rdv_->meet(stage_group_, u, &me, run);
  } else {
    const void* arg = &me;
    run(std::span<const void* const>(&arg, 1));
  }
  // 3. The expert step's rows and slots.
  slots_ = moe_->expert_slots(u);
  MoeExpertRows out;
  out.rows = slots_.rows;
  out.k = slots_.k;
  out.shared_rows = slots_.shared_rows;
  if (out.rows == 0) return out;
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(ids_dev_, slots_.ids.data(), slots_.ids.size() * 4, cudaMemcpyHostToDevice, s));
  MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(w_dev_, slots_.weights.data(), slots_.weights.size() * 4,
                                      cudaMemcpyHostToDevice, s));
  out.ids = ids_dev_;
  out.weights = w_dev_;
  if (const sim::FusedSchedule* fs = moe_->fused_schedule()) {
    fused_rows_copy(*fs, fs->expert_side[std::size_t(fs->group_of(u))], moe_->received(u), xrow_, true, s);
    out.x = xrow_;
    out.out = yrow_;
  } else {
    out.x = static_cast<const __nv_bfloat16*>(moe_->received(u));
    out.out = static_cast<__nv_bfloat16*>(moe_->expert_out(u));
  }
  return out;
}

void TransportComm::moe_combine(__nv_bfloat16* out, int64_t T, cudaStream_t s) {
  const int S = int(stage_group_.size()), u = group_index(CommGroup::stage);
  const int64_t H = moe_->geometry().hidden;
  if (const sim::FusedSchedule* fs = moe_->fused_schedule(); fs && slots_.rows > 0)
    fused_rows_copy(*fs, fs->expert_side[std::size_t(fs->group_of(u))], yrow_, moe_->expert_out(u), false, s);
  const MoeArrival me{u, s};
  auto run = [&](std::span<const void* const> args) {
    std::vector<cudaStream_t> main(std::size_t(S), nullptr);
    for (const void* a : args) {
      const auto* m = static_cast<const MoeArrival*>(a);
      main[std::size_t(m->index)] = m->stream;
    }
    moe_->combine(main);
  };
  if (rdv_) {
    rdv_->meet(stage_group_, u, &me, run);
  } else {
    const void* arg = &me;
    run(std::span<const void* const>(&arg, 1));
  }
  if (T > 0)
    MIXSERVE_CUDA_CHECK(cudaMemcpyAsync(out, moe_->output(u), std::size_t(T * H) * 2, cudaMemcpyDeviceToDevice, s));
}

void TransportComm::send_next_stage(const void* buf, std::size_t bytes, cudaStream_t s) {
  p2p(rank_, rank_ + layout_.stage_size(), buf, nullptr, bytes, s);
}
void TransportComm::recv_prev_stage(void* buf, std::size_t bytes, cudaStream_t s) {
  p2p(rank_ - layout_.stage_size(), rank_, nullptr, buf, bytes, s);
}

}  // namespace mixserve::gpu
