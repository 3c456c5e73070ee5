"""CPU forms of the kernels: the same functions as `slotjax.kernels.xla`, written the way XLA's CPU backend runs fast.

Each is exact up to the order of floating-point sums, and tested equal to its reference form (values and
gradients) in tests/test_conv.py and tests/test_modules.py. Why each exists:

- `conv`: XLA hands convs with few channels (at most 16 on both sides, or at most 4 inputs) to a generic kernel
  much slower than YNNPACK; on pairs of pixels along the width (`blocked_conv`) the channels double. The input
  gradient of a strided "SAME" conv is a transposed conv, computed as a sub-pixel conv instead of a conv of the
  zero-dilated gradient.
- `conv_transpose`: a sub-pixel conv (`transposed_conv_as_conv`, stride-1 conv then depth-to-space) forward;
  gradients through the strided conv it transposes (fewer taps than the sub-pixel form's).
- kernel gradients (`kernel_grad`): XLA's, summed over chunks of the batch whose operands fit in a core's L2
  cache; past that size XLA's CPU kernel gradient slows down per image.
- `layer_norm`: XLA fuses a row reduction into every consumer and recomputes it per element; as
  matrix-vector products the row statistics are computed once.
- `attention`: the keys and values of the N inputs are never formed: q . k(x) = k^T(q) . x, and the weighted
  mean of v(x) is v of the weighted mean of x (the projections are linear, without bias). About a quarter of
  the operations at the paper's sizes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from slotjax.kernels import xla
from slotjax.kernels.xla import Padding, same_padding

# A kernel-gradient chunk's larger operand (images or output gradient) stays within this many bytes: the L2
# cache per core of common x86 server CPUs (2 MiB).
KERNEL_GRAD_CHUNK_BYTES = 2 << 20


def runs_on_blocks(images: jax.Array, kernel: jax.Array, padding: Padding) -> bool:
    """Whether a stride-1 conv runs on pairs of pixels along the width (`blocked_conv`).

    XLA hands convs with at most 16 channels on both sides to its generic (Eigen) kernel, not to YNNPACK,
    and its kernel for up to 4 input channels is slow; on pairs the conv has twice the channels on both
    sides. Needs an even width and padding that keeps the width.
    """
    kernel_width, in_features, out_features = kernel.shape[1:]
    return (
        sum(padding[1]) == kernel_width - 1
        and images.shape[2] % 2 == 0
        and (in_features <= 4 or max(in_features, out_features) <= 16)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(images: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """`xla.conv` with the forward on pixel pairs where `runs_on_blocks`, and the gradients of `_conv_backward`."""
    if stride == 1 and runs_on_blocks(images, kernel, padding):
        return blocked_conv(images, kernel, 2, padding)
    return xla.conv(images, kernel, stride, padding)


def _conv_forward(images, kernel, stride, padding):
    return conv(images, kernel, stride, padding), (images, kernel)


def _conv_backward(stride, padding, residuals, output_grad):
    """Input gradient: stride 1, the conv of the output gradient with the flipped kernel (again through `conv`);
    a "SAME" strided conv, the transposed conv of the output gradient as a sub-pixel conv; XLA's otherwise.
    Kernel gradient: `kernel_grad`."""
    images, kernel = residuals
    same = tuple(same_padding(size, stride) for size in kernel.shape[:2])
    if stride == 1:  # dx[i] = sum_t dy[i + before - t] w[t]: a conv with the flipped kernel, in and out swapped
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        flipped_padding = tuple(
            (size - 1 - before, size - 1 - after) for size, (before, after) in zip(kernel.shape, padding)
        )
        images_grad = conv(output_grad, flipped, 1, flipped_padding)
    elif padding == same and images.shape[1] % stride == 0 and images.shape[2] % stride == 0:
        # TF's Conv2DTranspose reads the HWIO kernel as [k, k, out, in]
        images_grad = sub_pixel_conv(output_grad, kernel, stride)
    else:
        images_grad = jax.vjp(lambda x: xla.conv(x, kernel, stride, padding), images)[1](output_grad)[0]
    return images_grad, kernel_grad(images, kernel, stride, padding, output_grad)


conv.defvjp(_conv_forward, _conv_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_transpose(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`xla.conv_transpose` as a sub-pixel conv; gradients of the "SAME" conv(., kernel, stride) it transposes.

    <conv_transpose(x, w), dy> = <x, conv(dy, w)> (w read as HWIO), so the input gradient is conv(dy, w) and
    the kernel gradient is that conv's kernel gradient at input dy and output gradient x: a 5x5 stride-2
    kernel is 25 taps where its sub-pixel form is 3x3 over 4 phases (36, 11 of them zero).
    """
    return sub_pixel_conv(images, kernel, stride)


def _conv_transpose_forward(images, kernel, stride):
    return sub_pixel_conv(images, kernel, stride), (images, kernel)


def _conv_transpose_backward(stride, residuals, output_grad):
    images, kernel = residuals
    same = tuple(same_padding(size, stride) for size in kernel.shape[:2])
    images_grad = conv(output_grad, kernel, stride, same)
    return images_grad, kernel_grad(output_grad, kernel, stride, same, images)


conv_transpose.defvjp(_conv_transpose_forward, _conv_transpose_backward)


def sub_pixel_conv(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """`xla.conv_transpose` as a stride-1 conv (through `conv`) followed by depth-to-space."""
    conv_kernel, padding = transposed_conv_as_conv(kernel, stride)
    return depth_to_space(conv(images, conv_kernel, 1, padding), stride)


def kernel_grad_chunks(batch: int, image_bytes: int, devices: int) -> int:
    """How many chunks `kernel_grad` splits each device's images into: the fewest whose larger operand
    (`image_bytes` per image) fits in KERNEL_GRAD_CHUNK_BYTES, with the batch split over `devices`."""
    local_batch = batch // devices if batch % devices == 0 else batch
    fitting = (
        count
        for count in range(1, local_batch + 1)
        if local_batch % count == 0
        and (local_batch // count * image_bytes <= KERNEL_GRAD_CHUNK_BYTES or count == local_batch)
    )
    return min(fitting, default=1)


def data_parallel_devices() -> int:
    """The number of devices the batch is split over: the size of the mesh being traced under (`jax.set_mesh`,
    as the trainer does), 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.axis_sizes)


def kernel_grad(images, kernel, stride, padding, output_grad):
    """XLA's kernel gradient, summed over chunks of the batch (`kernel_grad_chunks`; one chunk: XLA's as is).

    Chunk i takes images i, i + chunks, i + 2 * chunks, ...: with the batch split over the devices (data
    parallel), every chunk holds images of each device, which sums its own without moving images between
    devices.
    """
    batch = images.shape[0]
    image_bytes = max(math.prod(array.shape[1:]) * array.dtype.itemsize for array in (images, output_grad))
    chunks = kernel_grad_chunks(batch, image_bytes, data_parallel_devices())
    images = images.reshape(batch // chunks, chunks, *images.shape[1:])
    output_grad = output_grad.reshape(batch // chunks, chunks, *output_grad.shape[1:])
    grads = [
        jax.vjp(lambda w: xla.conv(images[:, index], w, stride, padding), kernel)[1](output_grad[:, index])[0]
        for index in range(chunks)
    ]
    accumulator = jnp.promote_types(kernel.dtype, jnp.float32)  # bfloat16 chunks summed in float32, float64 in float64
    return functools.reduce(jnp.add, [grad.astype(accumulator) for grad in grads]).astype(kernel.dtype)


def transposed_conv_as_conv(kernel: jax.Array, stride: int) -> tuple[jax.Array, Padding]:
    """Rewrites a "SAME" transposed conv as a stride-1 conv followed by depth-to-space (sub-pixel conv).

    kernel: [k, k, out, in], the layout of TF's Conv2DTranspose. Output pixel o = stride * m + phase receives
    input pixel m + offset through tap t = phase + pad - stride * offset (pad: the SAME padding before), so
    every phase is a small ordinary conv over the input. Returns the conv kernel
    [w, w, in, stride * stride * out] (phases major, then channels) and its padding.
    """
    kernel_size = kernel.shape[0]
    pad = same_padding(kernel_size, stride)[0]
    # (phase, offset) -> the kernel tap feeding that phase from that offset
    offsets = {
        (phase, (phase + pad - tap) // stride): tap
        for phase in range(stride)
        for tap in range(kernel_size)
        if (phase + pad - tap) % stride == 0
    }
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
    return conv_kernel, ((-min_offset, max_offset),) * 2


def depth_to_space(images: jax.Array, stride: int) -> jax.Array:
    """[B, H, W, s * s * C] (phases major) -> [B, s * H, s * W, C]."""
    batch, height, width, channels = images.shape
    out_features = channels // (stride * stride)
    images = images.reshape(batch, height, width, stride, stride, out_features)
    return images.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height * stride, width * stride, out_features)


def blocked_conv(images: jax.Array, kernel: jax.Array, block: int, padding: Padding | None = None) -> jax.Array:
    """A stride-1 conv on blocks of `block` pixels along the width: [B, H, W, in] -> [B, H', W, out].

    `padding` [(top, bottom), (left, right)] (default "SAME") must keep the width: left + right =
    kernel width - 1. Output column block * m + out_phase receives input column block * (m + offset) + in_phase
    through kernel column t = block * offset + in_phase - out_phase + left, so the conv becomes one from
    block * in to block * out channels over the blocks, and the images go in and out by reshapes alone.
    """
    kernel_height, kernel_width = kernel.shape[:2]
    if padding is None:
        padding = (same_padding(kernel_height, 1), same_padding(kernel_width, 1))
    (top, bottom), (left, right) = padding
    if left + right != kernel_width - 1 or images.shape[2] % block:
        raise ValueError(
            f"blocked_conv needs width padding summing to {kernel_width - 1} (got {left}, {right}) "
            f"and a width divisible by {block} (got {images.shape[2]})."
        )
    min_offset = -((left + block - 1) // block)
    max_offset = (block - 1 + right) // block
    zero = jnp.zeros_like(kernel[:, 0])  # [kernel_height, in, out]

    def column(offset: int, in_phase: int, out_phase: int) -> jax.Array:
        index = block * offset + in_phase - out_phase + left
        return kernel[:, index] if 0 <= index < kernel_width else zero

    blocked_kernel = jnp.stack(
        [
            jnp.concatenate(
                [
                    jnp.concatenate([column(offset, in_phase, out_phase) for out_phase in range(block)], axis=-1)
                    for in_phase in range(block)
                ],
                axis=-2,
            )  # [kernel_height, block * in, block * out]
            for offset in range(min_offset, max_offset + 1)
        ],
        axis=1,
    )
    batch, height, width, in_features = images.shape
    blocks = images.reshape(batch, height, width // block, block * in_features)
    outputs = xla.conv(blocks, blocked_kernel, 1, ((top, bottom), (-min_offset, max_offset)))
    return outputs.reshape(*outputs.shape[:2], width, kernel.shape[-1])


def _row_mean(rows: jax.Array) -> jax.Array:  # [N, F] -> [N, 1], a matrix-vector product
    return rows @ jnp.full((rows.shape[-1], 1), 1.0 / rows.shape[-1], rows.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(rows: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """`xla.layer_norm` of [N, F] rows, statistics as matrix-vector products, its backward written out."""
    return _layer_norm_forward(rows, scale, bias, epsilon)[0]


def _layer_norm_forward(rows, scale, bias, epsilon):
    centered = rows - _row_mean(rows)
    inverse_std = jax.lax.rsqrt(_row_mean(centered * centered) + epsilon)
    normalized = centered * inverse_std
    return normalized * scale + bias, (normalized, inverse_std, scale)


def _layer_norm_backward(epsilon, residuals, output_grad):
    normalized, inverse_std, scale = residuals
    grad = output_grad * scale
    rows_grad = inverse_std * (grad - _row_mean(grad) - normalized * _row_mean(grad * normalized))
    return rows_grad, jnp.sum(output_grad * normalized, axis=0), jnp.sum(output_grad, axis=0)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def attention(
    attend: Callable,
    queries: jax.Array,
    inputs: jax.Array,
    key_kernel: jax.Array,
    value_kernel: jax.Array,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """`attend(queries, inputs @ key_kernel, inputs @ value_kernel, epsilon)` without forming those keys and
    values: `attend` on the queries mapped back to the inputs' space and on the inputs themselves, then the
    value kernel applied to the K weighted means of the inputs."""
    inputs = inputs.astype(key_kernel.dtype)  # [B, N, C], in the compute dtype of the projections
    attention, mean_inputs = attend(queries @ key_kernel.T, inputs, inputs, epsilon)  # [B, K, N], [B, K, C]
    return attention, mean_inputs @ value_kernel
