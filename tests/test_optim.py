"""The paper's Adam (Keras' epsilon placement) in slotjax and torch_reference against Keras' own.

Keras' Adam, the paper's `tf.keras.optimizers.Adam(lr, epsilon=1e-08)`, in both of its implementations: the one
`tf.keras` holds today (Keras 3, Python) and TensorFlow's fused `ResourceApplyAdam` kernel, which Keras 2's Adam
ran (the paper's TensorFlow 2). The learning rate is set before every step, as the paper's training loop does.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
import tensorflow as tf
import torch

from slotjax.train.optim import bias_correction, learning_rate_schedule, make_optimizer
from torch_reference.train.optim import make_optimizer as make_torch_optimizer

SCHEDULE = dict(learning_rate=4e-4, warmup_steps=10, decay_steps=50)  # warm-up and decay both act in 100 steps
STEPS = 100
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-8
# Relative error of the parameters' displacement after 100 steps: each step rounds the parameters (~1e-8 for
# values ~0.1) and moves them by ~lr, so the displacement carries that rounding; optax's placement is ~5e-3 away.
TOLERANCE = 1e-4


def random_run(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Initial parameters [300] and 100 steps of gradients [100, 300] whose scales span 1e-8 to 1e-2, so
    that some are near eps (where the placements differ) and some far above it."""
    rng = np.random.default_rng(seed)
    params = (0.1 * rng.normal(size=300)).astype(np.float32)
    scales = 10 ** rng.uniform(-8, -2, size=(STEPS, 300))
    return params, (rng.normal(size=(STEPS, 300)) * scales).astype(np.float32)


def keras_adam(params, grads):
    variable = keras.Variable(params)
    optimizer = keras.optimizers.Adam(learning_rate=SCHEDULE["learning_rate"], epsilon=EPSILON)
    schedule = learning_rate_schedule(**SCHEDULE)
    for step, grad in enumerate(grads):
        optimizer.learning_rate = float(schedule(step))
        optimizer.apply_gradients([(tf.constant(grad), variable)])
    return np.asarray(variable)


def keras_2_kernel_adam(params, grads):
    variable, m, v = (tf.Variable(array) for array in (params, np.zeros_like(params), np.zeros_like(params)))
    schedule = learning_rate_schedule(**SCHEDULE)
    for step, grad in enumerate(grads):
        t = step + 1
        scalars = dict(beta1_power=BETA_1**t, beta2_power=BETA_2**t, lr=float(schedule(step)))
        scalars.update(beta1=BETA_1, beta2=BETA_2, epsilon=EPSILON)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            grad=tf.constant(grad),
            **{name: tf.constant(value, tf.float32) for name, value in scalars.items()},
        )
    return variable.numpy()


def slotjax_adam(params, grads, adam_epsilon="keras"):
    optimizer = make_optimizer(**SCHEDULE, adam_epsilon=adam_epsilon)

    @jax.jit
    def step(params, state, grad):
        updates, state = optimizer.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    params = jnp.asarray(params)
    state = optimizer.init(params)
    for grad in grads:
        params, state = step(params, state, jnp.asarray(grad))
    return np.asarray(params)


def torch_adam(params, grads, adam_epsilon="keras", resume_at=None):
    """torch_reference's optimiser; with `resume_at`, a new optimiser loads the state saved after that step."""
    parameter = torch.nn.Parameter(torch.tensor(params))
    optimizer, scheduler = make_torch_optimizer([parameter], **SCHEDULE, adam_epsilon=adam_epsilon)
    for step, grad in enumerate(grads):
        if step == resume_at:
            saved = optimizer.state_dict(), scheduler.state_dict()
            optimizer, scheduler = make_torch_optimizer([parameter], **SCHEDULE, adam_epsilon=adam_epsilon)
            optimizer.load_state_dict(saved[0])
            scheduler.load_state_dict(saved[1])
        parameter.grad = torch.tensor(grad)
        optimizer.step()
        scheduler.step()
    return parameter.detach().numpy()


def displacement_error(params, result, expected) -> float:
    moved, expected_moved = (np.float64(array) - params for array in (result, expected))
    return float(np.linalg.norm(moved - expected_moved) / np.linalg.norm(expected_moved))


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_adam_equals_keras(seed):
    params, grads = random_run(seed)
    for keras_name, expected in (("keras", keras_adam(params, grads)), ("kernel", keras_2_kernel_adam(params, grads))):
        for name, result in (("slotjax", slotjax_adam(params, grads)), ("torch", torch_adam(params, grads))):
            error = displacement_error(params, result, expected)
            assert error < TOLERANCE, f"{name} against Keras' {keras_name}: {error:.3g}"
        # the test can tell the placements apart
        assert displacement_error(params, slotjax_adam(params, grads, "optax"), expected) > 10 * TOLERANCE


def test_optax_placement_equals_torch_adam():
    """adam_epsilon="optax": optax's adam in slotjax, torch.optim.Adam in torch_reference."""
    params, grads = random_run(2)
    error = displacement_error(params, slotjax_adam(params, grads, "optax"), torch_adam(params, grads, "optax"))
    assert error < TOLERANCE


def test_torch_keras_adam_resumes_from_its_state_dict():
    params, grads = random_run(3)
    np.testing.assert_array_equal(torch_adam(params, grads, resume_at=40), torch_adam(params, grads))


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="adam_epsilon='adamw' is unknown; use 'keras'"):
        make_optimizer(**SCHEDULE, adam_epsilon="adamw")
    with pytest.raises(ValueError, match="adam_epsilon='adamw' is unknown; use 'keras'"):
        make_torch_optimizer([torch.nn.Parameter(torch.zeros(1))], **SCHEDULE, adam_epsilon="adamw")


def test_bias_correction_keeps_float32_precision():
    """1 - decay^t in float32 is within a few roundings of float64's, for the decay the moments apply (1 minus
    the float32 of 1 - decay); `1 - decay**t` in float32 is not: 0.999 rounds to 0.99900001."""
    t = np.arange(1, 20_001)
    for decay in (BETA_1, BETA_2):
        exact = 1 - (1 - np.float64(np.float32(1 - decay))) ** t
        corrected = np.float64(bias_correction(decay, jnp.asarray(t, jnp.float32)))
        assert np.max(np.abs(corrected / exact - 1)) < 5e-7, decay
    plain = np.float64(1 - jnp.float32(BETA_2) ** jnp.asarray(t, jnp.float32))
    assert np.max(np.abs(plain / exact - 1)) > 1e-5
