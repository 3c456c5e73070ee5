"""The record of a task: all that is particular to it, asked by the generic code (step, trainer, data, convert),
which never compares task names.

A task is a `Task` subclass with one instance: the model a config builds (and its torch_reference twin), the
training loss, the evaluation scores, metrics and picture, what it needs from a data set, and the names its model
has in the paper's TensorFlow checkpoints where they differ from the other task's.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import ml_collections
import numpy as np
from flax import nnx

from slotjax.data.encoding import MAX_OBJECTS
from slotjax.nn.slot_attention import query_noise_schedule

# Config fields every model takes as constructor arguments (named alike in torch_reference).
MODEL_ARGUMENTS = ("resolution", "num_slots", "num_iterations", "slot_size", "encoder_features", "mlp_hidden_size")
# Slot Attention's variants (docs/variants.md), constructor arguments of both models; the defaults are the paper's.
VARIANT_ARGUMENTS = ("implicit_gradients", "learned_queries", "num_heads", "attention_normalisation")
# Config fields that shape every model's parameters: a checkpoint belongs to a model with the same values
# (`slotjax.train.runs.model_differences`); a task adds its own in `Task.model_fields`. Training settings (batch
# size, learning rate, clipping, ...) and the numbers of slots and iterations, which are no parameters, are not here.
MODEL_FIELDS = (
    "task",
    "resolution",
    "slot_size",
    "encoder_features",
    "mlp_hidden_size",
    "learned_queries",  # then num_slots is a parameter's shape too (`slotjax.train.runs.model_fields`)
    "num_heads",
    "attention_normalisation",
)


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    """What a task reads from a data set (`slotjax.data.datasets`)."""

    targets: bool = False  # the 19-value object targets (docs/target_encoding.md): only CLEVR and the scenes have them
    clevr_max_objects: int = MAX_OBJECTS  # CLEVR scenes with more objects are left out (6: CLEVR6)
    clevr_crop: bool = False  # CLEVR's official crop (rows 29:221, columns 64:256) before resizing


class Task(abc.ABC):
    """What is particular to a task. Outputs and batches are dicts of arrays; "scores" are per example ([B])."""

    name: str
    model_fields: tuple[str, ...] = ()  # the task's own config fields that shape its parameters (constructor arguments)
    torch_model: str | None = None  # torch_reference's twin class, built with `model_arguments`
    datasets: tuple[str, ...] = ("scenes",)  # the data sets that hold what the task needs
    data: DataNeeds = DataNeeds()
    tf_head: str | None = None  # the TF checkpoint's attribute path that only this task's model has

    def model_arguments(self, config: ml_collections.ConfigDict) -> dict:
        """The constructor arguments of the model (and of its torch_reference twin) that `config` asks for."""
        return {name: config[name] for name in MODEL_ARGUMENTS + VARIANT_ARGUMENTS + self.model_fields}

    @abc.abstractmethod
    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        """The model `config` describes, initialised from `rngs`."""

    def forward(self, config: ml_collections.ConfigDict, model: nnx.Module, batch: dict, key: jax.Array, step=None):
        """The model's outputs on a batch; `key` draws the initial slots, `step` is the training step (None when
        evaluating): with learned queries, it sets the annealed training noise on them."""
        options = {}
        if step is not None and config.learned_queries and config.query_noise_anneal_steps:
            options["query_noise"] = query_noise_schedule(step, config.query_noise_anneal_steps)
        return model(batch["image"], key=key, **options)

    @abc.abstractmethod
    def loss(self, outputs: dict, batch: dict, config: ml_collections.ConfigDict) -> jax.Array:
        """The training loss of a batch (a scalar)."""

    @abc.abstractmethod
    def scores(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        """Per-example evaluation scores ([B] each), "loss" among them; NaN where a score is undefined."""

    def pooled(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        """Arrays of each evaluation batch that `metrics` needs, pooled over the evaluation."""
        return {}

    def metrics(self, pooled: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the whole evaluation from the `pooled` arrays (beside the scores' means)."""
        return {}

    @abc.abstractmethod
    def pictured(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        """The arrays of a batch that `picture` draws."""

    @abc.abstractmethod
    def picture(self, pictured: dict[str, np.ndarray]) -> np.ndarray:
        """A labelled uint8 picture [H, W, 3] of the first examples of an evaluation."""

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Refuses settings the task cannot use (ValueError naming the --config flag)."""

    def report(self, results: dict[str, float]) -> str | None:
        """A table of an evaluation's results printed by --mode=eval, if the task has one."""
        return None

    def tf_names(self, table, torch_names) -> None:
        """Adds the TF attribute paths of the task's own layers to `table` (`slotjax.tf_checkpoint.NameTable`);
        `torch_names` are the parameters of the model to fill."""
        raise NotImplementedError(f"the paper's TensorFlow checkpoints hold no {self.name} model")

    def tf_config(self, config: ml_collections.ConfigDict, variables, required, resolution: int | None) -> None:
        """Sets the config fields of the task's own layers from an official checkpoint's `variables`
        ({attribute path: array}); `required(name, rank)` is a variable's shape, refused when missing."""
        raise NotImplementedError(f"the paper's TensorFlow checkpoints hold no {self.name} model")
