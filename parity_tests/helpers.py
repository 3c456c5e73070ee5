"""Shared helpers of the parity tests: relative errors and the tolerances of docs/parity.md."""

import jax
import numpy as np
import torch
from flax import nnx

from slotjax.convert import flax_to_torch

# docs/parity.md: float32 on CPU.
FORWARD_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = as_numpy(actual).astype(np.float64), as_numpy(expected).astype(np.float64)
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_close(actual, expected, tolerance: float, name: str = "value") -> None:
    error = relative_error(actual, expected)
    assert error < tolerance, f"{name}: relative error {error:.3g} >= {tolerance:g}"


def as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_torch(value, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(value), dtype=torch.float32, requires_grad=requires_grad)


def jax_value_and_grads(module: nnx.Module, loss_fn, *inputs):
    """loss, parameter gradients as a torch-layout state dict, and gradients w.r.t. `inputs`."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss_of(params, *inputs):
        return loss_fn(nnx.merge(graphdef, params, rest, copy=True), *inputs)

    argnums = tuple(range(len(inputs) + 1))
    loss, (param_grads, *input_grads) = jax.value_and_grad(loss_of, argnums=argnums)(params, *inputs)
    gradient_module = nnx.merge(graphdef, param_grads, rest, copy=True)
    return loss, flax_to_torch(gradient_module), input_grads


def torch_param_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: as_numpy(p.grad) for name, p in module.named_parameters()}


def zero_gradient_names(grads: dict) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic: norm below 1e-6 of the whole gradient's.

    E.g. norm_slots.bias: it shifts all slots' logits equally, and the softmax
    over slots cancels it; both frameworks hold only rounding noise there.
    """
    norms = {name: np.linalg.norm(as_numpy(g).astype(np.float64)) for name, g in grads.items()}
    total_norm = np.sqrt(sum(norm**2 for norm in norms.values()))
    return {name for name, norm in norms.items() if norm < 1e-6 * total_norm}


def assert_grads_close(jax_grads: dict, torch_grads: dict, tolerance: float = GRADIENT_TOLERANCE) -> None:
    """Every parameter's gradient within `tolerance` relative error; gradients that are zero
    in exact arithmetic are held to it relative to the whole gradient's norm."""
    assert sorted(jax_grads) == sorted(torch_grads)
    total_norm = np.sqrt(sum(np.sum(np.square(as_numpy(g).astype(np.float64))) for g in torch_grads.values()))
    zero = zero_gradient_names(torch_grads)
    for name in torch_grads:
        if name in zero:
            difference = np.linalg.norm(as_numpy(jax_grads[name]) - as_numpy(torch_grads[name]))
            assert difference < tolerance * total_norm, (
                f"gradient of {name} (zero in exact arithmetic): {difference:.3g}"
            )
        else:
            assert_close(jax_grads[name], torch_grads[name], tolerance, f"gradient of {name}")
