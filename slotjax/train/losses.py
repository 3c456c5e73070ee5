"""Training losses: Hungarian-matched Huber loss (set prediction) and MSE.

The set-prediction loss matches predicted slots to target objects with the
Hungarian algorithm (`optax.assignment.hungarian_algorithm`, vmapped over the
batch), entirely on device and jit-able.  Gradients flow through the matched
costs only; the assignment itself is treated as a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _check_sets(predictions: jax.Array, targets: jax.Array) -> None:
    """Refuses sets that are not [B, K, D] and [B, M, D] arrays of the same B and D (static, free under jit)."""
    for name, array in (("predictions", predictions), ("targets", targets)):
        if getattr(array, "ndim", None) != 3:
            raise ValueError(
                f"{name} have shape {getattr(array, 'shape', type(array).__name__)}; "
                "expected [batch, set size, features]."
            )
    if predictions.shape[0] != targets.shape[0] or predictions.shape[2] != targets.shape[2]:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must have the "
            "same batch size and number of features."
        )
    for name, array in (("predictions", predictions), ("targets", targets)):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{name} have dtype {array.dtype}; expected floats.")


def pairwise_huber_cost(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Huber (delta 1) cost between every target and every prediction.

    Args:
      predictions: [B, K, D].
      targets: [B, M, D].

    Returns:
      [B, M, K]: cost[b, i, j] = mean over D of Huber(targets[b, i] - predictions[b, j]).
    """
    _check_sets(predictions, targets)
    differences = targets[:, :, None, :] - predictions[:, None, :, :]  # [B, M, K, D]
    return optax.losses.huber_loss(differences, delta=1.0).mean(axis=-1)


@jax.jit
def optimal_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost assignment per image, rows sorted ascending.

    Args:
      cost: [B, R, C] cost matrices.

    Returns:
      (row_indices, col_indices), each int [B, min(R, C)]: row row_indices[b, n]
      is assigned to column col_indices[b, n].  For R <= C, row_indices[b] is
      arange(R).
    """
    rows, cols = jax.vmap(optax.assignment.hungarian_algorithm)(cost)  # [B, min(R, C)]
    order = jnp.argsort(rows, axis=1)
    return jnp.take_along_axis(rows, order, 1), jnp.take_along_axis(cols, order, 1)


def hungarian_huber_costs(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Matched Huber costs summed per image.

    Args:
      predictions: [B, K, D] predicted objects.
      targets: [B, M, D] target objects; padding rows are matched too.

    Returns:
      [B]: each image's set loss.
    """
    cost = pairwise_huber_cost(predictions, targets)  # [B, M, K]
    target_indices, prediction_indices = optimal_assignment(jax.lax.stop_gradient(cost))
    batch_indices = jnp.arange(cost.shape[0])[:, None]
    return cost[batch_indices, target_indices, prediction_indices].sum(axis=1)  # [B]


def hungarian_huber_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Set loss: matched Huber costs summed per image (`hungarian_huber_costs`), averaged over the batch."""
    return hungarian_huber_costs(predictions, targets).mean()


def mse_loss(predictions: jax.Array, targets: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean squared error over all elements (e.g. B x H x W x C), or over `axis` (e.g. (1, 2, 3): per image)."""
    return jnp.mean(jnp.square(predictions - targets), axis=axis)
