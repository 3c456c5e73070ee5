"""Metric reached against wall-clock minutes for the default training command of a task.

    python benchmarks/convergence.py --task=discovery --minutes=15
    python benchmarks/convergence.py --task=set_prediction --minutes=15

Runs `python train.py --task=TASK` (the default config, embedded data) in a
fresh work directory for at most --minutes, then prints one row per
evaluation: minutes since the start of the command (start-up and compilation
included), step, and the task's metrics from metrics.jsonl. Extra arguments
after `--` go to train.py (e.g. `-- --config.eval_every=250`). Like `make run`, the command runs with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 unless the environment sets GLIBC_TUNABLES (see the README).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"discovery": ("fg_ari", "ari", "mse"), "set_prediction": ("ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(METRICS), default="discovery")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--workdir", help="default: a fresh temporary directory")
    parser.add_argument("train_args", nargs="*", help="passed on to train.py")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"convergence_{args.task}_")
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--task={args.task}",
        f"--workdir={workdir}",
        *args.train_args,
    ]
    print("command:", " ".join(command))
    start = time.time()
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", **os.environ}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    try:
        process.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the run saves a checkpoint and exits
        process.wait()
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    names = METRICS[args.task]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; work directory {workdir}")
    print("| minutes | step | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for row in rows:
        if row["split"] == "validation":
            minutes = (row["wall_time"] - start) / 60
            print(f"| {minutes:.1f} | {row['step']} | " + " | ".join(f"{row[name]:.3f}" for name in names) + " |")


if __name__ == "__main__":
    main()
