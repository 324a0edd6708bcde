// Distributed forward on ONE GPU (docs/distributed.md): for every layout the planner emits for
// R = 2, 4, 8 ranks (planner::enumerate_layouts filtered by its structural predicates, not a hand
// list: TP, EP, DP-attention + EP, hybrid TP x EP with each MoE comm choice, PP), the plan's R
// ranks run as logical ranks on one GPU (EmulatedRanks: LocalTransport, one thread per rank) and
// their logits and per-layer residual streams are compared with the single-GPU forward
// (GpuModel, whole model) over prefill, mixed (chunked prefill + decode + a new prefill) and
// decode steps. Requests are dealt to the attention-DP replicas round-robin, so with DP 4 and 8
// some replicas step with empty batches.
//   test_gpu_distributed (label gpu): R logical ranks on one GPU (LocalTransport).
//   test_gpu_distributed_nccl (label multigpu, MIXSERVE_GPU_TEST_MIN_DEVICES >= 2): rank r on GPU r
//     through NCCL, for every R <= the visible GPUs (tools/multigpu-run.sh).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/gpu/distributed.hpp"
#include "mixserve/gpu/model_forward.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/weights.hpp"
#include "mixserve/planner/search.hpp"
#include "forward_ties.hpp"

using namespace mixserve;
using gpu::GpuModelConfig;
using gpu::GpuStepOutput;
using model::SequenceStep;

namespace {

// Tolerance of the distributed forward against the single-GPU one (relative L2 over the rows
// compared). Both keep activations in bf16 with fp32 accumulation; the distributed forward adds
// roundings where it splits a sum: each rank's partial o_proj, expert down and combine outputs
// are rounded to bf16 before the sum over ranks, and the sum is rounded again. That is of the
// order of the forward's own roundings (~3-6e-3 relative per layer, test_forward.cpp), so the
// single-GPU forward's budget against the float64 reference is used: (l + 1) * 2e-2 at layer l,
// layers * 2e-2 + 1e-2 on the logits. A wrong shard (a head, an expert or a slice missing or
// doubled) gives 0.1-1.
constexpr double kTolHiddenPerLayer = 2e-2;
constexpr double kTolLogitsExtra = 1e-2;

// Qwen3-MoE-like and divisible by every degree up to 8: 8 query heads and 2 KV heads (replicated
// for attention TP 4 and 8), 16 experts top-4 (several experts of a token on one EP rank), expert
// and dense widths 128 (16 per rank at TP 8), a dense first layer, 4 layers (PP up to 4).
ModelSpec dist_model() {
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128, "num_experts": 16,
    "num_experts_per_tok": 4, "norm_topk_prob": true, "mlp_only_layers": [0],
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                          "dist-qwen3/config.json");
}

// The same shape as Qwen2-MoE: a shared expert (width 64, 8 per rank at TP 8) with its sigmoid
// gate beside the routed experts, TP-sharded over moe_tp. Under a schedule every moe-TP group
// runs it on its own tokens inside the schedule's reduce-scatter; in the all-reduce / gather
// exchange the ranks of EP index 0 add it.
ModelSpec dist_model_shared() {
  return import_hf_config(R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128, "num_experts": 16,
    "num_experts_per_tok": 4, "norm_topk_prob": true, "mlp_only_layers": [0],
    "shared_expert_intermediate_size": 64, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": false})",
                          "dist-qwen2/config.json");
}

ClusterSpec cluster_of(int gpus) {
  ClusterSpec c = load_cluster("h200-1x8");
  c.num_nodes = gpus >= 4 ? 2 : 1;  // two nodes from 4 GPUs: the hybrid's "across nodes"
  c.gpus_per_node = gpus / c.num_nodes;
  c.nics_per_node = c.num_nodes > 1 ? c.gpus_per_node : 0;
  return c;
}

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> d(0, vocab - 1);
  std::vector<int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

struct Stats {
  double worst_hidden = 0, worst_logits = 0;  // largest error / tolerance seen
  int rows = 0, rows_excluded = 0, top1_checked = 0;
};

// A request of the scenario: its id (for the replica it is dealt to) and this step's tokens.
struct Req {
  int id;
  SequenceStep step;
};

// Runs the step on the single GPU (all requests) and on the emulated ranks (each replica its
// requests) and compares every request's rows.
void run_step(const std::string& what, const model::WeightSet& w, model::ReferenceModel& ref, gpu::GpuModel& one,
              gpu::EmulatedRanks& dist, const std::vector<Req>& reqs, Stats& st) {
  const ModelSpec& m = w.spec();
  const int64_t H = m.hidden_size, V = m.vocab_size;
  const int dp = dist.layout().attn_dp;
  std::vector<SequenceStep> all;
  std::vector<std::vector<SequenceStep>> per(static_cast<std::size_t>(dp));
  std::vector<std::pair<int, int>> where;  // request -> (replica, index in it)
  for (const auto& r : reqs) {
    all.push_back(r.step);
    auto& b = per[std::size_t(r.id % dp)];
    where.emplace_back(r.id % dp, int(b.size()));
    b.push_back(r.step);
  }
  gpu::StepOptions o;
  o.all_logits = true;
  o.record_hidden = true;
  const auto r64 = ref.step(all);
  const auto tie = test::near_ties(w, r64);
  const GpuStepOutput base = one.step(all, o);
  const std::vector<GpuStepOutput> got = dist.step(per, o);
  REQUIRE(got.size() == std::size_t(dp));
  INFO(what);
  std::vector<bool> diverged(std::size_t(base.num_tokens), false);
  // Relative L2 of the rows of every request (single-GPU rows at base offsets, distributed rows
  // at the replica's offsets), rows diverged through near-ties left out.
  auto rel = [&](auto pick_base, auto pick_dist, int64_t width, const char* name, int layer, double tol,
                 double& worst) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < reqs.size(); ++i) {
      const auto [d, k] = where[i];
      const int64_t b0 = base.seq_offsets[i], g0 = got[std::size_t(d)].seq_offsets[std::size_t(k)];
      const int64_t n = base.seq_offsets[i + 1] - b0;
      for (int64_t t = 0; t < n; ++t) {
        if (diverged[std::size_t(b0 + t)]) continue;
        const float* a = pick_base(b0 + t);
        const float* g = pick_dist(d, g0 + t);
        for (int64_t c = 0; c < width; ++c) {
          num += (double(g[c]) - a[c]) * (double(g[c]) - a[c]);
          den += double(a[c]) * a[c];
        }
      }
    }
    if (den == 0) return;  // every row left out
    const double e = std::sqrt(num / den);
    worst = std::max(worst, e / tol);
    CHECK_MESSAGE(e <= tol, what << " " << name << " layer " << layer << ": rel err " << e << " > " << tol);
  };
  for (int l = 0; l < m.num_layers; ++l) {
    const double tol = kTolHiddenPerLayer * (l + 1);
    rel([&](int64_t t) { return &base.attn_hidden[std::size_t(l)][std::size_t(t * H)]; },
        [&](int d, int64_t t) { return &got[std::size_t(d)].attn_hidden[std::size_t(l)][std::size_t(t * H)]; }, H,
        "attn", l, tol, st.worst_hidden);
    for (std::size_t t = 0; t < diverged.size(); ++t) diverged[t] = diverged[t] || tie[std::size_t(l)][t];
    rel([&](int64_t t) { return &base.layer_hidden[std::size_t(l)][std::size_t(t * H)]; },
        [&](int d, int64_t t) { return &got[std::size_t(d)].layer_hidden[std::size_t(l)][std::size_t(t * H)]; }, H,
        "layer", l, tol, st.worst_hidden);
  }
  rel([&](int64_t t) { return &base.logits[std::size_t(t * V)]; },
      [&](int d, int64_t t) { return &got[std::size_t(d)].logits[std::size_t(t * V)]; }, V, "logits", m.num_layers,
      kTolHiddenPerLayer * m.num_layers + kTolLogitsExtra, st.worst_logits);
  // Top-1 ids of the rows without a near tie agree (a clear gap: 0.25 of the row's logit RMS).
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    const auto [d, k] = where[i];
    const int64_t b0 = base.seq_offsets[i], g0 = got[std::size_t(d)].seq_offsets[std::size_t(k)];
    for (int64_t t = 0; t < base.seq_offsets[i + 1] - b0; ++t) {
      ++st.rows;
      if (diverged[std::size_t(b0 + t)]) {
        ++st.rows_excluded;
        continue;
      }
      const float* a = &base.logits[std::size_t((b0 + t) * V)];
      const float* g = &got[std::size_t(d)].logits[std::size_t((g0 + t) * V)];
      for (int64_t c = 0; c < V; ++c) REQUIRE_MESSAGE(std::isfinite(g[c]), what << ": logit not finite");
      std::vector<int64_t> idx(static_cast<std::size_t>(V));
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + 2, idx.end(), [&](int64_t x, int64_t y) { return a[x] > a[y]; });
      double ss = 0;
      for (int64_t c = 0; c < V; ++c) ss += double(a[c]) * a[c];
      if (a[idx[0]] - a[idx[1]] < 0.25 * std::sqrt(ss / double(V))) continue;
      CHECK_MESSAGE(std::max_element(g, g + V) - g == idx[0], what << ": top-1 differs in row " << t);
      ++st.top1_checked;
    }
  }
}

// The scenario on one layout: prefill of three requests, a mixed step (a second chunk, two
// decodes, a new prefill), a decode of all four. Block tables are shuffled and non-contiguous.
Stats run_layout(const model::WeightSet& w, const ClusterSpec& c, const Layout& l, gpu::ExpertPath path,
                 gpu::Placement placement) {
  const ModelSpec& m = w.spec();
  const int block = 8, num_blocks = 32;
  GpuModelConfig cfg;
  cfg.block_size = block;
  cfg.num_blocks = num_blocks;
  cfg.max_tokens_per_step = 64;
  cfg.max_seqs_per_step = 8;
  cfg.max_blocks_per_seq = 16;
  cfg.expert_path = path;
  model::ReferenceModel ref(w, model::KVCacheConfig{block, num_blocks});
  gpu::GpuModel one(w, cfg);
  gpu::EmulatedRanks dist(w, c, l, cfg, placement);
  std::mt19937_64 rng(1234);
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  auto take = [&](int n) {
    std::vector<int32_t> t(pool.end() - n, pool.end());
    pool.resize(pool.size() - std::size_t(n));
    return t;
  };
  const std::vector<std::vector<int32_t>> bt = {take(4), take(3), take(4), take(3)};
  const auto a = random_tokens(rng, 17, m.vocab_size);
  auto req = [&](int id, std::vector<int32_t> tok, int64_t pos) { return Req{id, SequenceStep{std::move(tok), pos, bt[std::size_t(id)]}}; };
  auto tok = [&](int n) { return random_tokens(rng, n, m.vocab_size); };
  Stats st;
  const std::string name = l.name() + (path == gpu::ExpertPath::cublaslt      ? " (cublaslt)"
                                        : path == gpu::ExpertPath::device_gemv ? " (gemv)"
                                                                               : " (automatic)");
  run_step(name + " prefill", w, ref, one, dist,
           {req(0, {a.begin(), a.begin() + 11}, 0), req(1, tok(7), 0), req(2, tok(19), 0)}, st);
  run_step(name + " mixed", w, ref, one, dist,
           {req(0, {a.begin() + 11, a.end()}, 11), req(1, tok(1), 7), req(2, tok(1), 19), req(3, tok(13), 0)}, st);
  run_step(name + " decode", w, ref, one, dist,
           {req(0, tok(1), 17), req(1, tok(1), 8), req(2, tok(1), 20), req(3, tok(1), 13)}, st);
  // The plan's MoE communication ran by its schedule (a2a: EP dispatch/combine, with the moe-TP
  // all-gather / reduce-scatter when moe_tp > 1; fused, rs-a2a-ag: AG-Dispatch / RS-Combine),
  // and every MoE layer of every rank moved exactly
  // the bytes the schedule (and so the cost model) counts for it.
  const gpu::MoeSched sched = gpu::moe_sched_for(l, m);
  int64_t records = 0, wrong_bytes = 0;
  double moved = 0;
  for (int p = 0; p < l.pp; ++p) {
    gpu::StageMoe* sm = dist.stage_moe(p);
    if (sched == gpu::MoeSched::none) {
      CHECK_MESSAGE(sm == nullptr, name << ": a StageMoe for a plan without a schedule");
      continue;
    }
    REQUIRE_MESSAGE(sm != nullptr, name << ": no StageMoe for stage " << p << " (moe_sched " << gpu::to_string(sched) << ")");
    for (const auto& r : sm->records()) {
      ++records;
      moved += r.moved.dispatch + r.moved.combine;
      if (r.moved.dispatch != r.scheduled.dispatch || r.moved.combine != r.scheduled.combine) {
        if (++wrong_bytes <= 4)
          FAIL_CHECK(name << " stage " << p << " rank " << r.rank << ": moved dispatch " << r.moved.dispatch
                          << " combine " << r.moved.combine << " bytes; the schedule counts " << r.scheduled.dispatch
                          << " and " << r.scheduled.combine);
      }
    }
  }
  if (sched != gpu::MoeSched::none) {
    CHECK_MESSAGE(records == 3 * int64_t(m.num_moe_layers()) * l.stage_size(),
                  name << ": " << records << " scheduled MoE layer-ranks recorded, expected 3 steps x "
                       << m.num_moe_layers() << " MoE layers x " << l.stage_size() << " ranks");
    CHECK_MESSAGE(wrong_bytes == 0, name << ": " << wrong_bytes << " layer-ranks moved other bytes than the schedule");
    CHECK_MESSAGE(moved > 0, name << ": the scheduled MoE moved nothing");
  }
  std::printf("  %-48s worst err/tol: hidden %.2f logits %.2f; %d/%d rows after near-ties left out, %d top-1 checked; "
              "moe %s, %lld layer-ranks, %.0f bytes = schedule\n",
              name.c_str(), st.worst_hidden, st.worst_logits, st.rows_excluded, st.rows, st.top1_checked,
              gpu::to_string(sched), static_cast<long long>(records), moved);
  CHECK_MESSAGE(st.top1_checked > 0, name << ": no row had a clear top-1");
  CHECK_MESSAGE(2 * st.rows_excluded <= st.rows, name << ": too many near-tie rows left out");
  return st;
}

// Every layout of the planner for R = 2, 4, 8 ranks (R <= max_ranks) through `placement`.
int run_all_layouts(const ModelSpec& m, uint64_t seed, gpu::Placement placement, int max_ranks) {
  const auto w = model::synthetic_weights(m, seed);
  const bool shared = m.moe.has_shared_expert();
  std::printf("model %s%s\n", m.name.c_str(), shared ? " (shared expert with sigmoid gate)" : "");
  int layouts = 0, ep_tp = 0, with_plan_schedule = 0;
  double worst_hidden = 0, worst_logits = 0;
  int by_sched[4] = {0, 0, 0, 0};  // gpu::MoeSched: none, ep, fused, rs_a2a_ag
  for (int P : {2, 4, 8}) {
    if (P > max_ranks) break;
    const ClusterSpec c = cluster_of(P);
    for (const Layout& l : planner::enumerate_layouts(P)) {
      if (planner::first_structural_failure(m, c, l)) continue;
      // The expert paths in turn over the layouts (each meets every MoE mode): the device GEMV,
      // cuBLASLt per expert, and automatic (whatever the executor picks by the routed rows).
      const gpu::ExpertPath paths[] = {gpu::ExpertPath::device_gemv, gpu::ExpertPath::cublaslt,
                                       gpu::ExpertPath::automatic};
      const auto path = paths[layouts % 3];
      const Stats st = run_layout(w, c, l, path, placement);
      const gpu::MoeSched sched = gpu::moe_sched_for(l, m);
      ++by_sched[static_cast<int>(sched)];
      ep_tp += sched == gpu::MoeSched::ep && l.moe_tp > 1;
      // Plans whose MoE communication has a schedule (a2a, fused, rs-a2a-ag over > 1 rank) must
      // run it, with or without a shared expert.
      with_plan_schedule += l.moe_comm != MoeComm::tp_allreduce && l.stage_size() > 1;
      worst_hidden = std::max(worst_hidden, st.worst_hidden);
      worst_logits = std::max(worst_logits, st.worst_logits);
      ++layouts;
    }
  }
  std::printf("%d layouts; worst error / tolerance: hidden %.2f, logits %.2f\n", layouts, worst_hidden, worst_logits);
  std::printf("MoE by schedule: %d EP (a2a; %d of them with moe_tp > 1), %d fused, %d rs-a2a-ag; %d through the "
              "all-reduce / gather exchange\n",
              by_sched[1], ep_tp, by_sched[2], by_sched[3], by_sched[0]);
  CHECK_MESSAGE(by_sched[1] + by_sched[2] + by_sched[3] == with_plan_schedule,
                "a layout whose plan says a2a, fused or rs-a2a-ag did not run by its schedule");
  if (max_ranks >= 4) {  // P = 4: EP, TP2 x EP2 with a2a, fused and rs-a2a-ag
    CHECK_MESSAGE(by_sched[1] > 0, "no layout ran the EP dispatch/combine");
    CHECK_MESSAGE(ep_tp > 0, "no layout ran the EP schedule with moe_tp > 1");
    CHECK_MESSAGE(by_sched[2] > 0, "no layout ran the fused AG-Dispatch / RS-Combine");
    CHECK_MESSAGE(by_sched[3] > 0, "no layout ran rs-a2a-ag");
  }
  return layouts;
}

}  // namespace

#if MIXSERVE_GPU_TEST_MIN_DEVICES < 2
TEST_CASE("distributed forward on one GPU equals the single-GPU forward for every planner layout, R <= 8") {
  // 5 + 16 + 36 layouts for P = 2, 4, 8 (docs/planner.md), less those the model does not divide.
  CHECK(run_all_layouts(dist_model(), 77, gpu::Placement::one_gpu, 8) >= 40);
}

TEST_CASE("distributed forward on one GPU, shared expert + sigmoid gate (Qwen2-MoE-like), every planner layout, R <= 8") {
  CHECK(run_all_layouts(dist_model_shared(), 79, gpu::Placement::one_gpu, 8) >= 40);
}

TEST_CASE("distributed forward: a rank that fails releases its peers") {
  const ModelSpec m = dist_model();
  const auto w = model::synthetic_weights(m, 78);
  Layout l;
  l.attn_tp = 2;
  l.moe_tp = 2;
  GpuModelConfig cfg;
  cfg.block_size = 8;
  cfg.num_blocks = 8;
  cfg.max_tokens_per_step = 16;
  gpu::EmulatedRanks dist(w, cluster_of(2), l, cfg);
  // 17 tokens > max_tokens_per_step: both ranks throw in prepare, nobody hangs.
  std::mt19937_64 rng(3);
  std::vector<std::vector<SequenceStep>> b = {{SequenceStep{random_tokens(rng, 17, m.vocab_size), 0, {0, 1, 2}}}};
  CHECK_THROWS_AS(dist.step(b), InputError);
}
#else
TEST_CASE("distributed forward over NCCL, a GPU per rank, equals the single-GPU forward for every planner layout") {
  const int n = gpu::device_count_or_zero();
  std::printf("%d GPUs visible\n", n);
  CHECK(run_all_layouts(dist_model(), 77, gpu::Placement::gpu_per_rank, n) >= 4);  // P = 2 alone has 5 layouts
  CHECK(run_all_layouts(dist_model_shared(), 79, gpu::Placement::gpu_per_rank, n) >= 4);
}
#endif
