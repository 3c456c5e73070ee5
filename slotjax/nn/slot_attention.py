"""Slot Attention (Locatello et al., NeurIPS 2020, Algorithm 1) in Flax NNX; docs/architecture.md.

Constructor options select published variants (docs/variants.md); their defaults give Algorithm 1 exactly.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slotjax import kernels
from slotjax.nn.layers import (
    LAYER_NORM_EPSILON,
    MLP,
    GRUCell,
    at_least_float32,
    dense,
    glorot_uniform,
    layer_norm,
)

# How the attention step turns each slot's attention over the N inputs into weights of the values: Algorithm 1's
# weighted mean, or a weighted sum divided by N (Krimmel et al. 2024); docs/variants.md
ATTENTION_NORMALISATIONS = ("mean", "scaled_sum")


class SlotAttention(nnx.Module):
    """Maps N input features to K slots by iterated attention in which the slots compete for the inputs.

    >>> slot_attention = SlotAttention(num_slots=7, slot_size=64, input_size=64, rngs=nnx.Rngs(0))
    >>> slots = slot_attention(inputs, key=jax.random.key(1))  # [B, N, 64] -> [B, 7, 64]

    Call options: `num_slots` and `num_iterations` override the constructor's (e.g. more slots at test time),
    `initial_slots` [B, K, slot_size] replaces the sampled ones, `key` draws the initial noise (default: the
    module's own `noise` stream), `query_noise` scales the training noise on learned queries, and
    `return_attention=True` returns `(slots, aux)` with aux["attention"] [B, T, K, N] (softmax over the slots,
    per iteration; T + 1 maps with implicit gradients; the mean over the heads with several) and
    aux["initial_slots"] [B, K, slot_size].

    Variants (docs/variants.md), each off by default: `implicit_gradients` (Chang et al. 2022: the gradient
    runs through one extra, last iteration only), `learned_queries` (BO-QSA, Jia et al. 2023: learned initial
    slots, straight-through gradient to them), `num_heads` (multi-head attention step) and
    `attention_normalisation` ("mean", Algorithm 1's weighted mean, or "scaled_sum", Krimmel et al. 2024).
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
        implicit_gradients: bool = False,
        learned_queries: bool = False,
        num_heads: int = 1,
        attention_normalisation: str = "mean",
        rngs: nnx.Rngs,
    ):
        num_slots, num_iterations, slot_size, num_heads = _positive_integers(
            num_slots=num_slots, num_iterations=num_iterations, slot_size=slot_size, num_heads=num_heads
        )
        check_variants(slot_size, num_heads, attention_normalisation)
        self.num_slots, self.slot_size, self.num_iterations = num_slots, slot_size, num_iterations
        self.implicit_gradients, self.learned_queries = bool(implicit_gradients), bool(learned_queries)
        self.num_heads, self.head_size = num_heads, slot_size // num_heads
        self.attention_normalisation = attention_normalisation
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
        if learned_queries:  # one learned initial slot each, glorot-uniform over [1, K, D] (i.e. over [K, D])
            self.slots_queries = nnx.Param(glorot_uniform(rngs.params(), (1, num_slots, slot_size)))
        else:  # learned Gaussian of the initial slots, glorot-uniform over [1, 1, D] as in Keras
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
        query_noise: float | jax.Array = 0.0,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        num_slots, num_iterations = self._check(inputs, num_slots, num_iterations, initial_slots, query_noise)
        if initial_slots is None:  # slots ~ N(mu, diag(sigma)), or the learned queries: [B, K, D]
            initial_slots = self.sample_initial_slots(inputs.shape[0], num_slots, key, query_noise)
        if self.implicit_gradients:  # T iterations towards the fixed point, then the one that is differentiated
            num_iterations += 1

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

        B: batch, N: inputs of size C (input_size), K: slots of size D (slot_size), T: iterations; H heads of
        D / H features (one in Algorithm 1).
        """
        initial_slots = slots
        inputs = self.norm_inputs(inputs)  # [B, N, C]
        k = self.project_k(inputs)  # keys [B, N, D]
        v = self.project_v(inputs)  # values [B, N, D]
        attention_maps = []
        for iteration in range(num_iterations):
            if iteration == num_iterations - 1:  # the slots as they are, but for the variants' gradients
                slots = self.last_iteration_slots(slots, initial_slots)
            slots_prev = slots
            q = self.project_q(self.norm_slots(slots)) * self.head_size**-0.5  # queries / sqrt(D / H): [B, K, D]
            attention, updates = self.attention_step(q, k, v, inputs)  # [B, K, N], [B, K, D]
            slots = self.gru(updates, slots_prev)  # [B, K, D]
            slots = slots + self.mlp(self.norm_mlp(slots))
            attention_maps.append(attention)
        return slots, jnp.stack(attention_maps, axis=1)

    def attention_step(
        self, q: jax.Array, k: jax.Array, v: jax.Array, inputs: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """`attend(q, k, v)` with one head, or its CPU form, which reads the inputs and kernels of k and v instead;
        with several heads, `attend_heads` as written on every platform (the CPU form cannot split the heads)."""
        attend = functools.partial(self.attend, normalisation=self.attention_normalisation)
        if self.num_heads > 1:
            return attend_heads(attend, q, k, v, self.attention_epsilon, self.num_heads)
        return kernels.attention(
            attend, q, k, v, self.attention_epsilon, inputs=inputs, projections=self._key_value_kernels()
        )

    @staticmethod
    def attend(
        q: jax.Array, k: jax.Array, v: jax.Array, epsilon: float, normalisation: str = "mean"
    ) -> tuple[jax.Array, jax.Array]:
        """Algorithm 1's attention step: the slots compete for the inputs, then read the values of what they won.

        q [B, K, D] (scaled by 1 / sqrt(D)), k and v [B, N, D]. Returns the attention [B, K, N] (softmax over the
        K slots, float32) and the updates [B, K, D]: per slot, the mean of v weighted by attention + epsilon, or
        with normalisation "scaled_sum" the sum of v so weighted, divided by N.
        """
        logits = jnp.einsum("bnd,bkd->bkn", k, q)  # [B, K, N]
        attention = jax.nn.softmax(at_least_float32(logits), axis=1)  # over the slots: they compete for inputs
        weights = attention + epsilon
        if normalisation == "mean":
            weights = weights / jnp.sum(weights, axis=2, keepdims=True)  # [B, K, N], a weighted mean over the inputs
        else:  # "scaled_sum": a weighted sum over the inputs, divided by their number
            weights = weights / weights.shape[2]
        updates = jnp.einsum("bkn,bnd->bkd", weights.astype(v.dtype), v)  # [B, K, D]
        return attention, updates

    def last_iteration_slots(self, slots: jax.Array, initial_slots: jax.Array) -> jax.Array:
        """The slots [B, K, D] entering the last iteration, equal in value to `slots` in every variant.

        Algorithm 1: `slots`. Implicit gradients: no gradient to the iterations before. Learned queries (BO-QSA):
        none either, but the gradient of the last iteration's input goes straight to the initial slots:
        sg(S) + (S0 - sg(S0)), with the bracket first so that the value is S exactly.
        """
        if self.learned_queries:
            return jax.lax.stop_gradient(slots) + (initial_slots - jax.lax.stop_gradient(initial_slots))
        if self.implicit_gradients:
            return jax.lax.stop_gradient(slots)
        return slots

    def sample_initial_slots(
        self, batch_size: int, num_slots: int, key: jax.Array | None = None, query_noise: float | jax.Array = 0.0
    ) -> jax.Array:
        """mu + exp(log_sigma) * eps; with learned queries Q, Q + query_noise * eps * sg(Q) (Q itself at
        query_noise 0, and then no noise is drawn). eps ~ N(0, 1): [B, K, slot_size]."""
        if self.learned_queries:
            queries = jnp.broadcast_to(self.slots_queries[...], (batch_size, *self.slots_queries.shape[1:]))
            if _is_zero(query_noise):
                return queries
            key = self.noise.noise() if key is None else key
            noise = jax.random.normal(key, queries.shape, queries.dtype)
            return queries + query_noise * noise * jax.lax.stop_gradient(queries)
        key = self.noise.noise() if key is None else key
        noise = jax.random.normal(key, (batch_size, num_slots, self.slot_size), self.slots_mu.dtype)
        return self.slots_mu[...] + jnp.exp(self.slots_log_sigma[...]) * noise

    def _key_value_kernels(self) -> tuple[jax.Array, jax.Array]:
        """project_k's and project_v's kernels [C, D] in the layers' compute dtype: k = inputs @ kernel."""
        return tuple(
            layer.promote_dtype((layer.kernel[...],), dtype=layer.dtype)[0]
            for layer in (self.project_k, self.project_v)
        )

    def _check(self, inputs, num_slots, num_iterations, initial_slots, query_noise) -> list[int]:
        """Refuses bad arguments with a message naming the fix; returns (num_slots, num_iterations)."""
        if self.learned_queries and num_slots is not None and num_slots != self.num_slots:
            raise ValueError(
                f"num_slots={num_slots!r} but this module learns {self.num_slots} queries, one per slot "
                "(learned_queries=True fixes the number of slots): leave num_slots out."
            )
        if not self.learned_queries and not _is_zero(query_noise):
            raise ValueError(
                "query_noise perturbs learned queries, and this module samples its initial slots from a Gaussian: "
                "build it with learned_queries=True or leave query_noise out."
            )
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


def attend_heads(
    attend: Callable, q: jax.Array, k: jax.Array, v: jax.Array, epsilon: float, num_heads: int
) -> tuple[jax.Array, jax.Array]:
    """`attend` on each of H heads: q [B, K, D] (each head's part scaled by 1 / sqrt(D / H)), k and v [B, N, D]
    split along D into H parts. The softmax runs over the slots per head. Returns the attention [B, K, N], its
    mean over the heads, and the updates [B, K, D], the heads' updates concatenated."""
    batch, num_slots, size = q.shape

    def split(array: jax.Array) -> jax.Array:  # [B, L, D] -> [B * H, L, D / H]
        parts = array.reshape(batch, array.shape[1], num_heads, size // num_heads).transpose(0, 2, 1, 3)
        return parts.reshape(batch * num_heads, array.shape[1], size // num_heads)

    attention, updates = attend(split(q), split(k), split(v), epsilon)  # [B * H, K, N], [B * H, K, D / H]
    attention = attention.reshape(batch, num_heads, num_slots, -1).mean(axis=1)
    updates = updates.reshape(batch, num_heads, num_slots, -1).transpose(0, 2, 1, 3).reshape(q.shape)
    return attention, updates


def query_noise_schedule(step: int | jax.Array, anneal_steps: int) -> jax.Array:
    """BO-QSA's `query_noise` at training step `step`: a cosine from 1 at step 0 to 0 at `anneal_steps`, 0 from
    there on (and at every step with anneal_steps 0). Float32 scalar; `step` may be traced."""
    if (
        isinstance(anneal_steps, (bool, np.bool_))
        or not isinstance(anneal_steps, (int, np.integer))
        or anneal_steps < 0
    ):
        raise ValueError(f"anneal_steps must be an integer >= 0, got {anneal_steps!r}.")
    step = jnp.asarray(step, jnp.float32)
    progress = step / max(anneal_steps, 1)
    return jnp.where(step < anneal_steps, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)), 0.0).astype(jnp.float32)


def check_variants(slot_size: int, num_heads: int, attention_normalisation: str) -> None:
    """Refuses a number of heads that does not divide the slot size, and unknown attention normalisations."""
    if slot_size % num_heads:
        raise ValueError(
            f"slot_size {slot_size} does not split into num_heads={num_heads} heads of equal size; "
            "choose num_heads dividing slot_size."
        )
    if attention_normalisation not in ATTENTION_NORMALISATIONS:
        raise ValueError(
            f"attention_normalisation={attention_normalisation!r} is unknown; use one of "
            f"{', '.join(map(repr, ATTENTION_NORMALISATIONS))}."
        )


def _is_zero(value: float | jax.Array) -> bool:
    """Whether `value` is known to be 0 while tracing (a traced value is not)."""
    return not isinstance(value, jax.core.Tracer) and float(value) == 0.0


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
