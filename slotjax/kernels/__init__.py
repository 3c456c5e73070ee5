"""The one place where the models' heavy operations choose their form: convolutions, transposed convolutions,
LayerNorm and Slot Attention's attention step.

Every operation has a reference form (`slotjax.kernels.xla`: plain XLA operations, the path on GPUs and TPUs)
and a CPU form (`slotjax.kernels.cpu`: the same function, written the way XLA's CPU backend runs fast). The
form follows the platform the program is compiled for (`jax.lax.platform_dependent`), so a program traced on
one machine and compiled for another still gets its platform's form. `use_forms("cpu")` or
`use_forms("reference")` picks one explicitly while tracing (tests, FLOP counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax

from slotjax.kernels import cpu, xla
from slotjax.kernels.xla import Padding, same_padding

FORMS = ("platform", "cpu", "reference")
_form = "platform"


@contextlib.contextmanager
def use_forms(form: str) -> Iterator[None]:
    """Within the block, functions traced use the CPU or reference forms ("platform": by the compile platform)."""
    global _form
    if form not in FORMS:
        raise ValueError(f"Unknown kernel form {form!r}; use one of {', '.join(FORMS)}.")
    previous, _form = _form, form
    try:
        yield
    finally:
        _form = previous


def _dispatch(cpu_form: Callable, reference_form: Callable, *arrays):
    if _form == "cpu":
        return cpu_form(*arrays)
    if _form == "reference":
        return reference_form(*arrays)
    return jax.lax.platform_dependent(*arrays, cpu=cpu_form, default=reference_form)


def conv(images: jax.Array, kernel: jax.Array, stride: int = 1, padding: Padding | None = None) -> jax.Array:
    """NHWC convolution with an HWIO kernel; "SAME" padding unless `padding` ((before, after),) * 2 is given."""
    if padding is None:
        padding = (same_padding(kernel.shape[0], stride), same_padding(kernel.shape[1], stride))
    padding = tuple(tuple(pair) for pair in padding)
    return _dispatch(
        lambda x, w: cpu.conv(x, w, stride, padding), lambda x, w: xla.conv(x, w, stride, padding), images, kernel
    )


def conv_transpose(images: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """TF's "SAME" Conv2DTranspose, kernel [k, k, out, in]: [B, H, W, in] -> [B, sH, sW, out]."""
    return _dispatch(
        lambda x, w: cpu.conv_transpose(x, w, stride), lambda x, w: xla.conv_transpose(x, w, stride), images, kernel
    )


def layer_norm(inputs: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis of float32 inputs [..., F]."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    outputs = _dispatch(
        lambda *a: cpu.layer_norm(*a, epsilon), lambda *a: xla.layer_norm(*a, epsilon), rows, scale, bias
    )
    return outputs.reshape(inputs.shape)


def attention(
    queries: jax.Array, inputs: jax.Array, key_kernel: jax.Array, value_kernel: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array]:
    """Slot Attention's attention step: (attention [B, K, N] over the slots, updates [B, K, D]).

    queries [B, K, D] scaled by 1 / sqrt(D); inputs [B, N, C]; the key and value projections' kernels [C, D].
    """
    return _dispatch(
        lambda *a: cpu.attention(*a, epsilon),
        lambda *a: xla.attention(*a, epsilon),
        queries,
        inputs,
        key_kernel,
        value_kernel,
    )


__all__ = ["FORMS", "attention", "conv", "conv_transpose", "layer_norm", "same_padding", "use_forms"]
