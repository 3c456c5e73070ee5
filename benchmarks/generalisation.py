"""More slots and more objects at test time: FG-ARI and mBO by the number of objects in a scene.

Slot Attention is trained with K slots and T iterations on scenes of a few objects, then tested with more slots
and iterations on scenes with more objects (the paper: CLEVR6 -> CLEVR10 with 11 slots; Krimmel et al., TMLR
2024: train K=7, T=3, test K=11, T=5). This evaluates a trained discovery run on held-out embedded scenes
(the test split) with exactly n objects, n = 2..10, for K in {trained, 11} and T in {3, 5}, through the same
evaluation as `train.py --mode=eval`, and prints a table per metric and draws them.

    python benchmarks/generalisation.py --workdir=runs/discovery
    python benchmarks/generalisation.py --workdir=runs/discovery --num-examples=64 --objects 2 6 10 --slots 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys

METRICS = ("fg_ari", "mbo")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a discovery run on the embedded scenes (its checkpoints/)")
    parser.add_argument("--objects", type=int, nargs="+", default=list(range(2, 11)), help="objects per scene")
    parser.add_argument("--slots", type=int, nargs="+", help="numbers of slots to test (default: trained and 11)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[3, 5], help="numbers of iterations to test")
    parser.add_argument("--num-examples", type=int, default=256, help="test scenes per number of objects")
    parser.add_argument("--output", help="JSON and PNG path stem (default: WORKDIR/generalisation)")
    args = parser.parse_args(argv)
    try:
        rows, trained = measure(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    stem = args.output or os.path.join(args.workdir, "generalisation")
    with open(stem + ".json", "w") as file:
        json.dump({"trained": trained, "rows": rows}, file, indent=1)
    print(
        f"\ntrained: {trained['num_slots']} slots, {trained['num_iterations']} iterations, "
        f"{trained['min_objects']}-{trained['max_objects']} objects, step {trained['step']}"
    )
    for metric in METRICS:
        print(f"\n{metric} on {args.num_examples} test scenes per number of objects\n")
        print(table(rows, metric, args.objects))
    print(f"\nWrote {plot(rows, args.objects, trained, stem + '.png')} and {stem}.json")


def measure(args) -> tuple[list[dict], dict]:
    """One row per (K, T): {num_slots, num_iterations, fg_ari: {n: value}, mbo: {n: value}}."""
    from flax import nnx

    from slotjax.convert import restore_model
    from slotjax.train import trainer as trainers
    from slotjax.train.runs import check_config

    model, saved, step = restore_model(args.workdir, print_fn=lambda line: print(line, file=sys.stderr))
    if saved.task != "discovery" or saved.dataset != "scenes":
        raise ValueError(f"{args.workdir} holds a {saved.task} run on {saved.dataset}; this needs discovery on scenes.")
    trained = {name: saved[name] for name in ("num_slots", "num_iterations", "min_objects", "max_objects")}
    trained["step"] = step
    params = nnx.state(model, nnx.Param)
    rows = []
    for num_slots in args.slots or sorted({saved.num_slots, 11}):
        for num_iterations in args.iterations:
            config = tested_config(saved, num_slots, num_iterations, args.objects[0], args.num_examples)
            check_config(config)
            trainer = trainers.Trainer(config)
            row = {"num_slots": num_slots, "num_iterations": num_iterations, **{metric: {} for metric in METRICS}}
            for num_objects in args.objects:
                trainer.config = tested_config(saved, num_slots, num_iterations, num_objects, args.num_examples)
                results, _ = trainer.evaluate(params, "test")
                for metric in METRICS:
                    row[metric][num_objects] = results[metric]
                print(
                    f"K={num_slots} T={num_iterations} objects={num_objects}: "
                    + "  ".join(f"{metric} {results[metric]:.3f}" for metric in METRICS),
                    file=sys.stderr,
                )
            rows.append(row)
    return rows, trained


def tested_config(saved, num_slots: int, num_iterations: int, num_objects: int, num_examples: int):
    """The saved config with the test-time settings (none of them changes a parameter)."""
    config = saved.copy_and_resolve_references()
    config.update(
        num_slots=num_slots,
        num_iterations=num_iterations,
        min_objects=num_objects,
        max_objects=num_objects,
        num_eval_examples=num_examples,
        eval_batch_size=min(saved.eval_batch_size, num_examples),
    )
    return config


def table(rows: list[dict], metric: str, objects: list[int]) -> str:
    lines = ["| K | T | " + " | ".join(f"{n} obj." for n in objects) + " |", "|---" * (len(objects) + 2) + "|"]
    for row in rows:
        values = " | ".join(f"{row[metric][n]:.3f}" for n in objects)
        lines.append(f"| {row['num_slots']} | {row['num_iterations']} | {values} |")
    return "\n".join(lines)


def plot(rows: list[dict], objects: list[int], trained: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), sharex=True)
    for axis, metric in zip(axes, METRICS):
        for row in rows:
            values = [row[metric][n] for n in objects]
            axis.plot(objects, values, marker="o", label=f"K={row['num_slots']}, T={row['num_iterations']}")
        axis.axvspan(trained["min_objects"] - 0.5, trained["max_objects"] + 0.5, color="0.9", zorder=0)
        axis.set_xlabel("objects in the scene")
        axis.set_ylabel({"fg_ari": "FG-ARI", "mbo": "mBO"}[metric])
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend(title="tested with")
    figure.suptitle(
        f"trained: {trained['num_slots']} slots, {trained['num_iterations']} iterations, "
        f"{trained['min_objects']}-{trained['max_objects']} objects (shaded), step {trained['step']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
