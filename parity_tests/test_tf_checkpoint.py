"""The paper's TensorFlow checkpoints: read into slotjax and torch_reference, against TensorFlow itself.

The checkpoints here are written the way the official scripts write theirs: `tf.train.Checkpoint(network=...,
optimizer=..., global_step=...)` through a `tf.train.CheckpointManager`, every model variable at
`network/layer_with_weights-0/<attribute path>/.ATTRIBUTES/VARIABLE_VALUE`, Adam's slots under each variable.
The expected outputs are computed with TensorFlow ops from the paper's equations and the Keras layers'
definitions (no slotjax code), on the same images and initial-slot noise.
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from flax import nnx

import torch_reference
from parity_tests.helpers import FORWARD_TOLERANCE, as_numpy, assert_close
from slotjax import convert, tf_checkpoint
from slotjax.convert import ConversionError
from slotjax.train import checkpoints as training_checkpoints
from slotjax.train.step import build_model, initial_state
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small models with all widths different, so that a transposed or swapped array cannot go unnoticed.
ENCODER, SLOT, MLP_HIDDEN, DECODER, HEAD = 12, 16, 20, 10, 14
DISCOVERY_RESOLUTION = 32  # an 8x8 broadcast and two stride-2 transposed convs
SET_PREDICTION_RESOLUTION = 16  # a 4x4 grid after the strided encoder
BATCH = 2
STEP = 1234


def official_shapes(task: str) -> dict[str, tuple[int, ...]]:
    """Attribute path -> shape of every variable of the official model (Keras layouts)."""
    shapes = {}
    in_features = 3
    for index in range(4):
        shapes[f"encoder_cnn/layer_with_weights-{index}/kernel"] = (5, 5, in_features, ENCODER)
        shapes[f"encoder_cnn/layer_with_weights-{index}/bias"] = (ENCODER,)
        in_features = ENCODER
    shapes.update(
        {
            "encoder_pos/dense/kernel": (4, ENCODER),
            "encoder_pos/dense/bias": (ENCODER,),
            "layer_norm/gamma": (ENCODER,),
            "layer_norm/beta": (ENCODER,),
        }
    )
    for index in range(2):
        shapes[f"mlp/layer_with_weights-{index}/kernel"] = (ENCODER, ENCODER)
        shapes[f"mlp/layer_with_weights-{index}/bias"] = (ENCODER,)
    attention = {
        "slots_mu": (1, 1, SLOT),
        "slots_log_sigma": (1, 1, SLOT),
        "project_q/kernel": (SLOT, SLOT),
        "project_k/kernel": (ENCODER, SLOT),
        "project_v/kernel": (ENCODER, SLOT),
        "gru/kernel": (SLOT, 3 * SLOT),
        "gru/recurrent_kernel": (SLOT, 3 * SLOT),
        "gru/bias": (2, 3 * SLOT),
        "mlp/layer_with_weights-0/kernel": (SLOT, MLP_HIDDEN),
        "mlp/layer_with_weights-0/bias": (MLP_HIDDEN,),
        "mlp/layer_with_weights-1/kernel": (MLP_HIDDEN, SLOT),
        "mlp/layer_with_weights-1/bias": (SLOT,),
    }
    for norm, size in (("norm_inputs", ENCODER), ("norm_slots", SLOT), ("norm_mlp", SLOT)):
        attention.update({f"{norm}/gamma": (size,), f"{norm}/beta": (size,)})
    shapes.update({f"slot_attention/{name}": shape for name, shape in attention.items()})
    if task == "discovery":
        shapes.update({"decoder_pos/dense/kernel": (4, SLOT), "decoder_pos/dense/bias": (SLOT,)})
        layers = [(5, DECODER, SLOT), (5, DECODER, DECODER), (5, DECODER, DECODER), (3, 4, DECODER)]
        for index, (size, out, in_features) in enumerate(layers):  # Conv2DTranspose kernels: [k, k, out, in]
            shapes[f"decoder_cnn/layer_with_weights-{index}/kernel"] = (size, size, out, in_features)
            shapes[f"decoder_cnn/layer_with_weights-{index}/bias"] = (out,)
    else:
        shapes.update(
            {
                "mlp_classifier/layer_with_weights-0/kernel": (SLOT, HEAD),
                "mlp_classifier/layer_with_weights-0/bias": (HEAD,),
                "mlp_classifier/layer_with_weights-1/kernel": (HEAD, 19),
                "mlp_classifier/layer_with_weights-1/bias": (19,),
            }
        )
    return shapes


def random_variables(task: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every variable: kernels scaled by fan-in, biases and LayerNorm offsets away from 0,
    LayerNorm scales away from 1."""
    rng = np.random.default_rng(seed)
    variables = {}
    for name, shape in official_shapes(task).items():
        if name.endswith("gamma"):
            value = 1.0 + 0.3 * rng.normal(size=shape)
        elif name.endswith(("bias", "beta")):
            value = 0.2 * rng.normal(size=shape)
        elif name.endswith("slots_log_sigma"):
            value = -1.0 + 0.3 * rng.normal(size=shape)
        elif name.endswith("slots_mu"):
            value = rng.normal(size=shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if "decoder_cnn" not in name else shape[0] * shape[1] * shape[3]
            value = rng.normal(size=shape) / np.sqrt(fan_in)
        variables[name] = value.astype(np.float32)
    return variables


class FakeAdam(tf.Module):
    """An optimizer as Keras' OptimizerV2 appears in a checkpoint: its own variables, and m / v slots that the
    checkpoint stores under each model variable (`<variable>/.OPTIMIZER_SLOT/optimizer/m/...`)."""

    def __init__(self, model_variables):
        super().__init__()
        self.iter = tf.Variable(STEP, dtype=tf.int64)
        self.learning_rate = tf.Variable(4e-4)
        self.beta_1 = tf.Variable(0.9)
        self._slot_table = types.SimpleNamespace(
            values={  # not tracked: slots are saved through get_slot
                (variable.ref(), name): tf.Variable(tf.ones_like(variable) * 0.5)
                for variable in model_variables
                for name in ("m", "v")
            }
        )

    def get_slot_names(self):
        return ["m", "v"]

    def get_slot(self, variable, name):
        return self._slot_table.values[(variable.ref(), name)]


def write_official_checkpoint(directory, variables: dict[str, np.ndarray], extra_names=()) -> str:
    """Saves `variables` (attribute path -> array) in the official layout; returns the checkpoint prefix."""
    layer = tf.Module()
    tf_variables = []
    for name, value in {**variables, **{name: np.ones(2, np.float32) for name in extra_names}}.items():
        node = layer
        *parents, leaf = name.split("/")
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(value))
        tf_variables.append(getattr(node, leaf))
    network = tf.Module()
    setattr(network, "layer_with_weights-0", layer)
    checkpoint = tf.train.Checkpoint(
        network=network, optimizer=FakeAdam(tf_variables), global_step=tf.Variable(STEP, dtype=tf.int64)
    )
    return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=5).save()


# --- the official forward pass in TensorFlow ops -------------------------------------------------------------------


def tf_dense(x, variables, path, activation=None):
    y = tf.einsum("...i,io->...o", x, variables[f"{path}/kernel"])
    if f"{path}/bias" in variables:
        y = y + variables[f"{path}/bias"]
    return activation(y) if activation else y


def tf_layer_norm(x, variables, path):
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) / tf.sqrt(variance + 1e-3) * variables[f"{path}/gamma"] + variables[f"{path}/beta"]


def tf_grid(size):
    y, x = np.meshgrid(np.linspace(0.0, 1.0, size), np.linspace(0.0, 1.0, size), indexing="ij")
    return np.stack([y, x, 1.0 - y, 1.0 - x], axis=-1).astype(np.float32)[None]


def tf_gru(inputs, state, variables, path):
    """Keras GRUCell(reset_after=True): gates [update, reset, candidate]; bias rows: input, recurrent."""
    bias = variables[f"{path}/bias"]
    x_z, x_r, x_h = tf.split(inputs @ variables[f"{path}/kernel"] + bias[0], 3, axis=-1)
    h_z, h_r, h_h = tf.split(state @ variables[f"{path}/recurrent_kernel"] + bias[1], 3, axis=-1)
    update, reset = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
    candidate = tf.tanh(x_h + reset * h_h)
    return update * state + (1.0 - update) * candidate


def tf_slot_attention(inputs, noise, variables):
    v = {
        name.removeprefix("slot_attention/"): value
        for name, value in variables.items()
        if name.startswith("slot_attention/")
    }
    inputs = tf_layer_norm(inputs, v, "norm_inputs")
    keys, values = tf_dense(inputs, v, "project_k"), tf_dense(inputs, v, "project_v")
    slots = v["slots_mu"] + tf.exp(v["slots_log_sigma"]) * noise
    batch, num_slots, slot_size = noise.shape
    for _ in range(3):
        previous = slots
        queries = tf_dense(tf_layer_norm(slots, v, "norm_slots"), v, "project_q") * slot_size**-0.5
        attention = tf.nn.softmax(tf.einsum("bnd,bkd->bnk", keys, queries), axis=-1) + 1e-8
        attention = attention / tf.reduce_sum(attention, axis=-2, keepdims=True)
        updates = tf.einsum("bnk,bnd->bkd", attention, values)
        slots = tf.reshape(
            tf_gru(tf.reshape(updates, [-1, slot_size]), tf.reshape(previous, [-1, slot_size]), v, "gru"),
            [batch, num_slots, slot_size],
        )
        normed = tf_layer_norm(slots, v, "norm_mlp")
        slots = slots + tf_dense(
            tf_dense(normed, v, "mlp/layer_with_weights-0", tf.nn.relu), v, "mlp/layer_with_weights-1"
        )
    return slots


def tf_encoder(images, noise, variables, strides):
    x = images
    for index, stride in enumerate(strides):
        x = tf.nn.conv2d(x, variables[f"encoder_cnn/layer_with_weights-{index}/kernel"], stride, "SAME")
        x = tf.nn.relu(x + variables[f"encoder_cnn/layer_with_weights-{index}/bias"])
    x = x + tf_dense(tf_grid(x.shape[1]), variables, "encoder_pos/dense")
    x = tf.reshape(x, [x.shape[0], -1, x.shape[-1]])
    x = tf_dense(
        tf_dense(tf_layer_norm(x, variables, "layer_norm"), variables, "mlp/layer_with_weights-0", tf.nn.relu),
        variables,
        "mlp/layer_with_weights-1",
    )
    return tf_slot_attention(x, noise, variables)


def tf_discovery(images, noise, variables):
    slots = tf_encoder(images, noise, variables, (1, 1, 1, 1))
    batch, num_slots, slot_size = slots.shape
    x = tf.tile(tf.reshape(slots, [-1, 1, 1, slot_size]), [1, 8, 8, 1])
    x = x + tf_dense(tf_grid(8), variables, "decoder_pos/dense")
    for index, stride in enumerate((2, 2, 1, 1)):
        kernel = variables[f"decoder_cnn/layer_with_weights-{index}/kernel"]
        shape = [x.shape[0], x.shape[1] * stride, x.shape[2] * stride, kernel.shape[2]]
        x = tf.nn.conv2d_transpose(x, kernel, shape, stride, "SAME")
        x = x + variables[f"decoder_cnn/layer_with_weights-{index}/bias"]
        x = tf.nn.relu(x) if index < 3 else x
    x = tf.reshape(x, [batch, num_slots, *x.shape[1:]])
    slot_reconstructions, alpha = x[..., :3], x[..., 3:]
    masks = tf.nn.softmax(alpha, axis=1)
    return {
        "reconstruction": tf.reduce_sum(slot_reconstructions * masks, axis=1),
        "slot_reconstructions": slot_reconstructions,
        "masks": masks,
        "slots": slots,
    }


def tf_set_prediction(images, noise, variables):
    slots = tf_encoder(images, noise, variables, (1, 2, 2, 1))
    hidden = tf_dense(slots, variables, "mlp_classifier/layer_with_weights-0", tf.nn.relu)
    return {
        "predictions": tf_dense(hidden, variables, "mlp_classifier/layer_with_weights-1", tf.sigmoid),
        "slots": slots,
    }


# --- tests ----------------------------------------------------------------------------------------------------------

# task -> (image size, the paper's number of slots, the official forward pass)
TASKS = {
    "discovery": (DISCOVERY_RESOLUTION, 7, tf_discovery),
    "set_prediction": (SET_PREDICTION_RESOLUTION, 10, tf_set_prediction),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """task -> (checkpoint directory, the variables written)."""
    written = {}
    for task in TASKS:
        directory = tmp_path_factory.mktemp(task)
        variables = random_variables(task, seed=len(written))
        write_official_checkpoint(directory, variables)
        written[task] = (str(directory), variables)
    return written


@pytest.mark.parametrize("task", list(TASKS))
def test_written_checkpoints_have_the_official_layout(checkpoints, task):
    directory, variables = checkpoints[task]
    names = {name for name, _ in tf.train.list_variables(directory)}
    model_names = {f"network/layer_with_weights-0/{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in variables}
    slot_names = {
        name.replace("/.ATTRIBUTES/", f"/.OPTIMIZER_SLOT/optimizer/{slot}/.ATTRIBUTES/")
        for name in model_names
        for slot in ("m", "v")
    }
    others = {
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "global_step/.ATTRIBUTES/VARIABLE_VALUE",
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    }
    others |= {f"optimizer/{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in ("iter", "learning_rate", "beta_1")}
    assert names == model_names | slot_names | others
    assert "network/layer_with_weights-0/slot_attention/gru/bias/.ATTRIBUTES/VARIABLE_VALUE" in names
    assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


@pytest.mark.parametrize("task", list(TASKS))
def test_slotjax_and_torch_compute_the_official_function_of_the_weights(checkpoints, tmp_path, task):
    directory, variables = checkpoints[task]
    resolution, num_slots, official = TASKS[task]
    options = {"resolution": resolution} if task == "set_prediction" else {}
    model, config = tf_checkpoint.load_tf_model(directory, **options)
    assert (config.task, config.resolution, config.num_slots) == (task, resolution, num_slots)
    assert (config.encoder_features, config.slot_size, config.mlp_hidden_size) == (ENCODER, SLOT, MLP_HIDDEN)

    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (BATCH, resolution, resolution, 3)).astype(np.float32)
    noise = rng.normal(size=(BATCH, num_slots, SLOT)).astype(np.float32)
    expected = {name: value.numpy() for name, value in official(images, noise, variables).items()}

    slot_attention = model.encoder.slot_attention
    initial = slot_attention.slots_mu[...] + jnp.exp(slot_attention.slots_log_sigma[...]) * noise
    ours = model(jnp.asarray(images), initial_slots=initial)

    weights = str(tmp_path / "model.safetensors")
    assert convert.convert_tf_checkpoint(directory, weights, **options) == weights
    assert convert.load_metadata(weights)["step"] == str(STEP)
    reference = torch_reference.load_model(weights)
    torch_attention = reference.encoder.slot_attention
    torch_initial = torch_attention.slots_mu + torch.exp(torch_attention.slots_log_sigma) * torch.tensor(noise)
    with torch.no_grad():
        theirs = reference(torch.tensor(images).permute(0, 3, 1, 2), initial_slots=torch_initial)
    for name, value in expected.items():
        assert_close(ours[name], value, FORWARD_TOLERANCE, f"slotjax {name}")
        torch_value = as_numpy(theirs[name])
        if name != "slots" and name != "predictions":
            torch_value = np.moveaxis(torch_value, -3, -1)  # channels last
        assert_close(torch_value, value, FORWARD_TOLERANCE, f"torch_reference {name}")


def test_a_checkpoint_prefix_and_a_directory_give_the_same_weights(checkpoints):
    directory, _ = checkpoints["discovery"]
    from_directory = tf_checkpoint.read_tf_checkpoint(directory)
    from_prefix = tf_checkpoint.read_tf_checkpoint(os.path.join(directory, "ckpt-1.index"))
    assert from_directory.step == from_prefix.step == STEP
    assert from_directory.path == from_prefix.path == os.path.join(directory, "ckpt-1")
    for name, value in from_directory.state_dict.items():
        np.testing.assert_array_equal(value, from_prefix.state_dict[name])


def run_module(*arguments, timeout=300):
    environment = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environment
    )


@pytest.mark.slow  # two fresh processes import TensorFlow and JAX and initialise the model: about a minute
def test_command_writes_a_work_directory_that_train_py_evaluates(checkpoints, tmp_path):
    directory, _ = checkpoints["discovery"]
    workdir = str(tmp_path / "official_discovery")
    result = run_module("-m", "slotjax.convert", f"--input={directory}", f"--output={workdir}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Wrote a checkpoint to {workdir}"

    model, config = tf_checkpoint.load_tf_model(directory)
    manager = training_checkpoints.checkpoint_manager(workdir)
    assert manager.latest_step() == STEP
    state = training_checkpoints.restore_checkpoint(manager, initial_state(config), config)
    manager.close()
    converted = nnx.state(model, nnx.Param)
    assert jax.tree.structure(state.params) == jax.tree.structure(converted)
    for restored, value in zip(jax.tree.leaves(state.params), jax.tree.leaves(converted)):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(value))

    overrides = dict(
        dataset="scenes",  # the converted run keeps the paper's data set; evaluate it on the embedded scenes
        resolution=DISCOVERY_RESOLUTION,
        encoder_features=ENCODER,
        slot_size=SLOT,
        mlp_hidden_size=MLP_HIDDEN,
        decoder_features=DECODER,
        num_eval_examples=8,
        eval_batch_size=8,
    )
    result = run_module(
        "train.py",
        "--task=discovery",
        "--preset=official",
        "--mode=eval",
        f"--workdir={workdir}",
        *(f"--config.{name}={value}" for name, value in overrides.items()),
    )
    assert result.returncode == 0, result.stderr
    assert f"eval validation at step {STEP}: " in result.stdout, result.stdout


@pytest.mark.slow
def test_command_reports_a_missing_variable_in_one_line(tmp_path):
    variables = random_variables("set_prediction")
    del variables["slot_attention/norm_mlp/beta"]
    write_official_checkpoint(tmp_path / "tf", variables)
    result = run_module("-m", "slotjax.convert", f"--input={tmp_path / 'tf'}", f"--output={tmp_path / 'out'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {str(tmp_path / 'tf' / 'ckpt-1')!r} does not hold the official set_prediction model: missing "
        "variable 'network/layer_with_weights-0/slot_attention/norm_mlp/beta/.ATTRIBUTES/VARIABLE_VALUE'."
    ]
    assert not os.path.exists(tmp_path / "out")


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"holds no TensorFlow checkpoint: no 'checkpoint' file"):
        tf_checkpoint.read_tf_checkpoint(tmp_path)
    (tmp_path / "weights.h5").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"weights.h5' is not a TensorFlow checkpoint: no weights.h5.index"):
        tf_checkpoint.read_tf_checkpoint(tmp_path / "weights.h5")
    (tmp_path / "ckpt-3.index").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match=r"Could not read the TensorFlow checkpoint '.*ckpt-3'"):
        tf_checkpoint.read_tf_checkpoint(tmp_path / "ckpt-3")


def test_unexpected_and_misshapen_variables_are_named(tmp_path):
    variables = random_variables("discovery")
    write_official_checkpoint(tmp_path / "extra", variables, extra_names=["slot_attention/project_q/bias"])
    with pytest.raises(
        ConversionError,
        match=r"unexpected variable 'network/layer_with_weights-0/slot_attention/"
        r"project_q/bias/.ATTRIBUTES/VARIABLE_VALUE'",
    ):
        tf_checkpoint.read_tf_checkpoint(tmp_path / "extra")

    variables["slot_attention/gru/recurrent_kernel"] = variables["slot_attention/gru/recurrent_kernel"][:, :SLOT]
    write_official_checkpoint(tmp_path / "shape", variables)
    with pytest.raises(
        ConversionError,
        match=r"Variable network/layer_with_weights-0/slot_attention/gru/"
        rf"recurrent_kernel/.ATTRIBUTES/VARIABLE_VALUE in .* has shape "
        rf"\({SLOT}, {SLOT}\); .* expects \({SLOT}, {3 * SLOT}\)",
    ):
        tf_checkpoint.read_tf_checkpoint(tmp_path / "shape")


def test_another_models_run_directory_is_refused(checkpoints, tmp_path):
    discovery, _ = checkpoints["discovery"]
    set_prediction, _ = checkpoints["set_prediction"]
    workdir = str(tmp_path / "run")
    convert.convert_tf_checkpoint(set_prediction, workdir, resolution=SET_PREDICTION_RESOLUTION)
    with pytest.raises(
        ConversionError,
        match=r"holds checkpoints of another model \(task: checkpoint 'set_prediction' vs now 'discovery'",
    ):
        convert.convert_tf_checkpoint(discovery, workdir)
    with pytest.raises(ConversionError, match=rf"already holds a checkpoint at step {STEP}"):
        convert.convert_tf_checkpoint(set_prediction, workdir, resolution=SET_PREDICTION_RESOLUTION)


def test_a_work_directory_exports_back_to_the_same_tensorflow_checkpoint(checkpoints, tmp_path):
    """TF checkpoint -> slotjax work directory -> official layout again: every variable bit for bit, and the step."""
    directory, variables = checkpoints["discovery"]
    workdir = str(tmp_path / "run")
    convert.convert_tf_checkpoint(directory, workdir)
    convert.main(["--workdir", workdir, "--output", str(tmp_path / "tf"), "--tf"])
    reader = tf.train.load_checkpoint(str(tmp_path / "tf"))
    names = set(reader.get_variable_to_shape_map())
    model_names = {f"network/layer_with_weights-0/{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in variables}
    assert names == model_names | {
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "global_step/.ATTRIBUTES/VARIABLE_VALUE",
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    }
    assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == STEP
    for name, value in variables.items():
        stored = reader.get_tensor(f"network/layer_with_weights-0/{name}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(stored, value, err_msg=name)


@pytest.mark.parametrize("exported", ["tensorflow", "model.safetensors", "model.pt"])
@pytest.mark.parametrize("task", list(TASKS))
def test_a_round_trip_through_each_format_keeps_the_config(tmp_path, task, exported):
    """A model exported to a weights file or with --tf comes back with its own config (slots, resolution, training
    settings), not the official one a bare layout implies."""
    config = tiny_config(
        task, num_slots=11 if task == "set_prediction" else 5, grad_clip_norm=0.5, batch_size=6, learning_rate=3e-4
    )
    model = build_model(config)
    workdir, exported, back = (str(tmp_path / name) for name in ("run", exported, "back"))
    convert.write_checkpoint(model, config, 3, workdir)
    convert.main(["--workdir", workdir, "--output", exported] + (["--tf"] if exported.endswith("tensorflow") else []))
    convert.main(["--input", exported, "--output", back])
    restored, restored_config, step = convert.restore_model(back, print_fn=lambda line: None)
    assert step == 3 and restored_config.to_dict() == config.to_dict()
    images = np.random.default_rng(0).uniform(-1, 1, (2, config.resolution, config.resolution, 3)).astype(np.float32)
    key = jax.random.key(1)
    expected, actual = model(images, key=key), restored(images, key=key)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
