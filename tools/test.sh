#!/usr/bin/env bash
# Installs what is missing, builds, and runs the CPU tests (label `unit`). GPU tests (labels `gpu`,
# `multigpu`) need a GPU: run tools/gpu-test.sh on a GPU host.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mixserve_install_packages
mixserve_build
echo "[mixserve] GPU tests (labels gpu, multigpu) are skipped here: they need a GPU (tools/gpu-test.sh)"
ctest --test-dir "$MIXSERVE_BUILD" -L unit --output-on-failure -j "$(nproc 2>/dev/null || echo 2)"
