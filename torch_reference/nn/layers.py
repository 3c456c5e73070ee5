"""PyTorch twins of `slotjax/nn/layers.py`: same names, same parameters.

Kept plain on purpose: this is the reference the JAX code is checked against.
Layouts are torch's (NCHW images, Linear weight [out, in]); `slotjax.convert`
translates (docs/parity.md). Initialisers follow the official Keras code, like slotjax.
"""

from __future__ import annotations

import torch
from torch import nn

LAYER_NORM_EPSILON = 1e-3  # Keras' default, set on both sides (docs/parity.md)


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
        self.weight = nn.Parameter(
            nn.init.xavier_uniform_(torch.empty(out_features, in_features, kernel_size, kernel_size))
        )
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
        self.weight = nn.Parameter(
            nn.init.xavier_uniform_(torch.empty(in_features, out_features, kernel_size, kernel_size))
        )
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, in, H, W]
        padding = same_padding(self.weight.shape[-1], self.stride)[0]
        output = nn.functional.conv_transpose2d(images, self.weight, self.bias, stride=self.stride, padding=padding)
        height, width = images.shape[-2] * self.stride, images.shape[-1] * self.stride
        return output[..., :height, :width]
