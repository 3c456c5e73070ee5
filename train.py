"""Train or evaluate Slot Attention.

    python train.py --task=discovery                       # embedded scenes, CPU preset, ./runs/discovery
    python train.py --config=configs/set_prediction.py:official --config.dataset=clevr --config.data_dir=DIR
    python train.py --task=discovery --mode=eval --workdir=runs/discovery --split=test

`--task=TASK` is short for `--config=configs/TASK.py` with the preset `--preset` (default auto: cpu on the
embedded scenes, official on real data). Every config field can be overridden: --config.FIELD=VALUE.
Rerunning the same command with the same --workdir resumes from the last checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from slotjax import TASKS, cpu_devices
from slotjax.train import trainer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
flags.DEFINE_enum("task", "discovery", TASKS, "Which model and task (short for --config=configs/TASK.py).")
flags.DEFINE_enum("preset", "auto", configs.PRESETS, "Preset of --task: official, cpu or auto (cpu on scenes).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (and evaluate), or only evaluate the last checkpoint.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, images/ (default runs/TASK).")
flags.DEFINE_string("split", "validation", "Split evaluated by --mode=eval: train_eval, validation or test.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for training on several hosts "
    "(default: $JAX_COORDINATOR_ADDRESS, or what SLURM / a TPU pod provides).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) taking part (default: from the cluster).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 (default: from the cluster).")
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with the default config file chosen by --task and --preset."""
    try:
        FLAGS(argv, known_only=True)
    except flags.Error:
        pass  # reported by the whole parse below
    task, preset = FLAGS["task"].value, FLAGS["preset"].value  # the defaults where the values were bad
    preset = "cpu" if preset == "auto" else preset  # auto: main() switches to official for real data
    try:  # the config flag applies the --config.FIELD overrides as it is defined
        config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, f"{task}.py:{preset}"), "Configuration.")
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}")
    except (AttributeError, KeyError) as error:  # an override of a field the config does not have
        sys.exit(unknown_field(argv, configs.get_config(task, preset)) or f"error: {error}")


def unknown_field(argv: list[str], config) -> str | None:
    """One message naming the first --config.FIELD override that `config` does not have."""
    for argument in argv[1:]:
        if argument.startswith("--config."):
            path, node = argument[len("--config.") :].split("=", 1)[0], config
            for field in path.split("."):
                if not hasattr(node, "keys") or field not in node:
                    fields = f" Fields: {', '.join(sorted(node.keys()))}." if hasattr(node, "keys") else ""
                    return f"error: unknown config field {path!r} in {argument!r}.{fields}"
                node = node[field]
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if not FLAGS["config"].present:  # --task: the preset "auto" follows the data set
        preset = configs.preset_for(config.dataset, FLAGS.preset)
        if preset != config.preset:
            config = configs.get_config(FLAGS.task, preset, config.dataset)
            config.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    if config.task != FLAGS.task and (FLAGS["task"].present or not FLAGS["config"].present):
        raise app.UsageError(f"--config.task={config.task} contradicts --task={FLAGS.task}; set only --task.")
    workdir = FLAGS.workdir or f"runs/{config.task}"
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:  # before JAX starts: one CPU device per core, each with a shard of the batch (no effect on GPUs, TPUs)
        per_core = cpu_devices.device_count([config.batch_size, config.eval_batch_size])
        cpu_devices.split_host(config.cpu_devices or max(per_core, config.num_devices))
        trainer.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        print(f"task {config.task}, data set {config.dataset}, preset {config.preset}, work directory {workdir}")
        if FLAGS.mode == "eval":
            trainer.evaluate_checkpoint(config, workdir, FLAGS.split)
        else:
            trainer.train_and_evaluate(config, workdir)
    except (ValueError, TypeError, FileNotFoundError, trainer.TrainingError) as error:
        sys.exit(f"error: {error}")  # one message naming the problem and the fix, no traceback


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (data, TensorBoard) is quiet unless it errs
    app.run(main, flags_parser=parse_flags)
