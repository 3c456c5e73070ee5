"""slotjax.huge_pages: the restart with glibc's huge-page tunable, checked in subprocesses."""

import os
import pathlib
import subprocess
import sys

from slotjax import huge_pages

REPO = pathlib.Path(__file__).resolve().parent.parent
MIB = 1 << 20
# Prints its process id on every start, restarts, then maps 64 MiB with malloc (as XLA does) and reports how much
# of it the kernel backs with huge pages.
SCRIPT = """
import ctypes, os, sys
sys.path.insert(0, {repo!r})
from slotjax import huge_pages
print("start", os.getpid(), flush=True)
huge_pages.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(64 << 20)
ctypes.memset(buffer, 1, 64 << 20)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge_kib = sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages"))
print("done", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), huge_kib, sys.argv[1:], flush=True)
"""


def run_script(tmp_path, **environment):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
    result = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=dict(env, **environment),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [line.split(" ", 2) for line in result.stdout.splitlines()]


def test_restart_adds_the_tunable_once_and_keeps_process_and_arguments(tmp_path):
    lines = run_script(tmp_path)
    starts = [rest for kind, *rest in lines if kind == "start"]
    (done,) = [rest for kind, *rest in lines if kind == "done"]
    pid, details = done
    if not huge_pages.tunable_helps():  # this machine gains nothing (not Linux/glibc 2.35+/THP "madvise")
        assert len(starts) == 1 and "hugetlb" not in details
        return
    assert [start[0] for start in starts] == [pid, pid], "one restart, in place (same process id)"
    tunables, huge_kib, arguments = details.split(" ", 2)
    assert huge_pages.TUNABLE in tunables.split(":")
    assert arguments == "['--flag', 'a b']"
    assert int(huge_kib) * 1024 >= 32 * MIB, f"only {huge_kib} KiB of huge pages for a 64 MiB malloc"


def test_opt_out_and_existing_tunables(tmp_path):
    lines = run_script(tmp_path, **{huge_pages.OPT_OUT: "0"})
    assert [kind for kind, *_ in lines] == ["start", "done"]
    assert "hugetlb" not in lines[-1][2]
    lines = run_script(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    tunables = lines[-1][2].split(" ")[0].split(":")
    assert tunables[0] == "glibc.malloc.arena_max=2"  # kept, with hugetlb added where the restart happens
    assert (huge_pages.TUNABLE in tunables) == huge_pages.tunable_helps()
