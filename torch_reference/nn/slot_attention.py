"""PyTorch twin of `slotjax/nn/slot_attention.py`: Algorithm 1 with keys and values formed as in the paper."""

from __future__ import annotations

import torch
from torch import nn

from torch_reference.nn.layers import LAYER_NORM_EPSILON, MLP, dense, glorot_uniform_


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al., 2020, Algorithm 1). See slotjax.SlotAttention."""

    def __init__(
        self,
        num_slots: int,
        slot_size: int,
        *,
        input_size: int | None = None,
        num_iterations: int = 3,
        mlp_hidden_size: int = 128,
        attention_epsilon: float = 1e-8,
        layer_norm_epsilon: float = LAYER_NORM_EPSILON,
    ):
        super().__init__()
        input_size = slot_size if input_size is None else input_size
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.num_iterations = num_iterations
        self.attention_epsilon = attention_epsilon

        self.norm_inputs = nn.LayerNorm(input_size, eps=layer_norm_epsilon)
        self.norm_slots = nn.LayerNorm(slot_size, eps=layer_norm_epsilon)
        self.norm_mlp = nn.LayerNorm(slot_size, eps=layer_norm_epsilon)
        self.project_q = dense(slot_size, slot_size, use_bias=False)
        self.project_k = dense(input_size, slot_size, use_bias=False)
        self.project_v = dense(input_size, slot_size, use_bias=False)
        self.gru = nn.GRUCell(slot_size, slot_size)
        nn.init.xavier_uniform_(self.gru.weight_ih)
        nn.init.orthogonal_(self.gru.weight_hh)
        nn.init.zeros_(self.gru.bias_ih)
        nn.init.zeros_(self.gru.bias_hh)
        self.mlp = MLP(slot_size, mlp_hidden_size, slot_size)
        self.slots_mu = nn.Parameter(glorot_uniform_(torch.empty(1, 1, slot_size)))
        self.slots_log_sigma = nn.Parameter(glorot_uniform_(torch.empty(1, 1, slot_size)))

    def forward(
        self,
        inputs: torch.Tensor,  # [B, N, input_size]
        *,
        num_slots: int | None = None,
        num_iterations: int | None = None,
        initial_slots: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_attention: bool = False,
    ):
        batch_size = inputs.shape[0]
        num_slots = self.num_slots if num_slots is None else num_slots
        num_iterations = self.num_iterations if num_iterations is None else num_iterations
        if initial_slots is None:
            noise = torch.randn(batch_size, num_slots, self.slot_size, generator=generator, device=inputs.device)
            initial_slots = self.slots_mu + torch.exp(self.slots_log_sigma) * noise

        inputs = self.norm_inputs(inputs)
        keys = self.project_k(inputs)  # [B, N, D]
        values = self.project_v(inputs)  # [B, N, D]
        slots = initial_slots
        attention_maps = []
        for _ in range(num_iterations):
            slots_prev = slots
            queries = self.project_q(self.norm_slots(slots)) * self.slot_size**-0.5  # [B, K, D]
            logits = torch.einsum("bnd,bkd->bnk", keys, queries)
            attention = torch.softmax(logits, dim=-1)  # slots compete for each input
            attention_maps.append(attention)
            weights = attention + self.attention_epsilon
            weights = weights / weights.sum(dim=1, keepdim=True)  # weighted mean over inputs
            updates = torch.einsum("bnk,bnd->bkd", weights, values)  # [B, K, D]
            slots = self.gru(updates.reshape(-1, self.slot_size), slots_prev.reshape(-1, self.slot_size))
            slots = slots.reshape(updates.shape)
            slots = slots + self.mlp(self.norm_mlp(slots))

        if not return_attention:
            return slots
        attention = torch.stack(attention_maps, dim=1).transpose(-1, -2)  # [B, T, K, N]
        return slots, {"attention": attention, "initial_slots": initial_slots}
