"""slotjax.flops.count_flops against XLA's cost analysis of the same program on CPU (which sees every conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slotjax import kernels
from slotjax.flops import count_flops
from slotjax.train import losses
from slotjax.train import step as steps
from tests.conftest import tiny_config


def xla_flops(function, *args) -> float:
    cost = jax.jit(function).lower(*args).cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def conv(stride, padding, lhs_dilation=None, rhs_dilation=None):
    return lambda images, kernel: jax.lax.conv_general_dilated(
        images, kernel, (stride, stride), padding, lhs_dilation, rhs_dilation, ("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "stride, padding, lhs_dilation, rhs_dilation",
    [
        (1, "SAME", None, None),
        (2, "SAME", None, None),
        (2, "VALID", None, None),
        (1, ((2, 1), (0, 3)), None, None),
        (1, ((4, 4), (4, 4)), (2, 2), None),  # a stride-2 transposed conv: taps on inserted zeros do not count
        (1, "SAME", None, (2, 3)),
    ],
)
def test_convolution_flops_equal_xla(stride, padding, lhs_dilation, rhs_dilation):
    rng = np.random.default_rng(stride)
    images = jnp.asarray(rng.normal(size=(3, 13, 10, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, 4, 5, 7)), jnp.float32)
    function = conv(stride, padding, lhs_dilation, rhs_dilation)
    assert count_flops(function, images, kernel) == xla_flops(function, images, kernel)
    # both gradients: the input gradient dilates the output gradient, the kernel gradient dilates the kernel
    gradients = jax.grad(lambda images, kernel: jnp.sum(function(images, kernel)), argnums=(0, 1))
    assert count_flops(gradients, images, kernel) == xla_flops(gradients, images, kernel)


def test_products_count_and_unused_work_does_not():
    a, b = jnp.ones((4, 6, 8)), jnp.ones((4, 8, 9))
    assert count_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 4 * 6 * 9 * 8
    assert count_flops(lambda a, b: (a @ b, a)[1], a, b) == 0  # XLA removes a product nobody reads


def test_scan_counts_every_step_and_while_loops_that_multiply_are_refused():
    matrix = jnp.ones((16, 16))
    once = count_flops(lambda m: m @ m, matrix)
    scanned = count_flops(lambda m: jax.lax.scan(lambda carry, _: (carry @ m, None), m, length=5)[0], matrix)
    assert scanned == 5 * once
    assert count_flops(lambda m: jax.lax.fori_loop(0, 3, lambda _, carry: carry @ m, m), matrix) == 3 * once
    with pytest.raises(ValueError, match="while loop multiplies"):
        count_flops(lambda m, steps: jax.lax.fori_loop(0, steps, lambda _, carry: carry @ m, m), matrix, 3)


@pytest.mark.parametrize("form", ["cpu", "reference"])
def test_model_gradient_flops_are_xla_count_less_elementwise_work(form):
    """The discovery model's loss gradient in each kernel form (the CPU forms' own conv gradients, or XLA's
    convs): products and convolutions are nearly all of XLA's count, and never more."""
    config = tiny_config("discovery")
    graphdef, params, rest = nnx.split(steps.build_model(config), nnx.Param, ...)
    images = jnp.asarray(
        np.random.default_rng(0).uniform(-1, 1, (4, config.resolution, config.resolution, 3)), jnp.float32
    )

    def loss(params, images):
        outputs = nnx.merge(graphdef, params, rest)(images, key=jax.random.key(0))
        return losses.mse_loss(outputs["reconstruction"], images)

    with kernels.use_forms(form):
        counted, xla = count_flops(jax.grad(loss), params, images), xla_flops(jax.grad(loss), params, images)
    assert 0.9 * xla < counted <= xla
