#!/usr/bin/env bash
# One device call's worth of executor validation, run ON the GPU host from the repository root with
# a bundle made here by tools/gpu-bundle.sh whose fidelity plans were made by
# `tools/fidelity.sh prepare <bundle>`:
#   1. re-measure the executor's own tables (attention kernel, expert paths) into a copy of
#      profiles/<name>.yaml (`mixserve-profile attention|expert_gemv|gemv --merge`: the attention
#      kernel, the expert paths, the decode kernels' GEMV tables), and check it;
#   2. simulator fidelity with that profile (tools/fidelity.sh run: models x batch shapes);
#   3. the PyTorch baselines at the bench shapes: transformers eager and torch.compile
#      (tools/bench_pytorch.py; skipped with MIXSERVE_SKIP_PYTORCH=1).
# Usage: tools/executor-session.sh <bundle-dir> <out-dir> [profile-name]
# Writes (<= 8 files): session.log, <name>.yaml, check.json, fidelity.md, fidelity.tgz,
# pytorch-eager.json, pytorch-compile.json.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$(cd "${1:?bundle dir}" && pwd)"
OUT="${2:?out dir}"
NAME="${3:-h200}"
mkdir -p "$OUT"
source "$ROOT/tools/gpu-env.sh"
mixserve_gpu_env "$BUNDLE"
PROF="$BUNDLE/bin/mixserve-profile"
T0=$(date +%s)
stamp() { echo "=== $(date -u +%H:%M:%S) (+$(( $(date +%s) - T0 )) s) $*"; }
{
  stamp "profile: executor tables into a copy of profiles/$NAME.yaml"
  "$PROF" attention --merge "profiles/$NAME.yaml" -o /tmp/p1.yaml --json /tmp/attention.json &&
    "$PROF" expert_gemv --merge /tmp/p1.yaml -o /tmp/p2.yaml --json /tmp/expert_gemv.json &&
    "$PROF" gemv --merge /tmp/p2.yaml -o "$OUT/$NAME.yaml" --json /tmp/gemv.json
  echo "profile exit $?"
  stamp "host overhead per step (online bench, Qwen3-30B-A3B 8 layers) into $OUT/$NAME.yaml"; "$BUNDLE/bin/mixserve-plan" search --model qwen3-30b-a3b --cluster h200-1x1 --workload sharegpt-paper --layout 'attn TP1xDP1 | moe TP1xEP1 | PP1 | allreduce' -o /tmp/ho-plan.yaml > /tmp/ho-plan.log 2>&1 && timeout 240 "$BUNDLE/bin/mixserve-run" bench --plan /tmp/ho-plan.yaml --workload sharegpt-paper --num-requests 60 --request-rate 16 --num-layers 8 --progress-every 0 --profile "$OUT/$NAME.yaml" --host-overhead-to "$OUT/$NAME.yaml" --json /tmp/host-overhead.json | tail -n 16; echo "host overhead exit ${PIPESTATUS[0]}"
  stamp "check"
  timeout 180 "$PROF" check --profile "$OUT/$NAME.yaml" --count 30 --json "$OUT/check.json" | tail -n 6
  stamp "fidelity"
  rm -rf /tmp/fidelity && bash "$ROOT/tools/fidelity.sh" run "$BUNDLE" /tmp/fidelity "$OUT/$NAME.yaml"
  echo "fidelity exit $?"
  cp /tmp/fidelity/fidelity.md "$OUT/" 2>/dev/null
  tar -C /tmp -czf "$OUT/fidelity.tgz" fidelity
  if [ "${MIXSERVE_SKIP_PYTORCH:-0}" != 1 ]; then
    export PYTHONUNBUFFERED=1
    stamp "pytorch eager"
    timeout 240 python3 "$ROOT/tools/bench_pytorch.py" --batch 1,64 --input-len 512 --output-len 64 \
      --num-layers 8 --json "$OUT/pytorch-eager.json"
    echo "pytorch eager exit $?"
    stamp "pytorch torch.compile"
    timeout 300 python3 "$ROOT/tools/bench_pytorch.py" --batch 1,64 --input-len 512 --output-len 64 \
      --num-layers 8 --compile --json "$OUT/pytorch-compile.json" 2>&1 | grep -v "^\s*$" | tail -n 40
    echo "pytorch compile exit ${PIPESTATUS[0]}"
  fi
  stamp "done"
} 2>&1 | tee "$OUT/session.log"
