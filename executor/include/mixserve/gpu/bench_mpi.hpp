// One process per GPU under MPI for `mixserve-run bench --mpi` (mpirun -np R, or srun): the MPI
// session of the process and the ProcessGroup (bench.hpp) over MPI_COMM_WORLD. Built in
// mixserve_gpu_mpi (MIXSERVE_HAVE_MPI); launcher_world_size() is always there, so that a binary
// without MPI can refuse a launch under mpirun clearly.
#pragma once
#include <span>
#include <string>

#include "mixserve/gpu/bench.hpp"
#include "mixserve/gpu/online.hpp"

namespace mixserve::gpu {

// The world size an MPI launcher gave this process, from its environment, without MPI:
// OMPI_COMM_WORLD_SIZE (Open MPI), PMI_SIZE (MPICH/Hydra, Slurm PMI2), PMIX_SIZE, or SLURM_NTASKS
// beside PMIX_RANK (srun --mpi=pmix). 0: not launched by MPI (or none of these set).
int launcher_world_size();
// A launcher's environment variable as a non-negative integer; -1 when unset, empty or not one.
int launcher_env_int(const char* name);

#if MIXSERVE_HAVE_MPI
// MPI_Init on construction, MPI_Finalize on destruction. The local rank (the GPU it takes) is
// OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID or PMI_LOCAL_RANK when set, else the
// rank within MPI_COMM_TYPE_SHARED. One per process.
class MpiSession final : public ProcessGroup {
 public:
  MpiSession();
  ~MpiSession() override;
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  void barrier() override;
  void max_int32(std::span<int32_t> v) override;
  double broadcast(double v) override;
  // Ends every process of the job with `code` (a failure after the processes entered NCCL).
  [[noreturn]] void abort(int code);

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0;
};

// run_bench_process / run_online_process with the NCCL world from init_mpi_world.
BenchResult run_bench_mpi(const std::string& plan_path, const BenchConfig& cfg, MpiSession& mpi);
OnlineResult run_online_mpi(const std::string& plan_path, const OnlineConfig& cfg, MpiSession& mpi);
#endif

}  // namespace mixserve::gpu
