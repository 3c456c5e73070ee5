"""Train or evaluate Slot Attention.

    python train.py --task=discovery                       # embedded scenes, CPU preset, ./runs/discovery
    python train.py --task=set_prediction --workdir=runs/sp
    python train.py --task=discovery --config.dataset=clevr --config.data_dir=~/tensorflow_datasets
    python train.py --task=discovery --mode=eval --workdir=runs/discovery --split=test

Every config field (slotjax/configs.py) can be overridden: --config.FIELD=VALUE.
Rerunning the same command with the same --workdir resumes from the last checkpoint.
"""

import os
import sys

from slotjax import huge_pages

if __name__ == "__main__":
    huge_pages.restart_with_huge_pages()  # Linux: re-executes with glibc asking for huge pages (faster CPU steps)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (data, TensorBoard) is quiet unless it errs

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from slotjax import configs, cpu_devices  # noqa: E402


def _peek(argv: list[str], name: str, default: str) -> str:
    """A flag's value before absl parses (the config's defaults depend on it)."""
    for index, argument in enumerate(argv):
        if argument.startswith(f"--{name}="):
            return argument.split("=", 1)[1]
        if argument == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
    return default


def _default_config():
    task = _peek(sys.argv, "task", "discovery")
    try:
        return configs.get_config(task, _peek(sys.argv, "preset", "auto"), _peek(sys.argv, "config.dataset", "scenes"))
    except ValueError:  # reported by main() after absl has parsed the flags
        return configs.get_config()


def _check_overrides(argv: list[str], config) -> None:
    """Unknown --config.FIELD names get one clear message instead of a traceback.

    Runs before `config_flags.DEFINE_config_dict`, which already reads the overrides in sys.argv.
    """
    for argument in argv[1:]:
        if argument.startswith("--config."):
            path = argument[len("--config."):].split("=", 1)[0]
            node = config
            for field in path.split("."):
                if not hasattr(node, "keys") or field not in node:
                    fields = f" Fields: {', '.join(sorted(node.keys()))}." if hasattr(node, "keys") else ""
                    sys.exit(f"error: unknown config field {path!r} in {argument!r}.{fields}")
                node = node[field]


if __name__ == "__main__":  # before DEFINE_config_dict below: it parses the --config.* overrides while defined
    _check_overrides(sys.argv, _default_config())

flags.DEFINE_enum("task", "discovery", configs.TASKS, "Which model and task.")
flags.DEFINE_enum("preset", "auto", configs.PRESETS, "Defaults: official (paper), cpu (small), auto (cpu on scenes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate the last checkpoint.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, images/ (default runs/TASK).")
flags.DEFINE_string("split", "validation", "Split evaluated by --mode=eval: train_eval, validation or test.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for training on several hosts "
                    "(default: $JAX_COORDINATOR_ADDRESS, or what SLURM / a TPU pod provides).")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) taking part (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (default: from the cluster).")
config_flags.DEFINE_config_dict("config", _default_config(), "Training configuration.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config.task != FLAGS.task:
        raise app.UsageError(f"--config.task={config.task} contradicts --task={FLAGS.task}; set only --task.")
    workdir = FLAGS.workdir or f"runs/{FLAGS.task}"
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO

    try:  # before JAX starts: one CPU device per core, each with a shard of the batch (no effect on GPUs, TPUs)
        per_core = cpu_devices.device_count([config.batch_size, config.eval_batch_size])
        cpu_devices.split_host(config.cpu_devices or max(per_core, config.num_devices))
    except ValueError as error:
        sys.exit(f"error: {error}")
    from slotjax import trainer  # imports JAX: after flag parsing, so --help is quick

    trainer.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    print(f"task {config.task}, data set {config.dataset}, preset {config.preset}, work directory {workdir}")
    try:
        if FLAGS.mode == "eval":
            trainer.evaluate_checkpoint(config, workdir, FLAGS.split)
        else:
            trainer.train_and_evaluate(config, workdir)
    except (ValueError, TypeError, FileNotFoundError, trainer.TrainingError) as error:
        sys.exit(f"error: {error}")  # one message naming the problem and the fix, no traceback


if __name__ == "__main__":
    app.run(main)
