"""slotjax.SlotAttention on its own: call options, compilation, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slotjax
from slotjax import kernels
from slotjax.kernels import cpu, xla
from slotjax.nn.layers import layer_norm


@pytest.fixture
def module():
    return slotjax.SlotAttention(num_slots=4, slot_size=16, input_size=8, mlp_hidden_size=32, rngs=nnx.Rngs(0))


def test_initial_slot_parameters_are_glorot_uniform_over_1_1_d():
    module = slotjax.SlotAttention(num_slots=7, slot_size=64, rngs=nnx.Rngs(0))
    limit = np.sqrt(6 / (1 + 64))  # 0.3038
    for parameter in (module.slots_mu, module.slots_log_sigma):
        values = np.asarray(parameter[...])
        assert values.shape == (1, 1, 64)
        assert np.abs(values).max() <= limit and np.abs(values).max() > 0.8 * limit


def test_call_options(module):
    inputs = jax.random.normal(jax.random.key(0), (2, 10, 8))
    assert module(inputs, key=jax.random.key(1)).shape == (2, 4, 16)
    slots, aux = module(inputs, num_slots=6, num_iterations=5, key=jax.random.key(1), return_attention=True)
    assert slots.shape == (2, 6, 16) and aux["attention"].shape == (2, 5, 6, 10)
    np.testing.assert_allclose(aux["attention"].sum(axis=2), 1.0, rtol=1e-5)  # softmax over slots
    # the key decides the initial noise; the same key gives the same slots
    np.testing.assert_array_equal(module(inputs, key=jax.random.key(3)), module(inputs, key=jax.random.key(3)))
    assert not np.allclose(module(inputs, key=jax.random.key(3)), module(inputs, key=jax.random.key(4)))
    # explicit initial slots set the number of slots
    slots, aux = module(inputs, initial_slots=jnp.ones((2, 3, 16)), return_attention=True)
    assert slots.shape == (2, 3, 16)
    np.testing.assert_array_equal(aux["initial_slots"], jnp.ones((2, 3, 16)))
    # without a key the module's own noise stream advances: two calls differ
    assert not np.allclose(module(inputs), module(inputs))


def test_jit_compiles_once_per_shape(module):
    traces = []

    @nnx.jit
    def apply(module, inputs, key):
        traces.append(inputs.shape)
        return module(inputs, key=key)

    for seed in range(3):
        apply(module, jax.random.normal(jax.random.key(seed), (2, 10, 8)), jax.random.key(seed))
    apply(module, jnp.zeros((5, 10, 8)), jax.random.key(0))
    assert traces == [(2, 10, 8), (5, 10, 8)]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(inputs=np.zeros((2, 10, 7), np.float32)),
            ValueError,
            r"inputs has shape \(2, 10, 7\); expected .* 8 features",
        ),
        (dict(inputs=np.zeros((10, 8), np.float32)), ValueError, r"inputs has shape \(10, 8\)"),
        (dict(inputs=np.zeros((2, 10, 8), np.int32)), TypeError, "floating dtype"),
        (dict(num_slots=0), ValueError, "num_slots must be an integer >= 1"),
        (dict(num_iterations=0), ValueError, "num_iterations must be an integer >= 1"),
        (dict(initial_slots=np.zeros((2, 3, 5), np.float32)), ValueError, r"initial_slots has shape \(2, 3, 5\)"),
        (dict(initial_slots=np.zeros((3, 3, 16), np.float32)), ValueError, "batch size 3 but inputs have 2"),
    ],
)
def test_bad_input_is_refused_clearly(module, kwargs, error, message):
    inputs = kwargs.pop("inputs", np.zeros((2, 10, 8), np.float32))
    with pytest.raises(error, match=message):
        module(jnp.asarray(inputs), **kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_slots must be an integer >= 1, got 0"):
        slotjax.SlotAttention(num_slots=0, slot_size=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_iterations"):
        slotjax.SlotAttention(num_slots=2, slot_size=8, num_iterations=-1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(3, 5, 8), (64, 32), (2, 3, 4, 16)])
def test_layer_norm_equals_flax_values_and_gradients(shape):
    """`layers.LayerNorm` (through `kernels.layer_norm`) is `nnx.LayerNorm`."""
    keys = jax.random.split(jax.random.key(shape[-1] + len(shape)), 4)
    inputs = 3.0 * jax.random.normal(keys[0], shape) + 1.5
    ours = layer_norm(shape[-1], 1e-3, nnx.Rngs(0))
    ours.scale[...] = jax.random.normal(keys[1], (shape[-1],))
    ours.bias[...] = jax.random.normal(keys[2], (shape[-1],))
    flax_norm = nnx.LayerNorm(shape[-1], epsilon=1e-3, rngs=nnx.Rngs(0))
    flax_norm.scale[...], flax_norm.bias[...] = ours.scale[...], ours.bias[...]
    cotangent = jax.random.normal(keys[3], shape)

    def vjp(module):
        graphdef, params = nnx.split(module)
        outputs, pullback = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, inputs)
        params_grad, inputs_grad = pullback(cotangent)
        return outputs, inputs_grad, params_grad["scale"][...], params_grad["bias"][...]

    for got, expected in zip(vjp(ours), vjp(flax_norm)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    half = inputs.astype(jnp.bfloat16)  # other dtypes take Flax's own path
    np.testing.assert_array_equal(ours(half), nnx.LayerNorm.__call__(ours, half))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_without_keys_and_values_equals_the_textbook_form(dtype):
    """The CPU form of the attention step (no keys or values formed) against Algorithm 1's `SlotAttention.attend`
    on k = inputs @ key_kernel, v = inputs @ value_kernel: attention and updates, and their gradients w.r.t.
    queries, inputs and both projections."""
    keys = jax.random.split(jax.random.key(0), 6)
    queries = jax.random.normal(keys[0], (2, 5, 16)).astype(dtype)
    inputs = jax.random.normal(keys[1], (2, 30, 8))
    key_kernel, value_kernel = (0.3 * jax.random.normal(key, (8, 16)).astype(dtype) for key in keys[2:4])
    cotangents = (jax.random.normal(keys[4], (2, 5, 30)), jax.random.normal(keys[5], (2, 5, 16)).astype(dtype))
    attend = slotjax.SlotAttention.attend

    def textbook(q, x, key_kernel, value_kernel):
        x = x.astype(dtype)
        return attend(q, x @ key_kernel, x @ value_kernel, 1e-8)

    def vjp(form):
        outputs, pullback = jax.vjp(form, queries, inputs, key_kernel, value_kernel)
        return *outputs, *pullback(cotangents)

    tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
    cpu_form = functools.partial(cpu.attention, attend, epsilon=1e-8)
    for got, expected in zip(vjp(cpu_form), vjp(textbook), strict=True):
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(expected, np.float32),
            rtol=tolerance,
            atol=tolerance * float(np.abs(np.asarray(expected, np.float32)).max()),
        )


def test_layer_norm_cpu_form_equals_the_reference():
    rows = 2.0 * jax.random.normal(jax.random.key(0), (64, 24)) + 0.5
    scale, bias = jax.random.normal(jax.random.key(1), (24,)), jax.random.normal(jax.random.key(2), (24,))
    cotangent = jax.random.normal(jax.random.key(3), (64, 24))
    ours = jax.vjp(lambda *arrays: cpu.layer_norm(*arrays, 1e-3), rows, scale, bias)
    reference = jax.vjp(lambda *arrays: xla.layer_norm(*arrays, 1e-3), rows, scale, bias)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours[1](cotangent), reference[1](cotangent), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["cpu", "reference"])
def test_slot_attention_gives_the_same_slots_in_both_kernel_forms(module, form):
    inputs = jax.random.normal(jax.random.key(0), (2, 10, 8))
    with kernels.use_forms(form):
        slots = module(inputs, key=jax.random.key(1))
    np.testing.assert_allclose(slots, module(inputs, key=jax.random.key(1)), rtol=1e-5, atol=1e-5)


def test_slot_attention_on_cpu_compiles_to_the_work_of_the_cpu_form_alone(module):
    """Compiled for CPU in the platform form, the gradient of the module costs what its CPU form costs, less than
    the reference form: the keys and values the CPU form leaves unread, and their gradients, are not computed."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    inputs = jax.device_put(jax.random.normal(jax.random.key(0), (2, 30, 8)), jax.devices("cpu")[0])

    def loss(params, inputs):
        return jnp.sum(nnx.merge(graphdef, params, rest)(inputs, num_iterations=1, key=jax.random.key(1)) ** 2)

    def compiled_flops(form):
        with kernels.use_forms(form):
            cost = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, inputs).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert compiled_flops("platform") == compiled_flops("cpu") < compiled_flops("reference")
