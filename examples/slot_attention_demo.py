"""A short demo: the same Slot Attention weights in JAX and in PyTorch give the same slots."""

import jax
import numpy as np
import torch
from flax import nnx

import slotjax
import torch_reference
from slotjax.convert import flax_to_torch

slot_attention = slotjax.SlotAttention(num_slots=7, slot_size=64, input_size=32, rngs=nnx.Rngs(0))
inputs = jax.random.normal(jax.random.key(1), (2, 1024, 32))  # [batch, num_inputs, input_size]
slots, aux = slot_attention(inputs, key=jax.random.key(2), return_attention=True)
print("slots", slots.shape, "attention", aux["attention"].shape)

reference = torch_reference.SlotAttention(num_slots=7, slot_size=64, input_size=32)
reference.load_state_dict({name: torch.from_numpy(value) for name, value in flax_to_torch(slot_attention).items()})
torch_slots = reference(torch.tensor(np.asarray(inputs)), initial_slots=torch.tensor(np.asarray(aux["initial_slots"])))
error = np.linalg.norm(np.asarray(slots) - torch_slots.detach().numpy()) / np.linalg.norm(np.asarray(slots))
print(f"relative difference JAX vs PyTorch: {error:.2e}")
