"""train.py's command line: the config of a new or an existing run, checks before anything starts, and one
line for every way it ends.

- A work directory with checkpoints runs with the config saved with them (`--mode=eval` too); flags change
  only what leaves the model as it is, and a flag that would change the model is refused. The devices to use
  (`num_devices`, `cpu_devices`) are this machine's: the flags', not the saved ones.
- Bad flags, settings and data files: one line "error: ..." on stderr, exit status 1, no traceback. The
  data files are checked before JAX starts (`slotjax.data.files`), then opened by the trainer.
- SIGINT (Ctrl-C) or SIGTERM: training saves a checkpoint and the run exits with 130 or 143 (128 + the
  signal, as a shell reports a process that the signal ended); before training (train.py's handler), one line
  and the same status at once.
- A run that has reached num_train_steps says so in one line and exits 0.

The flags are train.py's. The config files are the package's (slotjax/configs/): `--config=configs/TASK.py:PRESET`
names the packaged file wherever no configs/TASK.py exists relative to the working directory.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from slotjax import configs, cpu_devices
from slotjax.data import pipeline
from slotjax.train import runs

FLAGS = flags.FLAGS
CONFIGS = os.path.dirname(os.path.abspath(configs.__file__))
ERRORS = (ValueError, TypeError, FileNotFoundError, runs.TrainingError)  # reported in one line


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with the default config file chosen by --task and --preset."""
    argv = packaged_config_files(argv)
    try:
        FLAGS(argv, known_only=True)
    except flags.Error:
        pass  # reported by the whole parse below
    task, preset = FLAGS["task"].value, FLAGS["preset"].value  # the defaults where the values were bad
    preset = "cpu" if preset == "auto" else preset  # auto: new_run_config switches to official for real data
    try:  # the config flag applies the --config.FIELD overrides as it is defined
        config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, f"{task}.py:{preset}"), "Configuration.")
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a config file given by --config loads here
        return remaining
    except flags.Error as error:  # also a config file whose get_config raises: its traceback in the message
        sys.exit(f"error: {_one_line(error)}")
    except (AttributeError, KeyError) as error:  # an override of a field the config does not have
        sys.exit(unknown_field(argv, configs.get_config(task, preset)) or f"error: {error}")
    except Exception as error:  # the config file is missing or not Python
        sys.exit(f"error: the --config file does not load: {_one_line(error).split(': ', 1)[-1]}")


def packaged_config_files(argv: list[str]) -> list[str]:
    """`argv` with a --config path configs/NAME.py that does not exist relative to the working directory replaced
    by the packaged slotjax/configs/NAME.py (the config files install with the package)."""
    argv = list(argv)
    for index, argument in enumerate(argv):
        if argument.startswith("--config="):
            argv[index] = "--config=" + packaged_config_file(argument[len("--config=") :])
        elif argument == "--config" and index + 1 < len(argv):
            argv[index + 1] = packaged_config_file(argv[index + 1])
    return argv


def packaged_config_file(value: str) -> str:
    """configs/NAME.py[:PRESET] as the packaged file where no configs/NAME.py exists here; any other path as it is."""
    path, colon, preset = value.partition(":")
    packaged = os.path.join(CONFIGS, path[len("configs/") :])
    if path.startswith("configs/") and not os.path.exists(path) and os.path.isfile(packaged):
        return packaged + colon + preset
    return value


def _one_line(error: Exception) -> str:
    """A message that spans lines (a config file's traceback) as its first line and its last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"


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
    """Runs train.py's command (after `parse_flags`), ending as the module docstring says."""
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {' '.join(argv[1:])!r}; flags are written --name=value.")
        run()
    except runs.Interrupted as error:  # the trainer saved a checkpoint and said so
        sys.exit(128 + error.signum)
    except ERRORS as error:
        sys.exit(f"error: {error}")


def run() -> None:
    config, workdir = run_config()
    mode = FLAGS.mode
    runs.check_config(config)
    splits = (FLAGS.split,) if mode == "eval" else ("train", "validation")
    if mode == "train" or runs.checkpoint_steps(workdir):  # else the evaluation's message: train first
        pipeline.check_files(config, splits)  # missing, empty, foreign or short files, in a second
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    # before JAX starts: one CPU device per core, each with a shard of the batch (no effect on GPUs, TPUs)
    batch_sizes = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}
    per_core = cpu_devices.device_count(list(batch_sizes.values()))
    count = cpu_devices.split_host(config.cpu_devices or max(per_core, config.num_devices))
    from slotjax.train import trainer  # orbax, optax: after the checks above

    trainer.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    print(f"task {config.task}, data set {config.dataset}, preset {config.preset}, work directory {workdir}")
    note = cpu_devices.fewer_devices_note(batch_sizes)
    if note and count == per_core and not config.cpu_devices and jax.default_backend() == "cpu":
        print(note)
    if mode == "eval":
        trainer.evaluate_checkpoint(config, workdir, FLAGS.split)
    else:
        trainer.train_and_evaluate(config, workdir)


def run_config():
    """(config, work directory): a new run's config from the flags, or an existing run's saved config with the
    flags' changes that leave its model as it is."""
    config = configs.with_defaults(FLAGS.config)  # a config file of one's own may lack newer fields
    whole_config = FLAGS["config"].present or (FLAGS["preset"].present and FLAGS.preset != "auto")
    if not FLAGS["config"].present:  # --task: the preset "auto" follows the data set
        preset = configs.preset_for(config.dataset, FLAGS.preset)
        if preset != config.preset:
            config = configs.get_config(FLAGS.task, preset, config.dataset)
            config.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    if config.task != FLAGS.task and (FLAGS["task"].present or not FLAGS["config"].present):
        raise ValueError(f"--config.task={config.task} contradicts --task={FLAGS.task}; set only --task.")
    workdir = FLAGS.workdir or f"runs/{config.task}"
    saved = runs.saved_config(workdir)
    if saved is None:
        return config, workdir
    asked = {name: config.get(name) for name in runs.model_fields(config)} if whole_config else {}
    if FLAGS["task"].present:
        asked["task"] = config.task
    overrides = config_flags.get_override_values(FLAGS["config"])
    machine = {name: config[name] for name in runs.MACHINE_FIELDS}
    return runs.existing_run_config(*saved, workdir, asked, overrides, machine), workdir
