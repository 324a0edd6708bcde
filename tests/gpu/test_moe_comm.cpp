// GPU execution of the MoE communication schedules (executor/moe_comm.hpp) against the host
// executor (sim/host_exec.hpp) and the single-device reference, on exact-valued data (small
// tagged integers, power-of-two weights, the toy expert in f64): every rank's output rows must
// equal the reference with 0 wrong elements; outputs are poisoned (NaN) before each run.
//   test_gpu_moe_comm (label gpu): LocalTransport, R = N*G logical ranks on one GPU.
//   test_gpu_moe_comm_nccl (label multigpu, MIXSERVE_GPU_TEST_MIN_DEVICES >= 2): NcclTransport,
//   one rank per visible GPU.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>

#include "../comm/comm_test_util.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/moe_comm.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/transport.hpp"
#include "mixserve/sim/host_exec.hpp"

#if MIXSERVE_HAVE_NCCL
#include "mixserve/gpu/comm.hpp"
#endif

namespace {
using namespace mixserve;
using sim::CommGeometry;
using sim::EpSource;
using sim::ReplicaRouting;
using test::RoutingKind;

static_assert(kernels::kToyIntermediate == sim::kToyIntermediate,
              "the device toy expert must be the host one");

struct Case {
  int N, G, E, k;
  RoutingKind kind;
  int hidden;
  std::string str() const {
    return "N=" + std::to_string(N) + " G=" + std::to_string(G) + " E=" + std::to_string(E) +
           " k=" + std::to_string(k) + " routing=" + test::to_string(kind) +
           " hidden=" + std::to_string(hidden);
  }
};

struct Problem {
  std::vector<ReplicaRouting> routing;
  std::vector<std::vector<double>> inputs;
  std::vector<std::vector<double>> reference;  // per replica
  int max_tokens = 0;
};

// A different, small token count per replica (awkward sizes: 1, primes), or `tokens` for all.
// shared: the reference adds the shared expert (toy expert E, as the executors do when
// geo.shared_expert).
Problem make_problem(const Case& c, int replicas, uint64_t seed, int tokens = 0, bool shared = false) {
  static constexpr int kCounts[] = {7, 1, 13, 5, 11, 3, 17, 2};
  std::mt19937_64 rng(seed);
  Problem p;
  for (int q = 0; q < replicas; ++q) {
    const int n = tokens > 0 ? tokens : (replicas <= 2 ? 12 + 7 * q : kCounts[q % 8]);
    p.routing.push_back(test::make_routing(c.kind, q, n, c.E, c.k, rng));
    p.inputs.push_back(test::make_input(q, p.routing.back().num_tokens, c.hidden));
    p.reference.push_back(sim::reference_moe(p.routing.back(), c.k, c.hidden, p.inputs.back(), shared ? c.E : -1));
    p.max_tokens = std::max(p.max_tokens, n);
  }
  return p;
}

// Runs one step on `mc` (FusedMoeComm or EpMoeComm) and returns every held rank's output.
template <class Mc>
std::vector<std::vector<double>> run_step(Mc& mc, gpu::Transport& tr, const Problem& p,
                                          int ranks_per_replica, int64_t cap, int hidden) {
  const int P = tr.num_ranks();
  std::vector<gpu::Stream> main;
  std::vector<cudaStream_t> mains(P, nullptr);
  main.reserve(P);
  for (int r = 0; r < P; ++r) {
    if (!tr.is_local(r)) continue;
    const int q = r / ranks_per_replica;
    MIXSERVE_CUDA_CHECK(cudaSetDevice(tr.device_of(r)));
    MIXSERVE_CUDA_CHECK(cudaMemset(mc.output(r), 0xff, static_cast<size_t>(cap) * hidden * 8));  // NaN
    MIXSERVE_CUDA_CHECK(cudaMemcpy(mc.input(r), p.inputs[q].data(), p.inputs[q].size() * 8,
                                   cudaMemcpyHostToDevice));
    main.emplace_back(tr.device_of(r));
    mains[r] = main.back().get();
  }
  mc.fork(mains);
  mc.dispatch();
  mc.toy_experts();
  mc.combine();
  mc.join(mains);
  for (auto& s : main) s.synchronize();
  std::vector<std::vector<double>> out(P);
  for (int r = 0; r < P; ++r) {
    if (!tr.is_local(r)) continue;
    const auto& ref = p.reference[r / ranks_per_replica];
    out[r].resize(ref.size());
    MIXSERVE_CUDA_CHECK(cudaSetDevice(tr.device_of(r)));
    if (!ref.empty())
      MIXSERVE_CUDA_CHECK(cudaMemcpy(out[r].data(), mc.output(r), ref.size() * 8, cudaMemcpyDeviceToHost));
  }
  return out;
}

// Wrong elements over the held ranks (NaN = never written = wrong).
int64_t count_wrong(const std::vector<std::vector<double>>& got, const gpu::Transport& tr,
                    const std::vector<std::vector<double>>& want_per_replica, int ranks_per_replica) {
  int64_t wrong = 0;
  for (int r = 0; r < tr.num_ranks(); ++r) {
    if (!tr.is_local(r)) continue;
    const auto& want = want_per_replica[r / ranks_per_replica];
    for (size_t i = 0; i < want.size(); ++i) wrong += !(got[r][i] == want[i]);
  }
  return wrong;
}

bool any_nonzero(const Problem& p) {
  for (const auto& ref : p.reference)
    for (double v : ref)
      if (v != 0) return true;
  return false;
}

// Fused (overlapped, and serialised = rs_a2a_ag), plain EP (split, replicated) and EP with
// moe_tp 2 and G (split) on one problem; two steps per executor object (buffers reused).
// Returns the number of runs.
int check_case(const Case& c, gpu::Transport& tr, uint64_t seed, int tokens = 0) {
  int runs = 0;
  const Problem p = make_problem(c, c.N, seed, tokens);
  const Problem p2 = make_problem(c, c.N, seed + 17, tokens);
  if (c.kind != RoutingKind::empty_ranks || c.N > 1) CHECK_MESSAGE(any_nonzero(p), c.str());
  const CommGeometry hg = test::hybrid_geometry(c.N, c.G, c.E, c.k, c.hidden);
  const auto fs = sim::build_fused_schedule(hg, p.routing);
  const auto fs2 = sim::build_fused_schedule(hg, p2.routing);
  const auto host = sim::run_fused_on_host(fs, p.routing, p.inputs);
  const int64_t cap = std::max(p.max_tokens, p2.max_tokens);
  for (bool overlap : {true, false}) {
    gpu::FusedMoeComm mc(hg, cap, kernels::MoeDType::f64, tr);
    mc.set_overlap(overlap);
    mc.prepare(fs, p.routing);
    const auto got = run_step(mc, tr, p, c.G, cap, c.hidden);
    std::vector<std::vector<double>> host_per_replica;
    for (int q = 0; q < c.N; ++q) host_per_replica.push_back(host.rank_output[q * c.G]);
    CHECK_MESSAGE(count_wrong(got, tr, p.reference, c.G) == 0, "fused overlap=", overlap, " ", c.str());
    CHECK_MESSAGE(count_wrong(got, tr, host_per_replica, c.G) == 0, "fused vs host ", c.str());
    mc.prepare(fs2, p2.routing);
    const auto got2 = run_step(mc, tr, p2, c.G, cap, c.hidden);
    CHECK_MESSAGE(count_wrong(got2, tr, p2.reference, c.G) == 0, "fused step 2 overlap=", overlap, " ", c.str());
    runs += 2;
  }
  if (c.E % (c.N * c.G) == 0) {
    const CommGeometry eg = test::ep_geometry(c.N, c.G, c.E, c.k, c.hidden);
    for (EpSource src : {EpSource::split, EpSource::replicated}) {
      const char* sname = src == EpSource::split ? "split" : "replicated";
      const auto es = sim::build_ep_schedule(eg, p.routing, src);
      const auto es2 = sim::build_ep_schedule(eg, p2.routing, src);
      gpu::EpMoeComm mc(eg, cap, src, kernels::MoeDType::f64, tr);
      mc.prepare(es, p.routing);
      const auto got = run_step(mc, tr, p, c.G, cap, c.hidden);
      CHECK_MESSAGE(count_wrong(got, tr, p.reference, c.G) == 0, "ep ", sname, " ", c.str());
      mc.prepare(es2, p2.routing);
      const auto got2 = run_step(mc, tr, p2, c.G, cap, c.hidden);
      CHECK_MESSAGE(count_wrong(got2, tr, p2.reference, c.G) == 0, "ep step 2 ", sname, " ", c.str());
      runs += 2;
    }
  }
  // EP by all-to-all with TP inside the experts (moe_tp 2 and G): the moe-TP all-gather and
  // reduce-scatter around the toy expert's TP partials; the output must equal the reference and
  // the host executor's, and the bytes each rank sent through the transport (counted by a
  // StageTransport over `tr`) must equal the schedule's, the counts round apart.
  const int P = c.N * c.G;
  for (int tp : c.G == 2 ? std::vector<int>{2} : std::vector<int>{2, c.G}) {
    CommGeometry tg = test::ep_tp_geometry(c.N, c.G, tp, c.E, c.k, c.hidden);
    tg.elem_bytes = 8;  // f64 on the wire
    if (c.E % tg.moe_ep != 0 || c.hidden % tp != 0) continue;
    const auto es = sim::build_ep_schedule(tg, p.routing, EpSource::split);
    const auto es2 = sim::build_ep_schedule(tg, p2.routing, EpSource::split);
    const auto host = sim::run_ep_on_host(es, p.routing, p.inputs);
    gpu::StageTransport st(tr, 0, P);
    gpu::EpMoeComm mc(tg, cap, EpSource::split, kernels::MoeDType::f64, st);
    mc.prepare(es, p.routing);
    const auto got = run_step(mc, st, p, c.G, cap, c.hidden);
    std::vector<std::vector<double>> host_per_replica;
    for (int q = 0; q < c.N; ++q) host_per_replica.push_back(host.rank_output[q * c.G]);
    CHECK_MESSAGE(count_wrong(got, st, p.reference, c.G) == 0, "ep moe_tp=", tp, " ", c.str());
    CHECK_MESSAGE(count_wrong(got, st, host_per_replica, c.G) == 0, "ep moe_tp=", tp, " vs host ", c.str());
    const double counts = double(P - 1) * tg.experts_per_ep_rank() * 8.0;
    int64_t byte_mismatches = 0;
    for (int r = 0; r < P; ++r) {
      if (!st.is_local(r)) continue;
      const auto& rp = es.ranks[r];
      const double want = rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes +
                          rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes;
      byte_mismatches += st.bytes_sent(r) - counts != want;
    }
    CHECK_MESSAGE(byte_mismatches == 0, "ep moe_tp=", tp, " bytes ", c.str());
    mc.prepare(es2, p2.routing);
    const auto got2 = run_step(mc, st, p2, c.G, cap, c.hidden);
    CHECK_MESSAGE(count_wrong(got2, st, p2.reference, c.G) == 0, "ep moe_tp=", tp, " step 2 ", c.str());
    runs += 2;
  }
  return runs;
}

// Shared expert (toy expert E): fused (overlapped and serialised) and EP with moe_tp 1, 2, G
// (split), against the reference with the shared expert and the host executor; EP bytes through
// a StageTransport equal the schedule's. Returns the number of runs.
int check_shared_case(const Case& c, gpu::Transport& tr, uint64_t seed) {
  int runs = 0;
  const Problem p = make_problem(c, c.N, seed, 0, true);
  const int64_t cap = p.max_tokens;
  const int P = c.N * c.G;
  CommGeometry hg = test::hybrid_geometry(c.N, c.G, c.E, c.k, c.hidden);
  hg.shared_expert = true;
  const auto fs = sim::build_fused_schedule(hg, p.routing);
  for (bool overlap : {true, false}) {
    gpu::FusedMoeComm mc(hg, cap, kernels::MoeDType::f64, tr);
    mc.set_overlap(overlap);
    mc.prepare(fs, p.routing);
    const auto got = run_step(mc, tr, p, c.G, cap, c.hidden);
    CHECK_MESSAGE(count_wrong(got, tr, p.reference, c.G) == 0, "fused shared overlap=", overlap, " ", c.str());
    ++runs;
  }
  for (int tp : {1, 2, c.G}) {
    CommGeometry tg = test::ep_tp_geometry(c.N, c.G, tp, c.E, c.k, c.hidden);
    tg.shared_expert = true;
    tg.elem_bytes = 8;
    if (c.E % tg.moe_ep != 0 || c.hidden % tp != 0) continue;
    const auto es = sim::build_ep_schedule(tg, p.routing, EpSource::split);
    const auto host = sim::run_ep_on_host(es, p.routing, p.inputs);
    gpu::StageTransport st(tr, 0, P);
    gpu::EpMoeComm mc(tg, cap, EpSource::split, kernels::MoeDType::f64, st);
    mc.prepare(es, p.routing);
    const auto got = run_step(mc, st, p, c.G, cap, c.hidden);
    std::vector<std::vector<double>> host_per_replica;
    for (int q = 0; q < c.N; ++q) host_per_replica.push_back(host.rank_output[q * c.G]);
    CHECK_MESSAGE(count_wrong(got, st, p.reference, c.G) == 0, "ep shared moe_tp=", tp, " ", c.str());
    CHECK_MESSAGE(count_wrong(got, st, host_per_replica, c.G) == 0, "ep shared moe_tp=", tp, " vs host ", c.str());
    const double counts = double(P - 1) * tg.experts_per_ep_rank() * 8.0;
    int64_t byte_mismatches = 0;
    for (int r = 0; r < P; ++r) {
      if (!st.is_local(r)) continue;
      const auto& rp = es.ranks[r];
      const double want = rp.dispatch_bytes.inter_bytes + rp.dispatch_bytes.intra_bytes +
                          rp.combine_bytes.inter_bytes + rp.combine_bytes.intra_bytes;
      byte_mismatches += st.bytes_sent(r) - counts != want;
    }
    CHECK_MESSAGE(byte_mismatches == 0, "ep shared moe_tp=", tp, " bytes ", c.str());
    ++runs;
  }
  return runs;
}

}  // namespace

#if MIXSERVE_GPU_TEST_MIN_DEVICES < 2

TEST_CASE("local transport: shared expert inside fused and EP (moe_tp 1, 2, G), 0 wrong") {
  constexpr int kShapes[][2] = {{1, 2}, {2, 2}, {2, 4}, {4, 2}};
  int runs = 0, cases = 0;
  for (const auto& shape : kShapes)
    for (int E : {8, 64})
      for (int k : {1, 2, 8})
        for (RoutingKind kind : test::kAllRoutings) {
          const Case c{shape[0], shape[1], E, k, kind, 3 * shape[1]};
          CAPTURE(c.str());
          gpu::LocalTransport tr(c.N * c.G);
          runs += check_shared_case(c, tr, 3000017ull * (++cases));
        }
  MESSAGE("shared-expert cases ", cases, ", GPU steps ", runs);
  CHECK(cases == 4 * 2 * 3 * 5);
}

TEST_CASE("local transport, R = N*G ranks on one GPU: fused, plain EP and EP x TP, 0 wrong (matrix)") {
  constexpr int kShapes[][2] = {{1, 2}, {2, 2}, {2, 4}, {4, 2}};
  int runs = 0, cases = 0;
  for (const auto& shape : kShapes)
    for (int E : {8, 64})
      for (int k : {1, 2, 8})
        for (RoutingKind kind : test::kAllRoutings) {
          const Case c{shape[0], shape[1], E, k, kind, 3 * shape[1]};  // slices of 3 elements
          CAPTURE(c.str());
          gpu::LocalTransport tr(c.N * c.G);
          runs += check_case(c, tr, 1000003ull * (++cases));
        }
  MESSAGE("cases ", cases, ", GPU steps ", runs);
  CHECK(cases == 4 * 2 * 3 * 5);
}

TEST_CASE("local transport: larger steps (hundreds of tokens, wider rows)") {
  const Case cases[] = {
      {2, 4, 64, 8, RoutingKind::uniform, 4 * 97},  // 97-element slices
      {4, 2, 64, 2, RoutingKind::skewed, 2 * 130},
      {2, 2, 8, 8, RoutingKind::uniform, 2 * 64},
      {1, 2, 8, 2, RoutingKind::uniform, 2 * 33},
  };
  uint64_t seed = 77;
  for (const Case& c : cases) {
    CAPTURE(c.str());
    gpu::LocalTransport tr(c.N * c.G);
    check_case(c, tr, seed++, 257);
  }
}

TEST_CASE("TP groups of 2 inside 4-GPU nodes (moe_tp < G): rails partly inside a node") {
  for (int k : {1, 2, 8}) {
    CommGeometry g = test::hybrid_geometry(2, 4, 64, k, 10);
    g.attn_tp = g.moe_tp = 2;
    g.attn_dp = g.moe_ep = 4;
    const Case c{4, 2, 64, k, RoutingKind::uniform, 10};
    CAPTURE(c.str());
    const Problem p = make_problem(c, 4, 99 + k);
    const auto fs = sim::build_fused_schedule(g, p.routing);
    gpu::LocalTransport tr(8);
    gpu::FusedMoeComm mc(g, p.max_tokens, kernels::MoeDType::f64, tr);
    mc.prepare(fs, p.routing);
    const auto got = run_step(mc, tr, p, 2, p.max_tokens, c.hidden);
    CHECK(count_wrong(got, tr, p.reference, 2) == 0);
  }
}

TEST_CASE("a step above the preallocated bound and a non-f64 toy expert are input errors") {
  const Case c{2, 2, 8, 2, RoutingKind::uniform, 6};
  const Problem p = make_problem(c, 2, 5, 9);
  const CommGeometry hg = test::hybrid_geometry(2, 2, 8, 2, 6);
  const auto fs = sim::build_fused_schedule(hg, p.routing);
  gpu::LocalTransport tr(4);
  gpu::FusedMoeComm small(hg, 8, kernels::MoeDType::f64, tr);
  CHECK_THROWS_AS(small.prepare(fs, p.routing), InputError);
  gpu::FusedMoeComm bf(hg, 9, kernels::MoeDType::bf16, tr);
  bf.prepare(fs, p.routing);
  CHECK_THROWS_AS(bf.toy_experts(), InputError);
  gpu::LocalTransport wrong_size(3);
  CHECK_THROWS_AS(gpu::FusedMoeComm(hg, 9, kernels::MoeDType::f64, wrong_size), InputError);
  const auto es = sim::build_ep_schedule(test::ep_geometry(2, 2, 8, 2, 6), p.routing, EpSource::split);
  gpu::EpMoeComm ep(test::ep_geometry(2, 2, 8, 2, 6), 4, EpSource::split, kernels::MoeDType::f64, tr);
  CHECK_THROWS_AS(ep.prepare(es, p.routing), InputError);
}

TEST_CASE("bf16 communication only: zero partial sums combine to zero rows, every row written") {
  // Without experts the partial-sum buffers hold zeros: the combine must write every output
  // element (poisoned with 0xff first) as +0.
  const Case c{2, 4, 64, 8, RoutingKind::uniform, 4 * 24};
  const Problem p = make_problem(c, 2, 11, 33);
  const CommGeometry hg = test::hybrid_geometry(2, 4, 64, 8, c.hidden);
  const auto fs = sim::build_fused_schedule(hg, p.routing);
  gpu::LocalTransport tr(8);
  gpu::FusedMoeComm mc(hg, 33, kernels::MoeDType::bf16, tr);
  mc.prepare(fs, p.routing);
  gpu::Stream main;
  std::vector<cudaStream_t> mains(8, main.get());
  for (int r = 0; r < 8; ++r) MIXSERVE_CUDA_CHECK(cudaMemset(mc.output(r), 0xff, 33 * c.hidden * 2));
  mc.fork(mains);
  mc.dispatch();
  mc.combine();
  mc.join(mains);
  main.synchronize();
  int64_t nonzero = 0;
  for (int r = 0; r < 8; ++r) {
    std::vector<uint16_t> y(33 * c.hidden);
    MIXSERVE_CUDA_CHECK(cudaMemcpy(y.data(), mc.output(r), y.size() * 2, cudaMemcpyDeviceToHost));
    for (uint16_t v : y) nonzero += v != 0;
  }
  CHECK(nonzero == 0);
}

#else

#if MIXSERVE_HAVE_NCCL
TEST_CASE("NCCL transport, one rank per GPU: fused, plain EP and EP x TP, 0 wrong") {
  const int g = gpu::device_count_or_zero();
  REQUIRE(g >= 2);
  const int P = g >= 8 ? 8 : g >= 4 ? 4 : 2;
  std::vector<int> devices(P);
  for (int i = 0; i < P; ++i) devices[i] = i;
  auto world = gpu::init_single_process(devices);
  std::vector<const gpu::Comm*> wp;
  for (auto& c : world) wp.push_back(&c);
  int cases = 0;
  for (int G = 1; G <= P; G *= 2) {
    const int N = P / G;
    if (G == 1 && N == 1) continue;
    gpu::NcclTransport tr(wp, G);
    for (int E : {8, 64})
      for (int k : {1, 2, 8})
        for (RoutingKind kind : test::kAllRoutings) {
          const Case c{N, G, E, k, kind, 3 * G};
          CAPTURE(c.str());
          check_case(c, tr, 1000003ull * (++cases));
          check_shared_case(c, tr, 3000017ull * cases);
        }
  }
  MESSAGE("NCCL cases ", cases, " on ", P, " GPUs");
}
#endif

#endif
