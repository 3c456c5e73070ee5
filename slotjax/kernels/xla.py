"""The reference forms of the kernels: plain XLA operations, the path on GPUs and TPUs.

Each CPU form in `slotjax.kernels.cpu` is tested equal to its counterpart here (the attention step's is
`slotjax.nn.slot_attention.SlotAttention.attend`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """TF/Flax "SAME" padding (before, after) of a conv whose input size is a multiple of `stride`."""
    total = max(kernel_size - stride, 0)
    return total // 2, total - total // 2


def conv(images: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """NHWC images, HWIO kernel: [B, H, W, in] -> [B, H', W', out]."""
    return jax.lax.conv_general_dilated(images, kernel, (stride, stride), padding, dimension_numbers=DIMENSIONS)


def conv_transpose(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """TF's "SAME" Conv2DTranspose, kernel [k, k, out, in]: [B, H, W, in] -> [B, sH, sW, out]."""
    return jax.lax.conv_transpose(
        images, kernel, (stride, stride), "SAME", dimension_numbers=DIMENSIONS, transpose_kernel=True
    )


def layer_norm(rows: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm of [N, F] rows over the features (two-pass variance)."""
    centered = rows - jnp.mean(rows, axis=-1, keepdims=True)
    variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(variance + epsilon) * scale + bias
