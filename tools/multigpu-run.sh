#!/usr/bin/env bash
# The multi-GPU run of the distributed forward, one command, ON an N-GPU host (N >= 2), from the
# repository root, with a bundle made by tools/gpu-bundle.sh (it holds mixserve-plan too):
#   1. every multigpu test of the bundle (tests-multigpu.txt): test_gpu_distributed_nccl (every
#      planner layout for R = 2, 4, 8 <= N on a GPU per rank through NCCL, against the single-GPU
#      forward), test_gpu_comm, test_gpu_moe_comm_nccl;
#   2. a distributed offline bench (mixserve-run bench --gpu-per-rank: one process, a thread per
#      GPU, NCCL) of Qwen3-30B-A3B (first 8 layers, synthetic weights) for the N-GPU layouts
#      below, next to the 1-GPU plan on GPU 0 as the baseline of the same run, the same plans
#      emulated on one GPU (--emulate-ranks) for comparison, one process per GPU under mpirun
#      (--mpi; when the host has mpirun), and the online mode with a GPU per rank and under
#      mpirun (60 sharegpt-paper requests at 16 req/s); then mpirun of one process too many,
#      which every rank must refuse.
# Usage: tools/multigpu-run.sh <bundle-dir> <log-dir>
# Logs: tests.log, bench.log, bench-*.json (the last ones dropped past 8 files). Exit 1 on a
# failed test or bench. It has not run as a whole yet; its tests and two of its benches ran on two
# H200s in session 7 (docs/distributed.md "First run on two GPUs").
set -uo pipefail
BUNDLE="$(cd "${1:?bundle dir}" && pwd)"
LOGS="${2:?log dir}"
mkdir -p "$LOGS"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
mixserve_gpu_env "$BUNDLE"
BIN="$BUNDLE/bin"
N="$(nvidia-smi -L 2>/dev/null | wc -l)"
if [ "$N" -lt 2 ]; then
  echo "multigpu-run: $N GPU(s) visible; this run needs at least 2" >&2
  exit 2
fi
status=0
{
  echo "# host $(hostname)  $(date -u +%Y-%m-%dT%H:%M:%SZ)  $N GPUs  bundle commit $(cat "$BUNDLE/commit.txt" 2>/dev/null)"
  nvidia-smi topo -m 2>&1 | head -20
  for t in $(cat "$BUNDLE/tests-multigpu.txt" 2>/dev/null); do
    echo "=== [multigpu] $t"
    timeout 500 "$BIN/$t"
    rc=$?
    case $rc in
      0) echo "=== [multigpu] $t: PASSED" ;;
      77) echo "=== [multigpu] $t: SKIPPED" ;;
      *) echo "=== [multigpu] $t: FAILED (exit $rc)"; status=1 ;;
    esac
  done
} > "$LOGS/tests.log" 2>&1
grep -E "^===|layouts; worst|^MoE by schedule" "$LOGS/tests.log"

# Plans: the N-GPU cluster is h200-1x8 with gpus_per_node N (the shipped node, cut to N GPUs).
P=$((N > 8 ? 8 : N))
PLANS="$(mktemp -d)"
sed -e "s/^name: h200-1x8/name: h200-1x$P/" -e "s/^gpus_per_node: 8/gpus_per_node: $P/" \
  configs/clusters/h200-1x8.yaml > "$PLANS/h200-1x$P.yaml"
layouts=("attn TP${P}xDP1 | moe TP${P}xEP1 | PP1 | allreduce"
         "attn TP1xDP${P} | moe TP1xEP${P} | PP1 | a2a")
[ "$P" -ge 4 ] && layouts+=("attn TP2xDP$((P / 2)) | moe TP2xEP$((P / 2)) | PP1 | fused"
                             "attn TP2xDP$((P / 2)) | moe TP2xEP$((P / 2)) | PP1 | rs-a2a-ag")
ARGS=(--num-layers 8 --batch 16 --input-len 512 --output-len 32 --warmup 1)
{
  "$BIN/mixserve-plan" search --model qwen3-30b-a3b --cluster h200-1x1 --workload sharegpt-like \
    -o "$PLANS/one.yaml" > /dev/null || status=1
  echo "=== bench baseline: 1 GPU"
  timeout 300 "$BIN/mixserve-run" bench --plan "$PLANS/one.yaml" "${ARGS[@]}" --json "$LOGS/bench-1gpu.json" || status=1
  i=0
  for L in "${layouts[@]}"; do
    i=$((i + 1))
    "$BIN/mixserve-plan" search --model qwen3-30b-a3b --cluster "$PLANS/h200-1x$P.yaml" --workload sharegpt-like \
      --layout "$L" -o "$PLANS/p$i.yaml" > /dev/null || { status=1; continue; }
    echo "=== bench $L: a GPU per rank (NCCL)"
    timeout 300 "$BIN/mixserve-run" bench --plan "$PLANS/p$i.yaml" "${ARGS[@]}" --gpu-per-rank \
      --json "$LOGS/bench-$i-nccl.json" || status=1
    echo "=== bench $L: emulated on one GPU"
    timeout 300 "$BIN/mixserve-run" bench --plan "$PLANS/p$i.yaml" "${ARGS[@]}" --emulate-ranks || status=1
    if command -v mpirun > /dev/null; then
      echo "=== bench $L: one process per GPU (mpirun -np $P --mpi)"
      timeout 300 mpirun --allow-run-as-root -np "$P" -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
        "$BIN/mixserve-run" bench --plan "$PLANS/p$i.yaml" "${ARGS[@]}" --mpi --json "$LOGS/bench-$i-mpi.json" ||
        status=1
    else
      echo "=== bench $L: no mpirun on this host: --mpi not run"
    fi
    OARGS=(--workload sharegpt-paper --num-requests 60 --request-rate 16 --num-layers 8 --progress-every 0)
    echo "=== online $L: a GPU per rank (NCCL), one scheduler per attention-DP replica"
    timeout 300 "$BIN/mixserve-run" bench --plan "$PLANS/p$i.yaml" "${OARGS[@]}" --gpu-per-rank || status=1
    if command -v mpirun > /dev/null; then
      echo "=== online $L: one process per GPU (mpirun -np $P --mpi)"
      timeout 300 mpirun --allow-run-as-root -np "$P" -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
        "$BIN/mixserve-run" bench --plan "$PLANS/p$i.yaml" "${OARGS[@]}" --mpi || status=1
    fi
  done
  # A launch of the wrong size is refused by every rank before any device work.
  if command -v mpirun > /dev/null; then
    echo "=== mpirun -np $((P + 1)) of a $P-rank plan (must be refused by every rank)"
    timeout 120 mpirun --allow-run-as-root --oversubscribe -np "$((P + 1))" -x LD_LIBRARY_PATH \
      "$BIN/mixserve-run" bench --plan "$PLANS/p1.yaml" "${ARGS[@]}" --mpi > "$LOGS/refusal.log" 2>&1
    rc=$?
    cat "$LOGS/refusal.log"
    # Refused: a non-zero exit that is not the timeout's (a hang is a failure), the message from
    # every one of the P + 1 ranks.
    n=$(grep -c "needs $P ranks; launched with $((P + 1))" "$LOGS/refusal.log")
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$n" -ne "$((P + 1))" ]; then
      echo "=== refusal: FAILED (exit $rc, message from $n of $((P + 1)) ranks)"; status=1
    fi
  fi
} > "$LOGS/bench.log" 2>&1
grep -E "^===|^# MoE communication|^Prefill|^Decode\.|^Total|error|needs .* ranks|Mean TTFT|Mean ITL|Output token throughput" \
  "$LOGS/bench.log"
echo "=== multigpu-run: $([ $status -eq 0 ] && echo ok || echo FAILURES)"
exit $status
