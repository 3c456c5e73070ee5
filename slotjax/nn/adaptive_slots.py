"""Adaptive number of slots (AdaSlot; Fan et al., CVPR 2024) for the slot autoencoder; docs/variants.md.

Each slot decides to stay or be dropped: logits of (drop, keep) from a small MLP, a hard Gumbel-softmax sample
in training (straight-through gradient) and the more likely choice in evaluation. Dropped slots lose their share
of the decoder's alpha masks, which are renormalised over the kept slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slotjax.nn.layers import LAYER_NORM_EPSILON, MLP, at_least_float32, layer_norm

MASK_EPSILON = 1e-5  # AdaSlot's: keeps the renormalised masks finite where every slot is dropped


class KeepPredictor(nnx.Module):
    """LayerNorm -> MLP (D -> 4D, relu -> 2): each slot's logits of (drop, keep), and the decision from them."""

    def __init__(self, slot_size: int, *, rngs: nnx.Rngs):
        self.norm = layer_norm(slot_size, LAYER_NORM_EPSILON, rngs)
        self.mlp = MLP(slot_size, 4 * slot_size, 2, rngs=rngs)

    def __call__(self, slots: jax.Array, gumbel_noise: jax.Array | None = None) -> jax.Array:
        """slots [B, K, D] -> keep [B, K], 1 (kept) or 0 (dropped).

        With Gumbel noise [B, K, 2] (training): the hard Gumbel-softmax sample at temperature 1, argmax of
        logits + noise, whose gradient is that of the soft sample softmax(logits + noise) (straight-through;
        written so that the value is exactly 0 or 1). Without (evaluation): the more likely choice, no gradient.
        """
        logits = at_least_float32(self.mlp(self.norm(slots)))  # [B, K, 2]: (drop, keep)
        if gumbel_noise is None:
            return (logits[..., 1] > logits[..., 0]).astype(jnp.float32)
        perturbed = logits + gumbel_noise
        soft = jax.nn.softmax(perturbed, axis=-1)[..., 1]
        hard = (perturbed[..., 1] > perturbed[..., 0]).astype(jnp.float32)
        return hard + (soft - jax.lax.stop_gradient(soft))


def drop_slots(masks: jax.Array, keep: jax.Array) -> jax.Array:
    """Alpha masks [B, K, H, W, 1] (softmax over the K slots) of the kept slots (keep [B, K]) renormalised over
    them: keep_k * alpha_k / (sum_j keep_j * alpha_j + 1e-5). A dropped slot's mask is 0 everywhere."""
    masks = keep[:, :, None, None, None] * masks
    return masks / (jnp.sum(masks, axis=1, keepdims=True) + MASK_EPSILON)
