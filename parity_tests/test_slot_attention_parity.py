"""slotjax.SlotAttention against torch_reference.SlotAttention, weights converted both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import slotjax
import torch_reference
from parity_tests.helpers import (
    FORWARD_TOLERANCE,
    as_numpy,
    assert_close,
    assert_grads_close,
    jax_value_and_grads,
    to_torch,
    torch_param_grads,
)
from slotjax.convert import flax_to_torch, torch_to_flax
from slotjax.nn.layers import GRUCell, layer_norm

# (batch, num_inputs, input_size, slot_size, num_slots, num_iterations, call_num_slots, call_num_iterations)
CASES = {
    "official_sizes": (2, 64, 64, 64, 7, 3, None, None),
    "input_size_differs": (3, 20, 12, 16, 4, 3, None, None),
    "one_slot": (2, 10, 8, 8, 1, 2, None, None),
    "batch_one": (1, 30, 16, 16, 5, 3, None, None),
    "more_slots_and_iterations_at_call": (2, 25, 10, 16, 3, 2, 6, 5),
    "fewer_at_call": (2, 25, 10, 16, 7, 3, 2, 1),
}


def build_pair(case, seed: int, direction: str):
    """Twin modules with equal weights: initialised on one side, converted to the other."""
    _, _, input_size, slot_size, num_slots, num_iterations, _, _ = case
    options = dict(input_size=input_size, num_iterations=num_iterations, mlp_hidden_size=32)
    flax_module = slotjax.SlotAttention(num_slots, slot_size, **options, rngs=nnx.Rngs(seed))
    torch.manual_seed(seed)
    torch_module = torch_reference.SlotAttention(num_slots, slot_size, **options)
    if direction == "flax_to_torch":
        torch_module.load_state_dict({name: torch.from_numpy(v) for name, v in flax_to_torch(flax_module).items()})
    else:
        torch_to_flax(torch_module.state_dict(), flax_module)
    return flax_module, torch_module


def draw_inputs(case, seed: int):
    batch, num_inputs, input_size, slot_size, num_slots, _, call_num_slots, _ = case
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(batch, num_inputs, input_size)).astype(np.float32)
    noise = rng.normal(size=(batch, call_num_slots or num_slots, slot_size)).astype(np.float32)
    return inputs, noise


@pytest.mark.parametrize("direction", ["flax_to_torch", "torch_to_flax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_attention_match(case_name, seed, direction):
    case = CASES[case_name]
    call_num_slots, call_num_iterations = case[6], case[7]
    flax_module, torch_module = build_pair(case, seed, direction)
    inputs, noise = draw_inputs(case, seed + 100)
    initial = flax_module.slots_mu[...] + jnp.exp(flax_module.slots_log_sigma[...]) * noise

    slots, aux = flax_module(
        jnp.asarray(inputs), initial_slots=initial, num_iterations=call_num_iterations, return_attention=True
    )
    torch_slots, torch_aux = torch_module(
        to_torch(inputs), initial_slots=to_torch(initial), num_iterations=call_num_iterations, return_attention=True
    )
    expected_slots = call_num_slots or case[4]
    assert slots.shape == (case[0], expected_slots, case[3])
    assert aux["attention"].shape == (case[0], call_num_iterations or case[5], expected_slots, case[1])
    assert_close(slots, torch_slots, FORWARD_TOLERANCE, "slots")
    assert_close(aux["attention"], torch_aux["attention"], FORWARD_TOLERANCE, "attention")


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize(
    "case_name", ["official_sizes", "input_size_differs", "one_slot", "more_slots_and_iterations_at_call"]
)
def test_gradients_match(case_name, seed):
    """Gradients w.r.t. inputs and every parameter, including mu and log_sigma through the sampled slots."""
    case = CASES[case_name]
    call_num_iterations = case[7]
    flax_module, torch_module = build_pair(case, seed, "flax_to_torch")
    inputs, noise = draw_inputs(case, seed + 100)
    cotangent = np.random.default_rng(seed + 200).normal(size=(case[0], noise.shape[1], case[3])).astype(np.float32)

    def loss_fn(module, inputs):
        initial = module.slots_mu[...] + jnp.exp(module.slots_log_sigma[...]) * noise
        slots = module(inputs, initial_slots=initial, num_iterations=call_num_iterations)
        return jnp.sum(slots * cotangent)

    loss, jax_grads, (jax_input_grad,) = jax_value_and_grads(flax_module, loss_fn, jnp.asarray(inputs))

    torch_inputs = to_torch(inputs, requires_grad=True)
    initial = torch_module.slots_mu + torch.exp(torch_module.slots_log_sigma) * to_torch(noise)
    torch_loss = (
        torch_module(torch_inputs, initial_slots=initial, num_iterations=call_num_iterations) * to_torch(cotangent)
    ).sum()
    torch_loss.backward()

    assert_close(loss, torch_loss, FORWARD_TOLERANCE, "loss")
    assert_close(jax_input_grad, torch_inputs.grad, 1e-4, "gradient of inputs")
    assert_grads_close(jax_grads, torch_param_grads(torch_module))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gru_cell_alone_matches_torch_gru_cell(seed):
    in_features, hidden_size, batch = 12, 16, 5
    gru = GRUCell(in_features, hidden_size, rngs=nnx.Rngs(seed))
    torch.manual_seed(seed)
    torch_gru = torch.nn.GRUCell(in_features, hidden_size)  # torch's own init: non-zero biases on both sides
    torch_to_flax(torch_gru.state_dict(), gru)
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(batch, in_features)).astype(np.float32)
    state = rng.normal(size=(batch, hidden_size)).astype(np.float32)

    def loss_fn(module, inputs, state):
        return jnp.sum(jnp.sin(module(inputs, state)))

    loss, jax_grads, (input_grad, state_grad) = jax_value_and_grads(
        gru, loss_fn, jnp.asarray(inputs), jnp.asarray(state)
    )
    torch_inputs, torch_state = to_torch(inputs, True), to_torch(state, True)
    torch_out = torch_gru(torch_inputs, torch_state)
    torch.sin(torch_out).sum().backward()

    assert_close(gru(jnp.asarray(inputs), jnp.asarray(state)), torch_out, FORWARD_TOLERANCE, "GRU output")
    assert_close(loss, torch.sin(torch_out).sum(), FORWARD_TOLERANCE, "loss")
    assert_close(input_grad, torch_inputs.grad, 1e-4, "gradient of inputs")
    assert_close(state_grad, torch_state.grad, 1e-4, "gradient of state")
    assert_grads_close(jax_grads, torch_param_grads(torch_gru))


@pytest.mark.parametrize("scale", [1.0, 1e-2])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_norm_mapping(seed, scale):
    """Same epsilon on both sides; low-variance inputs (scale 1e-2) are where epsilons would differ."""
    features = 24
    flax_norm = layer_norm(features, 1e-3, nnx.Rngs(seed))
    torch_norm = torch.nn.LayerNorm(features, eps=1e-3)
    with torch.no_grad():
        torch_norm.weight.normal_()
        torch_norm.bias.normal_()
    torch_to_flax(torch_norm.state_dict(), flax_norm)
    inputs = (np.random.default_rng(seed).normal(size=(4, 9, features)) * scale).astype(np.float32)
    assert_close(flax_norm(jnp.asarray(inputs)), torch_norm(to_torch(inputs)), FORWARD_TOLERANCE, "LayerNorm")


def test_sampled_initial_slots_follow_the_learned_gaussian():
    """The module's own sampling: mean mu and standard deviation exp(log_sigma)."""
    module = slotjax.SlotAttention(4, 8, rngs=nnx.Rngs(0))
    _, aux = module(jnp.zeros((2000, 3, 8)), key=jax.random.key(5), return_attention=True, num_iterations=1)
    initial = np.asarray(aux["initial_slots"]).reshape(-1, 8)
    np.testing.assert_allclose(initial.mean(0), np.asarray(module.slots_mu[...]).ravel(), atol=0.05)
    np.testing.assert_allclose(initial.std(0), np.exp(np.asarray(module.slots_log_sigma[...])).ravel(), rtol=0.05)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_flax_torch_flax_is_bit_identical(seed):
    module = slotjax.SlotAttention(5, 16, input_size=12, rngs=nnx.Rngs(seed))
    copy = slotjax.SlotAttention(5, 16, input_size=12, rngs=nnx.Rngs(seed + 1000))
    torch_module = torch_reference.SlotAttention(5, 16, input_size=12)
    torch_module.load_state_dict({name: torch.from_numpy(v) for name, v in flax_to_torch(module).items()})
    torch_to_flax(torch_module.state_dict(), copy)
    original = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    returned = dict(nnx.to_flat_state(nnx.state(copy, nnx.Param)))
    assert original.keys() == returned.keys()
    for path in original:
        np.testing.assert_array_equal(
            np.asarray(returned[path][...]), np.asarray(original[path][...]), err_msg=str(path)
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_torch_flax_torch_is_bit_identical(seed):
    torch.manual_seed(seed)
    torch_module = torch_reference.SlotAttention(5, 16, input_size=12)
    with torch.no_grad():  # non-zero biases on both GRU sides: nothing may be folded away
        for parameter in torch_module.parameters():
            parameter.add_(torch.randn_like(parameter))
    module = torch_to_flax(torch_module.state_dict(), slotjax.SlotAttention(5, 16, input_size=12, rngs=nnx.Rngs(seed)))
    returned = flax_to_torch(module)
    original = {name: as_numpy(value) for name, value in torch_module.state_dict().items()}
    assert returned.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(returned[name], original[name], err_msg=name)
