"""Slot Attention's variants (docs/variants.md) against their torch_reference twins: forward, attention and
gradients with weights converted both ways, whole variant models, and weight round trips."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import slotjax
import torch_reference
from parity_tests.helpers import (
    FORWARD_TOLERANCE,
    GRADIENT_TOLERANCE,
    as_numpy,
    assert_close,
    assert_grads_close,
    jax_value_and_grads,
    to_torch,
)
from slotjax.convert import flax_to_torch, torch_to_flax
from slotjax.nn.slot_attention import query_noise_schedule
from torch_reference.nn.slot_attention import query_noise_schedule as torch_query_noise_schedule

VARIANTS = {
    "implicit_gradients": dict(implicit_gradients=True),
    "learned_queries": dict(learned_queries=True),
    "two_heads": dict(num_heads=2),
    "scaled_sum": dict(attention_normalisation="scaled_sum"),
    "implicit_heads_scaled_sum": dict(implicit_gradients=True, num_heads=2, attention_normalisation="scaled_sum"),
    "all_four": dict(implicit_gradients=True, learned_queries=True, num_heads=4, attention_normalisation="scaled_sum"),
}
# (batch, num_inputs, input_size, slot_size, num_slots, num_iterations), one per seed
SHAPES = [(2, 20, 12, 16, 4, 3), (3, 9, 8, 8, 3, 2)]


def build_pair(variants: dict, shape, seed: int, direction: str):
    _, _, input_size, slot_size, num_slots, num_iterations = shape
    options = dict(input_size=input_size, num_iterations=num_iterations, mlp_hidden_size=16, **variants)
    flax_module = slotjax.SlotAttention(num_slots, slot_size, **options, rngs=nnx.Rngs(seed))
    torch.manual_seed(seed)
    torch_module = torch_reference.SlotAttention(num_slots, slot_size, **options)
    if direction == "flax_to_torch":
        torch_module.load_state_dict({name: torch.from_numpy(v) for name, v in flax_to_torch(flax_module).items()})
    else:
        torch_to_flax(torch_module.state_dict(), flax_module)
    return flax_module, torch_module


def initial_slots(module, noise, exp):
    """The module's own learned queries (no noise), or mu + exp(log_sigma) * noise."""
    if module.learned_queries:
        return None
    return module.slots_mu[...] + exp(module.slots_log_sigma[...]) * noise


def torch_param_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Parameter gradients; zeros for those the graph does not reach (mu and log_sigma with implicit gradients)."""
    return {
        name: np.zeros(tuple(p.shape), np.float32) if p.grad is None else as_numpy(p.grad)
        for name, p in module.named_parameters()
    }


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_torch(variant, seed):
    shape = SHAPES[seed]
    batch, num_inputs, input_size, slot_size, num_slots, num_iterations = shape
    direction = ["flax_to_torch", "torch_to_flax"][seed]
    flax_module, torch_module = build_pair(VARIANTS[variant], shape, seed, direction)
    rng = np.random.default_rng(seed + 100)
    inputs = rng.normal(size=(batch, num_inputs, input_size)).astype(np.float32)
    noise = rng.normal(size=(batch, num_slots, slot_size)).astype(np.float32)
    cotangent = rng.normal(size=(batch, num_slots, slot_size)).astype(np.float32)

    slots, aux = flax_module(
        jnp.asarray(inputs), initial_slots=initial_slots(flax_module, noise, jnp.exp), return_attention=True
    )
    with torch.no_grad():
        torch_slots, torch_aux = torch_module(
            to_torch(inputs),
            initial_slots=initial_slots(torch_module, to_torch(noise), torch.exp),
            return_attention=True,
        )
    applications = num_iterations + flax_module.implicit_gradients
    assert aux["attention"].shape == (batch, applications, num_slots, num_inputs)
    assert_close(slots, torch_slots, FORWARD_TOLERANCE, "slots")
    assert_close(aux["attention"], torch_aux["attention"], FORWARD_TOLERANCE, "attention")
    assert_close(aux["initial_slots"], torch_aux["initial_slots"], FORWARD_TOLERANCE, "initial slots")

    def loss_fn(module, inputs):
        return jnp.sum(module(inputs, initial_slots=initial_slots(module, noise, jnp.exp)) * cotangent)

    loss, jax_grads, (jax_input_grad,) = jax_value_and_grads(flax_module, loss_fn, jnp.asarray(inputs))
    torch_inputs = to_torch(inputs, requires_grad=True)
    torch_initial = initial_slots(torch_module, to_torch(noise), torch.exp)
    torch_loss = (torch_module(torch_inputs, initial_slots=torch_initial) * to_torch(cotangent)).sum()
    torch_loss.backward()
    assert_close(loss, torch_loss, FORWARD_TOLERANCE, "loss")
    assert_close(jax_input_grad, torch_inputs.grad, GRADIENT_TOLERANCE, "gradient of inputs")
    assert_grads_close(jax_grads, torch_param_grads(torch_module))


MODEL_VARIANTS = dict(
    implicit_gradients=True,
    learned_queries=True,
    num_heads=2,
    attention_normalisation="scaled_sum",
    adaptive_slots=True,
)
MODEL_OPTIONS = dict(resolution=16, num_slots=3, slot_size=8, encoder_features=8, decoder_features=8, mlp_hidden_size=8)
CHANNELS_FIRST = ("reconstruction", "slot_reconstructions", "masks")  # torch's outputs [..., C, H, W]


def test_variant_model_round_trips_and_matches_torch(tmp_path, seed=0):
    """Weights convert bit for bit both ways (learned queries keep their name and layout); every output agrees
    (keep decisions by argmax); torch_reference's save_model writes the variants, and load_model builds them."""
    model = slotjax.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS, rngs=nnx.Rngs(seed))
    reference = torch_reference.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS)
    weights = flax_to_torch(model)
    assert weights["encoder.slot_attention.slots_queries"].shape == (1, 3, 8)
    reference.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    copy = torch_to_flax(
        reference.state_dict(), slotjax.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS, rngs=nnx.Rngs(seed + 7))
    )
    returned = flax_to_torch(copy)
    assert returned.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(returned[name], weights[name], err_msg=name)

    images = np.random.default_rng(seed).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    outputs = model(jnp.asarray(images), deterministic=True)
    loaded = torch_reference.load_model(torch_reference.save_model(reference, str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        expected = loaded(to_torch(images).permute(0, 3, 1, 2), deterministic=True)
    assert outputs.keys() == expected.keys()
    for key, value in expected.items():
        value = as_numpy(value.movedim(-3, -1)) if key in CHANNELS_FIRST else value
        assert_close(outputs[key], value, FORWARD_TOLERANCE, key)


def test_variant_model_gradients_match_torch(seed=1):
    """Every variant at once, keep decisions sampled with the same Gumbel noise: outputs, and the gradients of the
    reconstruction error plus the mean keep decision (AdaSlot's loss, straight through the decisions)."""
    model = slotjax.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS, rngs=nnx.Rngs(seed))
    reference = torch_reference.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS)
    reference.load_state_dict({name: torch.from_numpy(value) for name, value in flax_to_torch(model).items()})
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    noise = rng.gumbel(size=(2, 3, 2)).astype(np.float32)
    noise[:, 1, 0] += 30.0  # slot 1 dropped, whatever its logits

    def loss_fn(model, images):
        outputs = model(images, gumbel_noise=jnp.asarray(noise))
        return jnp.mean((outputs["reconstruction"] - images) ** 2) + jnp.mean(outputs["keep"])

    loss, jax_grads, (image_grad,) = jax_value_and_grads(model, loss_fn, jnp.asarray(images))
    torch_images = to_torch(images, requires_grad=True)
    outputs = reference(torch_images.permute(0, 3, 1, 2), gumbel_noise=to_torch(noise))
    reconstruction = outputs["reconstruction"].permute(0, 2, 3, 1)
    torch_loss = ((reconstruction - torch_images) ** 2).mean() + outputs["keep"].mean()
    torch_loss.backward()
    keep = model(jnp.asarray(images), gumbel_noise=jnp.asarray(noise))["keep"]
    np.testing.assert_array_equal(keep, as_numpy(outputs["keep"]))
    assert 0 < keep.sum() < keep.size  # slots kept and slots dropped
    assert_close(loss, torch_loss, FORWARD_TOLERANCE, "loss")
    assert_close(image_grad, torch_images.grad, GRADIENT_TOLERANCE, "gradient of images")
    assert_grads_close(jax_grads, torch_param_grads(reference))


def test_query_noise_schedules_agree():
    for anneal_steps in (0, 1, 7, 30000):
        for step in (0, 1, 3, anneal_steps // 3, anneal_steps - 1, anneal_steps, anneal_steps + 5):
            expected = torch_query_noise_schedule(max(step, 0), anneal_steps)
            assert float(query_noise_schedule(max(step, 0), anneal_steps)) == pytest.approx(expected, abs=1e-6)
