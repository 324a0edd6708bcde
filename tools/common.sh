# Shared by tools/setup.sh and tools/test.sh: install the Debian packages and build.
# Sourced, not run. Uses sudo only when not root and only for apt-get.
set -euo pipefail
MIXSERVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIXSERVE_BUILD="${MIXSERVE_BUILD:-$MIXSERVE_ROOT/build}"
MIXSERVE_PACKAGES=(build-essential cmake ninja-build pkg-config libcli11-dev libyaml-cpp-dev
  libfmt-dev libeigen3-dev doctest-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin)

mixserve_install_packages() {
  local missing=()
  for p in "${MIXSERVE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "[mixserve] packages: all present"
    return
  fi
  echo "[mixserve] installing from apt: ${missing[*]}"
  local SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

mixserve_build() {
  local jobs
  jobs="$(nproc 2>/dev/null || echo 2)"
  echo "[mixserve] configuring in $MIXSERVE_BUILD"
  cmake -S "$MIXSERVE_ROOT" -B "$MIXSERVE_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  echo "[mixserve] building with $jobs jobs"
  cmake --build "$MIXSERVE_BUILD" -j "$jobs"
}
