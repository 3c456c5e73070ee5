"""Validation metric against wall-clock minutes for the default training command of a task.

    python benchmarks/convergence.py --task=discovery --minutes=15 --seeds 0 1
    python benchmarks/convergence.py --task=set_prediction --minutes=15 --seeds 0 1

For each seed, runs `python train.py --task=TASK --config.seed=SEED` (the
default config on the embedded scenes) in a fresh work directory for at most
--minutes, one run after the other, then prints one row per evaluation
(minutes since the command started, start-up and compilation included; step;
the task's metrics from metrics.jsonl) and a summary of the main metric at
5, 10 and 15 minutes: the last evaluation finished by then, "-" before the
first, "not reached" where the run was stopped earlier (--minutes below the
column; a run that finished its training keeps its final value). A run
stopped before its first evaluation is reported as such. Writes the rows to
--json and a plot of the main metric against minutes to --plot. Arguments
after `--` go to train.py (e.g. `-- --config.learning_rate=1e-3`).
"""

from __future__ import annotations

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
LABELS = {"fg_ari": "FG-ARI", "ap_inf": "AP (no threshold)", "ap_1": "AP (distance 1)", "ap_0.5": "AP (distance 0.5)"}
CHECKPOINT_MINUTES = (5, 10, 15)
TARGETS = {"fg_ari": 0.9, "ap_inf": 0.5}  # what the default command should reach within 15 minutes


def run(task: str, seed: int, minutes: float, workdir: str, train_args: list[str]) -> dict:
    """Trains for at most `minutes`. Returns the validation `rows` (each with `minutes` since the start), the
    `minutes` the run lasted and whether it `finished` its training (rather than being stopped at `minutes`)."""
    command = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--task={task}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        *train_args,
    ]
    print("command:", " ".join(command), flush=True)
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the run saves a checkpoint and exits
        process.wait()
    else:
        if process.returncode != 0:
            sys.exit(f"error: train.py exited with status {process.returncode}; see its output above.")
    finished = process.returncode == 0
    lasted = min((time.time() - start) / 60, minutes)
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):  # a run stopped before its first evaluation has none
        with open(path) as file:
            rows = [json.loads(line) for line in file]
    rows = [
        {**row, "seed": seed, "minutes": (row["wall_time"] - start) / 60}
        for row in rows
        if row["split"] == "validation" and (row["wall_time"] - start) / 60 <= minutes
    ]
    return {"rows": rows, "minutes": lasted, "finished": finished}


def summary_cell(result: dict, name: str, minutes: float) -> str:
    """The metric `name` of the last evaluation finished by `minutes`; "-" before the first; "not reached" past the
    end of a run that was stopped (a run that finished its training keeps its final value)."""
    if minutes > result["minutes"] and not result["finished"]:
        return "not reached"
    done = [row[name] for row in result["rows"] if row["minutes"] <= minutes]
    return f"{done[-1]:.3f}" if done else "-"


def plot(runs: dict[int, dict], task: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = METRICS[task][:1] if task == "discovery" else METRICS[task][:3]
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for seed, result in runs.items():
        rows = result["rows"]
        for name, style in zip(names, ("-", "--", ":")):
            axis.plot(
                [row["minutes"] for row in rows],
                [row[name] for row in rows],
                style,
                marker=".",
                label=f"{LABELS.get(name, name)}, seed {seed}",
            )
    axis.axhline(TARGETS[names[0]], color="gray", linestyle=":", label=f"target {TARGETS[names[0]]}")
    axis.set_xlabel("wall-clock minutes (start-up and compilation included)")
    axis.set_ylabel(("FG-ARI" if task == "discovery" else "AP") + " (validation)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(METRICS), default="discovery")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workdir", help="parent of the runs' work directories (default: a fresh temporary one)")
    parser.add_argument("--json", help="write every evaluation row here (default: WORKDIR/convergence.json)")
    parser.add_argument("--plot", help="write the plot here (default: WORKDIR/convergence.png)")
    parser.add_argument("train_args", nargs="*", help="passed on to train.py")
    args = parser.parse_args()
    parent = args.workdir or tempfile.mkdtemp(prefix=f"convergence_{args.task}_")
    os.makedirs(parent, exist_ok=True)
    names = METRICS[args.task]
    runs = {}
    for seed in args.seeds:
        result = run(args.task, seed, args.minutes, os.path.join(parent, f"seed_{seed}"), args.train_args)
        runs[seed] = result
        if not result["rows"]:
            print(f"\nseed {seed}: no evaluation finished within {result['minutes']:.3g} minutes (start-up included).")
            continue
        print(f"\nseed {seed}:\n| minutes | step | " + " | ".join(names) + " |")
        print("|---:|---:|" + "---:|" * len(names))
        for row in result["rows"]:
            print(f"| {row['minutes']:.1f} | {row['step']} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nmachine: {machine}; work directories under {parent}")
    print(f"| seed | {names[0]} at " + " | ".join(f"{m} min" for m in CHECKPOINT_MINUTES) + " | steps |")
    print("|---:|" + "---:|" * (len(CHECKPOINT_MINUTES) + 1))
    for seed, result in runs.items():
        cells = " | ".join(summary_cell(result, names[0], m) for m in CHECKPOINT_MINUTES)
        print(f"| {seed} | {cells} | {result['rows'][-1]['step'] if result['rows'] else '-'} |")
    with open(args.json or os.path.join(parent, "convergence.json"), "w") as file:
        json.dump({"task": args.task, "machine": machine, "train_args": args.train_args, "runs": runs}, file)
    title = f"python train.py --task={args.task} {' '.join(args.train_args)}".strip() + f"\n{machine}"
    plot(runs, args.task, args.plot or os.path.join(parent, "convergence.png"), title)


if __name__ == "__main__":
    main()
