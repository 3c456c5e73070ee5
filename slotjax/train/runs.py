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

from slotjax import configs
from slotjax.data.files import DATASETS
from slotjax.nn.slot_attention import ATTENTION_NORMALISATIONS
from slotjax.tasks import MODEL_FIELDS, TASKS, task_named, task_of
from slotjax.train.optim import ADAM_EPSILONS

COMPUTE_DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
POSITIVE_FIELDS = (  # of either task's config
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
    "num_heads",
)
NON_NEGATIVE_FIELDS = ("num_train_steps", "num_devices", "cpu_devices", "query_noise_anneal_steps")
MACHINE_FIELDS = ("num_devices", "cpu_devices")  # the devices of the machine that runs, not of the run
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
    """The config the checkpoint at `step` was trained with (`checkpoints`: an orbax manager or its directory), with
    the defaults of the fields added since (`configs.with_defaults`)."""
    directory = checkpoint_directory(checkpoints)
    saved = read_checkpoint_json(directory, step, CONFIG_FILE)
    if not isinstance(saved, dict) or any(name not in saved for name in ("task", "resolution", "num_slots")):
        raise DamagedCheckpoint(directory, step, f"{CONFIG_FILE} holds no slotjax config")
    return configs.with_defaults(ml_collections.ConfigDict(saved))


def model_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The config fields that shape the config's model: its parameters and the variants it computes. The number
    of slots is one where the slots are learned queries (one parameter each), else a test-time setting."""
    return MODEL_FIELDS + task_of(config).model_fields + (("num_slots",) if config.get("learned_queries") else ())


def model_differences(saved: Mapping[str, object], config: ml_collections.ConfigDict) -> str:
    """Whether a checkpoint trained with the `saved` config belongs to the model `config` builds: "" when it does,
    else each field that shapes the parameters and differs, as "field: checkpoint X vs now Y". Training settings
    (batch size, learning rate, clipping, ...) never count: they follow the flags."""
    return ", ".join(
        f"{name}: checkpoint {saved.get(name)!r} vs now {config.get(name)!r}"
        for name in model_fields(config)
        if saved.get(name) != config.get(name)
    )


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after it saved a checkpoint; train.py exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def check_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Refuses settings no run can use, naming the --config flag and the values it takes: the one place where a
    config is checked. `device_count`: the devices a batch is split over, once they are known."""
    task = task_named(config.get("task"))
    known = ("scenes", *DATASETS)
    if config.dataset not in known:
        raise ValueError(f"Unknown data set {config.dataset!r}; use --config.dataset= one of {', '.join(known)}.")
    if config.dataset not in task.datasets:
        raise ValueError(
            f"Data set {config.dataset!r} has no {task.name} targets; use --config.dataset= one of "
            f"{', '.join(task.datasets)} for {task.name}, or another --task."
        )
    limits = [(name, 1) for name in POSITIVE_FIELDS] + [(name, 0) for name in NON_NEGATIVE_FIELDS]
    for name, least in limits:
        value = config.get(name, least)  # a task's config has only its own model's fields
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}: set --config.{name}.")
    choices = [
        ("compute_dtype", COMPUTE_DTYPES),
        ("nonfinite_loss", NONFINITE_POLICIES),
        ("adam_epsilon", ADAM_EPSILONS),
        ("attention_normalisation", ATTENTION_NORMALISATIONS),
    ]
    for name, values in choices:
        if config[name] not in values:
            raise ValueError(f"{name}={config[name]!r} is not supported; use --config.{name}={' or '.join(values)}.")
    if not isinstance(config.grad_clip_norm, (int, float)) or config.grad_clip_norm < 0:
        raise ValueError(
            f"grad_clip_norm={config.grad_clip_norm!r} is not a norm: set --config.grad_clip_norm to 0 (no clipping) "
            "or a positive number."
        )
    if config.slot_size % config.num_heads:
        raise ValueError(
            f"slot_size={config.slot_size} does not split into num_heads={config.num_heads} heads of equal size: "
            "set --config.num_heads to a divisor of slot_size."
        )
    task.check_config(config)
    for name in ("batch_size", "eval_batch_size") if device_count else ():
        if config[name] % device_count:
            raise ValueError(
                f"{name}={config[name]} is not divisible by the {device_count} devices; "
                f"use a multiple of {device_count} or set --config.num_devices."
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
    machine: Mapping[str, object] | None = None,
) -> ml_collections.ConfigDict:
    """The config of a run with checkpoints: the `saved` one with the flags' `overrides` ({field path: value}) and
    this `machine`'s MACHINE_FIELDS, refused where the overrides or the fields `asked` for explicitly would change
    the model its checkpoints hold."""
    config = ml_collections.ConfigDict({**saved.to_dict(), **(machine or {})})
    for path, value in overrides.items():
        *parents, field = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value
    wanted = ml_collections.ConfigDict({**config.to_dict(), **asked})
    details = model_differences(saved, wanted)
    if details:
        raise TrainingError(
            f"The checkpoint at step {step} in {os.path.join(workdir, 'checkpoints')} belongs to another model "
            f"({details}) than the flags ask for: drop those flags (a run keeps the config saved with its "
            "checkpoints), or use another --workdir."
        )
    return config
