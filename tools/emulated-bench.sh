#!/usr/bin/env bash
# mixserve-run bench of multi-GPU plans emulated on ONE GPU (R logical ranks, LocalTransport: the
# links are device copies, so the times are not multi-GPU times), beside the 1-GPU plan, for
# Qwen3-30B-A3B's first 8 layers (synthetic weights), batch 16, input 256, output 16. Plans are made
# here with the bundle's mixserve-plan. Every rank's MoE layers run the plan's schedule where it has
# one (the JSON's moe_schedule). Runs ON the GPU host from the repository root.
# Usage: tools/emulated-bench.sh <bundle-dir> <out-dir>
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$(cd "${1:?bundle dir}" && pwd)"
OUT="${2:?out dir}"
mkdir -p "$OUT/plans"
source "$ROOT/tools/gpu-env.sh"
mixserve_gpu_env "$BUNDLE"
PLAN="$BUNDLE/bin/mixserve-plan"
RUN="$BUNDLE/bin/mixserve-run"
MODEL="${MIXSERVE_EMU_MODEL:-qwen3-30b-a3b}"
ARGS=(--num-layers 8 --batch 16 --input-len 256 --output-len 16 --warmup 1)
LAYOUTS=(
  'attn TP8xDP1 | moe TP8xEP1 | PP1 | allreduce'
  'attn TP1xDP8 | moe TP1xEP8 | PP1 | a2a'
  'attn TP2xDP4 | moe TP2xEP4 | PP1 | a2a'
  'attn TP2xDP4 | moe TP2xEP4 | PP1 | fused'
  'attn TP2xDP4 | moe TP2xEP4 | PP1 | rs-a2a-ag'
  'attn TP4xDP1 | moe TP4xEP1 | PP2 | allreduce'
)
row() {  # plan-file tag extra-args...
  local plan="$1" tag="$2"; shift 2
  echo "=== bench $tag"
  timeout 150 "$RUN" bench --plan "$plan" "${ARGS[@]}" "$@" --json "$OUT/bench-$tag.json" |
    grep -E "^# (MoE|emulated|ranks)|median|Prefill|prefill latency|decode latency" | head -n 12
  echo "=== exit ${PIPESTATUS[0]}"
}
"$PLAN" search --model "$MODEL" --cluster h200-1x1 --workload sharegpt-like \
  --layout 'attn TP1xDP1 | moe TP1xEP1 | PP1 | allreduce' -o "$OUT/plans/one.yaml" > /dev/null || exit 1
row "$OUT/plans/one.yaml" 1gpu --no-cuda-graph   # eager decode, as the emulated ranks run it
i=0
for l in "${LAYOUTS[@]}"; do
  i=$((i + 1))
  p="$OUT/plans/p$i.yaml"
  "$PLAN" search --model "$MODEL" --cluster h200-1x8 --workload sharegpt-like --layout "$l" -o "$p" > /dev/null ||
    { echo "=== plan '$l' failed"; continue; }
  row "$p" "p$i" --emulate-ranks
done
python3 - "$OUT" <<'PY'
import json, glob, os, sys
out = sys.argv[1]
print("| plan | ranks | MoE schedule | prefill s | median decode ms | predicted decode ms |")
print("|---|---|---|---|---|---|")
for f in ["bench-1gpu.json"] + sorted(os.path.basename(x) for x in glob.glob(out + "/bench-p*.json")):
    try:
        j = json.load(open(os.path.join(out, f)))
    except Exception as e:
        print(f"| {f} | failed: {e} |"); continue
    dec = [s for s in j["steps"] if s["kind"] == "decode"]
    pred = sorted(s["predicted_ms"] for s in dec)
    print(f"| `{j['plan']['layout']}` | {j.get('ranks', 1)} | {j.get('moe_schedule', '-')} | "
          f"{j['prefill_latency']:.3f} | {1e3 * j['median_decode_latency']:.2f} | {pred[len(pred) // 2]:.2f} |")
PY
