# Shared by scripts/demo and scripts/test: install what is missing, configure and build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${JOBS:-$(nproc)}"
# ccache keys on relative paths, so clones in different folders share the cache.
export CCACHE_BASEDIR="$ROOT"

# Debian 12 packages the build and tests need (no vendored code; downloaded at build time only the
# model package and llama-cpp-python's source distribution, both from PyPI: curl and patch for the latter).
INSTINFER_PACKAGES=(cmake g++ make pkg-config ccache liburing-dev libnvme-dev libjson-c-dev libxsimd-dev doctest-dev
  libbenchmark-dev python3 python3-numpy python3-pip python3-venv fio gnuplot-nox qemu-user-static g++-aarch64-linux-gnu
  clang libclang-rt-14-dev clang-format binutils curl ca-certificates patch)

install_deps() {
  local missing=()
  for p in "${INSTINFER_PACKAGES[@]}"; do
    # dpkg-query, not dpkg -s: the latter fails when several architectures are installed (arm64 libs).
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "== installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# configure_build DIR [cmake args...]
configure_build() {
  local dir="$1"; shift
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  cmake -S "$ROOT" -B "$ROOT/$dir" "${launcher[@]}" "$@" >/dev/null
}
