"""The variants as config fields: they reach the model, train through the train step, and decide what a
checkpoint belongs to."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slotjax.data import pipeline
from slotjax.train import runs
from slotjax.train import step as steps
from tests.conftest import tiny_config

VARIANTS = [
    ("discovery", {"implicit_gradients": True, "num_heads": 2, "attention_normalisation": "scaled_sum"}),
    ("discovery", {"learned_queries": True, "query_noise_anneal_steps": 4}),
    ("discovery", {"adaptive_slots": True}),
    ("discovery", {"invariant_slots": True}),
    ("set_prediction", {"learned_queries": True, "num_heads": 4}),
]


@pytest.mark.slow
@pytest.mark.parametrize("task, fields", VARIANTS)
def test_a_variant_field_reaches_the_model_and_trains(task, fields):
    config = tiny_config(task, num_train_steps=2, **fields)
    runs.check_config(config)
    slot_attention = steps.build_model(config).encoder.slot_attention
    for name, value in fields.items():
        if hasattr(slot_attention, name):
            assert getattr(slot_attention, name) == value, name
    step_def = steps.make_step_def(config)
    state = steps.initial_state(config)
    batch = {name: jnp.asarray(value) for name, value in next(pipeline.train_batches(config, 0)).items()}
    train_step = jax.jit(lambda state, batch: steps.train_step(step_def, state, batch))
    new_state, _ = train_step(state, batch)  # the warm-up's learning rate is 0 at step 0
    new_state, step_metrics = train_step(new_state, batch)
    assert np.isfinite(float(step_metrics["loss"]))
    changed = jax.tree.map(lambda new, old: bool(jnp.any(new != old)), new_state.params, state.params)
    assert any(jax.tree.leaves(changed))
    scores, _ = steps.eval_step(step_def, new_state.params, batch)
    assert all(np.all(np.isfinite(values)) for name, values in scores.items() if name == "loss")
    if fields.get("adaptive_slots"):
        kept = np.asarray(scores["kept_slots"])
        assert kept.shape == (config.eval_batch_size,) and np.all((kept >= 0) & (kept <= config.num_slots))


def test_adaptive_slots_add_the_share_of_kept_slots_to_the_loss():
    config = tiny_config(adaptive_slots=True, keep_loss_weight=3.0)
    batch = {name: jnp.asarray(value) for name, value in next(pipeline.train_batches(config, 0)).items()}
    task = steps.task_of(config)
    outputs = task.forward(config, steps.build_model(config), batch, jax.random.key(0), step=0)
    mse = jnp.mean(jnp.square(outputs["reconstruction"] - batch["image"]))
    expected = mse + 3.0 * outputs["keep"].mean() / (16 * 16 * 3)
    np.testing.assert_allclose(task.loss(outputs, batch, config), expected, rtol=1e-6)


def test_learned_queries_make_the_number_of_slots_part_of_the_model():
    saved = tiny_config(learned_queries=True)
    with pytest.raises(runs.TrainingError, match=r"another model \(num_slots: checkpoint 4 vs now 6\)"):
        runs.existing_run_config(3, saved, "run", {}, {"num_slots": 6})
    assert runs.existing_run_config(3, tiny_config(), "run", {}, {"num_slots": 6}).num_slots == 6  # no parameter
    with pytest.raises(runs.TrainingError, match=r"num_heads: checkpoint 1 vs now 2"):
        runs.existing_run_config(3, tiny_config(), "run", {}, {"num_heads": 2})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_heads": 3}, "slot_size=16 does not split into num_heads=3 heads"),
        ({"attention_normalisation": "sum"}, "attention_normalisation='sum' is not supported"),
        ({"query_noise_anneal_steps": -1}, "query_noise_anneal_steps must be an integer >= 0"),
    ],
)
def test_bad_variant_settings_are_refused_naming_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        runs.check_config(tiny_config(**fields))
