// Shards, plan checks and the transport-backed forward communication: see shard.hpp.
#include "mixserve/gpu/shard.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/model/weights.hpp"

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
  s.shared_expert = info.moe_ep_rank == 0;
  s.stage_size = l.stage_size();
  s.num_stages = l.pp;
  s.moe_mode = l.stage_size() == 1 ? MoeMode::none : (l.attn_dp == 1 ? MoeMode::replicated : MoeMode::gathered);
  return s;
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

void TransportComm::send_next_stage(const void* buf, std::size_t bytes, cudaStream_t s) {
  p2p(rank_, rank_ + layout_.stage_size(), buf, nullptr, bytes, s);
}
void TransportComm::recv_prev_stage(void* buf, std::size_t bytes, cudaStream_t s) {
  p2p(rank_ - layout_.stage_size(), rank_, nullptr, buf, bytes, s);
}

}  // namespace mixserve::gpu
