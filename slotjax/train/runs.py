"""A run: the checks of its config, the config saved with a work directory's checkpoints, and how it stops.

Plain Python (no orbax, no JAX computation): train.py refuses a bad setting before anything starts, and reads
an existing run's config before it splits the CPU into devices for that run.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping

import ml_collections

from slotjax import TASKS
from slotjax.data.files import DATASETS

# Fields that decide the model's parameters: a checkpoint only fits a model built with the same values.
MODEL_FIELDS = (
    "task",
    "resolution",
    "num_slots",
    "slot_size",
    "encoder_features",
    "decoder_features",
    "mlp_hidden_size",
    "head_hidden_size",
)
COMPUTE_DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
POSITIVE_FIELDS = (
    "batch_size",
    "eval_batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "nonfinite_skip_limit",
    "resolution",
    "num_slots",
    "num_iterations",
    "slot_size",
    "encoder_features",
    "decoder_features",
    "mlp_hidden_size",
    "head_hidden_size",
)
NON_NEGATIVE_FIELDS = ("num_train_steps", "num_devices", "cpu_devices")
CONFIG_FILE = os.path.join("config", "metadata")  # in a checkpoint's step directory


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint of another model)."""


class DamagedCheckpoint(TrainingError):
    """A checkpoint whose files are missing, unreadable or altered."""

    def __init__(self, directory, step: int, problem: str):
        self.directory, self.step, self.problem = os.fspath(directory), step, problem.rstrip(".")
        super().__init__(f"The checkpoint at step {step} in {self.directory} is damaged: {self.problem}.")


def read_checkpoint_json(directory: str, step: int, name: str):
    """The JSON file `name` of the checkpoint at `step` in `directory`; DamagedCheckpoint where it does not parse."""
    try:
        with open(os.path.join(directory, str(step), name), "rb") as file:
            return json.loads(file.read())
    except FileNotFoundError:
        raise DamagedCheckpoint(directory, step, f"{name} is missing") from None
    except OSError as error:
        raise DamagedCheckpoint(directory, step, f"{name} cannot be read ({error.strerror})") from None
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedCheckpoint(directory, step, f"{name} is not valid JSON: {error}") from None


def checkpoint_directory(checkpoints) -> str:
    """The directory of the step directories: an orbax manager's, or the path given."""
    return os.fspath(getattr(checkpoints, "directory", checkpoints))


def config_from_checkpoint(checkpoints, step: int) -> ml_collections.ConfigDict:
    """The config the checkpoint at `step` was trained with (`checkpoints`: an orbax manager or its directory)."""
    directory = checkpoint_directory(checkpoints)
    saved = read_checkpoint_json(directory, step, CONFIG_FILE)
    if not isinstance(saved, dict) or any(name not in saved for name in ("task", "resolution", "num_slots")):
        raise DamagedCheckpoint(directory, step, f"{CONFIG_FILE} holds no slotjax config")
    return ml_collections.ConfigDict(saved)


def model_differences(saved: Mapping[str, object], wanted: Mapping[str, object]) -> str:
    """For each field of `wanted` whose value differs from the `saved` config's: "field: checkpoint X vs now Y"."""
    return ", ".join(
        f"{name}: checkpoint {saved.get(name)!r} vs now {value!r}"
        for name, value in wanted.items()
        if saved.get(name) != value
    )


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after it saved a checkpoint; train.py exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses settings no run can use, naming the --config flag and the values it takes."""
    if config.get("task") not in TASKS:
        raise ValueError(f"task={config.get('task')!r} is not a task; use --task={' or --task='.join(TASKS)}.")
    datasets = ("scenes", *DATASETS)
    if config.dataset not in datasets:
        raise ValueError(f"Unknown data set {config.dataset!r}; use --config.dataset= one of {', '.join(datasets)}.")
    if config.task == "set_prediction" and config.dataset not in ("scenes", "clevr"):
        raise ValueError(
            f"Data set {config.dataset!r} has no set prediction targets; use --config.dataset=clevr (or the "
            "embedded scenes) for set prediction, or --task=discovery."
        )
    for name, least in [(name, 1) for name in POSITIVE_FIELDS] + [(name, 0) for name in NON_NEGATIVE_FIELDS]:
        value = config.get(name, least)  # a task's config has only its model's fields
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}: set --config.{name}.")
    if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype={config.compute_dtype!r} is not supported; use --config.compute_dtype="
            f"{' or '.join(COMPUTE_DTYPES)}."
        )
    if config.get("nonfinite_loss", "stop") not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite_loss={config.nonfinite_loss!r} is not a policy; use --config.nonfinite_loss=stop or skip."
        )


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the complete checkpoints in `workdir`, newest first (orbax renames a finished one to its step)."""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted((int(name) for name in names if name.isdigit()), reverse=True)


def saved_config(workdir: str) -> tuple[int, ml_collections.ConfigDict] | None:
    """(step, config) of the newest checkpoint in `workdir` whose saved config reads, or None."""
    for step in checkpoint_steps(workdir):
        try:
            saved = config_from_checkpoint(os.path.join(workdir, "checkpoints"), step)
        except DamagedCheckpoint:  # the checkpoint's restore names it
            continue
        if saved.task in TASKS:
            return step, saved
    return None


def existing_run_config(
    step: int,
    saved: ml_collections.ConfigDict,
    workdir: str,
    asked: Mapping[str, object],
    overrides: Mapping[str, object],
) -> ml_collections.ConfigDict:
    """The config of a run with checkpoints: the `saved` one with the flags' `overrides` ({field path: value}),
    refused where they or the model fields `asked` for explicitly would change the model its checkpoints hold."""
    asked = {**asked, **{name: value for name, value in overrides.items() if name in MODEL_FIELDS}}
    details = model_differences(saved, asked)
    if details:
        raise TrainingError(
            f"The checkpoint at step {step} in {os.path.join(workdir, 'checkpoints')} belongs to another model "
            f"({details}) than the flags ask for: drop those flags (a run keeps the config saved with its "
            "checkpoints), or use another --workdir."
        )
    config = ml_collections.ConfigDict(saved.to_dict())
    for path, value in overrides.items():
        *parents, field = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value
    return config
