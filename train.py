"""Train or evaluate Slot Attention.

    python train.py --task=discovery                       # embedded scenes, CPU preset, ./runs/discovery
    python train.py --config=configs/set_prediction.py:official --config.dataset=clevr --config.data_dir=DIR
    python train.py --task=discovery --mode=eval --workdir=runs/discovery --split=test

`--task=TASK` is short for `--config=configs/TASK.py` with the preset `--preset` (default auto: cpu on the
embedded scenes, official on real data). Every config field can be overridden: --config.FIELD=VALUE.
Rerunning the same command with the same --workdir resumes from the last checkpoint; a work directory with
checkpoints keeps the config saved with them (flags may change what leaves the model as it is). Errors are one
line; Ctrl-C or SIGTERM saves a checkpoint and exits 130 or 143 (slotjax/train/cli.py).

Config fields (--config.FIELD=VALUE) and their defaults, per task: the cpu preset / the official preset (one
value where they agree; --task and --preset set `task` and `preset`):
"""

import os
import platform
import signal
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
# Set before anything imports TensorFlow (data, TensorBoard) or starts XLA: their C++ logs below errors, such as the
# start-up notices on CPU features and devices, stay hidden. TF_CPP_MIN_LOG_LEVEL=0 shows them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def restart_with_huge_pages() -> None:
    """Re-executes this command (same process, arguments and environment) with glibc's HUGE_PAGES tunable.

    XLA's CPU runtime allocates a step's temporaries afresh on every call; with 4 KiB pages their page faults cost
    about a sixth of a CPU training step (benchmarks/README.md). Where the kernel hands out transparent huge pages
    on request (mode "madvise"), glibc 2.35+ asks for them with the tunable, read only when a process starts.
    GLIBC_TUNABLES=glibc.malloc.hugetlb=0 keeps 4 KiB pages.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    libc, version = platform.libc_ver()
    if "glibc.malloc.hugetlb" in tunables or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            if "[madvise]" not in file.read():  # "always": every mapping has them already; "never": none can
                return
    except OSError:
        return
    environment = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES])))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def stopped_while_starting(signum, frame):
    """Ctrl-C or SIGTERM before training saves anything: one line and the status 128 + the signal, at once."""
    try:
        sys.stdout.flush()
    except Exception:  # interrupted in the middle of a print
        pass
    os.write(2, f"Stopped by {signal.Signals(signum).name}; nothing was saved.\n".encode())
    os._exit(128 + signum)


restart_with_huge_pages()
for signum in (signal.SIGINT, signal.SIGTERM):  # the training loop takes them over to save first
    signal.signal(signum, stopped_while_starting)

from absl import app, flags  # noqa: E402

from slotjax import TASKS, configs  # noqa: E402
from slotjax.data.files import SPLITS  # noqa: E402
from slotjax.train import cli  # noqa: E402

flags.DEFINE_enum("task", "discovery", TASKS, "Which model and task (short for --config=configs/TASK.py).")
flags.DEFINE_enum("preset", "auto", configs.PRESETS, "Preset of --task: official, cpu or auto (cpu on scenes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate the last checkpoint.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, images/ (default runs/TASK).")
flags.DEFINE_enum("split", "validation", SPLITS, "Split evaluated by --mode=eval.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for training on several hosts "
    "(default: $JAX_COORDINATOR_ADDRESS, or what SLURM / a TPU pod provides).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) taking part (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (default: from the cluster).")


def config_fields_help() -> str:
    """One line per config field with its defaults, for --help: `field  discovery 16 / 64, set_prediction 32 / 512`
    (cpu / official), one value where presets or tasks agree, only the tasks that have the field."""
    presets = ("cpu", "official")
    defaults = {task: [configs.get_config(task, preset) for preset in presets] for task in TASKS}
    names = sorted({name for task_configs in defaults.values() for name in task_configs[0]} - {"task", "preset"})
    lines = []
    for name in names:
        per_task = {}
        for task, task_configs in defaults.items():
            if name in task_configs[0]:
                values = list(dict.fromkeys(str(config[name]) or "''" for config in task_configs))
                per_task[task] = " / ".join(values)
        shown = set(per_task.values())
        if len(shown) == 1 and len(per_task) == len(defaults):
            text = shown.pop()
        else:
            text = ", ".join(f"{task} {values}" for task, values in per_task.items())
        lines.append(f"  {name:<26}{text}")
    return "\n".join(lines) + "\n"


__doc__ += config_fields_help()

if __name__ == "__main__":
    app.run(cli.main, flags_parser=cli.parse_flags)
