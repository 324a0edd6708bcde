#!/usr/bin/env bash
# Builds the GPU binaries (Hopper sm_90a + portable compute_80 PTX) and bundles what a GPU host
# needs into a folder (default: <repo>/gpu-bundle, git-ignored):
#   bin/  mixserve-profile, mixserve-run, mixserve-plan and the GPU test binaries (label gpu / multigpu / unit lists in tests-*.txt)
#   lib/  the shared libraries a CUDA 13 host may lack (fmt, yaml-cpp, cudart); the binaries find
#         them through tools/gpu-test.sh's LD_LIBRARY_PATH. cuBLAS and NCCL are the host's own.
# Usage: tools/gpu-bundle.sh [bundle-dir]     (env: MIXSERVE_GPU_BUILD, default <repo>/build-gpu;
#        MIXSERVE_BUNDLE_1GPU=1 for a 1-GPU host: multigpu tests left out, binaries stripped)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${1:-$ROOT/gpu-bundle}"
BUILD="${MIXSERVE_GPU_BUILD:-$ROOT/build-gpu}"

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j "${MIXSERVE_JOBS:-2}"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
# Every GPU program: the profiler and benchmarks (profiler/mixserve-*) and every test binary of
# tests/gpu (test_gpu_*), whatever their number.
find "$BUILD/profiler" -maxdepth 1 -type f -name 'mixserve-*' -perm -u+x -exec cp {} "$BUNDLE/bin/" \;
find "$BUILD/run" -maxdepth 1 -type f -name 'mixserve-run' -perm -u+x -exec cp {} "$BUNDLE/bin/" \; 2>/dev/null || true
# The planner (CPU only) makes the plans of tools/multigpu-run.sh on the GPU host.
find "$BUILD/planner" -maxdepth 1 -type f -name 'mixserve-plan' -perm -u+x -exec cp {} "$BUNDLE/bin/" \; 2>/dev/null || true
# test_gpu_comm_mpi is left out: it needs the host's own MPI build and mpirun.
find "$BUILD/tests/gpu" -maxdepth 1 -type f -name 'test_gpu_*' ! -name test_gpu_comm_mpi -perm -u+x \
  -exec cp {} "$BUNDLE/bin/" \;
# MIXSERVE_BUNDLE_1GPU=1: for a 1-GPU host under the 64 MiB carry limit: no multigpu test binaries
# (they would skip), binaries stripped.
if [ "${MIXSERVE_BUNDLE_1GPU:-0}" = 1 ]; then
  ctest --test-dir "$BUILD" -N -L '^multigpu$' 2>/dev/null | sed -n 's/^ *Test *#[0-9]*: \(test_gpu_[a-z0-9_]*\)$/\1/p' |
    while read -r t; do rm -f "$BUNDLE/bin/$t"; done
  strip "$BUNDLE"/bin/* 2>/dev/null || true
fi
# Test lists by label, from CTest itself (the binaries run directly on the host: no CTest there).
# Only binaries in the bundle: test_gpu_comm_mpi needs the host's own MPI and is left out.
for label in gpu multigpu unit; do
  ctest --test-dir "$BUILD" -N -L "^${label}\$" 2>/dev/null | sed -n 's/^ *Test *#[0-9]*: \(test_gpu_[a-z0-9_]*\)$/\1/p' |
    while read -r t; do if [ -x "$BUNDLE/bin/$t" ]; then echo "$t"; fi; done > "$BUNDLE/tests-$label.txt"
done
# Shared libraries the host image may not have (tools/bundle-libs.sh).
source "$ROOT/tools/bundle-libs.sh"
mixserve_bundle_libs "$BUNDLE"
( cd "$ROOT" && git rev-parse HEAD 2>/dev/null || echo unknown ) > "$BUNDLE/commit.txt"
du -sh "$BUNDLE"
ls -l "$BUNDLE/bin" "$BUNDLE/lib"
