#!/usr/bin/env bash
# Installs the Debian packages, builds MixServe, and plans the paper's setup:
# DeepSeek-R1 on 2 nodes x 8 H20 (NVLink + 400 Gb/s InfiniBand).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
mixserve_install_packages
mixserve_build
echo "[mixserve] mixserve-plan search --model deepseek-r1 --cluster h20-2x8 --workload sharegpt-paper"
"$MIXSERVE_BUILD/planner/mixserve-plan" search --model deepseek-r1 --cluster h20-2x8 \
  --workload sharegpt-paper --top 10 -o "$MIXSERVE_BUILD/plan-deepseek-r1-h20-2x8.yaml"
