#!/usr/bin/env bash
# Simulator fidelity on one GPU (issue #5): the planner's predicted step latency, with a measured
# profile, next to the step latency `mixserve-run bench` measures, for several models x batch shapes.
#
#   tools/fidelity.sh prepare <bundle-dir>            (here, with the planner built in build/)
#       writes one single-GPU plan per model into <bundle-dir>/fidelity/
#   tools/fidelity.sh run <bundle-dir> <out-dir> [profile.yaml]     (on the GPU host)
#       runs every case below with <bundle-dir>/bin/mixserve-run, JSON per case into <out-dir>,
#       then tools/fidelity_report.py prints the table (also <out-dir>/fidelity.md).
#
# Cases: every MODELS entry ("name:layers"; layers at full width, as `--num-layers`) x BATCHES,
# each prompt INPUT_LEN tokens and OUTPUT_LEN generated tokens: the prefill chunks (the plan's
# max_num_batched_tokens per step) and OUTPUT_LEN-1 decode steps (CUDA graphs) per case.
set -uo pipefail
MODELS="${MIXSERVE_FIDELITY_MODELS:-qwen3-30b-a3b:8 mixtral-8x7b:4 olmoe-1b-7b:16 qwen2-57b-a14b:6}"
BATCHES="${MIXSERVE_FIDELITY_BATCHES:-1 16 64}"
INPUT_LEN="${MIXSERVE_FIDELITY_INPUT_LEN:-512}"
OUTPUT_LEN="${MIXSERVE_FIDELITY_OUTPUT_LEN:-33}"
LAYOUT='attn TP1xDP1 | moe TP1xEP1 | PP1 | allreduce'
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:?usage: tools/fidelity.sh prepare|run <bundle-dir> [out-dir] [profile.yaml]}"
BUNDLE="${2:?bundle dir}"

case "$cmd" in
prepare)
  PLAN_BIN="${MIXSERVE_PLAN:-$ROOT/build/planner/mixserve-plan}"
  [ -x "$PLAN_BIN" ] || { echo "fidelity: $PLAN_BIN not built (tools/setup.sh builds it)" >&2; exit 2; }
  mkdir -p "$BUNDLE/fidelity"
  for entry in $MODELS; do
    m="${entry%%:*}"
    "$PLAN_BIN" search --model "$m" --cluster h200-1x1 --workload fixed-1k-1k --layout "$LAYOUT" \
      -o "$BUNDLE/fidelity/plan-$m.yaml" > "$BUNDLE/fidelity/plan-$m.log" 2>&1 ||
      { echo "fidelity: planning $m failed:" >&2; tail -3 "$BUNDLE/fidelity/plan-$m.log" >&2; exit 1; }
    echo "fidelity: plan for $m -> $BUNDLE/fidelity/plan-$m.yaml"
  done
  ;;
run)
  OUTDIR="${3:?out dir}"
  PROFILE="${4:-}"
  mkdir -p "$OUTDIR"
  BIN="$BUNDLE/bin/mixserve-run"
  [ -x "$BIN" ] || { echo "fidelity: $BIN missing (tools/gpu-bundle.sh)" >&2; exit 2; }
  source "$ROOT/tools/gpu-env.sh"
  mixserve_gpu_env "$(cd "$BUNDLE" && pwd)"
  failed=0
  n=0
  total=$(( $(echo $MODELS | wc -w) * $(echo $BATCHES | wc -w) ))
  for entry in $MODELS; do
    m="${entry%%:*}"
    layers="${entry##*:}"
    for b in $BATCHES; do
      n=$((n + 1))
      tag="$m-L$layers-B$b"
      echo "fidelity: [$n/$total] $tag" >&2
      args=(bench --plan "$BUNDLE/fidelity/plan-$m.yaml" --batch "$b" --input-len "$INPUT_LEN"
            --output-len "$OUTPUT_LEN" --num-layers "$layers" --warmup 1 --json "$OUTDIR/$tag.json")
      [ -n "$PROFILE" ] && args+=(--profile "$PROFILE")
      timeout 300 "$BIN" "${args[@]}" > "$OUTDIR/$tag.log" 2>&1
      rc=$?
      if [ "$rc" -ne 0 ]; then
        echo "fidelity: $tag FAILED (exit $rc); log tail:" >&2
        tail -5 "$OUTDIR/$tag.log" >&2
        failed=$((failed + 1))
      fi
    done
  done
  python3 "$ROOT/tools/fidelity_report.py" "$OUTDIR" | tee "$OUTDIR/fidelity.md"
  [ "$failed" -eq 0 ] || { echo "fidelity: $failed case(s) failed (listed in the table as missing)" >&2; exit 1; }
  ;;
*)
  echo "fidelity: unknown command '$cmd' (prepare | run)" >&2
  exit 2
  ;;
esac
