"""Invariant Slot Attention, translation and scale (Biza et al., ICML 2023) in Flax NNX; docs/variants.md.

Each slot has a position and a scale in the image as well as its features. The keys and values a slot sees are
those of the inputs plus an encoding of the inputs' positions relative to the slot's (shifted to its position,
divided by its scale), so what a slot binds does not depend on where the object is or how large it is; after
each round the slot's position and scale are re-estimated from its attention (mean and spread of the positions).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slotjax.nn.layers import LAYER_NORM_EPSILON, MLP, GRUCell, dense, layer_norm
from slotjax.nn.slot_attention import _check_features, _positive_integers

SCALE_RANGE = (1e-3, 2.0)  # slot scales are clipped to this range (never 0, never much larger than the image)


def position_grid(size: tuple[int, int]) -> jax.Array:
    """[H * W, 2] positions (y, x) of an H x W grid's cells, each linspace(-1, 1), row-major."""
    y, x = jnp.meshgrid(*(jnp.linspace(-1.0, 1.0, length) for length in size), indexing="ij")
    return jnp.stack([y, x], axis=-1).reshape(-1, 2)


def relative_grid(grid: jax.Array, positions: jax.Array, scales: jax.Array, scales_factor: float) -> jax.Array:
    """grid [N, 2] seen from each slot: (grid - position) / scales_factor / scale, [B, K, N, 2]."""
    return (grid - positions[:, :, None]) / scales_factor / scales[:, :, None]


class InvariantSlotAttention(nnx.Module):
    """Slot Attention whose slots carry a position and a scale (ISA, translation and scale).

    >>> isa = InvariantSlotAttention(num_slots=7, slot_size=64, grid_size=(16, 16), rngs=nnx.Rngs(0))
    >>> slots, aux = isa(inputs, key=jax.random.key(1), return_attention=True)  # inputs [B, 256, 64]

    The inputs [B, N, C] are the cells of a `grid_size` grid, row-major. Initial slots: learned features
    `slots_init` [1, K, D] (normal, sd 1), positions ~ U[-1, 1]^2 and scales ~ N(0.1, 0.1^2) per axis, drawn with
    `key` (default: the module's own `noise` stream) unless `initial_positions` / `initial_scales` [B, K, 2] are
    given, then clipped to [-1, 1] and SCALE_RANGE. `num_iterations` rounds update the slots, and one more only
    their positions and scales. aux: attention [B, T + 1, K, N] (softmax over the slots, per round),
    positions and scales [B, K, 2] (y, x), initial_positions, initial_scales.
    """

    def __init__(
        self,
        num_slots: int,
        slot_size: int,
        grid_size: tuple[int, int],
        *,
        input_size: int | None = None,
        num_iterations: int = 3,
        mlp_hidden_size: int = 128,
        grid_hidden_size: int = 128,
        scales_factor: float = 5.0,
        attention_epsilon: float = 1e-8,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        rngs: nnx.Rngs,
    ):
        num_slots, num_iterations, slot_size = _positive_integers(
            num_slots=num_slots, num_iterations=num_iterations, slot_size=slot_size
        )
        self.num_slots, self.slot_size, self.num_iterations = num_slots, slot_size, num_iterations
        self.grid_size = tuple(grid_size)
        self.input_size = input_size = slot_size if input_size is None else input_size
        self.scales_factor, self.attention_epsilon = scales_factor, attention_epsilon
        self.norm_inputs = layer_norm(input_size, layer_norm_epsilon, rngs)
        self.norm_slots = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.norm_mlp = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.project_q = dense(slot_size, slot_size, rngs, use_bias=False)
        self.project_k = dense(input_size, slot_size, rngs, use_bias=False)
        self.project_v = dense(input_size, slot_size, rngs, use_bias=False)
        self.project_grid = dense(2, slot_size, rngs)  # W_g: relative positions -> features
        self.norm_grid = layer_norm(slot_size, layer_norm_epsilon, rngs)  # g = MLP(LayerNorm(.))
        self.grid_mlp = MLP(slot_size, grid_hidden_size, slot_size, rngs=rngs)
        self.gru = GRUCell(slot_size, slot_size, rngs=rngs)
        self.mlp = MLP(slot_size, mlp_hidden_size, slot_size, rngs=rngs)
        self.slots_init = nnx.Param(jax.random.normal(rngs.params(), (1, num_slots, slot_size)))
        self.noise = nnx.Rngs(noise=rngs.params())

    def __call__(
        self,
        inputs: jax.Array,
        *,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        initial_positions: jax.Array | None = None,
        initial_scales: jax.Array | None = None,
        key: jax.Array | None = None,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        num_iterations = self._check(inputs, num_slots, num_iterations)
        batch_shape = (inputs.shape[0], self.num_slots, 2)
        if initial_positions is None or initial_scales is None:
            key = self.noise.noise() if key is None else key
            position_key, scale_key = jax.random.split(key)
            if initial_positions is None:
                initial_positions = jax.random.uniform(position_key, batch_shape, minval=-1.0, maxval=1.0)
            if initial_scales is None:
                initial_scales = 0.1 + 0.1 * jax.random.normal(scale_key, batch_shape)
        positions = jnp.clip(initial_positions, -1.0, 1.0)
        scales = jnp.clip(initial_scales, *SCALE_RANGE)
        slots = jnp.broadcast_to(self.slots_init[...], (inputs.shape[0], *self.slots_init.shape[1:]))
        slots, positions, scales, attention = self.iterate(inputs, slots, positions, scales, num_iterations)
        if not return_attention:
            return slots
        aux = {"attention": attention, "positions": positions, "scales": scales}
        return slots, {**aux, "initial_positions": initial_positions, "initial_scales": initial_scales}

    def iterate(self, inputs, slots, positions, scales, num_iterations: int):
        """inputs [B, N, C]; slots [B, K, D]; positions, scales [B, K, 2] -> the same after T rounds that update
        the slots and one more that updates positions and scales only; attention [B, T + 1, K, N]."""
        grid = position_grid(self.grid_size)  # [N, 2]
        inputs = self.norm_inputs(inputs)
        k = self.project_k(inputs)[:, None]  # [B, 1, N, D]
        v = self.project_v(inputs)[:, None]
        attention_maps = []
        for round_index in range(num_iterations + 1):
            embedded = self.project_grid(relative_grid(grid, positions, scales, self.scales_factor))  # [B, K, N, D]
            k_relative = self.grid_mlp(self.norm_grid(k + embedded))  # each slot's own keys: [B, K, N, D]
            v_relative = self.grid_mlp(self.norm_grid(v + embedded))
            q = self.project_q(self.norm_slots(slots)) * self.slot_size**-0.5  # [B, K, D]
            attention = jax.nn.softmax(jnp.einsum("bkd,bknd->bkn", q, k_relative), axis=1)  # over the slots
            weights = attention / (jnp.sum(attention, axis=2, keepdims=True) + self.attention_epsilon)
            updates = jnp.einsum("bkn,bknd->bkd", weights, v_relative)
            positions = weights @ grid  # [B, K, 2], the mean position of what each slot attends to
            spread = jnp.square(grid - positions[:, :, None])  # [B, K, N, 2]
            scales = jnp.sqrt(jnp.einsum("bkn,bknc->bkc", weights + self.attention_epsilon, spread))
            scales = jnp.clip(scales, *SCALE_RANGE)
            attention_maps.append(attention)
            if round_index < num_iterations:
                slots = self.gru(updates, slots)
                slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, positions, scales, jnp.stack(attention_maps, axis=1)

    def _check(self, inputs, num_slots, num_iterations) -> int:
        """Refuses bad arguments with a message naming the fix; returns num_iterations."""
        if num_slots is not None and num_slots != self.num_slots:
            raise ValueError(
                f"num_slots={num_slots!r} but invariant Slot Attention learns {self.num_slots} initial slots: "
                "leave num_slots out."
            )
        (num_iterations,) = _positive_integers(
            num_iterations=self.num_iterations if num_iterations is None else num_iterations
        )
        _check_features(inputs, self.input_size, "inputs", "[batch, num_inputs, input_size]")
        num_cells = self.grid_size[0] * self.grid_size[1]
        if inputs.shape[1] != num_cells:
            raise ValueError(
                f"inputs hold {inputs.shape[1]} cells but this module's grid is {self.grid_size[0]}x"
                f"{self.grid_size[1]} ({num_cells}); build it with the grid_size of the feature map."
            )
        return num_iterations


class RelativePositionEmbed(nnx.Module):
    """The decoder's position embedding of invariant slots: features + Dense(relative grid), each slot
    broadcast over the grid as it sees it (shifted to its position, divided by its scale)."""

    def __init__(self, features: int, resolution: tuple[int, int], scales_factor: float = 5.0, *, rngs: nnx.Rngs):
        self.resolution, self.scales_factor = tuple(resolution), scales_factor
        self.dense = dense(2, features, rngs)

    def __call__(self, features: jax.Array, positions: jax.Array, scales: jax.Array) -> jax.Array:
        """features [B * K, H, W, C]; positions, scales [B, K, 2]."""
        grid = relative_grid(position_grid(self.resolution), positions, scales, self.scales_factor)  # [B, K, HW, 2]
        return features + self.dense(grid.reshape(features.shape[:-1] + (2,)))
