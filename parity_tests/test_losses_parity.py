"""Parity of slotjax.train.losses (JAX, optax Hungarian) with torch_reference.train.losses (scipy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from slotjax.train import losses as jax_losses
from torch_reference.train import losses as torch_losses


def _relative_error(actual, expected):
    return np.linalg.norm(np.asarray(actual) - np.asarray(expected)) / np.linalg.norm(expected)


def _random_set_batch(rng, batch_size, num_slots, max_objects):
    """Sigmoid-like predictions [B, K, 19] and zero-padded binary-ish targets [B, M, 19]."""
    predictions = rng.random((batch_size, num_slots, 19)).astype(np.float32)
    targets = rng.random((batch_size, max_objects, 19)).astype(np.float32)
    targets[..., 18] = 1.0
    for image in range(batch_size):
        targets[image, rng.integers(1, max_objects + 1) :] = 0.0  # padding rows
    return predictions, targets


def _jax_loss_and_grad(predictions, targets):
    loss, grads = jax.jit(jax.value_and_grad(jax_losses.hungarian_huber_loss))(
        jnp.asarray(predictions), jnp.asarray(targets)
    )
    return np.asarray(loss), np.asarray(grads)


def _torch_loss_and_grad(predictions, targets):
    predictions = torch.tensor(predictions, requires_grad=True)
    loss = torch_losses.hungarian_huber_loss(predictions, torch.tensor(targets))
    loss.backward()
    return loss.detach().numpy(), predictions.grad.numpy()


def _assert_jax_assignment_is_optimal(cost):
    """The JAX assignment is a valid matching whose total cost is scipy's optimum."""
    rows, cols = (np.asarray(i) for i in jax_losses.optimal_assignment(jnp.asarray(cost)))
    cost = np.asarray(cost, np.float64)
    for image_cost, image_rows, image_cols in zip(cost, rows, cols):
        assert len(np.unique(image_rows)) == len(np.unique(image_cols)) == min(image_cost.shape)
        optimal_cost = image_cost[linear_sum_assignment(image_cost)].sum()
        np.testing.assert_allclose(image_cost[image_rows, image_cols].sum(), optimal_cost, rtol=1e-6)


@pytest.mark.parametrize(
    "seed, batch_size, num_slots, max_objects",
    [(0, 4, 10, 10), (1, 3, 10, 6), (2, 8, 7, 7), (3, 2, 11, 4), (4, 3, 4, 6)],
)
def test_loss_and_gradient_match_torch(seed, batch_size, num_slots, max_objects):
    predictions, targets = _random_set_batch(np.random.default_rng(seed), batch_size, num_slots, max_objects)
    jax_loss, jax_grads = _jax_loss_and_grad(predictions, targets)
    torch_loss, torch_grads = _torch_loss_and_grad(predictions, targets)
    assert _relative_error(jax_loss, torch_loss) < 1e-5
    assert _relative_error(jax_grads, torch_grads) < 1e-4

    cost = jax_losses.pairwise_huber_cost(jnp.asarray(predictions), jnp.asarray(targets))
    _assert_jax_assignment_is_optimal(cost)


@pytest.mark.parametrize("seed, num_slots, max_objects", [(0, 6, 6), (1, 8, 5)])
def test_loss_matches_torch_with_tied_costs(seed, num_slots, max_objects):
    """Duplicated predictions and values in {0, 0.5, 1}: many equally good matchings."""
    rng = np.random.default_rng(seed)
    predictions, targets = _random_set_batch(rng, 4, num_slots, max_objects)
    predictions = np.round(2 * predictions) / 2
    targets = np.round(2 * targets) / 2
    predictions[:, 1] = predictions[:, 0]
    jax_loss, _ = _jax_loss_and_grad(predictions, targets)
    torch_loss, _ = _torch_loss_and_grad(predictions, targets)
    assert _relative_error(jax_loss, torch_loss) < 1e-5

    cost = jax_losses.pairwise_huber_cost(jnp.asarray(predictions), jnp.asarray(targets))
    _assert_jax_assignment_is_optimal(cost)


@pytest.mark.parametrize("shape", [(6, 5, 5), (6, 4, 7), (6, 7, 4)])
def test_assignment_is_optimal_on_integer_costs(shape):
    costs = np.random.default_rng(sum(shape)).integers(0, 4, shape).astype(np.float32)
    _assert_jax_assignment_is_optimal(costs)
    torch_rows, torch_cols = torch_losses.optimal_assignment(torch.tensor(costs))
    torch_total = costs[np.arange(shape[0])[:, None], torch_rows.numpy(), torch_cols.numpy()].sum(1)
    jax_rows, jax_cols = jax_losses.optimal_assignment(jnp.asarray(costs))
    jax_total = costs[np.arange(shape[0])[:, None], np.asarray(jax_rows), np.asarray(jax_cols)].sum(1)
    np.testing.assert_array_equal(jax_total, torch_total)


def test_mse_loss_matches_torch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
    jax_value = jax_losses.mse_loss(jnp.asarray(a), jnp.asarray(b))
    torch_value = torch_losses.mse_loss(torch.tensor(a), torch.tensor(b))
    assert _relative_error(jax_value, torch_value.numpy()) < 1e-6
