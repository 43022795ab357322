#!/usr/bin/env bash
# The boot suite under KVM, on a lent machine where /dev/kvm works (issue #24; docs/bench.md,
# "KVM figures"):
#   bench/device/kvm-suite.sh [RESULTS_DIR] [RUNS]
# Build the images here first and carry them (./build.sh bench suite builds all six; the
# device machine reaches no network, so it installs nothing): out/cpu, out/cpu-tuned,
# out/cpu-launcher, out/baseline-{busybox,systemd}{,-tuned} as far as they exist, and a
# Python with the project's dependencies (PYTHON, default .venv/bin/python, else python3).
# It probes KVM with a real boot (bench/qemu.py probe_kvm: an open /dev/kvm proves
# nothing on nested hosts) and, if the probe passes, runs `guestinit-bench suite --accel kvm`
# over the variants whose images are there, into RESULTS_DIR/<date>-kvm-<cpu>/ (RESULTS_DIR
# default bench/results; $OUT when set) with machine.txt describing the host. Anything
# missing (QEMU, Python modules, images, KVM) is one line in steps.txt and the script
# exits 0 with the reason: a machine that cannot run it is a finding, not an error. Each
# step has a time limit; the suite stays under 8 minutes at RUNS=5.
set -u
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-bench/results}}
RUNS=${2:-5}
QEMU=${QEMU:-qemu-system-x86_64}
KVM_DEVICE=${KVM_DEVICE:-/dev/kvm}  # tests point it at a file that is not a device
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null)
machine=$(printf '%s' "${cpu:-cpu}" | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' \
  | sed 's/^-//; s/-$//' | cut -c1-40)
dir="$RESULTS/$(date -u +%F)-kvm-$machine"
mkdir -p "$dir"
steps="$dir/steps.txt"
: > "$steps"
note() { printf '%s\n' "$*" >> "$steps"; }
stop() { note "stopped: $*"; echo "kvm-suite: $* (see $steps)" >&2; exit 0; }

{
  echo "date: $(date -u +%FT%TZ)"
  echo "cpu: ${cpu:-unknown}, $(nproc) cores, $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo)"
  echo "kernel: $(uname -r)"
  echo "qemu: $("$QEMU" --version 2>/dev/null | head -1)"
  echo "python: $("$PYTHON" --version 2>&1)"
  command -v nvidia-smi >/dev/null && echo "gpu: $(timeout 20 nvidia-smi -L 2>/dev/null | head -1)"
} > "$dir/machine.txt"

command -v "$QEMU" >/dev/null || stop "no $QEMU on this machine"
"$PYTHON" -c 'import bench.suite, psutil, msgpack' 2>/dev/null \
  || stop "$PYTHON lacks the project's modules (carry .venv or set PYTHON)"
[ -c "$KVM_DEVICE" ] && [ -r "$KVM_DEVICE" ] && [ -w "$KVM_DEVICE" ] \
  || stop "$KVM_DEVICE is not a usable character device: no KVM here"

variants=()
for pair in guestinit:cpu guestinit-tuned:cpu-tuned busybox:baseline-busybox \
            systemd:baseline-systemd busybox-tuned:baseline-busybox-tuned \
            systemd-tuned:baseline-systemd-tuned; do
  [ -f "out/${pair#*:}/initramfs.img" ] && variants+=("${pair%%:*}") \
    || note "variant ${pair%%:*}: no out/${pair#*:}/initramfs.img, left out"
done
[ ${#variants[@]} -gt 0 ] || stop "no images under out/ (build them, then carry out/)"
extra=()
[ -f out/cpu-launcher/initramfs.img ] && extra=(--image launcher=out/cpu-launcher)

kernel=out/${variants[0]/guestinit-tuned/cpu-tuned}/vmlinuz
[ -f "$kernel" ] || kernel=out/cpu/vmlinuz
probe=$(timeout 120 "$PYTHON" -c '
import sys
from bench.qemu import probe_kvm
print("passed" if probe_kvm(sys.argv[1], sys.argv[2]) else "failed")' "$kernel" "$QEMU" 2>&1)
note "kvm probe ($kernel): $probe"
[ "$probe" = passed ] || stop "the KVM probe did not boot a kernel: $probe"

vlist=$(IFS=,; echo "${variants[*]}")
start=$(date +%s)
timeout 480 "$PYTHON" -m bench.cli suite --accel kvm --variants "$vlist" "${extra[@]}" \
  --runs "$RUNS" --out "$dir/suite" > "$dir/suite.log" 2>&1
rc=$?
note "suite --accel kvm --variants $vlist ${extra[*]} --runs $RUNS: rc=$rc, $(( $(date +%s) - start ))s"
exit 0
