#!/usr/bin/env bash
# Runs ON the GPU host, from the repository root, with a bundle made by tools/gpu-bundle.sh:
# environment report, GPU tests (labels gpu, multigpu, unit), the profiler (compute tables on one
# GPU, then collectives on every GPU merged into the same profile), and the prediction check.
# Usage: tools/gpu-test.sh <bundle-dir> <log-dir> [profile-name]
#   (MIXSERVE_GPU_TESTS_ONLY=1: the tests only, no profiling)
# Writes to <log-dir> (8 files at most): tests.log, profile.log, progress.log,
# <name>-compute.yaml, <name>.yaml, profile.json, comm.json, check.json.
set -uo pipefail
BUNDLE="$(cd "${1:?bundle dir}" && pwd)"
LOGS="${2:?log dir}"
NAME="${3:-h200}"
mkdir -p "$LOGS"
# Environment: NCCL_NVLS_ENABLE=0, NCCL 2.28.9 and the host's CUDA libraries first (gpu-env.sh).
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
mixserve_gpu_env "$BUNDLE"
BIN="$BUNDLE/bin"
NGPU="$(nvidia-smi -L 2>/dev/null | wc -l)"

{
  echo "# host $(hostname)  $(date -u +%Y-%m-%dT%H:%M:%SZ)  bundle commit $(cat "$BUNDLE/commit.txt" 2>/dev/null)"
  nvidia-smi
  nvidia-smi topo -m 2>&1 | head -20
  echo "# LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$BIN/mixserve-profile" | grep -E "not found|cublas|nccl|cudart|fmt|yaml"
  echo "# mpirun: $(command -v mpirun || echo none) (MPI tests are not bundled: the host needs its own MPI build)"
  status=0
  for label in unit gpu multigpu; do
    for t in $(cat "$BUNDLE/tests-$label.txt" 2>/dev/null); do
      echo "=== [$label] $t"
      timeout 300 "$BIN/$t"
      rc=$?
      case $rc in
        0) echo "=== [$label] $t: PASSED" ;;
        77) echo "=== [$label] $t: SKIPPED" ;;
        *) echo "=== [$label] $t: FAILED (exit $rc)"; status=1 ;;
      esac
    done
  done
  # mixserve-run bench --mpi (one process per rank, ProcessRank over an NCCL world from MPI) with a
  # 1-rank plan, offline and online: mpirun -np 1 where the host has mpirun, else the MPI singleton
  # (which needs an Open MPI installation; when it does not start, the case is reported NOT RUN).
  # Its greedy tokens (online: and its step count) must be those of the plain run: same seeded
  # weights, both eager; online with 12 requests at once (burst), so the schedule does not depend
  # on timing.
  MPIDIR="$(mktemp -d)"
  LAUNCH=()
  command -v mpirun > /dev/null && LAUNCH=(mpirun --allow-run-as-root -np 1 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE)
  printf '%s\n' 'version: 1' 'name: burst-12' 'arrival: {kind: burst}' 'input: {kind: uniform, min: 16, max: 200}' \
    'output: {kind: uniform, min: 4, max: 24}' 'num_requests: 12' 'seed: 5' > "$MPIDIR/burst.yaml"
  "$BIN/mixserve-plan" search --model qwen3-30b-a3b --cluster h200-1x1 --workload sharegpt-like \
    -o "$MPIDIR/one.yaml" > /dev/null || status=1
  for mode in offline online; do
    if [ "$mode" = offline ]; then
      MARGS=(--num-layers 4 --batch 4 --input-len 128 --output-len 16 --warmup 1 --no-cuda-graph)
      SAME='a["output_ids"]==b["output_ids"] and b["launch"]=="mpi"'
    else
      MARGS=(--workload "$MPIDIR/burst.yaml" --num-layers 4 --progress-every 0 --no-cuda-graph)
      SAME='a["output_ids"]==b["output_ids"] and a["mixserve_num_steps"]==b["mixserve_num_steps"] and b["launch"]=="mpi"'
    fi
    echo "=== [mpi] mixserve-run bench --mpi, 1-rank plan, $mode (${LAUNCH[*]:-MPI singleton})"
    rm -f "$MPIDIR/plain.json" "$MPIDIR/mpi.json"
    timeout 300 "$BIN/mixserve-run" bench --plan "$MPIDIR/one.yaml" "${MARGS[@]}" --json "$MPIDIR/plain.json" ||
      status=1
    timeout 300 "${LAUNCH[@]}" "$BIN/mixserve-run" bench --plan "$MPIDIR/one.yaml" "${MARGS[@]}" --mpi \
      --json "$MPIDIR/mpi.json" 2>&1 | tee "$MPIDIR/mpi.log"
    # After MPI_Init every message of mixserve-run names "(rank 0 of 1)": without it, MPI did not start.
    if [ ! -f "$MPIDIR/mpi.json" ] && [ ${#LAUNCH[@]} -eq 0 ] && ! grep -q "(rank 0 of 1)" "$MPIDIR/mpi.log"; then
      echo "=== [mpi] $mode: NOT RUN (no mpirun on this host and the MPI singleton did not start)"
    elif [ -f "$MPIDIR/plain.json" ] && [ -f "$MPIDIR/mpi.json" ] &&
         python3 -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); sys.exit(0 if $SAME else 1)" \
           "$MPIDIR/plain.json" "$MPIDIR/mpi.json"; then
      echo "=== [mpi] $mode: PASSED (the plain run's greedy tokens)"
    else
      echo "=== [mpi] $mode: FAILED"; status=1
    fi
  done
  echo "=== tests: $([ $status -eq 0 ] && echo all passed or skipped || echo FAILURES)"
} > "$LOGS/tests.log" 2>&1
tail -n 40 "$LOGS/tests.log" | grep -E "^===|skipped|FAILED|error" | tail -n 20

if [ "${MIXSERVE_GPU_TESTS_ONLY:-0}" = 1 ]; then
  echo "=== MIXSERVE_GPU_TESTS_ONLY=1: profiler and prediction check not run"
  exit $status
fi
P="$BIN/mixserve-profile"
# 1) compute tables and peaks on GPU 0 (collectives left out here: --gpus 1)
timeout 330 "$P" all --gpus 1 --name "$NAME" -o "$LOGS/$NAME-compute.yaml" --json "$LOGS/profile.json" \
  > "$LOGS/profile.log" 2> "$LOGS/progress.log"
echo "=== profile (compute) exit $?"
# 2) collectives on every GPU of the node, merged into the same profile
if [ "$NGPU" -ge 2 ] && [ -f "$LOGS/$NAME-compute.yaml" ]; then
  timeout 150 "$P" comm --merge "$LOGS/$NAME-compute.yaml" -o "$LOGS/$NAME.yaml" --json "$LOGS/comm.json" \
    -b 8 -e 1073741824 -f 2 >> "$LOGS/profile.log" 2>> "$LOGS/progress.log"
  echo "=== profile (comm, $NGPU GPUs) exit $?"
else
  cp "$LOGS/$NAME-compute.yaml" "$LOGS/$NAME.yaml" 2>/dev/null
fi
# 3) prediction check: 30 shapes off the grid, predicted from the profile just written
if [ -f "$LOGS/$NAME.yaml" ]; then
  timeout 120 "$P" check --profile "$LOGS/$NAME.yaml" --count 30 --json "$LOGS/check.json" \
    >> "$LOGS/profile.log" 2>> "$LOGS/progress.log"
  echo "=== check exit $?"
fi
grep -E "^# (Peaks|  |Verdict|Avg bus|Out of|all |gemm|experts)" "$LOGS/profile.log" | tail -n 40
