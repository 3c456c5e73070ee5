"""The official optimiser: Adam with linear warm-up and continuous exponential decay."""

import jax.numpy as jnp
import optax


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay_steps: int, decay_rate: float = 0.5):
    """lr(s) = learning_rate * min(s / warmup_steps, 1) * decay_rate ** (s / decay_steps); s counted from 0."""

    def schedule(step):
        warmup = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return learning_rate * warmup * decay_rate ** (step / decay_steps)

    return schedule


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    decay_steps: int,
    decay_rate: float = 0.5,
    grad_clip_norm: float = 0.0,
    adam_epsilon: str = "keras",
):
    """optax Adam (eps 1e-8, default betas) on the official schedule.

    `grad_clip_norm` > 0 first scales the gradients to that global norm at most (not in the paper, which does not
    clip; later Slot Attention work does, and it steadies the short CPU runs).
    """
    adam = optax.adam(learning_rate_schedule(learning_rate, warmup_steps, decay_steps, decay_rate), eps=1e-8)
    if grad_clip_norm < 0:
        raise ValueError(f"grad_clip_norm={grad_clip_norm} is negative; use 0 (no clipping) or a positive norm.")
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam) if grad_clip_norm else adam
