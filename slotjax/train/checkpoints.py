"""Checkpoints (orbax): the training state and the config it was trained with, written atomically."""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from slotjax.train.runs import MODEL_FIELDS, TrainingError
from slotjax.train.step import TrainState


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints_to_keep if config else None, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict) -> None:
    step = int(state.step)
    if manager.latest_step() == step:
        return
    manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
    )
    manager.wait_until_finished()


def config_from_checkpoint(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with."""
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ml_collections.ConfigDict(saved)


def restore_checkpoint(manager: ocp.CheckpointManager, target: TrainState, config, step: int | None = None):
    """Restores the latest (or given) checkpoint into the shape and sharding of `target`; refuses another model's."""
    step = manager.latest_step() if step is None else step
    saved_config = config_from_checkpoint(manager, step)
    differing = {
        name: (saved_config.get(name), config.get(name))
        for name in MODEL_FIELDS
        if saved_config.get(name) != config.get(name)
    }
    if differing:
        details = ", ".join(f"{name}: checkpoint {saved!r} vs now {now!r}" for name, (saved, now) in differing.items())
        raise TrainingError(
            f"The checkpoint at step {step} in {manager.directory} belongs to another model ({details}). "
            "Use the configuration it was trained with, or another --workdir."
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
