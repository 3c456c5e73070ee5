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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (data, TensorBoard) is quiet unless it errs

from absl import app, flags, logging
from ml_collections import config_flags

from slotjax import configs


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


flags.DEFINE_enum("task", "discovery", configs.TASKS, "Which model and task.")
flags.DEFINE_enum("preset", "auto", configs.PRESETS, "Defaults: official (paper), cpu (small), auto (cpu on scenes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate the last checkpoint.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, images/ (default runs/TASK).")
flags.DEFINE_string("split", "validation", "Split evaluated by --mode=eval: train_eval, validation or test.")
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

    from slotjax import trainer  # imports JAX: after flag parsing, so --help is quick

    print(f"task {config.task}, data set {config.dataset}, preset {config.preset}, work directory {workdir}")
    if FLAGS.mode == "eval":
        trainer.evaluate_checkpoint(config, workdir, FLAGS.split)
    else:
        trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
