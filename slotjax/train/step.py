"""The training and evaluation steps: pure functions of (state, batch), the same for every device layout.

`train_step` and `eval_step` take a `StepDef` (the model's structure and the loss and optimiser settings)
as their first argument; the trainer binds it with `functools.partial` and compiles the result with
`jax.jit` over its device mesh. benchmarks/step_time.py times these same functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from slotjax.nn.layers import set_compute_dtype
from slotjax.nn.models import SetPredictor, SlotAutoencoder
from slotjax.train import losses, metrics

MAX_ENTITIES = 11  # ground-truth ids 0..10 (CLEVR with masks has the most: 10 objects + background)
MODELS = {"discovery": SlotAutoencoder, "set_prediction": SetPredictor}


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's parameters
    opt_state: Any
    rng: jax.Array


def model_spec(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """The model class name and constructor arguments a config asks for (the same in torch_reference)."""
    arguments = dict(
        resolution=config.resolution,
        num_slots=config.num_slots,
        num_iterations=config.num_iterations,
        slot_size=config.slot_size,
        encoder_features=config.encoder_features,
        mlp_hidden_size=config.mlp_hidden_size,
    )
    if config.task == "discovery":
        return "SlotAutoencoder", {**arguments, "decoder_features": config.decoder_features}
    return "SetPredictor", {**arguments, "head_hidden_size": config.head_hidden_size}


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Module:
    _, arguments = model_spec(config)
    if config.task == "discovery":
        arguments["remat_decoder"] = config.get("remat_decoder", False)
    model = MODELS[config.task](**arguments, rngs=nnx.Rngs(config.seed if seed is None else seed))
    if config.get("compute_dtype", "float32") != "float32":
        set_compute_dtype(model, jnp.dtype(config.compute_dtype))
    return model


def example_losses(task: str, outputs: dict, batch: dict) -> jax.Array:
    """[B]: each example's loss; their mean is `compute_loss`."""
    if task == "discovery":
        squared_error = jnp.square(outputs["reconstruction"] - batch["image"])
        return squared_error.reshape(squared_error.shape[0], -1).mean(axis=1)
    # Rows past the data's largest scene are padding (the trainer refuses fewer slots than that), so a model with
    # K < 10 slots is matched against the first K rows: the same loss without padding rows left unmatched.
    predictions = outputs["predictions"]
    return losses.hungarian_huber_costs(predictions, batch["target"][:, : predictions.shape[1]])


def compute_loss(task: str, outputs: dict, batch: dict) -> jax.Array:
    """The training loss: MSE (discovery) or the Hungarian-matched Huber loss (set prediction)."""
    if task == "discovery":
        return losses.mse_loss(outputs["reconstruction"], batch["image"])
    return example_losses(task, outputs, batch).mean()


def task_loss(task: str, model: nnx.Module, batch: dict, key: jax.Array) -> jax.Array:
    """A task's training loss of `model` on a batch (`key` draws the initial slots)."""
    return compute_loss(task, model(batch["image"], key=key), batch)


@dataclasses.dataclass(frozen=True)
class StepDef:
    """What the steps need besides (state, batch): the model's structure, its loss and the optimiser."""

    graphdef: nnx.GraphDef
    rest: Any  # the model's state other than parameters (its noise stream)
    loss: Callable[[nnx.Module, dict, jax.Array], jax.Array]  # (model, batch, key) -> scalar
    optimizer: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate, for the logs
    skip_nonfinite: bool = False  # a non-finite loss leaves the parameters as they were

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest, copy=True)


def train_step(step_def: StepDef, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimiser step on one (global) batch; returns the new state and the loss."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = jax.value_and_grad(lambda params: step_def.loss(step_def.model(params), batch, key))(state.params)
    updates, opt_state = step_def.optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    finite = jnp.isfinite(loss)
    if step_def.skip_nonfinite:  # keep the old parameters, move on to the next batch
        new_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_state, state.replace(step=state.step + 1)
        )
    return new_state, {"loss": loss, "finite": finite, "learning_rate": step_def.schedule(state.step)}


def eval_step(step_def: StepDef, task: str, params, batch: dict) -> tuple[dict, dict]:
    """Per-example metrics of a batch (a fixed key: evaluating a checkpoint is reproducible) and the outputs.

    Returns (scores, outputs): scores maps each metric to one value per example ([B]; FG-ARI is NaN for an image
    without foreground); outputs are the model's, for pictures and the set-prediction AP.
    """
    outputs = step_def.model(params)(batch["image"], key=jax.random.key(0))
    scores = {"loss": example_losses(task, outputs, batch)}
    if task == "discovery":
        scores["mse"] = scores["loss"]
        if "segmentation" in batch:
            scores["fg_ari"] = metrics.fg_ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
            scores["ari"] = metrics.ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
    return scores, outputs
