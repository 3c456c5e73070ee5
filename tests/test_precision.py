"""Memory and speed options: bfloat16 mixed precision and decoder rematerialisation train close to float32."""

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from slotjax.data import pipeline
from slotjax.train import step as steps
from slotjax.train import trainer
from tests.conftest import tiny_config


def train_losses(task: str, num_steps: int = 5, **overrides) -> tuple[list[float], trainer.Trainer, steps.TrainState]:
    config = tiny_config(task, **overrides)
    run = trainer.Trainer(config)
    state = run.initial_state()
    losses = []
    for _, batch in zip(range(num_steps), pipeline.train_batches(config, 0)):
        state, step_metrics = run.train_step(state, run.shard(batch))
        losses.append(float(step_metrics["loss"]))
    return losses, run, state


def operand_dtypes(jaxpr) -> Counter:
    """(primitive, dtype of its first operand) -> count, over the jaxpr and every jaxpr nested in it."""
    counts = Counter()
    for equation in jaxpr.eqns:
        counts[equation.primitive.name, str(equation.invars[0].aval.dtype) if equation.invars else None] += 1
        for inner in jaxprs_in_params(equation.params):
            counts += operand_dtypes(inner)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_bfloat16_computes_in_bfloat16_and_trains_close_to_float32(task):
    reference, _, _ = train_losses(task)
    losses, run, state = train_losses(task, compute_dtype="bfloat16")
    relative = np.abs(np.asarray(losses) / np.asarray(reference) - 1)
    assert relative.max() < 3e-2, relative  # close to float32 training ...
    assert relative.max() > 1e-5, relative  # ... but not float32 training (which would give the same losses)
    assert losses[-1] < losses[0]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))  # parameters stay float32
    batch = run.shard(next(pipeline.train_batches(run.config, 0)))
    counts = operand_dtypes(jax.make_jaxpr(functools.partial(steps.train_step, run.step_def))(state, batch).jaxpr)
    dtypes = {name: {dtype for (primitive, dtype) in counts if primitive == name} for name, _ in counts}
    assert dtypes["conv_general_dilated"] == {"bfloat16"}  # every convolution, forward and backward
    assert counts["dot_general", "bfloat16"] > counts["dot_general", "float32"]  # most products (the Dense layers)
    # softmaxes (attention, masks), the initial slots' exp and LayerNorm's normalisation stay float32
    assert dtypes["exp"] == {"float32"} and dtypes["rsqrt"] == {"float32"}


def rematerialisations(run: trainer.Trainer, state: steps.TrainState) -> int:
    """How many rematerialised (jax.checkpoint) computations the run's compiled training step holds."""
    batch = run.shard(next(pipeline.train_batches(run.config, 0)))
    counts = operand_dtypes(jax.make_jaxpr(functools.partial(steps.train_step, run.step_def))(state, batch).jaxpr)
    return sum(count for (primitive, _), count in counts.items() if primitive.startswith(("remat", "checkpoint")))


@pytest.mark.slow
def test_rematerialised_decoder_gives_the_same_training():
    reference, reference_run, reference_state = train_losses("discovery")
    losses, run, state = train_losses("discovery", remat_decoder=True)
    assert rematerialisations(run, state) > 0 and rematerialisations(reference_run, reference_state) == 0
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-6)
