"""Building blocks of the Slot Attention models, in Flax NNX.

Every module here has a twin of the same name in `torch_reference/modules.py`
with parameters of the same names (up to the layout conventions handled by
`slotjax.convert`). Initialisers follow the official TensorFlow/Keras code:
glorot-uniform kernels, zero biases, orthogonal recurrent kernel in the GRU.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Keras' LayerNormalization default, used by the official code. Flax (1e-6) and
# torch (1e-5) default to other values; one value is used on both sides.
LAYER_NORM_EPSILON = 1e-3
ATTENTION_EPSILON = 1e-8

glorot_uniform = nnx.initializers.xavier_uniform()


class Dense(nnx.Linear):
    """`nnx.Linear` applied to its inputs flattened to [rows, in_features] and reshaped back.

    The same function; but XLA's CPU backend computes the kernel gradient of a 2-D matmul about 3x faster
    than that of a batched one (whose transpose contracts over two axes).
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:  # [..., in_features] -> [..., out_features]
        leading = inputs.shape[:-1]
        outputs = super().__call__(inputs.reshape(math.prod(leading), inputs.shape[-1]))
        return outputs.reshape(*leading, outputs.shape[-1])

    def transposed(self, outputs: jax.Array) -> jax.Array:  # [..., out_features] -> [..., in_features]
        """`outputs` times the transposed kernel: <layer(x), y> = <x, layer.transposed(y)> for a layer without bias."""
        if self.use_bias:
            raise ValueError("Dense.transposed is the adjoint of a linear map; this layer has a bias.")
        outputs, kernel = self.promote_dtype((outputs, self.kernel[...]), dtype=self.dtype)
        return jnp.matmul(outputs, kernel.T, precision=self.precision)


def dense(in_features: int, out_features: int, rngs: nnx.Rngs, use_bias: bool = True,
          kernel_init=glorot_uniform) -> Dense:
    """A Keras-initialised Dense layer (glorot-uniform kernel unless given, zero bias)."""
    return Dense(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters, same function); on CPU, float32 inputs go to `_cpu_layer_norm`.

    XLA's CPU backend fuses a row reduction into every consumer that broadcasts it back over the
    features and so recomputes it per element; as matrix-vector products the row statistics are
    computed once (forward and backward of the Slot Attention probe's 65,536 input rows: 50 -> 37 ms).
    """

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:  # [..., num_features]
        if args or kwargs or jax.default_backend() != "cpu" or x.dtype != jnp.float32:
            return super().__call__(x, *args, **kwargs)
        features = x.shape[-1]
        rows = x.reshape(-1, features)
        return _cpu_layer_norm(rows, self.scale[...], self.bias[...], self.epsilon).reshape(x.shape)


def layer_norm(num_features: int, epsilon: float, rngs: nnx.Rngs) -> LayerNorm:
    return LayerNorm(num_features, epsilon=epsilon, rngs=rngs)


def _row_mean(rows: jax.Array) -> jax.Array:  # [N, F] -> [N, 1], a matrix-vector product
    return rows @ jnp.full((rows.shape[-1], 1), 1.0 / rows.shape[-1], rows.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_layer_norm(rows, scale, bias, epsilon):
    """LayerNorm of [N, F] rows with its backward written out (two-pass variance; Flax uses E[x^2] - E[x]^2)."""
    return _cpu_layer_norm_forward(rows, scale, bias, epsilon)[0]


def _cpu_layer_norm_forward(rows, scale, bias, epsilon):
    centered = rows - _row_mean(rows)
    inverse_std = jax.lax.rsqrt(_row_mean(centered * centered) + epsilon)
    normalized = centered * inverse_std
    return normalized * scale + bias, (normalized, inverse_std, scale)


def _cpu_layer_norm_backward(epsilon, residuals, output_grad):
    normalized, inverse_std, scale = residuals
    grad = output_grad * scale
    rows_grad = inverse_std * (grad - _row_mean(grad) - normalized * _row_mean(grad * normalized))
    return rows_grad, jnp.sum(output_grad * normalized, axis=0), jnp.sum(output_grad, axis=0)


_cpu_layer_norm.defvjp(_cpu_layer_norm_forward, _cpu_layer_norm_backward)


class MLP(nnx.Module):
    """Dense(hidden, relu) -> Dense(out)."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int, *, rngs: nnx.Rngs):
        self.hidden = dense(in_features, hidden_size, rngs)
        self.output = dense(hidden_size, out_features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(jax.nn.relu(self.hidden(x)))


class GRUCell(nnx.Module):
    """GRU cell with one bias on each side, gates ordered [reset, update, new].

    This is Keras' `GRUCell(reset_after=True)` (the official code) and
    `torch.nn.GRUCell`, parameter for parameter. Flax's own GRUCell folds the
    reset/update biases of both sides into one, which would make a
    torch -> Flax conversion lossy; this one converts exactly both ways.
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


class SlotAttention(nnx.Module):
    """Slot Attention (Locatello et al., 2020, Algorithm 1).

    >>> slot_attention = SlotAttention(num_slots=7, slot_size=64, input_size=64, rngs=nnx.Rngs(0))
    >>> slots = slot_attention(inputs, key=jax.random.key(1))  # [B, N, 64] -> [B, 7, 64]

    Call options: `num_slots` and `num_iterations` override the constructor's
    (e.g. more slots at test time), `initial_slots` [B, K, slot_size] replaces
    the sampled ones, `key` draws the initial noise (default: the module's own
    `noise` stream), and `return_attention=True` returns `(slots, aux)` where
    aux["attention"] is [B, T, K, N] (softmax over slots, per iteration) and
    aux["initial_slots"] is [B, K, slot_size].
    """

    def __init__(
        self,
        num_slots: int,
        slot_size: int,
        *,
        input_size: int | None = None,
        num_iterations: int = 3,
        mlp_hidden_size: int = 128,
        attention_epsilon: float = ATTENTION_EPSILON,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
        rngs: nnx.Rngs,
    ):
        num_slots, num_iterations, slot_size = _positive_integers(
            num_slots=num_slots, num_iterations=num_iterations, slot_size=slot_size)
        input_size = slot_size if input_size is None else input_size
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.input_size = input_size
        self.num_iterations = num_iterations
        self.attention_epsilon = attention_epsilon

        self.norm_inputs = layer_norm(input_size, layer_norm_epsilon, rngs)
        self.norm_slots = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.norm_mlp = layer_norm(slot_size, layer_norm_epsilon, rngs)
        self.project_q = dense(slot_size, slot_size, rngs, use_bias=False)
        self.project_k = dense(input_size, slot_size, rngs, use_bias=False)
        self.project_v = dense(input_size, slot_size, rngs, use_bias=False)
        self.gru = GRUCell(slot_size, slot_size, rngs=rngs)
        self.mlp = MLP(slot_size, mlp_hidden_size, slot_size, rngs=rngs)
        # Learned Gaussian for the initial slots, glorot-uniform over [1, 1, D] as in Keras.
        self.slots_mu = nnx.Param(glorot_uniform(rngs.params(), (1, 1, slot_size)))
        self.slots_log_sigma = nnx.Param(glorot_uniform(rngs.params(), (1, 1, slot_size)))
        self.noise = nnx.Rngs(noise=rngs.params())

    def sample_initial_slots(self, batch_size: int, num_slots: int, key: jax.Array | None = None) -> jax.Array:
        """mu + exp(log_sigma) * eps, eps ~ N(0, 1): [B, K, slot_size]."""
        key = self.noise.noise() if key is None else key
        noise = jax.random.normal(key, (batch_size, num_slots, self.slot_size), self.slots_mu.dtype)
        return self.slots_mu[...] + jnp.exp(self.slots_log_sigma[...]) * noise

    def __call__(
        self,
        inputs: jax.Array,  # [B, N, input_size]
        *,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        initial_slots: jax.Array | None = None,
        key: jax.Array | None = None,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        num_slots = self.num_slots if num_slots is None else num_slots
        num_iterations = self.num_iterations if num_iterations is None else num_iterations
        num_slots, num_iterations = _positive_integers(num_slots=num_slots, num_iterations=num_iterations)
        _check_features(inputs, self.input_size, "inputs", "[batch, num_inputs, input_size]")
        batch_size = inputs.shape[0]
        if initial_slots is None:
            initial_slots = self.sample_initial_slots(batch_size, num_slots, key)
        else:  # its number of slots wins over num_slots
            _check_features(initial_slots, self.slot_size, "initial_slots", "[batch, num_slots, slot_size]")
            if initial_slots.shape[0] != batch_size:
                raise ValueError(
                    f"initial_slots has batch size {initial_slots.shape[0]} but inputs have {batch_size}; "
                    "pass one set of initial slots per input."
                )

        inputs = self.norm_inputs(inputs)  # [B, N, input_size]
        slots = initial_slots
        attention_maps = []
        for _ in range(num_iterations):
            slots_prev = slots
            queries = self.project_q(self.norm_slots(slots)) * self.slot_size**-0.5  # [B, K, D]
            # The keys and values of the N inputs are never formed (the same function, in about a quarter of
            # the operations at the paper's sizes): q . k(x) = k^T(q) . x, and the weighted mean of v(x) is
            # v of the weighted mean of x (project_k and project_v are linear, without bias).
            queries = self.project_k.transposed(queries)  # [B, K, input_size]
            logits = jnp.einsum("bki,bni->bkn", queries, inputs.astype(queries.dtype))  # [B, K, N]
            attention = jax.nn.softmax(logits.astype(jnp.float32), axis=1)  # slots compete for each input
            attention_maps.append(attention)
            weights = attention + self.attention_epsilon
            weights = weights / jnp.sum(weights, axis=2, keepdims=True)  # weighted mean over inputs
            updates = self.project_v(jnp.einsum("bkn,bni->bki", weights, inputs))  # [B, K, D]
            slots = self.gru(updates, slots_prev)
            slots = slots + self.mlp(self.norm_mlp(slots))

        if not return_attention:
            return slots
        attention = jnp.stack(attention_maps, axis=1)  # [B, T, K, N]
        return slots, {"attention": attention, "initial_slots": initial_slots}


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


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """TF/Flax "SAME" padding (before, after) of a conv whose input size is a multiple of `stride`."""
    total = max(kernel_size - stride, 0)
    return total // 2, total - total // 2


def conv2d(images: jax.Array, kernel: jax.Array, stride: int = 1, padding=None) -> jax.Array:
    """NHWC convolution with an HWIO kernel; "SAME" padding unless `padding` [(before, after)] * 2 is given.

    On CPU, exact reformulations replace slow XLA kernels (`_cpu_conv`); other backends use XLA's
    convolutions throughout.
    """
    if padding is None:
        padding = [same_padding(kernel.shape[0], stride), same_padding(kernel.shape[1], stride)]
    padding = tuple(tuple(pair) for pair in padding)
    if jax.default_backend() == "cpu":
        return _cpu_conv(images, kernel, stride, padding)
    return _xla_conv(images, kernel, stride, padding)


def _runs_on_blocks(images: jax.Array, kernel: jax.Array, padding) -> bool:
    """Whether a stride-1 conv is faster on pairs of pixels along the width on CPU (`blocked_conv`).

    XLA hands convs with at most 16 channels on both sides to its generic (Eigen) kernel, not to
    YNNPACK, and its kernel for up to 4 input channels is slow; on pairs the conv has twice the
    channels on both sides. Needs an even width and padding that keeps the width.
    """
    kernel_width, in_features, out_features = kernel.shape[1:]
    return (sum(padding[1]) == kernel_width - 1 and images.shape[2] % 2 == 0
            and (in_features <= 4 or max(in_features, out_features) <= 16))


def _xla_conv(images, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        images, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv(images, kernel, stride, padding):
    """A conv in the forms that are fastest on CPU; the same function and gradients as XLA's conv.

    Stride 1: forward on pairs of pixels along the width for the convs `_runs_on_blocks` picks
    (`blocked_conv`, e.g. 14.3 -> 6.4 ms for the CPU preset decoder's 5x5 16 -> 16 layer), XLA's
    otherwise; input gradient the conv of the output gradient with the flipped kernel, again through
    `conv2d`.
    Stride > 1: XLA's forward; the input gradient of a "SAME" conv is the transposed conv of the
    output gradient as a sub-pixel conv (`transposed_conv`, about 4x faster than XLA's conv of the
    zero-dilated gradient), XLA's otherwise. Kernel gradient: XLA's, over chunks of the batch
    (`_kernel_grad`).
    """
    if stride == 1 and _runs_on_blocks(images, kernel, padding):
        return blocked_conv(images, kernel, 2, padding)
    return _xla_conv(images, kernel, stride, padding)


def _cpu_conv_forward(images, kernel, stride, padding):
    return _cpu_conv(images, kernel, stride, padding), (images, kernel)


def _cpu_conv_backward(stride, padding, residuals, output_grad):
    images, kernel = residuals
    same = tuple(same_padding(size, stride) for size in kernel.shape[:2])
    if stride == 1:  # dx[i] = sum_t dy[i + before - t] w[t]: a conv with the flipped kernel, in and out swapped
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        images_grad = conv2d(output_grad, flipped, 1, [(size - 1 - before, size - 1 - after)
                                                       for size, (before, after) in zip(kernel.shape, padding)])
    elif padding == same and images.shape[1] % stride == 0 and images.shape[2] % stride == 0:
        # the transposed conv of the output gradient; TF's Conv2DTranspose reads the HWIO kernel as [k, k, out, in]
        images_grad = transposed_conv(output_grad, kernel, stride)
    else:
        images_grad = jax.vjp(lambda x: _xla_conv(x, kernel, stride, padding), images)[1](output_grad)[0]
    return images_grad, _kernel_grad(images, kernel, stride, padding, output_grad)


# XLA's CPU kernel gradient slows down (up to 2-3x per image) once an operand outgrows the core's L2 cache:
# a chunk's larger operand (images or output gradient) stays within this many bytes (2 MiB, the L2 cache per
# core of the benchmark machine).
KERNEL_GRAD_CHUNK_BYTES = 2 << 20


def kernel_grad_chunks(batch: int, image_bytes: int, devices: int) -> int:
    """How many chunks `_kernel_grad` splits each device's images into: the fewest whose larger operand
    (`image_bytes` per image) fits in KERNEL_GRAD_CHUNK_BYTES, with the batch split over `devices`."""
    local_batch = batch // devices if batch % devices == 0 else batch
    return min((count for count in range(1, local_batch + 1) if local_batch % count == 0
                and (local_batch // count * image_bytes <= KERNEL_GRAD_CHUNK_BYTES or count == local_batch)), default=1)


def _kernel_grad(images, kernel, stride, padding, output_grad):
    """XLA's kernel gradient, summed over chunks of the batch (`kernel_grad_chunks`; one chunk: XLA's as is).

    Chunk i takes images i, i + chunks, i + 2 * chunks, ...: with the batch split over the devices (data
    parallel), every chunk holds images of each device, which sums its own without moving images between
    devices. Discovery step on 2 CPU devices: 5% faster (the decoder's 5x5 16 -> 16 and 3x3 16 -> 64 layers);
    chunks sized by the larger operand rather than by the output gradient: a further 0.96x for set prediction
    (stride-2 layers, whose images are 4x their output gradient) and for discovery.
    """
    batch = images.shape[0]
    image_bytes = max(math.prod(array.shape[1:]) * array.dtype.itemsize for array in (images, output_grad))
    chunks = kernel_grad_chunks(batch, image_bytes, jax.device_count())
    images = images.reshape(batch // chunks, chunks, *images.shape[1:])
    output_grad = output_grad.reshape(batch // chunks, chunks, *output_grad.shape[1:])
    grads = [jax.vjp(lambda w: _xla_conv(images[:, index], w, stride, padding), kernel)[1](output_grad[:, index])[0]
             for index in range(chunks)]
    return functools.reduce(jnp.add, [grad.astype(jnp.float32) for grad in grads]).astype(kernel.dtype)


_cpu_conv.defvjp(_cpu_conv_forward, _cpu_conv_backward)


def transposed_conv_as_conv(kernel: jax.Array, stride: int) -> tuple[jax.Array, list[tuple[int, int]]]:
    """Rewrites a "SAME" transposed conv as a stride-1 conv followed by depth-to-space (sub-pixel conv).

    kernel: [k, k, out, in], the layout of TF's Conv2DTranspose and of Flax's
    ConvTranspose(transpose_kernel=True). Output pixel o = stride * m + phase
    receives input pixel m + offset through tap t = phase + pad - stride * offset
    (pad: the SAME padding before), so every phase is a small ordinary conv over
    the input. Returns the conv kernel [w, w, in, stride * stride * out] (phases
    major, then channels) and its padding. The same function as the transposed
    conv, exactly; only the order of the sums differs.
    """
    kernel_size = kernel.shape[0]
    pad = same_padding(kernel_size, stride)[0]
    # taps[phase][offset - min_offset] = kernel tap feeding that phase from that offset, or -1
    offsets = {(phase, (phase + pad - tap) // stride): tap
               for phase in range(stride) for tap in range(kernel_size) if (phase + pad - tap) % stride == 0}
    min_offset = min(offset for _, offset in offsets)
    max_offset = max(offset for _, offset in offsets)
    zero = jnp.zeros_like(kernel[0, 0])  # [out, in]
    rows = []
    for row_offset in range(min_offset, max_offset + 1):
        columns = []
        for column_offset in range(min_offset, max_offset + 1):
            phases = [
                kernel[offsets[(row_phase, row_offset)], offsets[(column_phase, column_offset)]]
                if (row_phase, row_offset) in offsets and (column_phase, column_offset) in offsets
                else zero
                for row_phase in range(stride)
                for column_phase in range(stride)
            ]  # stride * stride of [out, in]
            columns.append(jnp.concatenate(phases, axis=0).T)  # [in, stride * stride * out]
        rows.append(jnp.stack(columns))
    conv_kernel = jnp.stack(rows)  # [window, window, in, stride * stride * out]
    return conv_kernel, [(-min_offset, max_offset)] * 2


def depth_to_space(images: jax.Array, stride: int) -> jax.Array:
    """[B, H, W, s * s * C] (phases major) -> [B, s * H, s * W, C]."""
    batch, height, width, channels = images.shape
    out_features = channels // (stride * stride)
    images = images.reshape(batch, height, width, stride, stride, out_features)
    return images.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * stride, width * stride, out_features)


def blocked_conv(images: jax.Array, kernel: jax.Array, block: int, padding=None) -> jax.Array:
    """A stride-1 conv on blocks of `block` pixels along the width: [B, H, W, in] -> [B, H', W, out].

    `padding` [(top, bottom), (left, right)] (default "SAME") must keep the width: left + right =
    kernel width - 1. Output column block * m + out_phase receives input column
    block * (m + offset) + in_phase through kernel column t = block * offset + in_phase - out_phase + left,
    so the conv becomes one from block * in to block * out channels over the blocks, and the images go
    in and out by reshapes alone. The same function, exactly; only the order of the sums differs.
    """
    kernel_height, kernel_width = kernel.shape[:2]
    if padding is None:
        padding = (same_padding(kernel_height, 1), same_padding(kernel_width, 1))
    (top, bottom), (left, right) = padding
    if left + right != kernel_width - 1 or images.shape[2] % block:
        raise ValueError(f"blocked_conv needs width padding summing to {kernel_width - 1} (got {left}, {right}) "
                         f"and a width divisible by {block} (got {images.shape[2]}).")
    min_offset = -((left + block - 1) // block)
    max_offset = (block - 1 + right) // block
    zero = jnp.zeros_like(kernel[:, 0])  # [kernel_height, in, out]

    def column(offset: int, in_phase: int, out_phase: int) -> jax.Array:
        index = block * offset + in_phase - out_phase + left
        return kernel[:, index] if 0 <= index < kernel_width else zero

    blocked_kernel = jnp.stack([
        jnp.concatenate([jnp.concatenate([column(offset, in_phase, out_phase) for out_phase in range(block)], axis=-1)
                         for in_phase in range(block)], axis=-2)  # [kernel_height, block * in, block * out]
        for offset in range(min_offset, max_offset + 1)], axis=1)
    batch, height, width, in_features = images.shape
    blocks = images.reshape(batch, height, width // block, block * in_features)
    outputs = _xla_conv(blocks, blocked_kernel, 1, ((top, bottom), (-min_offset, max_offset)))
    return outputs.reshape(*outputs.shape[:2], width, kernel.shape[-1])


def transposed_conv(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """TF's "SAME" Conv2DTranspose (kernel [k, k, out, in]) as a sub-pixel conv: [B, H, W, in] -> [B, sH, sW, out].

    On CPU its gradients are those of the strided conv it is the transpose of (`_cpu_transposed_conv`).
    """
    if jax.default_backend() == "cpu":
        return _cpu_transposed_conv(images, kernel, stride)
    return _sub_pixel_conv(images, kernel, stride)


def _sub_pixel_conv(images, kernel, stride):
    conv_kernel, padding = transposed_conv_as_conv(kernel, stride)
    return depth_to_space(conv2d(images, conv_kernel, 1, padding), stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_transposed_conv(images, kernel, stride):
    """The sub-pixel conv forward; the gradients of the "SAME" conv2d(., kernel, stride) that it transposes.

    <transposed_conv(images, kernel), dy> = <images, conv2d(dy, kernel)> (the kernel read as HWIO), so the input
    gradient is conv2d(dy, kernel, stride) and the kernel gradient is that conv's kernel gradient at input dy
    and output gradient `images`. The same gradients as the sub-pixel conv's, in less work: a 5x5 stride-2
    kernel is 25 taps where its sub-pixel form is 3x3 over 4 phases (36, 11 of them zero), and no
    depth-to-space. Discovery train step (CPU preset), interleaved against the sub-pixel conv's gradients:
    0.94x on one core, 0.98x on two devices.
    """
    return _sub_pixel_conv(images, kernel, stride)


def _cpu_transposed_conv_forward(images, kernel, stride):
    return _sub_pixel_conv(images, kernel, stride), (images, kernel)


def _cpu_transposed_conv_backward(stride, residuals, output_grad):
    images, kernel = residuals
    same = tuple(same_padding(size, stride) for size in kernel.shape[:2])
    return conv2d(output_grad, kernel, stride), _kernel_grad(output_grad, kernel, stride, same, images)


_cpu_transposed_conv.defvjp(_cpu_transposed_conv_forward, _cpu_transposed_conv_backward)


class Conv(nnx.Module):
    """2-D convolution, "SAME" padding as in TF/Flax. Kernel [k, k, in, out] (HWIO)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.stride = stride
        self.dtype = None  # compute dtype (None: the parameters'); see set_compute_dtype
        self.kernel = nnx.Param(glorot_uniform(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, in] -> [B, H / stride, W / stride, out]
        images, kernel, bias = nnx.nn.dtypes.promote_dtype((images, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return conv2d(images, kernel, self.stride) + bias


class ConvTranspose(nnx.Module):
    """Transposed convolution, "SAME" padding as in TF (output = stride * input).

    The kernel is stored as TF's Conv2DTranspose / Flax's
    ConvTranspose(transpose_kernel=True) store it, [k, k, out, in], so weights
    convert as usual; it is computed as a sub-pixel convolution
    (`transposed_conv_as_conv`), which is much faster on XLA's CPU backend.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.stride = stride
        self.dtype = None  # compute dtype (None: the parameters'); see set_compute_dtype
        # Keras counts the fans of [k, k, out, in] as fan_in = k*k*out, fan_out = k*k*in.
        self.kernel = nnx.Param(glorot_uniform(rngs.params(), (kernel_size, kernel_size, out_features, in_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, in] -> [B, s * H, s * W, out]
        images, kernel, bias = nnx.nn.dtypes.promote_dtype((images, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return transposed_conv(images, kernel, self.stride) + bias


def set_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """Mixed precision: Dense and conv layers compute in `dtype` (e.g. bfloat16), in place.

    Parameters stay float32; LayerNorms, softmaxes (attention, masks) and the
    GRU's state update still compute in float32.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (nnx.Linear, Conv, ConvTranspose)):
            module.dtype = dtype
        elif isinstance(module, nnx.LayerNorm):
            module.dtype = jnp.float32
    return model
