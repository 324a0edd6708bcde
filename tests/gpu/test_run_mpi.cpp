// mixserve-run bench --mpi under mpirun, on any host (label unit): every process checks the plan
// against the launch before any device work, so a plan of 2 ranks launched as 3 (or 1) processes
// makes every rank exit non-zero with the same message naming both counts, and no results file
// is written, offline and online (--workload); --emulate-ranks with --mpi is refused by every
// rank. On a host without a GPU, a launch of the right size stops in every rank at "no GPU" (the
// processes agree before any NCCL call, so none hangs).
// Skipped (exit 77) when the mpiexec found at configure time cannot be run.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

#include "../planner/plan_cli_run.hpp"
#include "mixserve/gpu/runtime.hpp"

namespace fs = std::filesystem;
using namespace mixserve;

namespace {

fs::path scratch() { return test::cli_scratch("mixserve-run-mpi"); }

// The mpiexec flags to run as root with more processes than cores (Open MPI only).
std::string mpi_flags() {
  const test::CliRun v = test::run_cli(MIXSERVE_MPIEXEC, "--version", scratch());
  const std::string text = v.out + v.err;  // "mpiexec (OpenRTE) 4.1.4", "mpirun (Open MPI) 4.1.4"
  const bool open_mpi = text.find("Open MPI") != std::string::npos || text.find("OpenRTE") != std::string::npos;
  return open_mpi ? "--allow-run-as-root --oversubscribe " : "";
}

// Under `timeout 120`: a launch that hangs (a rank waiting for a peer that refused) ends with 124,
// which the callers' exit-code checks reject (kTimedOut).
constexpr int kTimedOut = 124;
test::CliRun mpirun(int np, const std::string& args) {
  return test::run_cli("timeout", "120 '" + std::string(MIXSERVE_MPIEXEC) + "' " + mpi_flags() + "-np " +
                                      std::to_string(np) + " '" + MIXSERVE_RUN_EXE + "' bench " + args,
                       scratch());
}

// A plan of 2 ranks (attention and MoE TP2) on a 2-GPU cut of the shipped 8-GPU node.
fs::path two_rank_plan() {
  const fs::path cluster = scratch() / "h200-1x2.yaml", plan = scratch() / "plan-2.yaml";
  std::string text = test::slurp(fs::path(MIXSERVE_SOURCE_DIR) / "configs/clusters/h200-1x8.yaml");
  for (const auto& [from, to] : {std::pair<std::string, std::string>{"name: h200-1x8", "name: h200-1x2"},
                                 {"gpus_per_node: 8", "gpus_per_node: 2"}}) {
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    text.replace(at, from.size(), to);
  }
  test::spit(cluster, text);
  const test::CliRun r = test::run_cli(MIXSERVE_PLAN_EXE,
                                       "search --model qwen3-30b-a3b --cluster '" + cluster.string() +
                                           "' --workload sharegpt-like --layout 'attn TP2xDP1 | moe TP2xEP1 | PP1 | "
                                           "allreduce' -o '" + plan.string() + "'",
                                       scratch());
  REQUIRE_MESSAGE(r.code == 0, r.err);
  return plan;
}

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (auto p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("mixserve-run bench --mpi: a launch of another world size is refused by every rank, no results file") {
  if (::access(MIXSERVE_MPIEXEC, X_OK) != 0) {
    std::cerr << "skipped: " << MIXSERVE_MPIEXEC << " cannot be run\n";
    std::exit(77);
  }
  const fs::path plan = two_rank_plan(), out = scratch() / "out.json";
  const std::string args = "--plan '" + plan.string() +
                           "' --mpi --num-layers 2 --batch 2 --input-len 8 --output-len 2 --json '" + out.string() +
                           "'";
  for (const int np : {3, 1}) {
    CAPTURE(np);
    fs::remove(out);
    const test::CliRun r = mpirun(np, args);
    const std::string all = r.out + r.err;
    INFO(all);
    CHECK(r.code != 0);
    CHECK(r.code != kTimedOut);
    const std::string msg = "plan layout 'attn TP2xDP1 | moe TP2xEP1 | PP1 | allreduce' needs 2 ranks; launched with " +
                            std::to_string(np);
    CHECK(count(all, msg) == np);  // every rank, each once
    for (int rank = 0; rank < np; ++rank)
      CHECK(all.find("mixserve-run (rank " + std::to_string(rank) + " of " + std::to_string(np) + "): " + msg) !=
            std::string::npos);
    CHECK(!fs::exists(out));
  }
  // Online mode: the same checks.
  const std::string online = "--plan '" + plan.string() + "' --workload sharegpt-paper --num-requests 4 --num-layers 2 "
                             "--progress-every 0 --json '" + out.string() + "'";
  {
    fs::remove(out);
    const test::CliRun r = mpirun(3, online);
    const std::string all = r.out + r.err;
    INFO(all);
    CHECK(r.code != 0);
    CHECK(r.code != kTimedOut);
    CHECK(count(all, "needs 2 ranks; launched with 3") == 3);
    CHECK(!fs::exists(out));
  }
  // Options the one-process launches take are refused with --mpi, by every rank.
  {
    const test::CliRun r = mpirun(2, args + " --emulate-ranks");
    CHECK(r.code != 0);
    CHECK(r.code != kTimedOut);
    CHECK(count(r.out + r.err, "--emulate-ranks, --gpu-per-rank and --mpi exclude each other") == 2);
  }
  // The right launch on a host without a GPU: every rank stops before NCCL, offline and online.
  if (gpu::device_count_or_zero() == 0) {
    for (const std::string& a : {args, online}) {
      fs::remove(out);
      const test::CliRun r = mpirun(2, a);
      const std::string all = r.out + r.err;
      INFO(all);
      CHECK(r.code != 0);
      CHECK(r.code != kTimedOut);
      CHECK(count(all, "no GPU") == 2);
      CHECK(!fs::exists(out));
    }
  }
}
