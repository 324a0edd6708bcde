#!/usr/bin/env bash
# Packs a bundle made by tools/gpu-bundle.sh into gpu-bundle-pack/<name>.tgz (git-ignored) so that it
# travels in the device tool's `carry` (64 MiB at most: a full 1-GPU bundle is ~85 MiB unpacked,
# ~39 MiB packed, since the test binaries' fat binaries compress well).
# Usage: tools/gpu-pack.sh <bundle-dir>
# Then: run(command="tar -xzf gpu-bundle-pack/<name>.tgz && bash <name>/x.sh", carry=["gpu-bundle-pack"])
# Write what the call produces as few files under $OUT (the tool returns a handful of files: tar
# the log folder after every step so a timeout still returns what ran).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="${1:?bundle dir}"
NAME="$(basename "$B")"
mkdir -p "$ROOT/gpu-bundle-pack"
rm -f "$ROOT/gpu-bundle-pack/"*.tgz
tar -C "$(dirname "$(cd "$B" && pwd)")" -czf "$ROOT/gpu-bundle-pack/$NAME.tgz" "$NAME"
SIZE=$(du -m "$ROOT/gpu-bundle-pack/$NAME.tgz" | cut -f1)
echo "gpu-pack: gpu-bundle-pack/$NAME.tgz (${SIZE} MiB)"
if [ "$SIZE" -gt 63 ]; then echo "gpu-pack: over the 64 MiB carry limit: remove binaries the call does not need" >&2; exit 1; fi
