"""Memory and speed options: bfloat16 mixed precision and decoder rematerialisation train close to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slotjax import input_pipeline, trainer
from tests.conftest import tiny_config


def train_losses(task: str, num_steps: int = 5, **overrides) -> tuple[list[float], trainer.Trainer, trainer.TrainState]:
    config = tiny_config(task, **overrides)
    run = trainer.Trainer(config)
    state = run.initial_state()
    losses = []
    for _, batch in zip(range(num_steps), input_pipeline.train_batches(config, 0)):
        state, step_metrics = run.train_step(state, run.shard(batch))
        losses.append(float(step_metrics["loss"]))
    return losses, run, state


@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_bfloat16_computes_in_bfloat16_and_trains_close_to_float32(task):
    reference, _, reference_state = train_losses(task)
    losses, run, state = train_losses(task, compute_dtype="bfloat16")
    np.testing.assert_allclose(losses, reference, rtol=3e-2)
    assert losses[-1] < losses[0]
    # parameters stay float32; the compiled step holds bfloat16 convolutions / matmuls
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    batch = run.shard(next(input_pipeline.train_batches(run.config, 0)))
    hlo = run.train_step.lower(state, batch).as_text()
    assert "bf16" in hlo


def test_rematerialised_decoder_gives_the_same_training():
    reference, _, reference_state = train_losses("discovery")
    losses, run, state = train_losses("discovery", remat_decoder=True)
    np.testing.assert_allclose(losses, reference, rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-6)
