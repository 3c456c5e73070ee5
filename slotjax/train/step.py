"""The training state and the steps: pure functions of (state, batch), the same for every device layout.

`initial_state(config)` is the state a run starts from, built from the config alone (no device mesh): training
starts from it, and checkpoints of any run restore into it. `train_step` and `eval_step` take a `StepDef` (the
model's structure, its task's loss and scores, the optimiser) as their first argument; the trainer binds it with
`functools.partial` and compiles the result with `jax.jit` over its device mesh. benchmarks/step_time.py times
these same functions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from slotjax.nn.layers import set_compute_dtype
from slotjax.tasks import Task, task_of
from slotjax.train.optim import learning_rate_schedule, make_optimizer


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's parameters
    opt_state: Any
    rng: jax.Array


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Module:
    """The model of the config's task, initialised from `seed` (default config.seed), computing in
    config.compute_dtype."""
    model = task_of(config).build_model(config, nnx.Rngs(config.seed if seed is None else seed))
    if config.compute_dtype != "float32":
        set_compute_dtype(model, jnp.dtype(config.compute_dtype))
    return model


def optimizer_and_schedule(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
    """The optimiser the config trains with, and its learning-rate schedule (step -> rate)."""
    schedule_arguments = (config.learning_rate, config.warmup_steps, config.decay_steps, config.decay_rate)
    optimizer = make_optimizer(*schedule_arguments, config.grad_clip_norm, config.adam_epsilon)
    return optimizer, learning_rate_schedule(*schedule_arguments)


def initial_state(config: ml_collections.ConfigDict) -> TrainState:
    """Step 0 of the run `config` describes: its initial parameters and a fresh optimiser state."""
    params = nnx.state(build_model(config), nnx.Param)
    optimizer, _ = optimizer_and_schedule(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed + 1)),
    )


@dataclasses.dataclass(frozen=True)
class StepDef:
    """What the steps need besides (state, batch): the model's structure, its loss and scores, and the optimiser."""

    graphdef: nnx.GraphDef
    rest: Any  # the model's state other than parameters (its noise stream)
    loss: Callable[[nnx.Module, dict, jax.Array, jax.Array], jax.Array]  # (model, batch, key, step) -> scalar
    optimizer: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate, for the logs
    skip_nonfinite: bool = False  # a non-finite loss leaves the parameters as they were
    evaluate: Callable[[nnx.Module, dict], tuple[dict, dict]] | None = None  # (model, batch) -> (scores, outputs)

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest, copy=True)


def make_step_def(config: ml_collections.ConfigDict, skip_nonfinite: bool = False) -> StepDef:
    """The StepDef of the config's task and optimiser."""
    task = task_of(config)
    graphdef, _, rest = nnx.split(build_model(config), nnx.Param, ...)
    optimizer, schedule = optimizer_and_schedule(config)
    return StepDef(
        graphdef,
        rest,
        functools.partial(training_loss, task, config),
        optimizer,
        schedule,
        skip_nonfinite,
        functools.partial(evaluation, task, config),
    )


def training_loss(
    task: Task, config: ml_collections.ConfigDict, model: nnx.Module, batch: dict, key: jax.Array, step: jax.Array
) -> jax.Array:
    """The task's training loss of `model` on a batch at training `step` (`key` draws the initial slots)."""
    return task.loss(task.forward(config, model, batch, key, step), batch, config)


def evaluation(task: Task, config: ml_collections.ConfigDict, model: nnx.Module, batch: dict) -> tuple[dict, dict]:
    """(per-example scores, outputs) of `model` on a batch, with a fixed key: evaluating a checkpoint is
    reproducible."""
    outputs = task.forward(config, model, batch, jax.random.key(0))
    return task.scores(outputs, batch), outputs


def train_step(step_def: StepDef, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimiser step on one (global) batch; returns the new state and the loss."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_of(params):
        return step_def.loss(step_def.model(params), batch, key, state.step)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
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


def eval_step(step_def: StepDef, params, batch: dict) -> tuple[dict, dict]:
    """Per-example scores of a batch ([B] each; FG-ARI is NaN for an image without foreground) and the model's
    outputs, for the pictures and the metrics of the whole evaluation."""
    return step_def.evaluate(step_def.model(params), batch)
