"""Converters refuse weights that do not fit, naming the parameter and both shapes."""

import numpy as np
import pytest
import torch
from flax import nnx

import slotjax
import torch_reference
from slotjax.convert import ConversionError, flax_to_torch, load_weights, save_weights, torch_to_flax


def test_mismatched_shape_names_parameter_and_both_shapes():
    torch_module = torch_reference.SlotAttention(4, 16, input_size=12)
    module = slotjax.SlotAttention(4, 16, input_size=10, rngs=nnx.Rngs(0))
    before = flax_to_torch(module)
    with pytest.raises(
        ConversionError,
        match=r"Parameter 'norm_inputs.bias' \(Flax norm_inputs.bias\) has shape \(12,\).*expects \(10,\)",
    ):
        torch_to_flax(torch_module.state_dict(), module)
    for name, value in flax_to_torch(module).items():  # nothing half-loaded
        np.testing.assert_array_equal(value, before[name])


def test_missing_and_unexpected_parameters_are_named():
    state_dict = flax_to_torch(slotjax.SlotAttention(4, 16, rngs=nnx.Rngs(0)))
    state_dict["extra.weight"] = state_dict.pop("gru.weight_ih")
    with pytest.raises(ConversionError, match=r"missing \['gru.weight_ih'\].*unexpected \['extra.weight'\]"):
        torch_to_flax(state_dict, slotjax.SlotAttention(4, 16, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weight_files_round_trip_and_load_in_torch(tmp_path, suffix):
    module = slotjax.SlotAttention(3, 8, rngs=nnx.Rngs(0))
    path = tmp_path / f"weights{suffix}"
    save_weights(module, path)
    torch_module = torch_reference.SlotAttention(3, 8)
    torch_module.load_state_dict({name: torch.as_tensor(v) for name, v in load_weights(path).items()})
    for name, value in flax_to_torch(module).items():
        np.testing.assert_array_equal(torch_module.state_dict()[name].numpy(), value)


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_weights(slotjax.SlotAttention(3, 8, rngs=nnx.Rngs(0)), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConversionError, match="Could not read weights"):
        load_weights(path)
