"""PyTorch twin of `slotjax/nn/adaptive_slots.py` (AdaSlot's keep-or-drop decision per slot)."""

from __future__ import annotations

import torch
from torch import nn

from torch_reference.nn.layers import LAYER_NORM_EPSILON, MLP

MASK_EPSILON = 1e-5


class KeepPredictor(nn.Module):
    """LayerNorm -> MLP (D -> 4D, relu -> 2): logits of (drop, keep) per slot. See slotjax's."""

    def __init__(self, slot_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(slot_size, eps=LAYER_NORM_EPSILON)
        self.mlp = MLP(slot_size, 4 * slot_size, 2)

    def forward(self, slots: torch.Tensor, gumbel_noise: torch.Tensor | None = None) -> torch.Tensor:
        """keep [B, K]: hard Gumbel-softmax sample (straight-through) with noise, the argmax without."""
        logits = self.mlp(self.norm(slots))
        if gumbel_noise is None:
            return (logits[..., 1] > logits[..., 0]).float()
        perturbed = logits + gumbel_noise
        soft = torch.softmax(perturbed, dim=-1)[..., 1]
        hard = (perturbed[..., 1] > perturbed[..., 0]).float()
        return hard + (soft - soft.detach())


def drop_slots(masks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """masks [B, K, 1, H, W] of the kept slots renormalised over them: keep * alpha / (sum keep * alpha + 1e-5)."""
    masks = keep[:, :, None, None, None] * masks
    return masks / (masks.sum(dim=1, keepdim=True) + MASK_EPSILON)


def sample_gumbel(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard Gumbel samples -log(-log(U)), U ~ U(0, 1)."""
    uniform = torch.rand(shape, generator=generator, device=device).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))
