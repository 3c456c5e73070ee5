"""Float64 models (`jax_enable_x64`) compute in float64 throughout: they agree with torch_reference in double far
beyond float32's precision, the reference against which benchmarks/precision.py measures float32's drift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import slotjax
import torch_reference
from parity_tests.helpers import assert_close, assert_grads_close, torch_param_grads
from parity_tests.test_models_parity import MODELS, channels_last, draw_batch
from slotjax import kernels
from slotjax.convert import flax_to_torch

TOLERANCE = 1e-10  # float32 rounding anywhere (a softmax, an output, a gradient) leaves ~1e-7 or more
OUTPUT = {"SlotAutoencoder": "reconstruction", "SetPredictor": "predictions"}


def double_pair(name: str, seed: int):
    """The slotjax model split (graph, float32 parameters, rest) and its torch twin in double, built with double
    as torch's default so that its position grids are computed in double too."""
    class_name, options, _ = MODELS[name]
    model = getattr(slotjax, class_name)(**options, rngs=nnx.Rngs(seed))
    torch.set_default_dtype(torch.float64)
    try:
        reference = getattr(torch_reference, class_name)(**options)
    finally:
        torch.set_default_dtype(torch.float32)
    reference.load_state_dict({key: torch.from_numpy(value) for key, value in flax_to_torch(model).items()})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest, reference


@pytest.mark.parametrize("name", ["autoencoder_16", "set_predictor_16"])
def test_float64_model_and_gradients_match_torch_double(name):
    """In the CPU kernel forms, which sum the kernel gradient's chunks in their own accumulator."""
    graphdef, params, rest, reference = double_pair(name, seed=5)
    images, noise, _ = draw_batch(name, 6)
    images, noise = np.float64(images), np.float64(noise)
    output = OUTPUT[MODELS[name][0]]

    def loss(params):  # -> (mean square of the output, outputs)
        model = nnx.merge(graphdef, params, rest, copy=True)
        slot_attention = model.encoder.slot_attention
        initial = slot_attention.slots_mu[...] + jnp.exp(slot_attention.slots_log_sigma[...]) * noise
        outputs = model(jnp.asarray(images), initial_slots=initial)
        return jnp.mean(jnp.square(outputs[output])), outputs

    with jax.enable_x64(True), kernels.use_forms("cpu"):
        params = jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), params)
        grads, outputs = jax.jit(jax.grad(loss, has_aux=True))(params)
        grads = flax_to_torch(nnx.merge(graphdef, grads, rest))
    slot_attention = reference.encoder.slot_attention
    initial = slot_attention.slots_mu + torch.exp(slot_attention.slots_log_sigma) * torch.from_numpy(noise)
    expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2), initial_slots=initial)
    torch.mean(torch.square(expected[output])).backward()
    for key, value in outputs.items():
        assert value.dtype == jnp.float64, key
        target = expected[key]
        target = channels_last(target) if key in ("reconstruction", "slot_reconstructions", "masks") else target
        assert_close(value, target, TOLERANCE, key)
    assert all(grad.dtype == np.float64 for grad in grads.values())
    assert_grads_close(grads, torch_param_grads(reference), TOLERANCE)
