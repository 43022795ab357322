"""``python -m guestinit --help-config | status --root DIR`` (not the boot path)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from guestinit import settings_doc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

USAGE = """python -m guestinit [--root DIR] [--cmdline "KEY=VALUE ..."]
    Run the init. In a VM it is /sbin/init (PID 1, no arguments). With --root DIR it
    uses DIR for /proc, /sys, /dev, /run and /etc/guestinit.conf, and reads the given
    cmdline instead of /proc/cmdline, so it can be PID 1 of a PID + mount namespace:
        unshare --pid --fork --mount --uts --net python -m guestinit --root DIR --cmdline ...
python -m guestinit --help-config     list every setting, its default and NVRC alias
python -m guestinit status [--root DIR] [--timeout S]
    ask a running init for its status (JSON) over <root>/run/guestinit/control"""


def main(argv: Sequence[str]) -> None:
    if argv[0] in ("--help", "-h"):
        print(USAGE)
        return
    if argv[0] == "--help-config":
        print(settings_doc.describe())
        return
    parser = argparse.ArgumentParser(prog="python -m guestinit status")
    parser.add_argument("status")
    parser.add_argument("--root", default="/")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    from guestinit.control import query

    path = os.path.join(args.root, "run/guestinit/control")
    try:
        print(json.dumps(query(path, args.timeout), indent=2))
    except OSError as exc:
        sys.exit(f"guestinit status: {exc}")
