#!/usr/bin/env bash
# guestinit front door. ./build.sh help lists the subcommands.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${GUESTINIT_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
APT_PACKAGES=(python3 python3-venv python3-dev qemu-system-x86 busybox-static erofs-utils
  cryptsetup-bin zstd lz4 cpio umockdev libudev1 util-linux ca-certificates binutils openssl gcc libc6-dev musl-tools
  libpython3.11-dev libffi-dev zlib1g-dev libexpat1-dev
  make bc bison flex libelf-dev libssl-dev kmod ovmf fdisk)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "$1 needs root (or sudo)"
    SUDO=sudo
  else
    SUDO=
  fi
}

setup_apt() {
  apt_install "${APT_PACKAGES[@]}"
}

apt_install() {  # apt_install PACKAGE...: install those not installed yet
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages: all $# present"
    return
  fi
  need_root "installing ${missing[*]}"
  say "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"
}

setup_venv() {
  # The venv uses Debian's python3 (3.11 on bookworm), the same Python the guest image ships.
  local base=/usr/bin/python3
  [ -x "$base" ] || die "$base missing: run on Debian/Ubuntu (apt-get install python3)"
  if [ ! -x "$PY" ]; then
    say "creating venv $VENV"
    "$base" -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
  fi
  local stamp=$VENV/.guestinit-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "pip install -e .[test] into $VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed"
    "$PY" -m pip install -q -e ".[test]" || die "pip install of the project failed"
    touch "$stamp"
  else
    say "venv $VENV up to date"
  fi
}

cmd_setup() { setup_apt; setup_venv; }

cmd_test() {
  cmd_setup
  say "building the cpu, cpu-tuned, kata (their kernels too, cached) and baseline images for the vm tier"
  for profile in cpu cpu-tuned baseline-busybox baseline-systemd; do
    "$VENV/bin/guestinit-build" image "$profile" --out "out/$profile"
  done
  # kata ships no stand-ins; the vm tier's Kata boots run the agent stand-in
  "$VENV/bin/guestinit-build" image kata --standins --out out/kata
  # the VM tier's GPU tests build stand-in NVIDIA kernel modules for the guest kernel
  apt_install "linux-headers-$(cat out/cpu/kernel-release.txt)"
  say "lint: ruff"
  "$VENV/bin/ruff" check guestinit rootfs bench tests
  say "types: mypy --strict"
  "$VENV/bin/mypy"
  say "tests: unit, pidns and vm tiers"
  "$PY" -m pytest -q "$@"
}

# The tuned guest kernel: Debian's linux-source (pinned in the profile's lock) built with
# kernel-config/ fragments; cached by the hash of source + fragments (rootfs/kbuild.py).
cmd_kernel() {
  cmd_setup
  "$VENV/bin/guestinit-build" kernel "$@"
}

cmd_image() {
  cmd_setup
  local profile=${1:-cpu}; shift || true
  "$VENV/bin/guestinit-build" image "$profile" --out "out/$profile" "$@"
}

# The cpu image carries no kata-agent (it is not a Debian package); the demo runs the
# agent stand-in shipped in the image, which logs to syslog and waits like an agent.
# guestinit.agent.ready: ready waits for the stand-in's "ready" line on the init's syslog.
DEMO_AGENT='guestinit.agent="/usr/bin/python3.11 -IS /usr/lib/guestinit/guestinit/testing/agent_standin.py" guestinit.agent.ready=syslog:agent-standin-ready'

cmd_demo() {
  cmd_setup
  say "building the cpu image"
  "$VENV/bin/guestinit-build" image cpu --out out/cpu
  say "booting it in QEMU (software emulation unless KVM works), then asking it to power down"
  "$VENV/bin/guestinit-bench" boot out/cpu --append "$DEMO_AGENT" "$@"
}

cmd_bench() {
  cmd_setup
  if [ "${1:-}" = suite ]; then  # the cpu image and both baselines, on both kernels
    for profile in cpu baseline-busybox baseline-systemd cpu-tuned baseline-busybox-tuned \
                   baseline-systemd-tuned; do
      "$VENV/bin/guestinit-build" image "$profile" --out "out/$profile"
    done
  elif [ "${1:-}" = optimize ]; then  # the optimizer's base and its tuned-kernel candidate
    for profile in cpu cpu-tuned; do
      "$VENV/bin/guestinit-build" image "$profile" --out "out/$profile"
    done
  elif [ "${1:-}" = bar-sweep ]; then  # the sweep boots the cpu image
    "$VENV/bin/guestinit-build" image cpu --out out/cpu
  fi
  "$VENV/bin/guestinit-bench" "$@"
}

usage() {
  cat <<USAGE
usage: ./build.sh COMMAND [ARGS]
  setup            install Debian packages and the Python venv (.venv); idempotent
  test [PYTEST]    lint, type-check and run every test tier (unit, pidns, vm)
  kernel [FRAGMENTS]
                   build the tuned guest kernel from linux-source with kernel-config/
                   fragments (default: cpu-tuned's), cached by source + fragment hash
  image [PROFILE]  build out/PROFILE (default cpu) with guestinit-build (never writes
                   the lock file)
  lock [PROFILE]   re-pin PROFILE's packages (default cpu) into its lock file
  demo             build the cpu image, boot it in QEMU, print the boot report
  bench ARGS       run guestinit-bench ARGS: suite and bar-sweep (build the images they
                   boot), optimize, boot, init, report, compare, listen, bar-map;
                   e.g. ./build.sh bench suite --runs 5
USAGE
}

case "${1:-help}" in
  setup) shift; cmd_setup "$@" ;;
  test) shift; cmd_test "$@" ;;
  kernel) shift; cmd_kernel "$@" ;;
  image) shift; cmd_image "$@" ;;
  demo) shift; cmd_demo "$@" ;;
  bench) shift; cmd_bench "$@" ;;
  lock) shift; cmd_setup; "$VENV/bin/guestinit-build" lock "${1:-cpu}" ;;
  help|-h|--help) usage ;;
  *) usage >&2; die "unknown command '$1'" ;;
esac
