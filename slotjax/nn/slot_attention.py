"""Slot Attention (Locatello et al., NeurIPS 2020, Algorithm 1) in Flax NNX; docs/architecture.md."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slotjax import kernels
from slotjax.nn.layers import LAYER_NORM_EPSILON, MLP, GRUCell, dense, glorot_uniform, layer_norm


class SlotAttention(nnx.Module):
    """Maps N input features to K slots by iterated attention in which the slots compete for the inputs.

    >>> slot_attention = SlotAttention(num_slots=7, slot_size=64, input_size=64, rngs=nnx.Rngs(0))
    >>> slots = slot_attention(inputs, key=jax.random.key(1))  # [B, N, 64] -> [B, 7, 64]

    Call options: `num_slots` and `num_iterations` override the constructor's (e.g. more slots at test time),
    `initial_slots` [B, K, slot_size] replaces the sampled ones, `key` draws the initial noise (default: the
    module's own `noise` stream), and `return_attention=True` returns `(slots, aux)` with aux["attention"]
    [B, T, K, N] (softmax over the slots, per iteration) and aux["initial_slots"] [B, K, slot_size].
    """

    def __init__(
        self,
        num_slots: int,
        slot_size: int,
        *,
        input_size: int | None = None,
        num_iterations: int = 3,
        mlp_hidden_size: int = 128,
        attention_epsilon: float = 1e-8,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        rngs: nnx.Rngs,
    ):
        num_slots, num_iterations, slot_size = _positive_integers(
            num_slots=num_slots, num_iterations=num_iterations, slot_size=slot_size
        )
        self.num_slots, self.slot_size, self.num_iterations = num_slots, slot_size, num_iterations
        self.input_size = input_size = slot_size if input_size is None else input_size
        self.attention_epsilon = attention_epsilon
        self.norm_inputs = layer_norm(input_size, layer_norm_epsilon, rngs)
        self.norm_slots = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.norm_mlp = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.project_q = dense(slot_size, slot_size, rngs, use_bias=False)
        self.project_k = dense(input_size, slot_size, rngs, use_bias=False)
        self.project_v = dense(input_size, slot_size, rngs, use_bias=False)
        self.gru = GRUCell(slot_size, slot_size, rngs=rngs)
        self.mlp = MLP(slot_size, mlp_hidden_size, slot_size, rngs=rngs)
        # learned Gaussian of the initial slots, glorot-uniform over [1, 1, D] as in Keras
        self.slots_mu = nnx.Param(glorot_uniform(rngs.params(), (1, 1, slot_size)))
        self.slots_log_sigma = nnx.Param(glorot_uniform(rngs.params(), (1, 1, slot_size)))
        self.noise = nnx.Rngs(noise=rngs.params())

    def __call__(
        self,
        inputs: jax.Array,
        *,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        initial_slots: jax.Array | None = None,
        key: jax.Array | None = None,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        num_slots, num_iterations = self._check(inputs, num_slots, num_iterations, initial_slots)
        if initial_slots is None:  # slots ~ N(mu, diag(sigma)): [B, K, D]
            initial_slots = self.sample_initial_slots(inputs.shape[0], num_slots, key)

        # Algorithm 1 is `iterate`, traced once per platform form of the kernels: on CPU its attention step
        # reads the inputs instead of k and v, which are then never computed (`kernels.per_platform`)
        slots, attention = kernels.per_platform(
            functools.partial(self.iterate, num_iterations=num_iterations), inputs, initial_slots
        )
        if not return_attention:
            return slots
        return slots, {"attention": attention, "initial_slots": initial_slots}

    def iterate(self, inputs: jax.Array, slots: jax.Array, num_iterations: int) -> tuple[jax.Array, jax.Array]:
        """Algorithm 1: inputs [B, N, C], initial slots [B, K, D] -> slots [B, K, D], attention [B, T, K, N].

        B: batch, N: inputs of size C (input_size), K: slots of size D (slot_size), T: iterations.
        """
        inputs = self.norm_inputs(inputs)  # [B, N, C]
        k = self.project_k(inputs)  # keys [B, N, D]
        v = self.project_v(inputs)  # values [B, N, D]
        attention_maps = []
        for _ in range(num_iterations):
            slots_prev = slots
            q = self.project_q(self.norm_slots(slots)) * self.slot_size**-0.5  # queries / sqrt(D): [B, K, D]
            # attend(q, k, v) below, or its CPU form, which reads the inputs and kernels of k and v instead
            attention, updates = kernels.attention(
                self.attend, q, k, v, self.attention_epsilon, inputs=inputs, projections=self._key_value_kernels()
            )  # [B, K, N], [B, K, D]
            slots = self.gru(updates, slots_prev)  # [B, K, D]
            slots = slots + self.mlp(self.norm_mlp(slots))
            attention_maps.append(attention)
        return slots, jnp.stack(attention_maps, axis=1)

    @staticmethod
    def attend(q: jax.Array, k: jax.Array, v: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
        """Algorithm 1's attention step: the slots compete for the inputs, then read the values of what they won.

        q [B, K, D] (scaled by 1 / sqrt(D)), k and v [B, N, D]. Returns the attention [B, K, N] (softmax over the
        K slots, float32) and the updates [B, K, D] (per slot, the mean of v weighted by attention + epsilon).
        """
        logits = jnp.einsum("bnd,bkd->bkn", k, q)  # [B, K, N]
        attention = jax.nn.softmax(logits.astype(jnp.float32), axis=1)  # over the slots: they compete for inputs
        weights = attention + epsilon
        weights = weights / jnp.sum(weights, axis=2, keepdims=True)  # [B, K, N], a weighted mean over the inputs
        updates = jnp.einsum("bkn,bnd->bkd", weights.astype(v.dtype), v)  # [B, K, D]
        return attention, updates

    def sample_initial_slots(self, batch_size: int, num_slots: int, key: jax.Array | None = None) -> jax.Array:
        """mu + exp(log_sigma) * eps, eps ~ N(0, 1): [B, K, slot_size]."""
        key = self.noise.noise() if key is None else key
        noise = jax.random.normal(key, (batch_size, num_slots, self.slot_size), self.slots_mu.dtype)
        return self.slots_mu[...] + jnp.exp(self.slots_log_sigma[...]) * noise

    def _key_value_kernels(self) -> tuple[jax.Array, jax.Array]:
        """project_k's and project_v's kernels [C, D] in the layers' compute dtype: k = inputs @ kernel."""
        return tuple(
            layer.promote_dtype((layer.kernel[...],), dtype=layer.dtype)[0]
            for layer in (self.project_k, self.project_v)
        )

    def _check(self, inputs, num_slots, num_iterations, initial_slots) -> list[int]:
        """Refuses bad arguments with a message naming the fix; returns (num_slots, num_iterations)."""
        num_slots, num_iterations = _positive_integers(
            num_slots=self.num_slots if num_slots is None else num_slots,
            num_iterations=self.num_iterations if num_iterations is None else num_iterations,
        )
        _check_features(inputs, self.input_size, "inputs", "[batch, num_inputs, input_size]")
        if initial_slots is not None:  # its number of slots wins over num_slots
            _check_features(initial_slots, self.slot_size, "initial_slots", "[batch, num_slots, slot_size]")
            if initial_slots.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"initial_slots has batch size {initial_slots.shape[0]} but inputs have "
                    f"{inputs.shape[0]}; pass one set of initial slots per input."
                )
        return [num_slots, num_iterations]


def _positive_integers(**values: int) -> list[int]:
    """The values as Python ints; refuses anything but integers >= 1 (Python or NumPy integers, not bools)."""
    numbers = []
    for name, value in values.items():
        try:
            number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
        except TypeError:
            number = None
        if number is None or number < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        numbers.append(number)
    return numbers


def _check_features(array: jax.Array, size: int, name: str, layout: str) -> None:
    """Refuses arrays that are not floating point of rank 3 with `size` features."""
    if array.ndim != 3 or array.shape[-1] != size:
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {layout} with {size} features.")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {array.dtype}; expected a floating dtype (cast with .astype(jnp.float32)).")
