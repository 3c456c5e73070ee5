"""Whole models against torch_reference: every output, gradients, and 10 optimiser steps."""

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
    torch_param_grads,
)
from slotjax.convert import flax_to_torch, torch_to_flax
from slotjax.train import losses as jax_losses
from slotjax.train.optim import make_optimizer
from torch_reference.train import losses as torch_losses
from torch_reference.train.optim import make_optimizer as make_torch_optimizer

# name -> (model class name, constructor options, batch size, target objects)
MODELS = {
    "autoencoder_16": (
        "SlotAutoencoder",
        dict(resolution=16, num_slots=3, slot_size=16, encoder_features=8, decoder_features=8, mlp_hidden_size=16),
        2,
    ),
    "autoencoder_32": (
        "SlotAutoencoder",
        dict(
            resolution=32,
            num_slots=4,
            slot_size=8,
            encoder_features=12,
            decoder_features=6,
            mlp_hidden_size=16,
            num_iterations=2,
        ),
        1,
    ),
    "set_predictor_16": (
        "SetPredictor",
        dict(resolution=16, num_slots=5, slot_size=16, encoder_features=8, mlp_hidden_size=16, head_hidden_size=8),
        3,
    ),
    "set_predictor_24": (
        "SetPredictor",
        dict(resolution=24, num_slots=3, slot_size=8, encoder_features=8, mlp_hidden_size=8, head_hidden_size=8),
        2,
    ),
}


def build_pair(name: str, seed: int, direction: str = "flax_to_torch"):
    class_name, options, _ = MODELS[name]
    model = getattr(slotjax, class_name)(**options, rngs=nnx.Rngs(seed))
    torch.manual_seed(seed)
    reference = getattr(torch_reference, class_name)(**options)
    if direction == "flax_to_torch":
        reference.load_state_dict({k: torch.tensor(v) for k, v in flax_to_torch(model).items()})
    else:
        torch_to_flax(reference.state_dict(), model)
    return model, reference


def draw_batch(name: str, seed: int):
    """Images in [-1, 1], initial-slot noise, and targets / a cotangent for the loss."""
    class_name, options, batch_size = MODELS[name]
    rng = np.random.default_rng(seed)
    resolution, num_slots = options["resolution"], options["num_slots"]
    images = rng.uniform(-1, 1, size=(batch_size, resolution, resolution, 3)).astype(np.float32)
    noise = rng.normal(size=(batch_size, num_slots, options["slot_size"])).astype(np.float32)
    targets = rng.uniform(size=(batch_size, num_slots + 1, 19)).astype(np.float32)
    targets[:, -2:] = 0.0  # padding rows
    return images, noise, targets


def nchw(images):
    images = images if isinstance(images, torch.Tensor) else to_torch(images)
    return images.permute(0, 3, 1, 2)


def channels_last(value: torch.Tensor) -> np.ndarray:
    """torch outputs [..., C, H, W] -> [..., H, W, C]."""
    return as_numpy(value.movedim(-3, -1))


def jax_loss(model, images, noise, targets):
    slot_attention = model.encoder.slot_attention
    initial = slot_attention.slots_mu[...] + jnp.exp(slot_attention.slots_log_sigma[...]) * noise
    outputs = model(images, initial_slots=initial)
    if "predictions" in outputs:
        return jax_losses.hungarian_huber_loss(outputs["predictions"], targets)
    return jax_losses.mse_loss(outputs["reconstruction"], images)


def torch_loss(reference, images, noise, targets):
    slot_attention = reference.encoder.slot_attention
    initial = slot_attention.slots_mu + torch.exp(slot_attention.slots_log_sigma) * to_torch(noise)
    outputs = reference(nchw(images), initial_slots=initial)
    if "predictions" in outputs:
        return torch_losses.hungarian_huber_loss(outputs["predictions"], to_torch(targets))
    return torch_losses.mse_loss(outputs["reconstruction"], nchw(images))


@pytest.mark.parametrize("direction", ["flax_to_torch", "torch_to_flax"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_output_matches(name, seed, direction):
    model, reference = build_pair(name, seed, direction)
    images, noise, _ = draw_batch(name, seed + 10)
    initial = (
        model.encoder.slot_attention.slots_mu[...] + jnp.exp(model.encoder.slot_attention.slots_log_sigma[...]) * noise
    )
    outputs = model(jnp.asarray(images), initial_slots=initial)
    with torch.no_grad():
        expected = reference(nchw(images), initial_slots=to_torch(initial))
    assert sorted(outputs) == sorted(expected)
    for key in outputs:
        value = expected[key]
        expected_value = channels_last(value) if key in ("reconstruction", "slot_reconstructions", "masks") else value
        assert_close(outputs[key], expected_value, FORWARD_TOLERANCE, key)
    with torch.no_grad():
        expected_tokens = reference.encoder.tokens(nchw(images))
    assert_close(model.encoder.tokens(jnp.asarray(images)), expected_tokens, FORWARD_TOLERANCE, "tokens")


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_gradients_match(name, seed):
    model, reference = build_pair(name, seed)
    images, noise, targets = draw_batch(name, seed + 10)
    loss, grads, (image_grad,) = jax_value_and_grads(
        model, lambda m, x: jax_loss(m, x, noise, targets), jnp.asarray(images)
    )
    torch_images = to_torch(images, requires_grad=True)
    reference_loss = torch_loss(reference, torch_images, noise, targets)
    reference_loss.backward()
    assert_close(loss, reference_loss, FORWARD_TOLERANCE, "loss")
    assert_close(image_grad, torch_images.grad, GRADIENT_TOLERANCE, "gradient of images")
    assert_grads_close(grads, torch_param_grads(reference))


@pytest.mark.parametrize("name", ["autoencoder_16", "set_predictor_16"])
def test_ten_optimizer_steps_match(name):
    """The paper's Adam (Keras' epsilon) on the official schedule in both frameworks: losses and parameters over
    ten steps that move them (after the first update, at lr(0) = 0).

    Parameters after a step are held to the gradient tolerance: an Adam update is
    a normalised gradient (about lr * sign(g) at first), so it carries the
    gradient's rounding error. Adam also magnifies gradients near its eps (1e-8):
    an element whose gradient is zero in exact arithmetic (norm_slots.bias, or a
    unit whose relu is off everywhere) holds rounding noise in both frameworks,
    which Adam turns into steps of up to lr. Such elements (|g| below 1e-6 of
    the largest gradient, at any step) are checked against that bound instead.
    """
    model, reference = build_pair(name, seed=7)
    schedule = dict(learning_rate=4e-4, warmup_steps=4, decay_steps=5)  # short, so warm-up and decay both act
    optimizer = nnx.Optimizer(model, make_optimizer(**schedule), wrt=nnx.Param)
    torch_optimizer, torch_scheduler = make_torch_optimizer(reference.parameters(), **schedule)
    initial = flax_to_torch(model)
    noise = {key: np.zeros(value.shape, bool) for key, value in initial.items()}

    @nnx.jit
    def train_step(model, optimizer, images, slot_noise, targets):
        loss, grads = nnx.value_and_grad(lambda m: jax_loss(m, images, slot_noise, targets))(model)
        optimizer.update(model, grads)
        return loss

    for step in range(11):
        images, slot_noise, targets = draw_batch(name, 100 + step)
        loss = train_step(model, optimizer, images, slot_noise, targets)
        torch_optimizer.zero_grad()
        reference_loss = torch_loss(reference, to_torch(images), slot_noise, targets)
        reference_loss.backward()
        torch_grads = torch_param_grads(reference)
        largest = max(np.abs(g).max() for g in torch_grads.values())
        for key, grad in torch_grads.items():
            noise[key] |= np.abs(grad) < 1e-6 * largest
        torch_optimizer.step()
        torch_scheduler.step()
        assert_close(loss, reference_loss, FORWARD_TOLERANCE, f"loss at step {step}")
        for key, value in flax_to_torch(model).items():
            expected = as_numpy(reference.state_dict()[key])
            assert np.abs(value - initial[key])[noise[key]].max(initial=0) <= 1.1 * schedule["learning_rate"] * step, (
                key
            )
            assert_close(value[~noise[key]], expected[~noise[key]], GRADIENT_TOLERANCE, f"{key} after step {step}")
    assert noise["encoder.slot_attention.norm_slots.bias"].all()
    assert sum(mask.sum() for mask in noise.values()) < 0.25 * sum(mask.size for mask in noise.values())
