"""PyTorch twin of `slotjax/nn/invariant_slot_attention.py` (Invariant Slot Attention, translation and scale)."""

from __future__ import annotations

import torch
from torch import nn

from torch_reference.nn.layers import LAYER_NORM_EPSILON, MLP, dense

SCALE_RANGE = (1e-3, 2.0)


def position_grid(size: tuple[int, int]) -> torch.Tensor:
    """[H * W, 2] positions (y, x), each linspace(-1, 1), row-major."""
    y, x = torch.meshgrid(*(torch.linspace(-1.0, 1.0, length) for length in size), indexing="ij")
    return torch.stack([y, x], dim=-1).reshape(-1, 2)


def relative_grid(grid, positions, scales, scales_factor: float) -> torch.Tensor:
    """(grid - position) / scales_factor / scale: [B, K, N, 2]."""
    return (grid - positions[:, :, None]) / scales_factor / scales[:, :, None]


class InvariantSlotAttention(nn.Module):
    """See slotjax.nn.invariant_slot_attention.InvariantSlotAttention."""

    def __init__(
        self,
        num_slots: int,
        slot_size: int,
        grid_size: tuple[int, int],
        *,
        input_size: int | None = None,
        num_iterations: int = 3,
        mlp_hidden_size: int = 128,
        grid_hidden_size: int = 128,
        scales_factor: float = 5.0,
        attention_epsilon: float = 1e-8,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
    ):
        super().__init__()
        input_size = slot_size if input_size is None else input_size
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.num_iterations = num_iterations
        self.scales_factor = scales_factor
        self.attention_epsilon = attention_epsilon
        self.register_buffer("grid", position_grid(grid_size), persistent=False)

        self.norm_inputs = nn.LayerNorm(input_size, eps=layer_norm_epsilon)
        self.norm_slots = nn.LayerNorm(slot_size, eps=layer_norm_epsilon)
        self.norm_mlp = nn.LayerNorm(slot_size, eps=layer_norm_epsilon)
        self.project_q = dense(slot_size, slot_size, use_bias=False)
        self.project_k = dense(input_size, slot_size, use_bias=False)
        self.project_v = dense(input_size, slot_size, use_bias=False)
        self.project_grid = dense(2, slot_size)
        self.norm_grid = nn.LayerNorm(slot_size, eps=layer_norm_epsilon)
        self.grid_mlp = MLP(slot_size, grid_hidden_size, slot_size)
        self.gru = nn.GRUCell(slot_size, slot_size)
        nn.init.xavier_uniform_(self.gru.weight_ih)
        nn.init.orthogonal_(self.gru.weight_hh)
        nn.init.zeros_(self.gru.bias_ih)
        nn.init.zeros_(self.gru.bias_hh)
        self.mlp = MLP(slot_size, mlp_hidden_size, slot_size)
        self.slots_init = nn.Parameter(torch.randn(1, num_slots, slot_size))

    def forward(
        self,
        inputs: torch.Tensor,  # [B, N, input_size], N = the grid's cells
        *,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        initial_positions: torch.Tensor | None = None,
        initial_scales: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_attention: bool = False,
    ):
        if num_slots not in (None, self.num_slots):
            raise ValueError(f"num_slots={num_slots!r} but this module learns {self.num_slots} initial slots.")
        num_iterations = self.num_iterations if num_iterations is None else num_iterations
        shape = (inputs.shape[0], self.num_slots, 2)
        if initial_positions is None:
            initial_positions = torch.rand(shape, generator=generator, device=inputs.device) * 2.0 - 1.0
        if initial_scales is None:
            initial_scales = 0.1 + 0.1 * torch.randn(shape, generator=generator, device=inputs.device)
        positions = initial_positions.clamp(-1.0, 1.0)
        scales = initial_scales.clamp(*SCALE_RANGE)
        slots = self.slots_init.expand(inputs.shape[0], -1, -1)

        inputs = self.norm_inputs(inputs)
        keys = self.project_k(inputs)[:, None]  # [B, 1, N, D]
        values = self.project_v(inputs)[:, None]
        attention_maps = []
        for round_index in range(num_iterations + 1):
            embedded = self.project_grid(relative_grid(self.grid, positions, scales, self.scales_factor))
            keys_relative = self.grid_mlp(self.norm_grid(keys + embedded))  # [B, K, N, D]
            values_relative = self.grid_mlp(self.norm_grid(values + embedded))
            queries = self.project_q(self.norm_slots(slots)) * self.slot_size**-0.5
            attention = torch.softmax(torch.einsum("bkd,bknd->bkn", queries, keys_relative), dim=1)
            weights = attention / (attention.sum(dim=2, keepdim=True) + self.attention_epsilon)
            updates = torch.einsum("bkn,bknd->bkd", weights, values_relative)
            positions = weights @ self.grid
            spread = (self.grid - positions[:, :, None]) ** 2
            scales = torch.einsum("bkn,bknc->bkc", weights + self.attention_epsilon, spread).sqrt()
            scales = scales.clamp(*SCALE_RANGE)
            attention_maps.append(attention)
            if round_index < num_iterations:
                slots = self.gru(updates.reshape(-1, self.slot_size), slots.reshape(-1, self.slot_size))
                slots = slots.reshape(updates.shape)
                slots = slots + self.mlp(self.norm_mlp(slots))

        if not return_attention:
            return slots
        aux = {"attention": torch.stack(attention_maps, dim=1), "positions": positions, "scales": scales}
        return slots, {**aux, "initial_positions": initial_positions, "initial_scales": initial_scales}


class RelativePositionEmbed(nn.Module):
    """features + Dense(grid relative to each slot's position and scale), features [B * K, C, H, W]."""

    def __init__(self, features: int, resolution: tuple[int, int], scales_factor: float = 5.0):
        super().__init__()
        self.scales_factor = scales_factor
        self.dense = dense(2, features)
        self.register_buffer("grid", position_grid(resolution), persistent=False)
        self.resolution = tuple(resolution)

    def forward(self, features, positions, scales):
        grid = relative_grid(self.grid, positions, scales, self.scales_factor)  # [B, K, HW, 2]
        embedded = self.dense(grid).reshape(-1, *self.resolution, features.shape[1])  # [B * K, H, W, C]
        return features + embedded.permute(0, 3, 1, 2)
