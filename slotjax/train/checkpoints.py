"""Checkpoints (orbax): the training state and the config it was trained with, written atomically.

Each checkpoint also holds a SHA-256 checksum of its arrays (`custom_metadata` of orbax's `_CHECKPOINT_METADATA`),
verified when it is restored, and only finite states are written. A damaged checkpoint (a file missing, cut short
or altered, metadata that is not JSON) raises `DamagedCheckpoint` naming its step and the file;
`restore_latest_intact` sets it aside in `WORKDIR/damaged/` and restores the newest intact one.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from slotjax.train.runs import (
    CONFIG_FILE,
    DamagedCheckpoint,
    TrainingError,
    checkpoint_directory,
    config_from_checkpoint,
    model_differences,
    read_checkpoint_json,
)
from slotjax.train.step import TrainState, initial_state

CHECKSUM_KEY = "state_sha256"  # in the custom metadata; checkpoints written before it are restored unverified
STEP_METADATA = "_CHECKPOINT_METADATA"
REQUIRED_FILES = (
    STEP_METADATA,
    CONFIG_FILE,
    os.path.join("state", "_METADATA"),
    os.path.join("state", "manifest.ocdbt"),
)
JSON_FILES = (STEP_METADATA, CONFIG_FILE, os.path.join("state", "_METADATA"), os.path.join("state", "_sharding"))
REFUSAL_FIX = "Restore the files, or move the checkpoints away to start afresh."


class _ReportedWhenRestored(logging.Filter):
    """Orbax logs a missing or unreadable `_CHECKPOINT_METADATA` each time it lists the steps; `restore_checkpoint`
    reports it once, naming the step, when that checkpoint is needed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Failed to read Metadata file", "Metadata file does not exist"))


_METADATA_FILTER = _ReportedWhenRestored()


def checkpoint_manager(
    workdir: str, config: ml_collections.ConfigDict | None = None, print_fn: Callable[[str], None] = print
) -> ocp.CheckpointManager:
    """The orbax manager of WORKDIR/checkpoints.

    Orbax lists no step at all when one step's `_CHECKPOINT_METADATA` is JSON of another shape: such steps are set
    aside first, each with one warning line, unless no other step is left (then the error names them).
    """
    if _METADATA_FILTER not in logging.getLogger("absl").filters:
        logging.getLogger("absl").addFilter(_METADATA_FILTER)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    unlistable = _unlistable_steps(directory)
    if unlistable:
        listable = [name for name in os.listdir(directory) if name.isdigit() and int(name) not in unlistable]
        if not listable:
            problems = "; ".join(f"step {step}: {problem}" for step, problem in unlistable.items())
            raise TrainingError(f"No intact checkpoint in {directory} ({problems}). {REFUSAL_FIX}")
        for step, problem in unlistable.items():
            print_fn(
                f"warning: the checkpoint at step {step} is damaged ({problem}); "
                f"moved it to {_move_aside(directory, step)}."
            )
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep if config else None, create=True)
    return ocp.CheckpointManager(directory, options=options)


def _unlistable_steps(directory: str) -> dict[int, str]:
    """Steps whose `_CHECKPOINT_METADATA` is JSON that orbax rejects -> the problem (unparsable files orbax skips)."""
    steps = {}
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for name in sorted((name for name in names if name.isdigit()), key=int):
        path = os.path.join(directory, name, STEP_METADATA)
        try:
            with open(path, "rb") as file:
                json.loads(file.read())
        except (OSError, ValueError):
            continue
        try:
            ocp.metadata.get_step_metadata(os.path.join(directory, name))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            steps[int(name)] = f"{STEP_METADATA} is not orbax's step metadata: {_first_line(error)}"
    return steps


def state_checksum(state) -> str:
    """SHA-256 over the dtype, shape and bytes of every array of `state`, in the order of its leaves."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _is_finite(state) -> bool:
    arrays = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    return all(np.isfinite(array).all() for array in arrays if jnp.issubdtype(array.dtype, jnp.inexact))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict) -> None:
    """Writes `state` at its step with `config` and the arrays' checksum; refuses a state holding NaN or inf."""
    step = int(state.step)
    if manager.latest_step() == step:
        return
    if not _is_finite(state):
        raise TrainingError(
            f"The parameters are not finite at step {step}: not saved; the last good checkpoint is step "
            f"{manager.latest_step()}. Lower the learning rate (or set --config.grad_clip_norm)."
        )
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
        custom_metadata={CHECKSUM_KEY: state_checksum(state)},
    )
    manager.wait_until_finished()


def _stored_checksum(directory: str, step: int) -> str | None:
    """Checks what is cheap (the files are there, the JSON files parse); returns the stored checksum, if any."""
    step_directory = os.path.join(directory, str(step))
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(step_directory, name)):
            raise DamagedCheckpoint(directory, step, f"{name} is missing")
    array_metadatas = os.path.join("state", "array_metadatas")  # one JSON file per process
    names = list(JSON_FILES)
    if os.path.isdir(os.path.join(step_directory, array_metadatas)):
        names += [
            os.path.join(array_metadatas, name) for name in os.listdir(os.path.join(step_directory, array_metadatas))
        ]
    for name in names:
        if os.path.exists(os.path.join(step_directory, name)):
            read_checkpoint_json(directory, step, name)
    metadata = read_checkpoint_json(directory, step, STEP_METADATA)
    if not isinstance(metadata, dict):
        raise DamagedCheckpoint(directory, step, f"{STEP_METADATA} holds no step metadata")
    custom = metadata.get("custom_metadata")
    checksum = custom.get(CHECKSUM_KEY) if isinstance(custom, dict) else None
    if checksum is not None and not isinstance(checksum, str):
        raise DamagedCheckpoint(directory, step, f"{STEP_METADATA} holds no valid checksum")
    return checksum


def array_paths(state) -> set[str]:
    """The paths of the arrays of a training state, as orbax names them."""
    return {"/".join(map(str, path)) for path in ocp.tree.to_flat_dict(state)}


def saved_array_paths(checkpoints: ocp.CheckpointManager | str, step: int) -> set[str]:
    """The paths of the arrays stored in the checkpoint at `step` (from state/_METADATA)."""
    directory, name = checkpoint_directory(checkpoints), os.path.join("state", "_METADATA")
    try:
        return {
            "/".join(str(key["key"]) for key in entry["key_metadata"])
            for entry in read_checkpoint_json(directory, step, name)["tree_metadata"].values()
            if entry["value_metadata"]["value_type"] != "None"
        }
    except (KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(directory, step, f"{name} holds no tree metadata") from None


def restore_checkpoint(
    checkpoints: ocp.CheckpointManager | str, target: TrainState, config, step: int | None = None
) -> TrainState:
    """Restores the checkpoint at `step` (with a manager, by default its latest) into the shape and sharding of
    `target`. Refuses another model's checkpoint (TrainingError) and a damaged one (DamagedCheckpoint).

    The optimiser settings follow `config`: a checkpoint written with others (gradient clipping on or off) is read
    in its own layout and its optimiser state carried over where its arrays are the same."""
    step = checkpoints.latest_step() if step is None else step
    directory = checkpoint_directory(checkpoints)
    checksum = _stored_checksum(directory, step)
    saved_config = config_from_checkpoint(directory, step)
    details = model_differences(saved_config, config)
    if details:
        raise TrainingError(
            f"The checkpoint at step {step} in {directory} belongs to another model ({details}). "
            "Use the configuration it was trained with, or another --workdir."
        )
    stored = saved_array_paths(directory, step)
    if array_paths(target) == stored:
        return _read_state(directory, step, target, checksum)
    sharding = jax.tree.leaves(target)[0].sharding
    saved_layout = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(lambda: initial_state(saved_config)),
    )
    differing_arrays = sorted(array_paths(saved_layout) ^ stored)
    if differing_arrays:
        raise TrainingError(
            f"The checkpoint at step {step} in {directory} holds another training state than its configuration "
            f"builds ({len(differing_arrays)} arrays differ, e.g. {differing_arrays[0]}): it was written by another "
            "version of slotjax. Use another --workdir."
        )
    state = _read_state(directory, step, saved_layout, checksum)
    optimizer_arrays = jax.tree.leaves(state.opt_state)
    layout = [(array.shape, array.dtype) for array in optimizer_arrays]
    if layout != [(array.shape, array.dtype) for array in jax.tree.leaves(target.opt_state)]:
        raise TrainingError(
            f"The optimiser state of the checkpoint at step {step} in {directory} does not fit the optimiser these "
            f"settings build: use the settings it was trained with (adam_epsilon={saved_config.adam_epsilon!r}, "
            f"grad_clip_norm={saved_config.grad_clip_norm!r}), or another --workdir."
        )
    return state.replace(opt_state=jax.tree.unflatten(jax.tree.structure(target.opt_state), optimizer_arrays))


def _read_state(directory: str, step: int, target, checksum: str | None) -> TrainState:
    """The arrays of the checkpoint at `step`, in the layout of `target`, checked against the `checksum`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _silence_failed_reads()  # before the read: TensorStore's threads report its leftovers while it fails
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            state = checkpointer.restore(
                os.path.join(directory, str(step)), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
    except Exception as error:  # orbax and TensorStore raise many types for files cut short or altered
        gc.collect()  # the failed read's leftovers go now, silently
        raise DamagedCheckpoint(
            directory, step, f"the arrays in state/ could not be read: {_first_line(error)}"
        ) from None
    if checksum is not None and state_checksum(state) != checksum:
        raise DamagedCheckpoint(directory, step, f"the arrays in state/ do not match the checksum in {STEP_METADATA}")
    if not _is_finite(state):
        raise DamagedCheckpoint(directory, step, "the arrays in state/ hold NaN or inf")
    return state


def restore_latest_intact(
    manager: ocp.CheckpointManager,
    make_target: Callable[[ml_collections.ConfigDict], TrainState],
    config: ml_collections.ConfigDict | None = None,
    print_fn: Callable[[str], None] = print,
) -> tuple[TrainState, ml_collections.ConfigDict] | None:
    """(state, config) of the newest intact checkpoint, or None when there is no checkpoint.

    `make_target(config)` gives the state to restore into; `config` is the model's (None: each checkpoint's own).
    Damaged checkpoints newer than the one restored are set aside (`set_aside`), each with one warning line;
    when every checkpoint is damaged nothing is moved and a TrainingError names them.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            used = config if config is not None else config_from_checkpoint(manager, step)
            state = restore_checkpoint(manager, make_target(used), used, step)
        except DamagedCheckpoint as error:
            damaged.append(error)
            continue
        for error in damaged:
            print_fn(
                f"warning: the checkpoint at step {error.step} is damaged ({error.problem}); "
                f"moved it to {set_aside(manager, error.step)} and restored step {step}, the newest intact one."
            )
        return state, used
    if damaged:
        problems = "; ".join(f"step {error.step}: {error.problem}" for error in damaged)
        raise TrainingError(f"No intact checkpoint in {manager.directory} ({problems}). {REFUSAL_FIX}")
    return None


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves the checkpoint at `step` to WORKDIR/damaged/STEP (STEP.1, ... when taken), where orbax no longer sees
    it; returns the new path."""
    destination = _move_aside(os.fspath(manager.directory), step)
    manager.reload()
    return destination


def _move_aside(directory: str, step: int) -> str:
    if jax.process_count() > 1:  # every process sees the same names before one of them moves the directory
        multihost_utils.sync_global_devices(f"find a place for checkpoint {step}")
    damaged = os.path.join(os.path.dirname(directory), "damaged")
    destination, copy = os.path.join(damaged, str(step)), 0
    while os.path.exists(destination):
        copy += 1
        destination = os.path.join(damaged, f"{step}.{copy}")
    if jax.process_index() == 0:
        os.makedirs(damaged, exist_ok=True)
        os.rename(os.path.join(directory, str(step)), destination)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    return destination


def verify_checkpoint(workdir: str, step: int) -> str | None:
    """What is wrong with the checkpoint at `step` in `workdir` (None when it is intact): its files, its JSON, its
    arrays and their checksum. It only reads; the model is built from the checkpoint's own config."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(os.path.join(directory, str(step))):
        return f"there is no checkpoint at step {step}"
    if step in (unlistable := _unlistable_steps(directory)):
        return unlistable[step]
    try:
        config = config_from_checkpoint(directory, step)
        restore_checkpoint(directory, initial_state(config), config, step)
    except DamagedCheckpoint as error:
        return error.problem
    return None


def _first_line(error: BaseException) -> str:
    """The innermost cause's first line, without TensorStore's long spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for marker in (" [tensorstore_spec", " See full TensorStore"):
        text = text.split(marker)[0]
    return text if len(text) <= 300 else text[:297] + "..."


_silenced = False


def _silence_failed_reads() -> None:
    """A failed restore leaves orbax tasks, coroutines and TensorStore callbacks behind that print tracebacks
    ("Event loop is closed", "exception was never retrieved"), some from TensorStore's threads while the read
    fails. The failure is reported once by the caller: these leftovers are silenced for the rest of the process."""
    global _silenced
    if not _silenced:
        _silenced = True
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        previous = sys.unraisablehook

        def hook(unraisable):
            leftover = inspect.iscoroutine(unraisable.object) or "Event loop is closed" in str(unraisable.exc_value)
            if not leftover:
                previous(unraisable)

        sys.unraisablehook = hook
