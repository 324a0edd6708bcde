#!/usr/bin/env bash
# A/B builds for one device call (the routine of sessions 10-12): one copy of a GPU test binary per
# variant of the working tree, named BINARY_NAME next to it, ready for tools/gpu-quick.sh and its
# ab_bench helper.
#
# Usage: tools/build-variants.sh [--target BINARY] NAME=SPEC [NAME=SPEC ...]
#   BINARY  a CMake target under tests/gpu (default test_gpu_forward)
#   SPEC    "HEAD" (the tree as committed), a patch file (git apply), "trace" (a stage-trace build:
#           MIXSERVE_FUSED_TRACE_STAGES=64, decode_layer.hpp) or "trace+PATCH" (both)
# Example:
#   tools/build-variants.sh base=HEAD r4=/work/notes/s12-next-route4.patch r4tr=trace+/work/notes/s12-next-route4.patch
#   -> build/tests/gpu/test_gpu_forward_{base,r4,r4tr}
# Needs a clean working tree (nothing modified or untracked): each variant is built from it and the
# tree is restored (git checkout, git clean) before the next. Env: MIXSERVE_GPU_BUILD (default
# <repo>/build, configured already).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MIXSERVE_GPU_BUILD:-$ROOT/build}"
TARGET=test_gpu_forward
if [ "${1:-}" = "--target" ]; then TARGET="${2:?--target needs a binary name}"; shift 2; fi
[ $# -ge 1 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
HDR=executor/include/mixserve/gpu/decode_layer.hpp
cd "$ROOT"
if [ -n "$(git status --porcelain)" ]; then
  echo "build-variants: the working tree is not clean (commit or stash first):" >&2
  git status --short >&2
  exit 2
fi
[ -d "$BUILD" ] || { echo "build-variants: no build folder $BUILD (run tools/setup.sh or cmake first)" >&2; exit 2; }
restore() { git checkout -q -- . && git clean -qfd; }
trap 'restore' EXIT
for arg in "$@"; do
  case "$arg" in *=*) ;; *) echo "build-variants: '$arg' is not NAME=SPEC" >&2; exit 2 ;; esac
  name="${arg%%=*}" spec="${arg#*=}"
  case "$name" in ""|*/*|*" "*) echo "build-variants: bad variant name '$name'" >&2; exit 2 ;; esac
  trace=0 patch=""
  case "$spec" in
    HEAD) ;;
    trace) trace=1 ;;
    trace+*) trace=1 patch="${spec#trace+}" ;;
    *) patch="$spec" ;;
  esac
  echo "== $name: ${patch:-(no patch)}$([ $trace = 1 ] && echo ', stage trace')"
  if [ -n "$patch" ]; then
    [ -f "$patch" ] || { echo "build-variants: no patch file $patch" >&2; exit 2; }
    git apply "$patch" || { echo "build-variants: $patch does not apply to $(git rev-parse --short HEAD)" >&2; exit 2; }
  fi
  if [ $trace = 1 ]; then
    grep -q '^#define MIXSERVE_FUSED_TRACE_STAGES 0$' "$HDR" || { echo "build-variants: no trace switch in $HDR" >&2; exit 2; }
    sed -i 's/^#define MIXSERVE_FUSED_TRACE_STAGES 0$/#define MIXSERVE_FUSED_TRACE_STAGES 64/' "$HDR"
  fi
  start=$(date +%s)
  if ! nice cmake --build "$BUILD" -j"$(nproc)" --target "$TARGET" > "/tmp/build-variants-$name.log" 2>&1; then
    tail -30 "/tmp/build-variants-$name.log" >&2
    echo "build-variants: $name failed to build (log /tmp/build-variants-$name.log)" >&2
    exit 1
  fi
  cp "$BUILD/tests/gpu/$TARGET" "$BUILD/tests/gpu/${TARGET}_$name"
  echo "   $BUILD/tests/gpu/${TARGET}_$name ($(( $(date +%s) - start )) s)"
  restore
done
# Leave the build folder matching the restored tree.
nice cmake --build "$BUILD" -j"$(nproc)" --target "$TARGET" > /tmp/build-variants-restore.log 2>&1 ||
  { echo "build-variants: rebuilding the restored tree failed (/tmp/build-variants-restore.log)" >&2; exit 1; }
