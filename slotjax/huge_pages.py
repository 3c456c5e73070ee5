"""Transparent huge pages for host memory: faster CPU steps on Linux with glibc.

XLA's CPU runtime allocates a step's temporaries afresh on every call, and glibc maps each large one
with fresh 4 KiB pages, so one training step page-faults tens of MB (96 MB for the discovery CPU
preset), and with two threads the faults contend for the kernel's memory-map lock. Where the kernel
hands out huge pages only on request (transparent huge pages in mode "madvise", Debian's default),
glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) makes malloc request them. glibc reads its
tunables when a process starts, so `restart_with_huge_pages` re-executes the running command with the
tunable added: same process id, arguments and environment. Measured in benchmarks/README.md (fifth
session): JAX training steps 10-23% faster on one thread, 1.5-1.9x on two.

`SLOTJAX_HUGE_PAGES=0` in the environment turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SLOTJAX_HUGE_PAGES"  # "0": leave the process as it is
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def tunable_helps() -> bool:
    """Whether glibc.malloc.hugetlb=1 changes anything here: Linux, glibc >= 2.35, THP mode "madvise"."""
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc":
        return False
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
        return False
    try:
        with open(THP_MODE_FILE) as file:
            return "[madvise]" in file.read()  # "always": every mapping gets them already; "never": none can
    except OSError:
        return False


def restart_needed() -> bool:
    """Whether the tunable would help and is missing from this process (and the restart is not turned off)."""
    if os.environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return tunable_helps()


def restart_with_huge_pages() -> None:
    """Re-executes this process with `glibc.malloc.hugetlb=1` where that helps; returns where it does not.

    Call it first thing in a program's entry point (`if __name__ == "__main__":`), before work is done.
    """
    if not restart_needed():
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
