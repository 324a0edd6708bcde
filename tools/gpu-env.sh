# Sourced ON the GPU host by the tools that run bundled binaries (gpu-test.sh, gpu-session.sh,
# fidelity.sh): `mixserve_gpu_env <bundle-dir>`. Sets the data dir (the repository root, so plans
# find configs/), keeps NVLink multicast off, and puts NCCL 2.28.9 from the Python wheel first on
# LD_LIBRARY_PATH (it matches the headers we build against), then the host's CUDA libraries, then
# the bundle's own libraries.
mixserve_gpu_env() {
  local bundle="$1" ldp d
  export MIXSERVE_DATA_DIR="${MIXSERVE_DATA_DIR:-$(pwd)}"
  export NCCL_NVLS_ENABLE=0                  # never NVLink multicast on these machines
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  ldp="$bundle/lib"
  for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib \
           /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib; do
    [ -d "$d" ] && ldp="$d:$ldp"
  done
  export LD_LIBRARY_PATH="$ldp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
