"""The one place where the models' heavy operations choose their form: convolutions, transposed convolutions,
LayerNorm and Slot Attention's attention step.

Every operation has a reference form (`slotjax.kernels.xla`: plain XLA operations, the path on GPUs and TPUs;
for the attention step, the textbook `SlotAttention.attend` that the model passes in) and a CPU form
(`slotjax.kernels.cpu`: the same function, written the way XLA's CPU backend runs fast). The form follows the
platform the program is compiled for (`jax.lax.platform_dependent`), so a program traced on one machine and
compiled for another still gets its platform's form: per operation, or for everything a function computes
(`per_platform`). `use_forms("cpu")` or `use_forms("reference")` picks one explicitly while tracing (tests,
FLOP counts).
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
    attend: Callable,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    epsilon: float,
    *,
    inputs: jax.Array,
    projections: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Slot Attention's attention step `attend(queries, keys, values, epsilon)` -> (attention, updates).

    `attend` is the textbook step (`SlotAttention.attend`), the reference form. keys and values [B, N, D] must
    be `inputs @ key_kernel` and `inputs @ value_kernel`, inputs [B, N, C] and `projections` the two kernels
    [C, D]: the CPU form reads those instead (`cpu.attention`). Call it under `per_platform`, so that on CPU
    the keys and values, read by no one, are never computed.
    """
    return _dispatch(
        lambda q, k, v, x, *kernels: cpu.attention(attend, q, x, *kernels, epsilon),
        lambda q, k, v, x, *kernels: attend(q, k, v, epsilon),
        queries,
        keys,
        values,
        inputs,
        *projections,
    )


def per_platform(function: Callable, *arrays):
    """`function(*arrays)`, traced once per form with every kernel inside in that form (on CPU the CPU forms).

    A CPU form can then leave work of the reference form undone, as the attention step leaves the keys and
    values: one operation's platform dispatch (a `cond`) still computes the gradients of operands that only
    the other branch reads, as zeros.
    """
    return _dispatch(_in_form("cpu", function), _in_form("reference", function), *arrays)


def _in_form(form: str, function: Callable) -> Callable:
    def traced(*arrays):
        with use_forms(form):
            return function(*arrays)

    return traced


__all__ = ["FORMS", "attention", "conv", "conv_transpose", "layer_norm", "per_platform", "same_padding", "use_forms"]
