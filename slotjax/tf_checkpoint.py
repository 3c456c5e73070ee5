"""The paper's own TensorFlow 2 checkpoints, read into slotjax and torch_reference exactly.

The official training scripts save `tf.train.Checkpoint(network=model, optimizer=..., global_step=...)`, where
`model` is a functional Keras model around one custom layer (the autoencoder or the classifier). Each model
variable is stored at `network/layer_with_weights-0/<attribute path>/.ATTRIBUTES/VARIABLE_VALUE`. The table
built by `_name_table` maps those attribute paths to `torch_reference` parameter names (the torch modules mirror
the Keras ones), so the weights then go into slotjax through `slotjax.convert.torch_to_flax`.

Command line (a checkpoint directory, whose latest checkpoint is read, or a `ckpt-N` prefix):
    python -m slotjax.convert --input=DIR_OR_CKPT_PREFIX --output=runs/official_discovery
    python -m slotjax.convert --input=DIR_OR_CKPT_PREFIX --output=model.safetensors

TensorFlow is imported only when a checkpoint is read or written. The names of each task's own layers (the
decoder, the classifier head) are the task's (`Task.tf_names`, `Task.tf_config`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ml_collections
import numpy as np

from slotjax import configs
from slotjax.tasks import TASKS, Task, task_of
from slotjax.torch_layout import flax_to_torch, torch_shapes, torch_to_flax
from slotjax.weights_file import ConversionError, written_whole

MODEL_PREFIX = "network/layer_with_weights-0/"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
SLOT_MARKER = "/.OPTIMIZER_SLOT/"  # Keras OptimizerV2 slots (Adam's m, v) sit under each model variable's path
STEP_NAME = "global_step/.ATTRIBUTES/VARIABLE_VALUE"
CONFIG_FILE = "slotjax_config.json"  # the config of a model slotjax exported, beside the checkpoint
IGNORED_PREFIXES = ("optimizer/", "global_step/", "save_counter/", "_CHECKPOINTABLE_OBJECT_GRAPH")  # not the model

# How a TF array becomes torch_reference's: Dense [in, out] -> [out, in]; Conv2D kernels [k, k, in, out] and
# Conv2DTranspose kernels [k, k, out, in] -> [out, in, k, k] and [in, out, k, k]; GRU see `_gru_blocks`.
DENSE, CONV, SAME, GRU_KERNEL, GRU_BIAS = "dense", "conv", "same", "gru_kernel", "gru_bias"


@dataclass
class TFCheckpoint:
    """What an official checkpoint holds: the model's config, its torch_reference state dict, the training step."""

    path: str  # the checkpoint prefix read
    config: ml_collections.ConfigDict
    state_dict: dict[str, np.ndarray]
    step: int


class NameTable(dict):
    """TF attribute path (without prefix and suffix) -> (torch_reference name, layout rule), filled layer by layer."""

    DENSE, CONV = DENSE, CONV

    def layer(self, tf_path: str, torch_path: str, rule: str, bias: bool = True) -> None:
        self[f"{tf_path}/kernel"] = (f"{torch_path}.weight", rule)
        if bias:
            self[f"{tf_path}/bias"] = (f"{torch_path}.bias", SAME)

    def norm(self, tf_path: str, torch_path: str) -> None:
        self[f"{tf_path}/gamma"] = (f"{torch_path}.weight", SAME)
        self[f"{tf_path}/beta"] = (f"{torch_path}.bias", SAME)

    def mlp(self, tf_path: str, torch_path: str) -> None:
        self.layer(f"{tf_path}/layer_with_weights-0", f"{torch_path}.hidden", DENSE)
        self.layer(f"{tf_path}/layer_with_weights-1", f"{torch_path}.output", DENSE)


def _name_table(task: Task, torch_names) -> NameTable:
    """The names of every variable of the task's official model whose torch_reference parameters are
    `torch_names`: the shared encoder's, then the task's own."""
    table = NameTable()
    for index in range(4):
        table.layer(f"encoder_cnn/layer_with_weights-{index}", f"encoder.encoder_cnn.convs.{index}", CONV)
    table.layer("encoder_pos/dense", "encoder.encoder_pos.dense", DENSE)
    table.norm("layer_norm", "encoder.layer_norm")
    table.mlp("mlp", "encoder.mlp")
    for name in ("slots_mu", "slots_log_sigma"):
        table[f"slot_attention/{name}"] = (f"encoder.slot_attention.{name}", SAME)
    for name in ("q", "k", "v"):
        table.layer(f"slot_attention/project_{name}", f"encoder.slot_attention.project_{name}", DENSE, bias=False)
    for name in ("inputs", "slots", "mlp"):
        table.norm(f"slot_attention/norm_{name}", f"encoder.slot_attention.norm_{name}")
    table["slot_attention/gru/kernel"] = ("encoder.slot_attention.gru.weight_ih", GRU_KERNEL)
    table["slot_attention/gru/recurrent_kernel"] = ("encoder.slot_attention.gru.weight_hh", GRU_KERNEL)
    table["slot_attention/gru/bias"] = ("encoder.slot_attention.gru.bias_ih", GRU_BIAS)  # and bias_hh
    table.mlp("slot_attention/mlp", "encoder.slot_attention.mlp")
    task.tf_names(table, torch_names)
    return table


def _gru_blocks(array: np.ndarray) -> np.ndarray:
    """Swaps the first two gate blocks along the last axis: Keras' [update, reset, candidate] <-> torch's
    [reset, update, new] (its own inverse)."""
    first, second, third = np.split(array, 3, axis=-1)
    return np.concatenate([second, first, third], axis=-1)


def _to_torch(rule: str, torch_name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    if rule == DENSE:
        return {torch_name: value.T}
    if rule == CONV:
        return {torch_name: value.transpose(3, 2, 0, 1)}
    if rule == GRU_KERNEL:
        return {torch_name: _gru_blocks(value).T}
    if rule == GRU_BIAS:  # row 0: input bias, row 1: recurrent bias
        return {torch_name: _gru_blocks(value[0]), torch_name.replace("bias_ih", "bias_hh"): _gru_blocks(value[1])}
    return {torch_name: value}


def _to_tf(rule: str, torch_name: str, state_dict: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of `_to_torch`: a TF variable's value from the torch_reference state dict."""
    value = state_dict[torch_name]
    if rule == DENSE:
        return value.T
    if rule == CONV:
        return value.transpose(2, 3, 1, 0)
    if rule == GRU_KERNEL:
        return _gru_blocks(value.T)
    if rule == GRU_BIAS:
        return np.stack([_gru_blocks(value), _gru_blocks(state_dict[torch_name.replace("bias_ih", "bias_hh")])])
    return value


def _tf_shape(rule: str, torch_name: str, torch_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The TF shape a variable must have for the model: the inverse of `_to_torch` on shapes."""
    shape = torch_shapes[torch_name]
    if rule in (DENSE, GRU_KERNEL):
        return shape[::-1]
    if rule == CONV:
        return (shape[2], shape[3], shape[1], shape[0])
    if rule == GRU_BIAS:
        return (2, *shape)
    return shape


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint prefix to read: the latest one of a directory, or `path` itself (`ckpt-N`, with or
    without its `.index` / `.data-*` suffix)."""
    import tensorflow as tf

    path = os.fspath(path)
    if os.path.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            raise ConversionError(
                f"{path!r} holds no TensorFlow checkpoint: no 'checkpoint' file naming one "
                "(a checkpoint directory holds 'checkpoint', ckpt-N.index and ckpt-N.data-* files)."
            )
        return prefix
    for suffix in (".index", ".data-00000-of-00001"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if not os.path.exists(f"{path}.index"):
        raise ConversionError(
            f"{path!r} is not a TensorFlow checkpoint: no {os.path.basename(path)}.index next to it "
            "(give the checkpoint directory or a ckpt-N prefix)."
        )
    return path


def read_variables(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray], int]:
    """(prefix, {attribute path: array} of the model's variables, global step) of a checkpoint.

    Optimizer state is skipped; anything else outside the model is refused by name.
    """
    import tensorflow as tf

    prefix = resolve_checkpoint(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = sorted(reader.get_variable_to_shape_map())
        step = int(reader.get_tensor(STEP_NAME)) if STEP_NAME in names else 0
        arrays = {
            name: np.asarray(reader.get_tensor(name))
            for name in names
            if not name.startswith(IGNORED_PREFIXES) and SLOT_MARKER not in name
        }
    except tf.errors.OpError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"Could not read the TensorFlow checkpoint {prefix!r}: {message}") from error
    variables = {}
    for name, value in arrays.items():
        if not (name.startswith(MODEL_PREFIX) and name.endswith(VALUE_SUFFIX)):
            raise ConversionError(
                f"Unexpected variable {name!r} in {prefix!r}: not a variable of the official "
                f"models (they sit at {MODEL_PREFIX}...{VALUE_SUFFIX})."
            )
        variables[name[len(MODEL_PREFIX) : -len(VALUE_SUFFIX)]] = value
    return prefix, variables, step


def detect_task(variables: dict[str, np.ndarray], prefix: str) -> Task:
    """The task whose model the variables hold: the one task whose own layers (`Task.tf_head`) are present."""
    official = [task for task in TASKS.values() if task.tf_head]
    found = [task for task in official if any(name.startswith(task.tf_head) for name in variables)]
    if len(found) != 1:
        what = f"the layers of {len(found)} models" if found else "none of the layers only one model has"
        heads = ", ".join(f"{task.name}: {task.tf_head.rstrip('/')}" for task in found or official)
        raise ConversionError(
            f"{prefix!r} holds {what} ({heads}): it is not one of the official Slot Attention models."
        )
    return found[0]


def _required(variables: dict[str, np.ndarray], name: str, rank: int, prefix: str) -> tuple[int, ...]:
    full_name = MODEL_PREFIX + name + VALUE_SUFFIX
    if name not in variables:
        raise ConversionError(f"Missing variable {full_name!r} in {prefix!r}.")
    shape = variables[name].shape
    if len(shape) != rank:
        raise ConversionError(f"Variable {full_name!r} in {prefix!r} has shape {shape}; expected rank {rank}.")
    return shape


def infer_config(
    variables: dict[str, np.ndarray], prefix: str, resolution: int | None = None
) -> ml_collections.ConfigDict:
    """The official config of the checkpoint's task, with the widths read from the variables' shapes.

    Discovery's resolution follows from the number of decoder layers (8x8 upsampled by each stride-2 layer);
    set prediction's is not stored in the weights: 128 as in the paper unless `resolution` says otherwise.
    """
    task = detect_task(variables, prefix)
    config = configs.get_config(task.name, "official", "clevr")  # the official scripts train on TFDS CLEVR
    config.encoder_features = _required(variables, "encoder_cnn/layer_with_weights-0/kernel", 4, prefix)[3]
    config.slot_size = _required(variables, "slot_attention/slots_mu", 3, prefix)[2]
    config.mlp_hidden_size = _required(variables, "slot_attention/mlp/layer_with_weights-0/kernel", 2, prefix)[1]
    try:
        task.tf_config(config, variables, lambda name, rank: _required(variables, name, rank, prefix), resolution)
    except ConversionError:
        raise
    except ValueError as error:
        raise ConversionError(f"{prefix!r} holds {error}") from None
    return config


def to_state_dict(
    variables: dict[str, np.ndarray], config: ml_collections.ConfigDict, prefix: str
) -> dict[str, np.ndarray]:
    """The torch_reference state dict of the model `config` describes, from the checkpoint's variables.

    Refuses missing, unexpected and misshapen variables, naming each one with its full checkpoint name.
    """
    from flax import nnx

    from slotjax.train.step import build_model

    shapes = torch_shapes(nnx.eval_shape(lambda: build_model(config)))  # nothing initialised
    table = _name_table(task_of(config), shapes)
    missing = sorted(set(table) - set(variables))
    unexpected = sorted(set(variables) - set(table))
    if missing or unexpected:
        full = [f"{MODEL_PREFIX}{name}{VALUE_SUFFIX}" for name in missing + unexpected]
        what = [f"missing variable {name!r}" for name in full[: len(missing)]]
        what += [f"unexpected variable {name!r}" for name in full[len(missing) :]]
        raise ConversionError(f"{prefix!r} does not hold the official {config.task} model: {'; '.join(what)}.")
    state_dict = {}
    for name, (torch_name, rule) in table.items():
        value = variables[name]
        expected = _tf_shape(rule, torch_name, shapes)
        if value.shape != expected:
            raise ConversionError(
                f"Variable {MODEL_PREFIX}{name}{VALUE_SUFFIX} in {prefix!r} has shape "
                f"{value.shape}; the {config.task} model its other variables describe expects "
                f"{expected}."
            )
        state_dict.update(
            {
                key: np.ascontiguousarray(array, dtype=np.float32)
                for key, array in _to_torch(rule, torch_name, value).items()
            }
        )
    return state_dict


def read_tf_checkpoint(path: str | os.PathLike, resolution: int | None = None) -> TFCheckpoint:
    """An official checkpoint (directory or `ckpt-N` prefix) as config, torch_reference state dict and step.

    The config is the one slotjax wrote beside a checkpoint it exported (CONFIG_FILE), so a round trip keeps
    every setting; else the official config with the widths the variables show."""
    prefix, variables, step = read_variables(path)
    config = infer_config(variables, prefix, resolution)
    saved = os.path.join(os.path.dirname(prefix), CONFIG_FILE)
    if os.path.exists(saved):
        with open(saved) as file:
            exported = configs.with_defaults(ml_collections.ConfigDict(json.load(file)))
        if resolution is not None and resolution != exported.resolution:
            raise ConversionError(
                f"{prefix!r} was exported from a {exported.resolution}x{exported.resolution} model "
                f"({CONFIG_FILE}), not {resolution}x{resolution}; leave --resolution out."
            )
        config = exported
    return TFCheckpoint(prefix, config, to_state_dict(variables, config, prefix), step)


def load_tf_model(path: str | os.PathLike, resolution: int | None = None):
    """(slotjax model with the checkpoint's weights, its config): for notebooks."""
    from slotjax.train.step import build_model

    checkpoint = read_tf_checkpoint(path, resolution)
    return torch_to_flax(checkpoint.state_dict, build_model(checkpoint.config)), checkpoint.config


def write_tf_checkpoint(model, config: ml_collections.ConfigDict, step: int, directory: str | os.PathLike) -> str:
    """Writes the weights of a slotjax model (of the task `config` names) in the official layout, as the official
    scripts' CheckpointManager does (`network/layer_with_weights-0/...` and `global_step`, no optimizer state);
    returns the checkpoint prefix."""
    import tensorflow as tf

    state_dict = flax_to_torch(model)
    layer = tf.Module()
    for name, (torch_name, rule) in _name_table(task_of(config), state_dict).items():
        node = layer
        *parents, leaf = name.split("/")
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(_to_tf(rule, torch_name, state_dict)))
    network = tf.Module()
    setattr(network, MODEL_PREFIX.split("/")[1], layer)
    checkpoint = tf.train.Checkpoint(network=network, global_step=tf.Variable(step, dtype=tf.int64))
    prefix = tf.train.CheckpointManager(checkpoint, os.fspath(directory), max_to_keep=5).save()
    with written_whole(os.path.join(os.fspath(directory), CONFIG_FILE)) as temporary:  # what the layout cannot hold
        with open(temporary, "w") as file:
            file.write(config.to_json(indent=1))
    return prefix
