#!/usr/bin/env bash
# One device call's worth of GPU work, run ON the GPU host from the repository root with a bundle
# made here by tools/gpu-bundle.sh:
#   1. every bundled GPU test (labels unit, gpu, multigpu; tools/gpu-test.sh, tests only),
#   2. the benchmarks that are test cases skipped by default (kernels, attention, forward),
#   3. the profile prediction check (30 shapes off the grid of profiles/<name>.yaml).
# Usage: tools/gpu-session.sh <bundle-dir> <log-dir> [profile-name]
# Logs (<= 8 files): tests.log, bench.log, check.log, check.json. Exit 1 if a test failed.
set -uo pipefail
BUNDLE="$(cd "${1:?bundle dir}" && pwd)"
LOGS="${2:?log dir}"
NAME="${3:-h200}"
mkdir -p "$LOGS"
MIXSERVE_GPU_TESTS_ONLY=1 bash "$(dirname "$0")/gpu-test.sh" "$BUNDLE" "$LOGS" "$NAME"
tests_rc=$?
# Environment: NCCL_NVLS_ENABLE=0, NCCL 2.28.9 and the host's CUDA libraries first (gpu-env.sh).
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
mixserve_gpu_env "$BUNDLE"
BIN="$BUNDLE/bin"
{
  for t in test_gpu_kernels test_gpu_attention test_gpu_forward; do
    [ -x "$BIN/$t" ] || continue
    echo "=== bench: $t"
    timeout 240 "$BIN/$t" --no-skip --test-case='bench*'
    echo "=== bench: $t exit $?"
  done
} > "$LOGS/bench.log" 2>&1
grep -E "^===" "$LOGS/bench.log"
if [ -f "profiles/$NAME.yaml" ] && [ -x "$BIN/mixserve-profile" ]; then
  timeout 180 "$BIN/mixserve-profile" check --profile "profiles/$NAME.yaml" --count 30 \
    --json "$LOGS/check.json" > "$LOGS/check.log" 2>&1
  echo "=== check exit $?"
  tail -n 12 "$LOGS/check.log"
fi
exit $tests_rc
