"""The official optimiser: Adam with linear warm-up and continuous exponential decay.

The paper's code trains with Keras' Adam, which adds epsilon to sqrt(v) before the bias correction of the step
size; optax's and torch's Adam add it to sqrt(v_hat) after. `scale_by_keras_adam` is Keras' placement and the
default (`adam_epsilon="keras"`); docs/parity.md gives the formulas and how far apart they train.
"""

import jax
import jax.numpy as jnp
import optax

ADAM_EPSILONS = ("keras", "optax")


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay_steps: int, decay_rate: float = 0.5):
    """lr(s) = learning_rate * min(s / warmup_steps, 1) * decay_rate ** (s / decay_steps); s counted from 0."""

    def schedule(step):
        warmup = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return learning_rate * warmup * decay_rate ** (step / decay_steps)

    return schedule


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Keras' Adam direction: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) at step t = 1, 2, ...

    That is optax's `scale_by_adam` with eps replaced by eps / sqrt(1 - b2^t) (the Adam paper's "epsilon hat"),
    computed as Keras computes it. The state is optax's `ScaleByAdamState`, so either placement resumes the
    other's checkpoints.
    """

    def init(params):
        mu, nu = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, grads)

        def direction(m, v):
            t = count.astype(m.dtype)  # the bias corrections in the moments' precision (float64 runs stay float64)
            return m * (jnp.sqrt(bias_correction(b2, t)) / bias_correction(b1, t)) / (jnp.sqrt(v) + eps)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def bias_correction(decay: float, t: jax.Array) -> jax.Array:
    """1 - decay^t, for the decay the moments apply: 1 - (1 - decay) in t's precision, as `update` rounds it.

    Written as -expm1(t * log1p(-(1 - decay))): `1 - decay**t` in float32 cancels (0.999 rounds to 0.99900001,
    so 1 - 0.999**1 is 1.3e-5 from the moments' 0.001) and would scale the early steps by 6e-6.
    """
    return -jnp.expm1(t * jnp.log1p(-jnp.asarray(1 - decay, t.dtype)))


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    decay_steps: int,
    decay_rate: float = 0.5,
    grad_clip_norm: float = 0.0,
    adam_epsilon: str = "keras",
):
    """Adam (eps 1e-8, default betas) on the official schedule; `adam_epsilon` places eps as "keras" or "optax".

    `grad_clip_norm` > 0 first scales the gradients to that global norm at most (not in the paper, which does not
    clip; later Slot Attention work does, and it steadies the short CPU runs).
    """
    if adam_epsilon not in ADAM_EPSILONS:
        raise ValueError(f"adam_epsilon={adam_epsilon!r} is unknown; use 'keras' (the paper's Adam) or 'optax'.")
    if grad_clip_norm < 0:
        raise ValueError(f"grad_clip_norm={grad_clip_norm} is negative; use 0 (no clipping) or a positive norm.")
    schedule = learning_rate_schedule(learning_rate, warmup_steps, decay_steps, decay_rate)
    if adam_epsilon == "keras":
        adam = optax.chain(scale_by_keras_adam(eps=1e-8), optax.scale_by_learning_rate(schedule))
    else:
        adam = optax.adam(schedule, eps=1e-8)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam) if grad_clip_norm else adam
