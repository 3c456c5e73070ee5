"""FLOPs of a JAX function, counted on its jaxpr: the same number on every backend.

XLA's cost analysis of a compiled program does not count the work of library calls: on a GPU the convolutions
and matrix products become cuDNN / cuBLAS calls, and the analysis of a compiled discovery training step (128x128,
batch 64) gave 64 GFLOP of its 8.6 TFLOP. `count_flops` counts the traced program instead.

Counted: 2 FLOPs per multiply-add of matrix products (`dot_general`) and convolutions (`conv_general_dilated`),
the work that dominates these models, with XLA's convention for convolutions (only kernel taps that land on
input pixels: not on padding, nor on the zeros a transposed convolution inserts). Elementwise operations,
reductions and softmax are not counted, nor is work whose result nothing uses (XLA removes it). Loops: a `scan`
counts its body once per step; a `while` loop whose body multiplies is refused (its trip count is unknown when
tracing). A `cond` counts its costliest branch, which includes the platform-dependent forms of `slotjax.kernels`:
trace under `kernels.use_forms("reference")` (or "cpu") to count the form one platform runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend.core import Jaxpr, JaxprEqn, Literal, jaxprs_in_params


def count_flops(function: Callable, *args, **kwargs) -> float:
    """FLOPs of the products and convolutions of `function(*args, **kwargs)` (arrays or ShapeDtypeStructs)."""
    return _jaxpr_flops(jax.make_jaxpr(function)(*args, **kwargs).jaxpr)


def _jaxpr_flops(jaxpr: Jaxpr, used_outputs: list[bool] | None = None) -> float:
    """Equations whose results nothing uses are skipped, as XLA removes them (e.g. the primal output that
    `jax.vjp` computes alongside a gradient)."""
    used_outputs = used_outputs or [True] * len(jaxpr.outvars)
    live = {var for var, used in zip(jaxpr.outvars, used_outputs) if used and not isinstance(var, Literal)}
    total = 0.0
    for equation in reversed(jaxpr.eqns):
        used = [var in live for var in equation.outvars]
        if any(used) or equation.effects:
            live.update(var for var in equation.invars if not isinstance(var, Literal))
            total += _equation_flops(equation, used)
    return total


def _equation_flops(equation: JaxprEqn, used_outputs: list[bool]) -> float:
    name, params = equation.primitive.name, equation.params
    if name == "dot_general":
        return _dot_general_flops(equation)
    if name == "conv_general_dilated":
        return _convolution_flops(equation)
    if name == "scan":  # every step's carry feeds the next: the whole body counts
        return params["length"] * _jaxpr_flops(params["jaxpr"].jaxpr)
    if name == "while":
        if _jaxpr_flops(params["body_jaxpr"].jaxpr) or _jaxpr_flops(params["cond_jaxpr"].jaxpr):
            raise ValueError(
                "count_flops: a while loop multiplies, and its trip count is unknown when tracing; "
                "write the loop as a jax.lax.scan (or a fori_loop with static bounds)"
            )
        return 0.0
    if name == "cond":
        return max(_jaxpr_flops(branch.jaxpr, used_outputs) for branch in params["branches"])
    # calls (jit, custom_jvp / custom_vjp, remat, ...): inner jaxprs whose outputs are the equation's
    return sum(
        _jaxpr_flops(inner, used_outputs if len(inner.outvars) == len(used_outputs) else None)
        for inner in jaxprs_in_params(params)
    )


def _dot_general_flops(equation) -> float:
    (lhs_contracting, _), _ = equation.params["dimension_numbers"]
    lhs_shape = equation.invars[0].aval.shape
    contracted = math.prod(lhs_shape[axis] for axis in lhs_contracting)
    return 2.0 * math.prod(equation.outvars[0].aval.shape) * contracted


def _convolution_flops(equation) -> float:
    params = equation.params
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    lhs_shape, rhs_shape = equation.invars[0].aval.shape, equation.invars[1].aval.shape
    out_shape = equation.outvars[0].aval.shape
    spatial = len(lhs_spec) - 2
    lhs_dilation = params["lhs_dilation"] or (1,) * spatial
    rhs_dilation = params["rhs_dilation"] or (1,) * spatial
    taps = math.prod(  # (output position, kernel tap) pairs that read an input pixel, per spatial dimension
        _valid_taps(
            lhs_shape[lhs_spec[2 + axis]],
            rhs_shape[rhs_spec[2 + axis]],
            out_shape[out_spec[2 + axis]],
            params["window_strides"][axis],
            params["padding"][axis][0],
            lhs_dilation[axis],
            rhs_dilation[axis],
        )
        for axis in range(spatial)
    )
    # each output (batch, feature) pair reads the kernel's input features of its group at each valid tap
    outputs = out_shape[out_spec[0]] * out_shape[out_spec[1]]
    return 2.0 * outputs * rhs_shape[rhs_spec[1]] * taps


def _valid_taps(
    size: int, kernel: int, out: int, stride: int, pad_low: int, lhs_dilation: int, rhs_dilation: int
) -> int:
    dilated_size = (size - 1) * lhs_dilation + 1
    count = 0
    for position in range(out):
        for tap in range(kernel):
            index = position * stride - pad_low + tap * rhs_dilation
            count += 0 <= index < dilated_size and index % lhs_dilation == 0
    return count
