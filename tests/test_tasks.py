"""The Task record: everything task-specific is asked of it, so a task defined outside the package trains and
evaluates through the generic code (step, trainer, data, checks)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slotjax import TASKS, visualize
from slotjax.data import pipeline
from slotjax.tasks import Task
from slotjax.train import runs, trainer
from slotjax.train.step import build_model
from tests.conftest import tiny_config


class MeanColourModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, images, key):
        return {"colour": self.dense(images.mean(axis=(1, 2)))}  # [B, 3]


class MeanColour(Task):
    """Predicts each image's mean colour: a third task, defined here and nowhere in slotjax."""

    name = "mean_colour"

    def build_model(self, config, rngs):
        return MeanColourModel(rngs)

    def loss(self, outputs, batch, config):
        return jnp.mean(self.scores(outputs, batch)["loss"])

    def scores(self, outputs, batch):
        return {"loss": jnp.mean(jnp.square(outputs["colour"] - batch["image"].mean(axis=(1, 2))), axis=1)}

    def pictured(self, outputs, batch):
        return {"image": batch["image"]}

    def picture(self, pictured):
        return visualize.tile([[visualize.to_uint8(image)] for image in pictured["image"]], ["input"])


def config_of(task: str, **overrides):
    """The tiny discovery config, with another task."""
    config = tiny_config(num_train_steps=3, eval_every=3, checkpoint_every=3, **overrides)
    config.task = task
    return config


@pytest.fixture
def mean_colour(monkeypatch):
    monkeypatch.setitem(TASKS, "mean_colour", MeanColour())
    return config_of("mean_colour")


def test_a_task_defined_outside_the_package_trains_and_evaluates(mean_colour, tmp_path):
    lines = []
    results = trainer.train_and_evaluate(mean_colour, str(tmp_path), print_fn=lines.append)
    assert set(results) == {"loss"} and np.isfinite(results["loss"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2, 3]
    assert [(row["step"], row["loss"]) for row in rows if row["split"] == "validation"] == [(3, results["loss"])]
    assert os.path.exists(tmp_path / "images" / "validation_step_0000003.png")
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    assert "eval validation at step 3: loss" in lines[-1]


def test_the_checks_ask_the_task(mean_colour):
    runs.check_config(mean_colour)
    with pytest.raises(ValueError, match="Data set 'clevr' has no mean_colour targets; .* one of scenes"):
        runs.check_config(config_of("mean_colour", dataset="clevr"))
    with pytest.raises(ValueError, match=r"task='colour' is not a task; use --task=discovery or"):
        runs.check_config(config_of("colour"))


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_scores_its_loss_per_example(task):
    """The training loss is the mean of the per-example "loss" scores (both tasks' own forms)."""
    config = tiny_config(task)
    record = TASKS[task]
    batch = next(pipeline.train_batches(config, 0))
    outputs = build_model(config)(jnp.asarray(batch["image"]), key=jax.random.key(0))
    np.testing.assert_allclose(
        record.loss(outputs, batch, config), record.scores(outputs, batch)["loss"].mean(), rtol=1e-6
    )
