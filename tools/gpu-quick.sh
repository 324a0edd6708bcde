#!/usr/bin/env bash
# A small bundle for ONE device call, the routine of sessions 5-7: the named binaries of an existing
# build (stripped), their libraries, and NAME/x.sh = a header + the steps read from standard input,
# packed into gpu-bundle-pack/NAME.tgz (the only tgz kept there, so `carry` sends just this one).
#
# Usage: tools/gpu-quick.sh NAME "BINARY ..." < steps.sh
#   BINARY: a file name under the build's tests/gpu, profiler, run or planner folder
#   (test_gpu_forward, mixserve-profile, mixserve-run, mixserve-plan, ...).
#   Then: run(command="tar -xzf gpu-bundle-pack/NAME.tgz && bash NAME/x.sh", carry=["gpu-bundle-pack"])
# Env: MIXSERVE_GPU_BUILD (default <repo>/build; build it first, e.g. `cmake --build build -j2`).
#
# The steps run from the repository root on the GPU host, after the header has set
# tools/gpu-env.sh's environment and made a log folder L=/tmp/logs that is tarred into
# $OUT/logs.tgz after every step (a timeout still returns what ran). Helpers for the steps:
#   run NAME LIMIT CMD ...   runs CMD under `timeout LIMIT`, output in $L/NAME.log, a summary line
#                            (exit code, seconds, doctest totals) in $L/summary.txt
#   fused_bench NAME [VAR=VALUE ...]
#                            the 48-layer Qwen3-30B-A3B decode bench of test_gpu_forward with
#                            MIXSERVE_FUSED_PHASE_TIMING=1 and the given environment; its b=1 rows
#                            and the fused layer's phase lines go into the summary
#   ab_bench BINARY NAME [VAR=VALUE ...]   (time limit: $BENCH_LIMIT s, default 60)
#                            the same bench from another binary of the bundle, for A/B builds in
#                            one call (sessions 10-11: copy build/tests/gpu/test_gpu_forward to
#                            test_gpu_forward_<variant> per build, bundle them all, alternate;
#                            tools/build-variants.sh NAME=PATCH ... makes those copies)
# Example (the fused decode layer's check and bench):
#   tools/gpu-quick.sh gpu-bundle-q1 "test_gpu_forward" <<'STEPS'
#   run fused 150 $B/bin/test_gpu_forward -tc='forward: fused*'
#   fused_bench default
#   fused_bench skipdot MIXSERVE_FUSED_SKIP_DOT=1
#   STEPS
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="${1:?usage: tools/gpu-quick.sh NAME \"BINARY ...\" < steps}"
BINS="${2:?usage: tools/gpu-quick.sh NAME \"BINARY ...\" < steps}"
BUILD="${MIXSERVE_GPU_BUILD:-$ROOT/build}"
trap 'echo "gpu-quick: failed; $NAME not packed" >&2' ERR
B="$ROOT/$NAME"
case "$NAME" in gpu-bundle-*) ;; *) echo "gpu-quick: NAME must start with gpu-bundle- (git-ignored)" >&2; exit 2 ;; esac

rm -rf "$B"
mkdir -p "$B/bin"
for name in $BINS; do
  found=""
  for dir in tests/gpu profiler run planner; do
    if [ -x "$BUILD/$dir/$name" ] && [ -f "$BUILD/$dir/$name" ]; then found="$BUILD/$dir/$name"; break; fi
  done
  if [ -z "$found" ]; then
    echo "gpu-quick: no binary $name under $BUILD/{tests/gpu,profiler,run,planner}" >&2
    rm -rf "$B"
    exit 2
  fi
  cp "$found" "$B/bin/"
done
strip "$B"/bin/* 2>/dev/null || true
source "$ROOT/tools/bundle-libs.sh"
mixserve_bundle_libs "$B"
echo "$(cd "$ROOT" && git rev-parse --short HEAD) + working tree: $(cd "$ROOT" && git status --short | tr '\n' ' ')" > "$B/commit.txt"

{
  echo '#!/usr/bin/env bash'
  echo "B=$NAME"
  cat <<'HEADER'
source tools/gpu-env.sh; mixserve_gpu_env "$(pwd)/$B"
L=/tmp/logs; rm -rf $L; mkdir -p $L  # a warm host keeps /tmp: start empty
save() { tar -C /tmp -czf $OUT/logs.tgz logs; }
run() { local name=$1 lim=$2; shift 2; echo "=== $name: $*" >> $L/summary.txt; local t0=$(date +%s)
  timeout $lim stdbuf -o0 -e0 "$@" > $L/$name.log 2>&1; local rc=$?
  echo "=== $name rc=$rc $(( $(date +%s)-t0 )) s; $(grep -E '^\[doctest\] (test cases|assertions)' $L/$name.log | tr '\n' ' ')" >> $L/summary.txt; save; }
ab_bench() { local bin=$1 name=$2; shift 2; run $name ${BENCH_LIMIT:-60} env MIXSERVE_FUSED_PHASE_TIMING=1 "$@" $B/bin/$bin --no-skip -tc='bench: Qwen3-30B-A3B all 48*'
  grep -hE "b=1 .*(fused|decode kernels  )|fused layer|fused vs unfused" $L/$name.log | sed "s/^/[$name] /" >> $L/summary.txt; save; }
fused_bench() { local name=$1; shift; ab_bench test_gpu_forward $name "$@"; }
cat $B/commit.txt >> $L/summary.txt
nvidia-smi -L >> $L/summary.txt 2>&1
HEADER
  cat
  echo 'cat $L/summary.txt'
} > "$B/x.sh"

mkdir -p "$ROOT/gpu-bundle-pack"
rm -f "$ROOT/gpu-bundle-pack/"*.tgz
tar -C "$ROOT" -czf "$ROOT/gpu-bundle-pack/$NAME.tgz" "$NAME"
SIZE=$(du -m "$ROOT/gpu-bundle-pack/$NAME.tgz" | cut -f1)
echo "gpu-quick: gpu-bundle-pack/$NAME.tgz (${SIZE} MiB): run(command=\"tar -xzf gpu-bundle-pack/$NAME.tgz && bash $NAME/x.sh\", carry=[\"gpu-bundle-pack\"])"
if [ "$SIZE" -gt 63 ]; then
  echo "gpu-quick: ${SIZE} MiB is over the 64 MiB carry limit: fewer binaries (nothing kept)" >&2
  rm -f "$ROOT/gpu-bundle-pack/$NAME.tgz"
  exit 1
fi
