#!/usr/bin/env bash
# One short, read-only call on a host with NVIDIA GPUs (docs/bench.md, bar-map):
#   bench/device/bar-map.sh [RESULTS_DIR] [SPAN]
# records lspci -vvv of the NVIDIA devices, nvidia-smi -q (text and XML), the
# /proc/driver/nvidia tree and the NVIDIA devices as udev lists them (gpus.json,
# bench.host_gpus), then runs bar-map over the largest BAR of the first GPU (BAR 1 on
# data-center GPUs; SPAN, default 1G, capped by the BAR), into
# RESULTS_DIR/<date>-<gpu>/ (RESULTS_DIR default bench/results; $OUT when set).
# Never resets a GPU, never changes a setting, never writes to a BAR. Each step has a
# time limit; a step that fails is recorded in steps.txt and the rest still run.
set -u
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-bench/results}}
SPAN=${2:-1G}
PY=${PYTHON:-python3}
SYSFS=${SYSFS:-/sys}  # the bar-map step's sysfs root (tests point it at an empty tree)
LIMIT=60  # seconds per step; the whole script stays well under 5 minutes

gpu_name=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
machine=$(printf '%s' "${gpu_name:-nvidia-gpu}" | tr -cs 'A-Za-z0-9' '-' | tr 'A-Z' 'a-z' \
  | sed 's/^-//; s/-$//')
dir="$RESULTS/$(date -u +%F)-$machine"
mkdir -p "$dir"
steps="$dir/steps.txt"
: > "$steps"

step() {  # step NAME OUTFILE COMMAND...: run with a limit, record status and duration
  local name=$1 out=$2 start rc
  shift 2
  start=$(date +%s.%N)
  timeout "$LIMIT" "$@" > "$dir/$out" 2> "$dir/$out.stderr"
  rc=$?
  [ -s "$dir/$out.stderr" ] || rm -f "$dir/$out.stderr"
  printf '%s\trc=%s\t%ss\t%s\n' "$name" "$rc" \
    "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')" \
    "$(printf '%s' "$*" | head -1 | cut -c1-100)" >> "$steps"
}

step lspci lspci-nvidia-vvv.txt lspci -D -vvv -d 10de:
step lspci-numeric lspci-nvidia-nn.txt lspci -D -nn -d 10de:
step nvidia-smi nvidia-smi-q.txt nvidia-smi -q
step nvidia-smi-xml nvidia-smi-q.xml nvidia-smi -q -x
step nvidia-smi-topo nvidia-smi-topo.txt nvidia-smi topo -m
step proc-tree proc-driver-nvidia.txt find /proc/driver/nvidia /proc/driver/nvidia-caps \
  -maxdepth 4 -printf '%y %m %p\n'
# the readable files of /proc/driver/nvidia, one after another, each under a header
step proc-files proc-driver-nvidia-files.txt sh -c '
  for f in $(find /proc/driver/nvidia /proc/driver/nvidia-caps -maxdepth 4 -type f \
             2>/dev/null | sort); do
    printf "==> %s <==\n" "$f"; head -c 65536 "$f" 2>&1; echo; done'
# the NVIDIA devices as udev enumerates them (bench.host_gpus: pyudev), BARs included
step gpus gpus.json env PYTHONPATH=. "$PY" -m bench.host_gpus --json

# the largest BAR of the first NVIDIA GPU (PCI order), from the same enumeration
target=$(env PYTHONPATH=. "$PY" -m bench.host_gpus --bar-map-target 2>/dev/null)
if [ -n "$target" ]; then
  step bar-map bar-map.txt env PYTHONPATH=. "$PY" -m bench.cli bar-map "$target" \
    --span "$SPAN" --sysfs "$SYSFS" --json "$dir/bar-map.json"
else
  printf 'bar-map\tskipped\tno NVIDIA GPU (class 0x03xxxx) in udev'"'"'s enumeration\n' >> "$steps"
fi
{ uname -a; grep -m1 'model name' /proc/cpuinfo; nproc; grep MemTotal /proc/meminfo; } \
  > "$dir/host.txt" 2>&1
echo "results in $dir"
cat "$steps"
