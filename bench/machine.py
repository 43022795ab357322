"""The ``machine`` of a result: the host and the VMM setup a boot ran on."""

from __future__ import annotations

import os
import platform

from bench.qemu import cpu_model
from rootfs import proc


def first_line(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip() if ":" in line else line
    except OSError:
        pass
    return "unknown"


def describe_machine(accel: str, entropy: str, qemu: str, guest_kernel: str,
                     memory_mib: int) -> dict[str, object]:
    mem_kib = first_line("/proc/meminfo", "MemTotal").split()[0]
    os_name = "unknown"
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
    except OSError:
        pass
    try:
        qemu_version = proc.run([qemu, "--version"], timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, proc.RunError):
        qemu_version = "unknown"
    cores = os.cpu_count() or 1
    return {
        "name": f"{accel}-{cores}c", "cpu_model": first_line("/proc/cpuinfo", "model name"),
        "cores": cores, "memory_bytes": int(mem_kib) * 1024 if mem_kib.isdigit() else 0,
        "host_kernel": platform.release(), "os": os_name, "qemu_version": qemu_version,
        "machine_type": "microvm", "accel": accel, "cpu": cpu_model(accel, entropy),
        "entropy": entropy, "guest_kernel": guest_kernel, "guest_memory_mib": memory_mib,
        "guest_cpus": 1,
    }


def guest_kernel(directory: str) -> str:
    try:
        with open(os.path.join(directory, "kernel-release.txt"), encoding="utf-8") as fh:
            return fh.read().strip() or "unknown"
    except OSError:
        return "unknown"
