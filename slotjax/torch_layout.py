"""Flax parameters <-> torch_reference state dicts: the names and axis orders of the same weights.

The two packages use the same module and parameter names, so a parameter's torch name is its Flax path with the
leaf renamed, and its torch value is its Flax value with the axes permuted. `LEAF_TABLE` below is the whole mapping;
`PARENT_RENAMES` covers torch.nn.GRUCell, whose parameters have torch's own names. Round trips are bit-identical in
both directions (only transposes). State dicts here are plain `{name: numpy array}` mappings (torch tensors are
accepted when loading).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from slotjax.nn import layers
from slotjax.weights_file import ConversionError, to_numpy

# (Flax module type, Flax leaf) -> (torch leaf, axis order turning the Flax array into torch's).
LEAF_TABLE: dict[tuple[type, str], tuple[str, tuple[int, ...] | None]] = {
    (layers.Dense, "kernel"): ("weight", (1, 0)),  # [in, out] -> [out, in]
    (layers.Dense, "bias"): ("bias", None),
    (layers.LayerNorm, "scale"): ("weight", None),
    (layers.LayerNorm, "bias"): ("bias", None),
    (layers.Conv, "kernel"): ("weight", (3, 2, 0, 1)),  # [k, k, in, out] -> [out, in, k, k]
    (layers.Conv, "bias"): ("bias", None),
    (layers.ConvTranspose, "kernel"): ("weight", (3, 2, 0, 1)),  # [k, k, out, in] -> [in, out, k, k]
    (layers.ConvTranspose, "bias"): ("bias", None),
}

# Parent module type -> {Flax "child.leaf": torch leaf}: torch.nn.GRUCell's names.
PARENT_RENAMES: dict[type, dict[str, str]] = {
    layers.GRUCell: {
        "input_dense.kernel": "weight_ih",
        "input_dense.bias": "bias_ih",
        "hidden_dense.kernel": "weight_hh",
        "hidden_dense.bias": "bias_hh",
    },
}


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _plan(module: nnx.Module) -> dict[str, tuple[tuple, tuple[int, ...] | None]]:
    """torch name -> (Flax path, axis order Flax -> torch) for every parameter of `module`."""
    plan = {}
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        owners = [module]
        for key in path[:-1]:
            owners.append(_child(owners[-1], key))
        leaf, owner = path[-1], owners[-1]
        torch_path = [str(key) for key in path]
        order = None
        rule = LEAF_TABLE.get((type(owner), leaf))
        if rule is not None:
            torch_path[-1], order = rule
        elif type(owner).__module__.startswith("flax."):
            raise ConversionError(f"No conversion rule for {type(owner).__name__}.{leaf} at {_dotted(path)}.")
        # else: a parameter of our own (e.g. slots_mu), same name and layout on both sides.
        if len(path) > 1 and (renamed := PARENT_RENAMES.get(type(owners[-2]), {}).get(f"{path[-2]}.{leaf}")):
            torch_path[-2:] = [renamed]
        plan[".".join(torch_path)] = (path, order)
    return plan


def _dotted(path: tuple) -> str:
    return ".".join(str(key) for key in path)


def flax_to_torch(module: nnx.Module) -> dict[str, np.ndarray]:
    """The `torch_reference` state dict (as numpy arrays) of a slotjax module."""
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    state_dict = {}
    for torch_name, (path, order) in _plan(module).items():
        value = np.asarray(params[path][...])
        state_dict[torch_name] = np.array(value if order is None else value.transpose(order), order="C")
    return state_dict


def torch_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """torch_reference parameter name -> shape, for `module` (also an abstract one, from `nnx.eval_shape`)."""
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return {name: _expected_torch_shape(params[path].shape, order) for name, (path, order) in _plan(module).items()}


def torch_to_flax(state_dict: Mapping[str, object], module: nnx.Module) -> nnx.Module:
    """Loads a `torch_reference` state dict (torch tensors or arrays) into `module`, in place.

    Refuses missing, unexpected, misshapen, non-numeric or non-finite parameters, naming each one.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module is a {type(module).__name__}; expected the nnx.Module to load the weights into.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict is a {type(state_dict).__name__}; expected a mapping {{name: tensor or array}}.")
    plan = _plan(module)
    missing = sorted(set(plan) - set(state_dict), key=str)
    unexpected = sorted(set(state_dict) - set(plan), key=str)
    if missing or unexpected:
        raise ConversionError(
            f"The weights do not belong to this {type(module).__name__}: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}. Build the model with the configuration the weights were trained with."
        )
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    converted = {}  # everything is checked before anything is written
    for torch_name, (path, order) in plan.items():
        try:
            value = to_numpy(state_dict[torch_name])
        except (TypeError, ValueError) as error:  # e.g. ragged nested lists
            raise ConversionError(f"Parameter {torch_name!r} is not an array: {error}") from error
        expected = _expected_torch_shape(params[path].shape, order)
        if value.shape != expected:
            raise ConversionError(
                f"Parameter {torch_name!r} (Flax {_dotted(path)}) has shape {value.shape} in the weights "
                f"but the model expects {expected}. "
                "Build the model with the configuration the weights were trained with."
            )
        if value.dtype.kind not in "biuf" and not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 is kind "V"
            raise ConversionError(f"Parameter {torch_name!r} has dtype {value.dtype}; expected real numbers.")
        with np.errstate(over="ignore"):
            value = np.asarray(value, dtype=params[path].dtype)
        if not np.isfinite(value).all():
            raise ConversionError(
                f"Parameter {torch_name!r} holds NaN or inf (in the model's {value.dtype}); "
                "the weights are broken (a diverged run?)."
            )
        converted[path] = value if order is None else value.transpose(np.argsort(order))
    for path, value in converted.items():
        params[path][...] = value
    return module


def _expected_torch_shape(flax_shape, order) -> tuple[int, ...]:
    return tuple(flax_shape) if order is None else tuple(flax_shape[axis] for axis in order)
