"""Tests for slotjax.train.losses: Huber cost, Hungarian matching and the set loss."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slotjax.train import losses


def _huber(x):
    return np.where(np.abs(x) <= 1.0, 0.5 * x**2, np.abs(x) - 0.5)


def _brute_force_set_loss(predictions, targets):
    """Minimum over all injective matchings of the summed costs, batch mean."""
    per_image = []
    for image_predictions, image_targets in zip(predictions, targets):
        cost = _huber(image_targets[:, None] - image_predictions[None]).mean(-1)  # [M, K]
        num_targets, num_predictions = cost.shape
        if num_targets <= num_predictions:
            options = (
                cost[np.arange(num_targets), list(cols)].sum()
                for cols in itertools.permutations(range(num_predictions), num_targets)
            )
        else:
            options = (
                cost[list(rows), np.arange(num_predictions)].sum()
                for rows in itertools.permutations(range(num_targets), num_predictions)
            )
        per_image.append(min(options))
    return np.mean(per_image)


def test_pairwise_huber_cost_layout_and_values():
    rng = np.random.default_rng(0)
    predictions = rng.normal(scale=2.0, size=(2, 4, 19)).astype(np.float32)
    targets = rng.normal(scale=2.0, size=(2, 3, 19)).astype(np.float32)
    cost = losses.pairwise_huber_cost(jnp.asarray(predictions), jnp.asarray(targets))
    assert cost.shape == (2, 3, 4)
    expected = _huber(targets[:, :, None] - predictions[:, None]).mean(-1)
    np.testing.assert_allclose(cost, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "seed, batch_size, num_predictions, num_targets",
    [(0, 3, 4, 4), (1, 2, 6, 3), (2, 4, 5, 5), (3, 2, 3, 5)],
)
def test_loss_equals_brute_force_minimum(seed, batch_size, num_predictions, num_targets):
    rng = np.random.default_rng(seed)
    predictions = rng.random((batch_size, num_predictions, 19)).astype(np.float32)
    targets = rng.random((batch_size, num_targets, 19)).astype(np.float32)
    loss = jax.jit(losses.hungarian_huber_loss)(jnp.asarray(predictions), jnp.asarray(targets))
    np.testing.assert_allclose(loss, _brute_force_set_loss(predictions, targets), rtol=1e-5)


def test_matching_recovers_permutation_and_loss_is_zero():
    rng = np.random.default_rng(0)
    batch_size, num_slots, num_objects = 3, 7, 4
    targets = rng.random((batch_size, num_objects, 19)).astype(np.float32)
    targets[:, -1] = 0.0  # a padding row, matched like any other
    slot_of_target = np.stack([rng.permutation(num_slots)[:num_objects] for _ in range(batch_size)])
    predictions = rng.random((batch_size, num_slots, 19)).astype(np.float32) + 5.0
    np.put_along_axis(predictions, slot_of_target[..., None], targets, axis=1)

    cost = losses.pairwise_huber_cost(jnp.asarray(predictions), jnp.asarray(targets))
    target_indices, prediction_indices = losses.optimal_assignment(cost)
    np.testing.assert_array_equal(target_indices, np.tile(np.arange(num_objects), (batch_size, 1)))
    np.testing.assert_array_equal(prediction_indices, slot_of_target)
    assert losses.hungarian_huber_loss(jnp.asarray(predictions), jnp.asarray(targets)) == 0.0


def test_gradient_reaches_matched_predictions_only():
    rng = np.random.default_rng(1)
    predictions = jnp.asarray(rng.random((2, 6, 19)), jnp.float32)
    targets = jnp.asarray(rng.random((2, 3, 19)), jnp.float32)
    grads = jax.jit(jax.grad(losses.hungarian_huber_loss))(predictions, targets)
    _, prediction_indices = losses.optimal_assignment(losses.pairwise_huber_cost(predictions, targets))
    is_matched = np.zeros((2, 6), bool)
    np.put_along_axis(is_matched, np.asarray(prediction_indices), True, axis=1)
    grad_norms = np.linalg.norm(np.asarray(grads), axis=-1)
    assert np.all(grad_norms[is_matched] > 0)
    assert np.all(grad_norms[~is_matched] == 0)


def test_mse_loss():
    a = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(losses.mse_loss(a, jnp.zeros_like(a)), np.mean(np.arange(6.0) ** 2))
