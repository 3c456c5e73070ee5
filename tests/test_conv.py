"""The convolution formulations equal XLA's / TF's definitions: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slotjax.modules import (_xla_conv, blocked_conv, conv2d, depth_to_space, same_padding,
                             transposed_conv_as_conv)


@pytest.mark.parametrize("kernel_size, stride, batch, size",
                         [(5, 1, 3, 8), (5, 2, 4, 8), (3, 2, 2, 6), (4, 2, 2, 8), (3, 1, 5, 6), (1, 1, 2, 4),
                          (4, 1, 2, 8), (5, 2, 2, 7), (5, 1, 2, 7)])  # 7: odd, XLA's conv or input gradient
def test_conv2d_and_its_gradients_equal_xla(kernel_size, stride, batch, size):
    keys = jax.random.split(jax.random.key(kernel_size * 10 + stride), 3)
    images = jax.random.normal(keys[0], (batch, size, size, 3))
    kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, 3, 4))
    padding = tuple([same_padding(kernel_size, stride)] * 2)
    cotangent = jax.random.normal(keys[2], conv2d(images, kernel, stride).shape)
    ours = jax.vjp(lambda x, w: conv2d(x, w, stride), images, kernel)
    xla = jax.vjp(lambda x, w: _xla_conv(x, w, stride, padding), images, kernel)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours[1](cotangent), xla[1](cotangent)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_size, stride", [(5, 2), (5, 1), (3, 1), (3, 2), (4, 2)])
def test_sub_pixel_conv_equals_transposed_conv(kernel_size, stride):
    """TF / Flax ConvTranspose(padding="SAME", transpose_kernel=True), kernel [k, k, out, in]."""
    images = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 3))
    expected = jax.lax.conv_transpose(images, kernel, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
    conv_kernel, padding = transposed_conv_as_conv(kernel, stride)
    got = depth_to_space(conv2d(images, conv_kernel, 1, padding), stride)
    assert got.shape == (2, 6 * stride, 6 * stride, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size, block, channels", [(5, 2, 3), (3, 2, 1), (4, 2, 8), (5, 4, 2), (1, 2, 3)])
def test_conv_on_pixel_blocks_equals_the_conv(kernel_size, block, channels):
    """`blocked_conv` is a stride-1 "SAME" conv, values and both gradients (any block and kernel size)."""
    keys = jax.random.split(jax.random.key(kernel_size * 10 + block), 3)
    images = jax.random.normal(keys[0], (2, 8, 12, channels))
    kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, channels, 5))
    padding = tuple([same_padding(kernel_size, 1)] * 2)
    cotangent = jax.random.normal(keys[2], (2, 8, 12, 5))
    ours = jax.vjp(lambda x, w: blocked_conv(x, w, block), images, kernel)
    xla = jax.vjp(lambda x, w: _xla_conv(x, w, 1, padding), images, kernel)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours[1](cotangent), xla[1](cotangent)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
