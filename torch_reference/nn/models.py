"""PyTorch twins of `slotjax/nn/models.py`. Images are NCHW here; outputs likewise channels-first."""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_reference.nn.adaptive_slots import KeepPredictor, drop_slots, sample_gumbel
from torch_reference.nn.invariant_slot_attention import InvariantSlotAttention, RelativePositionEmbed
from torch_reference.nn.layers import LAYER_NORM_EPSILON, MLP, Conv, ConvTranspose, dense
from torch_reference.nn.slot_attention import SlotAttention

OBJECT_SIZE = 19  # values per object of the set-prediction target (docs/target_encoding.md)
# The variants (docs/variants.md) at their settings that give the paper's models
PAPER = dict(
    implicit_gradients=False,
    learned_queries=False,
    num_heads=1,
    attention_normalisation="mean",
    adaptive_slots=False,
    invariant_slots=False,
)


def paper_differences(variants: dict, **model_variants) -> dict:
    """The variants whose settings differ from the paper's (what `arguments` records)."""
    return {name: value for name, value in {**variants, **model_variants}.items() if value != PAPER[name]}


def build_grid(resolution: tuple[int, int]) -> torch.Tensor:
    """[H, W, 4] grid of (y, x, 1 - y, 1 - x), each linspace(0, 1) in "ij" order."""
    y, x = torch.meshgrid(*(torch.linspace(0.0, 1.0, size) for size in resolution), indexing="ij")
    return torch.stack([y, x, 1.0 - y, 1.0 - x], dim=-1)


class SoftPositionEmbed(nn.Module):
    def __init__(self, features: int, resolution: tuple[int, int]):
        super().__init__()
        self.dense = dense(4, features)
        self.register_buffer("grid", build_grid(resolution), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        return features + self.dense(self.grid).permute(2, 0, 1)


class EncoderCNN(nn.Module):
    def __init__(self, features: int, strides: tuple[int, ...], kernel_size: int = 5):
        super().__init__()
        in_features = [3] + [features] * (len(strides) - 1)
        self.convs = nn.ModuleList(
            [Conv(n_in, features, kernel_size, stride) for n_in, stride in zip(in_features, strides)]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            images = torch.relu(conv(images))
        return images


class DecoderCNN(nn.Module):
    def __init__(self, in_features: int, features: int, num_upsamples: int):
        super().__init__()
        shapes = [(in_features, features, 5, 2)] + [(features, features, 5, 2)] * (num_upsamples - 1)
        shapes += [(features, features, 5, 1), (features, 4, 3, 1)]
        self.convs = nn.ModuleList([ConvTranspose(*shape) for shape in shapes])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            features = torch.relu(conv(features))
        return self.convs[-1](features)


class SlotEncoder(nn.Module):
    def __init__(
        self,
        resolution,
        strides,
        encoder_features,
        num_slots,
        slot_size,
        num_iterations,
        mlp_hidden_size,
        invariant_slots=False,
        **slot_attention_variants,
    ):
        super().__init__()
        grid = resolution // math.prod(strides)
        self.encoder_cnn = EncoderCNN(encoder_features, strides)
        self.encoder_pos = None if invariant_slots else SoftPositionEmbed(encoder_features, (grid, grid))
        self.layer_norm = nn.LayerNorm(encoder_features, eps=LAYER_NORM_EPSILON)
        self.mlp = MLP(encoder_features, encoder_features, encoder_features)
        sizes = dict(input_size=encoder_features, num_iterations=num_iterations, mlp_hidden_size=mlp_hidden_size)
        if invariant_slots:
            if paper_differences(slot_attention_variants):
                raise ValueError(
                    f"Invariant Slot Attention has no {', '.join(paper_differences(slot_attention_variants))}."
                )
            self.slot_attention = InvariantSlotAttention(num_slots, slot_size, (grid, grid), **sizes)
        else:
            self.slot_attention = SlotAttention(num_slots, slot_size, **sizes, **slot_attention_variants)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, C]: the inputs Slot Attention attends to, one per grid cell, row-major."""
        features = self.encoder_cnn(images)
        if self.encoder_pos is not None:
            features = self.encoder_pos(features)
        features = features.permute(0, 2, 3, 1).flatten(1, 2)
        return self.mlp(self.layer_norm(features))

    def forward(self, images: torch.Tensor, **slot_attention_options):  # [B, 3, H, W]
        return self.slot_attention(self.tokens(images), return_attention=True, **slot_attention_options)


class SlotAutoencoder(nn.Module):
    """Outputs: reconstruction [B, 3, H, W], slot_reconstructions [B, K, 3, H, W], masks [B, K, 1, H, W], slots."""

    def __init__(
        self,
        resolution=128,
        num_slots=7,
        num_iterations=3,
        slot_size=64,
        encoder_features=64,
        decoder_features=64,
        mlp_hidden_size=128,
        broadcast_resolution=8,
        *,
        implicit_gradients=False,
        learned_queries=False,
        num_heads=1,
        attention_normalisation="mean",
        adaptive_slots=False,
        invariant_slots=False,
    ):
        super().__init__()
        variants = dict(
            implicit_gradients=implicit_gradients,
            learned_queries=learned_queries,
            num_heads=num_heads,
            attention_normalisation=attention_normalisation,
        )
        self.arguments = dict(
            resolution=resolution,
            num_slots=num_slots,
            num_iterations=num_iterations,
            slot_size=slot_size,
            encoder_features=encoder_features,
            decoder_features=decoder_features,
            mlp_hidden_size=mlp_hidden_size,
            broadcast_resolution=broadcast_resolution,
            **paper_differences(variants, adaptive_slots=adaptive_slots, invariant_slots=invariant_slots),
        )  # what `save_model` writes for `load_model` (variants only where they differ from the paper)
        self.broadcast_resolution = broadcast_resolution
        self.encoder = SlotEncoder(
            resolution,
            (1, 1, 1, 1),
            encoder_features,
            num_slots,
            slot_size,
            num_iterations,
            mlp_hidden_size,
            invariant_slots=invariant_slots,
            **variants,
        )
        self.invariant_slots = invariant_slots
        position_embed = RelativePositionEmbed if invariant_slots else SoftPositionEmbed
        self.decoder_pos = position_embed(slot_size, (broadcast_resolution,) * 2)
        num_upsamples = int(math.log2(resolution // broadcast_resolution))
        self.decoder_cnn = DecoderCNN(slot_size, decoder_features, num_upsamples)
        self.adaptive_slots = adaptive_slots
        if adaptive_slots:
            self.keep_predictor = KeepPredictor(slot_size)

    def forward(
        self, images: torch.Tensor, *, deterministic=False, gumbel_noise=None, **slot_attention_options
    ) -> dict[str, torch.Tensor]:
        slots, aux = self.encoder(images, **slot_attention_options)
        batch_size, num_slots, slot_size = slots.shape
        size = self.broadcast_resolution
        broadcast = slots.reshape(-1, slot_size, 1, 1).expand(-1, -1, size, size)
        if self.invariant_slots:
            broadcast = self.decoder_pos(broadcast, aux["positions"], aux["scales"])
        else:
            broadcast = self.decoder_pos(broadcast)
        decoded = self.decoder_cnn(broadcast)  # [B * K, 4, H, W]
        decoded = decoded.reshape(batch_size, num_slots, *decoded.shape[1:])
        slot_reconstructions, alpha_logits = decoded[:, :, :3], decoded[:, :, 3:]
        masks = torch.softmax(alpha_logits, dim=1)
        outputs = {name: aux[name] for name in ("positions", "scales") if self.invariant_slots}
        if self.adaptive_slots:
            if not deterministic and gumbel_noise is None:
                generator = slot_attention_options.get("generator")
                gumbel_noise = sample_gumbel((batch_size, num_slots, 2), generator, images.device)
            outputs["keep"] = self.keep_predictor(slots, None if deterministic else gumbel_noise)
            masks = drop_slots(masks, outputs["keep"])
        return {
            "reconstruction": (slot_reconstructions * masks).sum(dim=1),
            "slot_reconstructions": slot_reconstructions,
            "masks": masks,
            "slots": slots,
            "attention": aux["attention"],
            **outputs,
        }


class SetPredictor(nn.Module):
    """Outputs: predictions [B, K, 19] in [0, 1], slots, attention."""

    def __init__(
        self,
        resolution=128,
        num_slots=10,
        num_iterations=3,
        slot_size=64,
        encoder_features=64,
        mlp_hidden_size=128,
        head_hidden_size=64,
        *,
        implicit_gradients=False,
        learned_queries=False,
        num_heads=1,
        attention_normalisation="mean",
    ):
        super().__init__()
        variants = dict(
            implicit_gradients=implicit_gradients,
            learned_queries=learned_queries,
            num_heads=num_heads,
            attention_normalisation=attention_normalisation,
        )
        self.arguments = dict(
            resolution=resolution,
            num_slots=num_slots,
            num_iterations=num_iterations,
            slot_size=slot_size,
            encoder_features=encoder_features,
            mlp_hidden_size=mlp_hidden_size,
            head_hidden_size=head_hidden_size,
            **paper_differences(variants),
        )  # what `save_model` writes for `load_model` (variants only where they differ from the paper)
        self.encoder = SlotEncoder(
            resolution,
            (1, 2, 2, 1),
            encoder_features,
            num_slots,
            slot_size,
            num_iterations,
            mlp_hidden_size,
            **variants,
        )
        self.mlp_classifier = MLP(slot_size, head_hidden_size, OBJECT_SIZE)

    def forward(self, images: torch.Tensor, **slot_attention_options) -> dict[str, torch.Tensor]:
        slots, aux = self.encoder(images, **slot_attention_options)
        return {"predictions": torch.sigmoid(self.mlp_classifier(slots)), "slots": slots, "attention": aux["attention"]}
