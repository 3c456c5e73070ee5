"""Weights files of the torch_reference models: `save_model` and `load_model`.

The file format (safetensors or .pt, with a checksum of the tensors) is `slotjax.weights_file`'s, shared with
`python -m slotjax.convert` for the file I/O only; the metadata names the model's class and its constructor
arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

from slotjax import weights_file
from torch_reference.nn.models import SetPredictor, SlotAutoencoder

MODELS = {model.__name__: model for model in (SlotAutoencoder, SetPredictor)}  # the models a weights file holds


def load_model(path: str) -> nn.Module:
    """A model from a weights file written by `save_model` or `python -m slotjax.convert` (safetensors, or .pt read
    with weights_only=True): the file's metadata names the model and its constructor arguments. Damaged files and
    altered tensors are refused (`slotjax.weights_file.ConversionError`)."""
    arrays, metadata = weights_file.read(path)
    if metadata.get("model") not in MODELS:
        raise ValueError(
            f"{path!r} does not say which model it holds (metadata 'model' is {metadata.get('model')!r}); "
            "write it with torch_reference.save_model or `python -m slotjax.convert --workdir=RUN --output=FILE`."
        )
    model = MODELS[metadata["model"]](**json.loads(metadata["arguments"]))
    model.load_state_dict({name: torch.tensor(array) for name, array in arrays.items()})
    return model


def save_model(model: nn.Module, path: str, step: int = 0, training: Mapping[str, object] | None = None) -> str:
    """Writes a SlotAutoencoder or SetPredictor to `path` (.safetensors, or .pt), atomically, with its class name,
    constructor arguments and training `step` as metadata: `load_model` reads it back, and
    `python -m slotjax.convert --input=PATH --output=RUN_DIR` turns it into a slotjax training checkpoint.
    `training`: the settings it was trained with, by slotjax's config names (e.g. batch_size, learning_rate,
    num_train_steps); the checkpoint continues with them (with the paper's where none are given)."""
    name = type(model).__name__
    if name not in MODELS:
        raise TypeError(f"save_model writes {' or '.join(MODELS)} models, not a {name}.")
    state_dict = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
    metadata = {"model": name, "arguments": json.dumps(model.arguments), "step": str(int(step))}
    if training:
        metadata["training"] = json.dumps(dict(training))
    weights_file.write(path, state_dict, metadata)
    return path
