// mixserve-run bench --mpi: the MPI session and process group (bench_mpi.hpp).
#include "mixserve/gpu/bench_mpi.hpp"

#include <mpi.h>

#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/gpu/comm.hpp"

namespace mixserve::gpu {
namespace {


void mpi_check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw RuntimeError(fmt::format("MPI: {} failed (error {})", what, rc));
}

}  // namespace

MpiSession::MpiSession() {
  int ready = 0;
  mpi_check(MPI_Initialized(&ready), "MPI_Initialized");
  if (ready) throw RuntimeError("MPI: MpiSession made twice in one process");
  mpi_check(MPI_Init(nullptr, nullptr), "MPI_Init");
  try {  // a failure below leaves no initialised MPI behind (the destructor does not run)
    mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
    mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
    for (const char* k : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"}) {
      const int v = launcher_env_int(k);
      if (v >= 0) {
        local_rank_ = v;
        return;
      }
    }
    MPI_Comm node = MPI_COMM_NULL;
    mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node),
              "MPI_Comm_split_type");
    mpi_check(MPI_Comm_rank(node, &local_rank_), "MPI_Comm_rank (node)");
    MPI_Comm_free(&node);
  } catch (...) {
    MPI_Finalize();
    throw;
  }
}

MpiSession::~MpiSession() { MPI_Finalize(); }

void MpiSession::barrier() { mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }

void MpiSession::max_int32(std::span<int32_t> v) {
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_INT32_T, MPI_MAX, MPI_COMM_WORLD),
            "MPI_Allreduce");
}

double MpiSession::broadcast(double v) {
  mpi_check(MPI_Bcast(&v, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD), "MPI_Bcast");
  return v;
}

void MpiSession::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return
}

BenchResult run_bench_mpi(const std::string& plan_path, const BenchConfig& cfg, MpiSession& mpi) {
  return run_bench_process(plan_path, cfg, mpi, [](int device) { return init_mpi_world(device); });
}

OnlineResult run_online_mpi(const std::string& plan_path, const OnlineConfig& cfg, MpiSession& mpi) {
  return run_online_process(plan_path, cfg, mpi, [](int device) { return init_mpi_world(device); });
}

}  // namespace mixserve::gpu
