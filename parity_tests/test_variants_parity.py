"""Slot Attention's variants (docs/variants.md) against their torch_reference twins: forward, attention and
gradients with weights converted both ways, Invariant Slot Attention, whole variant models (adaptive slots
among them), and weight round trips."""

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
from slotjax.nn.invariant_slot_attention import InvariantSlotAttention
from slotjax.nn.slot_attention import query_noise_schedule
from torch_reference.nn.invariant_slot_attention import InvariantSlotAttention as TorchInvariantSlotAttention
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


ISA_SHAPES = [(2, (4, 5), 12, 16, 4, 3), (3, (3, 3), 8, 8, 3, 2)]  # as SHAPES, the inputs a grid of cells


@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_slot_attention_matches_torch(seed):
    batch, grid_size, input_size, slot_size, num_slots, num_iterations = ISA_SHAPES[seed]
    options = dict(input_size=input_size, num_iterations=num_iterations, mlp_hidden_size=16, grid_hidden_size=16)
    flax_module = InvariantSlotAttention(num_slots, slot_size, grid_size, **options, rngs=nnx.Rngs(seed))
    torch_module = TorchInvariantSlotAttention(num_slots, slot_size, grid_size, **options)
    torch_module.load_state_dict({name: torch.from_numpy(v) for name, v in flax_to_torch(flax_module).items()})
    rng = np.random.default_rng(seed + 100)
    inputs = rng.normal(size=(batch, grid_size[0] * grid_size[1], input_size)).astype(np.float32)
    start = dict(
        initial_positions=rng.uniform(-1.2, 1.2, size=(batch, num_slots, 2)).astype(np.float32),  # some clipped
        initial_scales=rng.normal(0.1, 0.1, size=(batch, num_slots, 2)).astype(np.float32),
    )
    cotangent = rng.normal(size=(batch, num_slots, slot_size)).astype(np.float32)

    slots, aux = flax_module(jnp.asarray(inputs), **start, return_attention=True)
    with torch.no_grad():
        torch_slots, torch_aux = torch_module(
            to_torch(inputs), **{name: to_torch(value) for name, value in start.items()}, return_attention=True
        )
    assert aux["attention"].shape == (batch, num_iterations + 1, num_slots, grid_size[0] * grid_size[1])
    assert_close(slots, torch_slots, FORWARD_TOLERANCE, "slots")
    for name in ("attention", "positions", "scales"):
        assert_close(aux[name], torch_aux[name], FORWARD_TOLERANCE, name)

    def loss_fn(module, inputs):
        slots, aux = module(inputs, **start, return_attention=True)
        return jnp.sum(slots * cotangent) + jnp.sum(aux["positions"]) + jnp.sum(aux["scales"] ** 2)

    loss, jax_grads, (jax_input_grad,) = jax_value_and_grads(flax_module, loss_fn, jnp.asarray(inputs))
    torch_inputs = to_torch(inputs, requires_grad=True)
    slots, aux = torch_module(
        torch_inputs, **{name: to_torch(value) for name, value in start.items()}, return_attention=True
    )
    torch_loss = (slots * to_torch(cotangent)).sum() + aux["positions"].sum() + (aux["scales"] ** 2).sum()
    torch_loss.backward()
    assert_close(loss, torch_loss, FORWARD_TOLERANCE, "loss")
    assert_close(jax_input_grad, torch_inputs.grad, GRADIENT_TOLERANCE, "gradient of inputs")
    assert_grads_close(jax_grads, torch_param_grads(torch_module))


MODEL_OPTIONS = dict(resolution=16, num_slots=3, slot_size=8, encoder_features=8, decoder_features=8, mlp_hidden_size=8)
MODEL_VARIANTS = {  # with learned queries or learned initial slots, so that only the options below are random
    "slot_attention_variants": dict(
        implicit_gradients=True,
        learned_queries=True,
        num_heads=2,
        attention_normalisation="scaled_sum",
        adaptive_slots=True,
    ),
    "invariant_slots": dict(invariant_slots=True, adaptive_slots=True),
}
CHANNELS_FIRST = ("reconstruction", "slot_reconstructions", "masks")  # torch's outputs [..., C, H, W]


def model_pair(variants: dict, seed: int):
    model = slotjax.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS[variants], rngs=nnx.Rngs(seed))
    reference = torch_reference.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS[variants])
    reference.load_state_dict({name: torch.from_numpy(value) for name, value in flax_to_torch(model).items()})
    return model, reference


def draw_options(variants: dict, rng: np.random.Generator) -> dict:
    """The random call options of a variant model: initial positions and scales of invariant slots."""
    if variants != "invariant_slots":
        return {}
    return dict(
        initial_positions=rng.uniform(-1, 1, size=(2, 3, 2)).astype(np.float32),
        initial_scales=rng.normal(0.1, 0.1, size=(2, 3, 2)).astype(np.float32),
    )


@pytest.mark.parametrize("variants", list(MODEL_VARIANTS))
def test_variant_model_round_trips_and_matches_torch(variants, tmp_path, seed=0):
    """Weights convert bit for bit both ways (learned queries and initial slots keep their name and layout); every
    output agrees (keep decisions by argmax); torch_reference's save_model writes the variants, and load_model
    builds them."""
    model, reference = model_pair(variants, seed)
    weights = flax_to_torch(model)
    copy = torch_to_flax(
        reference.state_dict(),
        slotjax.SlotAutoencoder(**MODEL_OPTIONS, **MODEL_VARIANTS[variants], rngs=nnx.Rngs(seed + 7)),
    )
    returned = flax_to_torch(copy)
    assert returned.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(returned[name], weights[name], err_msg=name)

    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    options = draw_options(variants, rng)
    outputs = model(jnp.asarray(images), deterministic=True, **options)
    loaded = torch_reference.load_model(torch_reference.save_model(reference, str(tmp_path / "model.safetensors")))
    torch_options = {name: to_torch(value) for name, value in options.items()}
    with torch.no_grad():
        expected = loaded(to_torch(images).permute(0, 3, 1, 2), deterministic=True, **torch_options)
    assert outputs.keys() == expected.keys()
    for key, value in expected.items():
        value = as_numpy(value.movedim(-3, -1)) if key in CHANNELS_FIRST else value
        assert_close(outputs[key], value, FORWARD_TOLERANCE, key)


@pytest.mark.parametrize("variants", list(MODEL_VARIANTS))
def test_variant_model_gradients_match_torch(variants, seed=1):
    """Keep decisions sampled with the same Gumbel noise: the gradients of the reconstruction error plus the mean
    keep decision (AdaSlot's loss, straight through the decisions)."""
    model, reference = model_pair(variants, seed)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    options = draw_options(variants, rng)
    noise = rng.gumbel(size=(2, 3, 2)).astype(np.float32)
    noise[:, 1, 0] += 30.0  # slot 1 dropped, whatever its logits
    options["gumbel_noise"] = noise

    def loss_fn(model, images):
        outputs = model(images, **options)
        return jnp.mean((outputs["reconstruction"] - images) ** 2) + jnp.mean(outputs["keep"])

    loss, jax_grads, (image_grad,) = jax_value_and_grads(model, loss_fn, jnp.asarray(images))
    torch_images = to_torch(images, requires_grad=True)
    outputs = reference(torch_images.permute(0, 3, 1, 2), **{name: to_torch(v) for name, v in options.items()})
    reconstruction = outputs["reconstruction"].permute(0, 2, 3, 1)
    torch_loss = ((reconstruction - torch_images) ** 2).mean() + outputs["keep"].mean()
    torch_loss.backward()
    keep = model(jnp.asarray(images), **options)["keep"]
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
