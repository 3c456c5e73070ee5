"""Layers of the Slot Attention models, in Flax NNX, initialised as the official TensorFlow/Keras code.

Every layer has a twin of the same name and parameters in `torch_reference/nn/layers.py` (up to the layouts
`slotjax.convert` translates): glorot-uniform kernels, zero biases, an orthogonal recurrent kernel in the GRU.
The heavy operations go through `slotjax.kernels`, which picks their form per platform.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from slotjax import kernels

# Keras' LayerNormalization default, used by the official code; Flax (1e-6) and torch (1e-5) default to other
# values, so both sides set it (docs/parity.md).
LAYER_NORM_EPSILON = 1e-3

glorot_uniform = nnx.initializers.xavier_uniform()


class Dense(nnx.Linear):
    """`nnx.Linear` on its inputs flattened to [rows, in_features]: the same function, and on XLA's CPU backend
    the kernel gradient of a 2-D product is much faster than that of a batched one."""

    def __call__(self, inputs: jax.Array) -> jax.Array:  # [..., in_features] -> [..., out_features]
        leading = inputs.shape[:-1]
        outputs = super().__call__(inputs.reshape(math.prod(leading), inputs.shape[-1]))
        return outputs.reshape(*leading, outputs.shape[-1])


def dense(in_features: int, out_features: int, rngs: nnx.Rngs, use_bias: bool = True, kernel_init=glorot_uniform):
    """A Keras-initialised Dense layer (glorot-uniform kernel unless given, zero bias)."""
    return Dense(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters, same function); float32 inputs go through `kernels.layer_norm`."""

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., num_features]
        if x.dtype != jnp.float32:
            return super().__call__(x)
        return kernels.layer_norm(x, self.scale[...], self.bias[...], self.epsilon)


def layer_norm(num_features: int, epsilon: float, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(num_features, epsilon=epsilon, rngs=rngs)


class MLP(nnx.Module):
    """Dense(hidden, relu) -> Dense(out)."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int, *, rngs: nnx.Rngs):
        self.hidden = dense(in_features, hidden_size, rngs)
        self.output = dense(hidden_size, out_features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(jax.nn.relu(self.hidden(x)))


class GRUCell(nnx.Module):
    """GRU cell with one bias on each side, gates ordered [reset, update, new].

    This is Keras' `GRUCell(reset_after=True)` (the official code) and `torch.nn.GRUCell`, parameter for
    parameter. Flax's own GRUCell folds the reset/update biases of both sides into one, which would make a
    torch -> Flax conversion lossy; this one converts exactly both ways (docs/parity.md).
    """

    def __init__(self, in_features: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.hidden_size = hidden_size
        self.input_dense = dense(in_features, 3 * hidden_size, rngs)
        self.hidden_dense = dense(hidden_size, 3 * hidden_size, rngs, kernel_init=nnx.initializers.orthogonal())

    def __call__(self, inputs: jax.Array, state: jax.Array) -> jax.Array:
        input_reset, input_update, input_new = jnp.split(self.input_dense(inputs), 3, axis=-1)
        hidden_reset, hidden_update, hidden_new = jnp.split(self.hidden_dense(state), 3, axis=-1)
        reset = jax.nn.sigmoid(input_reset + hidden_reset)
        update = jax.nn.sigmoid(input_update + hidden_update)
        new = jnp.tanh(input_new + reset * hidden_new)
        return (1.0 - update) * new + update * state


class Conv(nnx.Module):
    """2-D convolution, "SAME" padding as in TF/Flax. Kernel [k, k, in, out] (HWIO)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.stride = stride
        self.dtype = None  # compute dtype (None: the parameters'); see set_compute_dtype
        self.kernel = nnx.Param(glorot_uniform(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, in] -> [B, H / stride, W / stride, out]
        images, kernel, bias = nnx.nn.dtypes.promote_dtype((images, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return kernels.conv(images, kernel, self.stride) + bias


class ConvTranspose(nnx.Module):
    """Transposed convolution, "SAME" padding as in TF (output = stride * input).

    The kernel is stored as TF's Conv2DTranspose and Flax's ConvTranspose(transpose_kernel=True) store it,
    [k, k, out, in], so weights convert as usual.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.stride = stride
        self.dtype = None  # compute dtype (None: the parameters'); see set_compute_dtype
        # Keras counts the fans of [k, k, out, in] as fan_in = k*k*out, fan_out = k*k*in.
        self.kernel = nnx.Param(glorot_uniform(rngs.params(), (kernel_size, kernel_size, out_features, in_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, in] -> [B, s * H, s * W, out]
        images, kernel, bias = nnx.nn.dtypes.promote_dtype((images, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return kernels.conv_transpose(images, kernel, self.stride) + bias


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, or in its own dtype where that is wider: what mixed precision keeps in float32 (softmaxes,
    the outputs) stays float64 in a float64 model (`jax_enable_x64`)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """Mixed precision: Dense and conv layers compute in `dtype` (e.g. bfloat16), in place.

    Parameters stay float32; LayerNorms, softmaxes (attention, masks) and the GRU's state update still compute
    in float32.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (nnx.Linear, Conv, ConvTranspose)):
            module.dtype = dtype
        elif isinstance(module, nnx.LayerNorm):
            module.dtype = jnp.float32
    return model
