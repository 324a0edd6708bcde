// R logical ranks of a plan on one GPU: see distributed.hpp.
#include "mixserve/gpu/distributed.hpp"

#include <exception>
#include <functional>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

EmulatedRanks::EmulatedRanks(const model::WeightSet& w, const ClusterSpec& c, const Layout& l,
                             const GpuModelConfig& base, Placement placement)
    : layout_(l) {
  build(&w, w.spec(), 0, c, base, placement);
}

EmulatedRanks::EmulatedRanks(const ModelSpec& m, uint64_t seed, const ClusterSpec& c, const Layout& l,
                             const GpuModelConfig& base, Placement placement)
    : layout_(l) {
  build(nullptr, m, seed, c, base, placement);
}

EmulatedRanks::~EmulatedRanks() = default;

void EmulatedRanks::build(const model::WeightSet* w, const ModelSpec& m, uint64_t seed, const ClusterSpec& c,
                          const GpuModelConfig& base, Placement placement) {
  rank_map_ = build_rank_map(c, m, layout_);
  const int R = layout_.world_size();
  int current = 0;
  MIXSERVE_CUDA_CHECK(cudaGetDevice(&current));
  const KeepDevice keep;  // the per-rank setup below switches devices, also when it throws
  Transport* attn = nullptr;
  Transport* stage = nullptr;
  Transport* moe = nullptr;  // the scheduled MoE's: groups of moe_tp ranks (NCCL), rails r % moe_tp
  const MoeSched sched = moe_sched_for(layout_, m);
  if (placement == Placement::one_gpu) {
    device_.assign(std::size_t(R), current);
    transports_.push_back(std::make_unique<LocalTransport>(R, current));
    attn = stage = moe = transports_.back().get();
  } else {
#if MIXSERVE_HAVE_NCCL
    const int n = device_count_or_zero();
    if (n < R)
      throw InputError(fmt::format("layout '{}' needs {} GPUs (one per rank); {} visible", layout_.name(), R, n));
    for (int r = 0; r < R; ++r) device_.push_back(r);
    auto world = std::make_shared<std::vector<Comm>>(init_single_process(device_));
    std::vector<const Comm*> ptrs;
    for (const Comm& cm : *world) ptrs.push_back(&cm);
    nccl_world_ = world;
    transports_.push_back(std::make_unique<NcclTransport>(ptrs, layout_.attn_tp));
    attn = transports_.back().get();
    transports_.push_back(std::make_unique<NcclTransport>(ptrs, layout_.stage_size()));
    stage = transports_.back().get();
    if (sched != MoeSched::none) {
      transports_.push_back(std::make_unique<NcclTransport>(ptrs, layout_.moe_tp));
      moe = transports_.back().get();
    }
#else
    throw InputError("a GPU per rank needs NCCL, which this build lacks");
#endif
  }
  rendezvous_ = std::make_unique<Rendezvous>();
  if (sched != MoeSched::none) {
    sim::CommGeometry geo = sim::make_comm_geometry(c, m, layout_);
    geo.elem_bytes = 2;  // the forward moves bf16 rows
    for (int p = 0; p < layout_.pp; ++p)
      stage_moe_.push_back(std::make_unique<StageMoe>(geo, sched, int64_t(base.max_tokens_per_step), *moe,
                                                      p * layout_.stage_size()));
    MIXSERVE_CUDA_CHECK(cudaSetDevice(current));
  }
  for (int r = 0; r < R; ++r) {
    MIXSERVE_CUDA_CHECK(cudaSetDevice(device_[std::size_t(r)]));
    // The all-reduce scratch holds one chunk of the largest all-reduce: [T, H] / group.
    comms_.push_back(std::make_unique<TransportComm>(*attn, *stage, layout_, r, rendezvous_.get(),
                                                     int64_t(base.max_tokens_per_step) * m.hidden_size));
    if (sched != MoeSched::none)
      comms_.back()->set_stage_moe(stage_moe_[std::size_t(r / layout_.stage_size())].get(), m.moe.top_k);
    GpuModelConfig cfg = base;
    cfg.shard = shard_for_rank(layout_, rank_map_[std::size_t(r)], m);
    cfg.comm = comms_.back().get();
    if (w)
      models_.push_back(std::make_unique<GpuModel>(*w, cfg));
    else
      models_.push_back(std::make_unique<GpuModel>(m, seed, cfg));
  }
}

int EmulatedRanks::replica_of(int rank) const {
  return (rank % layout_.stage_size()) / layout_.attn_tp;
}

void EmulatedRanks::on_every_rank(const std::function<void(int)>& fn) {
  const int R = num_ranks();
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(R));
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      try {
        MIXSERVE_CUDA_CHECK(cudaSetDevice(device_[std::size_t(r)]));
        fn(r);
        // The rank's thread must end on its own device (Rendezvous::meet runs collectives for
        // every rank on one thread and puts its device back).
        int now = -1;
        MIXSERVE_CUDA_CHECK(cudaGetDevice(&now));
        if (now != device_[std::size_t(r)])
          throw RuntimeError(fmt::format("rank {}: its thread ended on device {}, not its device {}", r, now,
                                         device_[std::size_t(r)]));
      } catch (...) {
        errors[std::size_t(r)] = std::current_exception();
        rendezvous_->abort();  // the peers waiting on this rank would never be released
      }
    });
  for (auto& t : threads) t.join();
  // The first error that is not a peer's abort is the cause.
  std::exception_ptr first;
  for (const auto& e : errors) {
    if (!e) continue;
    if (!first) first = e;
    try {
      std::rethrow_exception(e);
    } catch (const RuntimeError& re) {
      if (std::string(re.what()).find("rendezvous aborted") != std::string::npos) continue;
      first = e;
      break;
    } catch (...) {
      first = e;
      break;
    }
  }
  if (first) std::rethrow_exception(first);  // the rendezvous stays aborted: the ranks are unusable now
}

void EmulatedRanks::prepare(const std::vector<std::vector<model::SequenceStep>>& batches, const StepOptions& opt) {
  if (int(batches.size()) != layout_.attn_dp)
    throw InputError(fmt::format("emulated ranks: {} batches for {} attention-DP replicas", batches.size(),
                                 layout_.attn_dp));
  on_every_rank([&](int r) { models_[std::size_t(r)]->prepare(batches[std::size_t(replica_of(r))], opt); });
}

void EmulatedRanks::enqueue_and_wait() {
  on_every_rank([&](int r) {
    GpuModel& g = *models_[std::size_t(r)];
    g.enqueue(g.stream());
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(g.stream()));
  });
}

std::vector<GpuStepOutput> EmulatedRanks::step(const std::vector<std::vector<model::SequenceStep>>& batches,
                                               const StepOptions& opt) {
  prepare(batches, opt);
  enqueue_and_wait();
  return collect(opt.record_hidden);
}

std::vector<GpuStepOutput> EmulatedRanks::collect(bool record_hidden) {
  std::vector<GpuStepOutput> outs(static_cast<std::size_t>(num_ranks()));
  {
    const KeepDevice keep;
    for (int r = 0; r < num_ranks(); ++r) {
      MIXSERVE_CUDA_CHECK(cudaSetDevice(device_[std::size_t(r)]));
      GpuModel& g = *models_[std::size_t(r)];
      outs[std::size_t(r)] = g.collect(g.stream());
    }
  }
  const int S = layout_.stage_size();
  std::vector<GpuStepOutput> res;
  for (int d = 0; d < layout_.attn_dp; ++d) {
    const int last = (layout_.pp - 1) * S + d * layout_.attn_tp;
    GpuStepOutput o = outs[std::size_t(last)];
    if (record_hidden)  // each layer from the stage that owns it
      for (int s = 0; s < layout_.pp; ++s) {
        const int r = s * S + d * layout_.attn_tp;
        const RankInfo& info = rank_map_[std::size_t(r)];
        for (int l = info.layer_begin; l < info.layer_end; ++l) {
          o.attn_hidden[std::size_t(l)] = outs[std::size_t(r)].attn_hidden[std::size_t(l)];
          o.layer_hidden[std::size_t(l)] = outs[std::size_t(r)].layer_hidden[std::size_t(l)];
        }
      }
    res.push_back(std::move(o));
  }
  return res;
}

void EmulatedRanks::reset_cache() {
  const KeepDevice keep;
  for (int r = 0; r < num_ranks(); ++r) {
    MIXSERVE_CUDA_CHECK(cudaSetDevice(device_[std::size_t(r)]));
    models_[std::size_t(r)]->reset_cache();
  }
}

#if MIXSERVE_HAVE_NCCL
ProcessRank::ProcessRank(const Comm& world, const ModelSpec& m, uint64_t seed, const ClusterSpec& c, const Layout& l,
                         const GpuModelConfig& base)
    : layout_(l), rank_(world.rank()) {
  if (world.size() != l.world_size())
    throw InputError(fmt::format("plan layout '{}' needs {} ranks; launched with {}", l.name(), l.world_size(),
                                 world.size()));
  MIXSERVE_CUDA_CHECK(cudaSetDevice(world.device()));
  const auto rank_map = build_rank_map(c, m, l);
  const std::vector<const Comm*> w{&world};
  // The same transports, in the same order, on every rank (their constructors split the world).
  transports_.push_back(std::make_unique<NcclTransport>(w, l.attn_tp));
  Transport& attn = *transports_.back();
  transports_.push_back(std::make_unique<NcclTransport>(w, l.stage_size()));
  Transport& stage = *transports_.back();
  const MoeSched sched = moe_sched_for(l, m);
  if (sched != MoeSched::none) {
    transports_.push_back(std::make_unique<NcclTransport>(w, l.moe_tp));
    sim::CommGeometry geo = sim::make_comm_geometry(c, m, l);
    geo.elem_bytes = 2;  // the forward moves bf16 rows
    const int first = (rank_ / l.stage_size()) * l.stage_size();
    stage_moe_ = std::make_unique<StageMoe>(geo, sched, int64_t(base.max_tokens_per_step), *transports_.back(), first);
  }
  comm_ = std::make_unique<TransportComm>(attn, stage, l, rank_, nullptr, int64_t(base.max_tokens_per_step) * m.hidden_size);
  if (stage_moe_) comm_->set_stage_moe(stage_moe_.get(), m.moe.top_k);
  GpuModelConfig cfg = base;
  cfg.shard = shard_for_rank(l, rank_map.at(std::size_t(rank_)), m);
  cfg.comm = comm_.get();
  model_ = std::make_unique<GpuModel>(m, seed, cfg);
}

ProcessRank::~ProcessRank() = default;
#endif

}  // namespace mixserve::gpu
