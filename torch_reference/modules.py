"""PyTorch twins of `slotjax/modules.py`: same names, same parameters.

Kept plain on purpose: this is the reference the JAX code is checked against.
Layouts are torch's (NCHW images, Linear weight [out, in]); `slotjax.convert`
translates. Initialisers follow the official Keras code, like slotjax.
"""

from __future__ import annotations

import torch
from torch import nn

LAYER_NORM_EPSILON = 1e-3
ATTENTION_EPSILON = 1e-8


def dense(in_features: int, out_features: int, use_bias: bool = True) -> nn.Linear:
    """Keras-initialised Dense: glorot-uniform weight, zero bias."""
    layer = nn.Linear(in_features, out_features, bias=use_bias)
    nn.init.xavier_uniform_(layer.weight)
    if use_bias:
        nn.init.zeros_(layer.bias)
    return layer


def glorot_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """Keras' glorot-uniform for any rank: fan_in = shape[-2] * receptive, fan_out = shape[-1] * receptive.

    torch's xavier_uniform_ counts fans differently for rank > 2, so the
    [1, 1, D] slot parameters use this instead.
    """
    receptive = tensor[..., 0, 0].numel()
    fan_in, fan_out = tensor.shape[-2] * receptive, tensor.shape[-1] * receptive
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    with torch.no_grad():
        return tensor.uniform_(-limit, limit)


class MLP(nn.Module):
    """Dense(hidden, relu) -> Dense(out)."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int):
        super().__init__()
        self.hidden = dense(in_features, hidden_size)
        self.output = dense(hidden_size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))


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
        attention_epsilon: float = ATTENTION_EPSILON,
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


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for an input size that is a multiple of `stride`."""
    total = max(kernel_size - stride, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """Conv2d with TF "SAME" padding: explicit (before, after) padding, then an unpadded conv.

    (torch's padding=2 for a 5x5 stride-2 conv is off by one against TF's (1, 2).)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(out_features, in_features, kernel_size, kernel_size)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, in, H, W]
        before, after = same_padding(self.weight.shape[-1], self.stride)
        images = nn.functional.pad(images, (before, after, before, after))
        return nn.functional.conv2d(images, self.weight, self.bias, stride=self.stride)


class ConvTranspose(nn.Module):
    """ConvTranspose2d matching TF's "SAME": padding = TF's padding before, then crop to stride * size.

    (padding=2, output_padding=1 has the right size but is shifted by one pixel.)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(in_features, out_features, kernel_size, kernel_size)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, in, H, W]
        padding = same_padding(self.weight.shape[-1], self.stride)[0]
        output = nn.functional.conv_transpose2d(images, self.weight, self.bias, stride=self.stride, padding=padding)
        height, width = images.shape[-2] * self.stride, images.shape[-1] * self.stride
        return output[..., :height, :width]
