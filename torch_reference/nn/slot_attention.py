"""PyTorch twin of `slotjax/nn/slot_attention.py`: Algorithm 1 with keys and values formed as in the paper, and
the same variants (docs/variants.md) under the same argument names."""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_reference.nn.layers import LAYER_NORM_EPSILON, MLP, dense, glorot_uniform_

ATTENTION_NORMALISATIONS = ("mean", "scaled_sum")


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al., 2020, Algorithm 1) and its variants. See slotjax.SlotAttention."""

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
        implicit_gradients: bool = False,
        learned_queries: bool = False,
        num_heads: int = 1,
        attention_normalisation: str = "mean",
    ):
        super().__init__()
        if slot_size % num_heads:
            raise ValueError(f"slot_size {slot_size} does not split into num_heads={num_heads} heads of equal size.")
        if attention_normalisation not in ATTENTION_NORMALISATIONS:
            raise ValueError(f"attention_normalisation={attention_normalisation!r} is unknown.")
        input_size = slot_size if input_size is None else input_size
        self.num_slots = num_slots
        self.slot_size = slot_size
        self.num_iterations = num_iterations
        self.attention_epsilon = attention_epsilon
        self.implicit_gradients = implicit_gradients
        self.learned_queries = learned_queries
        self.num_heads = num_heads
        self.head_size = slot_size // num_heads
        self.attention_normalisation = attention_normalisation

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
        if learned_queries:
            self.slots_queries = nn.Parameter(glorot_uniform_(torch.empty(1, num_slots, slot_size)))
        else:
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
        query_noise: float = 0.0,
        return_attention: bool = False,
    ):
        if self.learned_queries and num_slots not in (None, self.num_slots):
            raise ValueError(f"num_slots={num_slots!r} but this module learns {self.num_slots} queries.")
        if not self.learned_queries and query_noise != 0:
            raise ValueError("query_noise perturbs learned queries; build the module with learned_queries=True.")
        num_slots = self.num_slots if num_slots is None else num_slots
        num_iterations = self.num_iterations if num_iterations is None else num_iterations
        if initial_slots is None:
            initial_slots = self.sample_initial_slots(inputs, num_slots, generator, query_noise)
        if self.implicit_gradients:  # T iterations, then the one that is differentiated
            num_iterations += 1

        inputs = self.norm_inputs(inputs)
        keys = self.project_k(inputs)  # [B, N, D]
        values = self.project_v(inputs)  # [B, N, D]
        slots = initial_slots
        attention_maps = []
        for iteration in range(num_iterations):
            if iteration == num_iterations - 1:
                slots = self.last_iteration_slots(slots, initial_slots)
            slots_prev = slots
            queries = self.project_q(self.norm_slots(slots)) * self.head_size**-0.5  # [B, K, D]
            attention, updates = self.attend(queries, keys, values)  # [B, N, K], [B, K, D]
            attention_maps.append(attention)
            slots = self.gru(updates.reshape(-1, self.slot_size), slots_prev.reshape(-1, self.slot_size))
            slots = slots.reshape(updates.shape)
            slots = slots + self.mlp(self.norm_mlp(slots))

        if not return_attention:
            return slots
        attention = torch.stack(attention_maps, dim=1).transpose(-1, -2)  # [B, T, K, N]
        return slots, {"attention": attention, "initial_slots": initial_slots}

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Per head h: softmax over the slots of keys_h . queries_h, weights (attention + eps) normalised over the
        inputs (mean) or divided by N (scaled_sum). Returns the attention [B, N, K] averaged over the heads and
        the updates [B, K, D] (the heads' weighted values side by side)."""
        batch, num_slots, _ = queries.shape

        def heads(tensor):  # [B, L, D] -> [B, L, H, D / H]
            return tensor.reshape(batch, tensor.shape[1], self.num_heads, self.head_size)

        logits = torch.einsum("bnhd,bkhd->bnkh", heads(keys), heads(queries))
        attention = torch.softmax(logits, dim=2)  # slots compete for each input, in each head
        weights = attention + self.attention_epsilon
        if self.attention_normalisation == "mean":
            weights = weights / weights.sum(dim=1, keepdim=True)  # weighted mean over inputs
        else:
            weights = weights / weights.shape[1]  # weighted sum over inputs, divided by N
        updates = torch.einsum("bnkh,bnhd->bkhd", weights, heads(values)).reshape(batch, num_slots, self.slot_size)
        return attention.mean(dim=-1), updates

    def last_iteration_slots(self, slots: torch.Tensor, initial_slots: torch.Tensor) -> torch.Tensor:
        """Equal in value to `slots`; implicit gradients and learned queries cut the earlier iterations from the
        gradient, learned queries passing it straight to the initial slots."""
        if self.learned_queries:
            return slots.detach() + (initial_slots - initial_slots.detach())
        if self.implicit_gradients:
            return slots.detach()
        return slots

    def sample_initial_slots(self, inputs, num_slots, generator=None, query_noise=0.0) -> torch.Tensor:
        """mu + exp(log_sigma) * eps, or the learned queries Q + query_noise * eps * Q.detach(): [B, K, D]."""
        batch_size = inputs.shape[0]
        if self.learned_queries:
            queries = self.slots_queries.expand(batch_size, -1, -1)
            if query_noise == 0:
                return queries
            noise = torch.randn(queries.shape, generator=generator, device=inputs.device)
            return queries + query_noise * noise * queries.detach()
        noise = torch.randn(batch_size, num_slots, self.slot_size, generator=generator, device=inputs.device)
        return self.slots_mu + torch.exp(self.slots_log_sigma) * noise


def query_noise_schedule(step: int, anneal_steps: int) -> float:
    """BO-QSA's query noise at `step`: a cosine from 1 at step 0 to 0 at `anneal_steps`, 0 from there on."""
    if step >= anneal_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / anneal_steps))
