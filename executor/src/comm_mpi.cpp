// MPI launch of the GPU ranks: rank 0 makes the NCCL unique id, MPI_Bcast shares it.
#include <mpi.h>

#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/comm.hpp"

namespace mixserve::gpu {

Comm init_mpi_world(int device) {
  disable_nvls();
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ncclUniqueId id{};
  if (rank == 0) MIXSERVE_NCCL_CHECK(ncclGetUniqueId(&id));
  if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
    throw RuntimeError("MPI_Bcast of the NCCL unique id failed");
  MIXSERVE_CUDA_CHECK(cudaSetDevice(device));
  ncclComm_t c = nullptr;
  MIXSERVE_NCCL_CHECK(ncclCommInitRank(&c, size, id, rank));
  return Comm(c, device);
}

}  // namespace mixserve::gpu
