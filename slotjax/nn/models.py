"""The two models of the paper: the slot autoencoder (object discovery) and the set predictor.

Both follow the official code (docs/architecture.md); widths, resolution and numbers of slots are constructor
arguments. Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
from flax import nnx

from slotjax.data.encoding import OBJECT_SIZE
from slotjax.nn.adaptive_slots import KeepPredictor, drop_slots
from slotjax.nn.invariant_slot_attention import InvariantSlotAttention, RelativePositionEmbed
from slotjax.nn.layers import LAYER_NORM_EPSILON, MLP, Conv, ConvTranspose, at_least_float32, dense, layer_norm
from slotjax.nn.slot_attention import SlotAttention


def build_grid(resolution: tuple[int, int]) -> jax.Array:
    """[H, W, 4] grid of (y, x, 1 - y, 1 - x), each linspace(0, 1) in "ij" order."""
    y, x = jnp.meshgrid(*(jnp.linspace(0.0, 1.0, size) for size in resolution), indexing="ij")
    return jnp.stack([y, x, 1.0 - y, 1.0 - x], axis=-1)


class SoftPositionEmbed(nnx.Module):
    """Adds a learned projection of the position grid: features + Dense(grid)."""

    def __init__(self, features: int, resolution: tuple[int, int], *, rngs: nnx.Rngs):
        self.resolution = tuple(resolution)
        self.dense = dense(4, features, rngs)

    def __call__(self, features: jax.Array) -> jax.Array:  # [B, H, W, C]
        return features + self.dense(build_grid(self.resolution))


class EncoderCNN(nnx.Module):
    """Conv 5x5 layers with relu, "SAME" padding; `strides` gives their number and strides."""

    def __init__(self, features: int, strides: tuple[int, ...], kernel_size: int = 5, *, rngs: nnx.Rngs):
        in_features = [3] + [features] * (len(strides) - 1)
        self.convs = nnx.List(
            [Conv(n_in, features, kernel_size, stride, rngs=rngs) for n_in, stride in zip(in_features, strides)]
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        for conv in self.convs:
            images = jax.nn.relu(conv(images))
        return images


class DecoderCNN(nnx.Module):
    """Spatial broadcast decoder's CNN: stride-2 5x5 transposed convs up to the image size,
    then a 5x5 and a 3x3 stride-1 transposed conv; 4 output channels (RGB + alpha logit)."""

    def __init__(self, in_features: int, features: int, num_upsamples: int, *, rngs: nnx.Rngs):
        shapes = [(in_features, features, 5, 2)] + [(features, features, 5, 2)] * (num_upsamples - 1)
        shapes += [(features, features, 5, 1), (features, 4, 3, 1)]
        self.convs = nnx.List([ConvTranspose(*shape, rngs=rngs) for shape in shapes])

    def __call__(self, features: jax.Array) -> jax.Array:
        for conv in self.convs[:-1]:
            features = jax.nn.relu(conv(features))
        return self.convs[-1](features)


def check_images(images: jax.Array, resolution: int) -> None:
    """Refuses images of the wrong rank, shape or dtype (static checks, free under jit)."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (resolution, resolution, 3):
        raise ValueError(
            f"images have shape {tuple(images.shape)}; this model expects [batch, {resolution}, {resolution}, 3] "
            "(NHWC, RGB). Resize the images or build the model with resolution matching them."
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images have dtype {images.dtype}; expected floats in [-1, 1] (uint8 x: x / 127.5 - 1).")
    if images.shape[0] == 0:
        raise ValueError("the batch holds no images; pass at least one.")


class SlotEncoder(nnx.Module):
    """CNN -> position embedding -> flatten -> LayerNorm -> MLP -> Slot Attention (shared by both models).

    `slot_attention_variants` go to `SlotAttention` (implicit_gradients, learned_queries, num_heads,
    attention_normalisation; docs/variants.md). With `invariant_slots`, Invariant Slot Attention replaces it, and
    the features get no absolute position embedding (the slots see positions relative to their own).
    """

    def __init__(
        self,
        resolution: int,
        strides: tuple[int, ...],
        encoder_features: int,
        num_slots: int,
        slot_size: int,
        num_iterations: int,
        mlp_hidden_size: int,
        *,
        rngs: nnx.Rngs,
        invariant_slots: bool = False,
        **slot_attention_variants,
    ):
        self.resolution = resolution
        grid = resolution // math.prod(strides)
        self.encoder_cnn = EncoderCNN(encoder_features, strides, rngs=rngs)
        self.encoder_pos = None if invariant_slots else SoftPositionEmbed(encoder_features, (grid, grid), rngs=rngs)
        self.layer_norm = layer_norm(encoder_features, LAYER_NORM_EPSILON, rngs)
        self.mlp = MLP(encoder_features, encoder_features, encoder_features, rngs=rngs)
        sizes = dict(input_size=encoder_features, num_iterations=num_iterations, mlp_hidden_size=mlp_hidden_size)
        if invariant_slots:
            defaults = inspect.signature(SlotAttention.__init__).parameters
            changed = sorted(name for name, value in slot_attention_variants.items() if value != defaults[name].default)
            if changed:
                raise ValueError(
                    f"invariant_slots=True replaces Slot Attention by Invariant Slot Attention, which has no "
                    f"{', '.join(changed)}: leave them at their defaults."
                )
            self.slot_attention = InvariantSlotAttention(num_slots, slot_size, (grid, grid), **sizes, rngs=rngs)
        else:
            self.slot_attention = SlotAttention(num_slots, slot_size, **sizes, rngs=rngs, **slot_attention_variants)

    def tokens(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> [B, N, C]: the inputs Slot Attention attends to, one per grid cell, row-major."""
        check_images(images, self.resolution)
        features = self.encoder_cnn(images)
        if self.encoder_pos is not None:
            features = self.encoder_pos(features)
        batch_size, height, width, channels = features.shape
        features = features.reshape(batch_size, height * width, channels)
        return self.mlp(self.layer_norm(features))

    def __call__(self, images: jax.Array, **slot_attention_options) -> tuple[jax.Array, dict]:
        return self.slot_attention(self.tokens(images), return_attention=True, **slot_attention_options)


class SlotAutoencoder(nnx.Module):
    """Object discovery: Slot Attention encoder and a spatial broadcast decoder with alpha masks.

    Returns a dict: reconstruction [B, H, W, 3], slot_reconstructions [B, K, H, W, 3],
    masks [B, K, H, W, 1] (softmax over slots), slots [B, K, D], attention [B, T, K, H*W].
    implicit_gradients, learned_queries, num_heads and attention_normalisation select Slot Attention's
    variants (docs/variants.md); call options (num_slots, num_iterations, initial_slots, key, query_noise) go to
    it too.

    adaptive_slots (AdaSlot): each slot is kept or dropped, and dropped slots get no share of the masks; the
    outputs add keep [B, K] (1 kept, 0 dropped). The decision is a Gumbel sample in training (noise drawn from
    `key`, or the `gumbel_noise` [B, K, 2] given), the more likely choice with `deterministic=True` (evaluation).

    invariant_slots (Invariant Slot Attention, translation and scale): slots with positions and scales, each
    decoded over the grid as it sees it; the outputs add positions and scales [B, K, 2] (y, x, in [-1, 1] image
    coordinates) and the attention has T + 1 rounds. Call options: num_iterations, key, initial_positions,
    initial_scales.
    """

    def __init__(
        self,
        resolution: int = 128,
        num_slots: int = 7,
        num_iterations: int = 3,
        slot_size: int = 64,
        encoder_features: int = 64,
        decoder_features: int = 64,
        mlp_hidden_size: int = 128,
        broadcast_resolution: int = 8,
        remat_decoder: bool = False,
        *,
        implicit_gradients: bool = False,
        learned_queries: bool = False,
        num_heads: int = 1,
        attention_normalisation: str = "mean",
        adaptive_slots: bool = False,
        invariant_slots: bool = False,
        rngs: nnx.Rngs,
    ):
        num_upsamples = math.log2(resolution / broadcast_resolution) if resolution >= broadcast_resolution else 0.5
        if num_upsamples < 1 or not num_upsamples.is_integer():
            raise ValueError(
                f"resolution {resolution} is not {broadcast_resolution} times a power of two (>= 2): the decoder "
                f"upsamples {broadcast_resolution}x{broadcast_resolution} by stride-2 steps. Use e.g. 32, 64 or 128."
            )
        self.resolution = resolution
        self.broadcast_resolution = broadcast_resolution
        self.remat_decoder = remat_decoder  # recompute the decoder's activations (the largest) in the backward pass
        self.encoder = SlotEncoder(
            resolution,
            (1, 1, 1, 1),
            encoder_features,
            num_slots,
            slot_size,
            num_iterations,
            mlp_hidden_size,
            rngs=rngs,
            implicit_gradients=implicit_gradients,
            learned_queries=learned_queries,
            num_heads=num_heads,
            attention_normalisation=attention_normalisation,
            invariant_slots=invariant_slots,
        )
        self.invariant_slots = bool(invariant_slots)
        position_embed = RelativePositionEmbed if invariant_slots else SoftPositionEmbed
        self.decoder_pos = position_embed(slot_size, (broadcast_resolution,) * 2, rngs=rngs)
        self.decoder_cnn = DecoderCNN(slot_size, decoder_features, int(num_upsamples), rngs=rngs)
        self.adaptive_slots = bool(adaptive_slots)
        if adaptive_slots:
            self.keep_predictor = KeepPredictor(slot_size, rngs=rngs)
            self.gumbel = nnx.Rngs(gumbel=rngs.params())  # the Gumbel noise of calls without a key

    def __call__(
        self,
        images: jax.Array,
        *,
        deterministic: bool = False,
        gumbel_noise: jax.Array | None = None,
        **slot_attention_options,
    ) -> dict[str, jax.Array]:
        if gumbel_noise is not None and (deterministic or not self.adaptive_slots):
            raise ValueError(
                "gumbel_noise samples the adaptive slots' keep decisions, which this call does not sample: "
                "build the model with adaptive_slots=True and leave deterministic False, or leave gumbel_noise out."
            )
        slots, aux = self.encoder(images, **slot_attention_options)
        batch_size, num_slots, slot_size = slots.shape
        size = self.broadcast_resolution
        broadcast = jnp.broadcast_to(
            slots.reshape(-1, 1, 1, slot_size), (batch_size * num_slots, size, size, slot_size)
        )
        decode = nnx.remat(DecoderCNN.__call__) if self.remat_decoder else DecoderCNN.__call__
        positioned = (
            self.decoder_pos(broadcast, aux["positions"], aux["scales"])
            if self.invariant_slots
            else self.decoder_pos(broadcast)
        )
        decoded = decode(self.decoder_cnn, positioned)  # [B * K, H, W, 4]
        decoded = decoded.reshape(batch_size, num_slots, *decoded.shape[1:])
        slot_reconstructions, alpha_logits = at_least_float32(decoded[..., :3]), decoded[..., 3:]
        masks = jax.nn.softmax(at_least_float32(alpha_logits), axis=1)
        outputs = {name: aux[name] for name in ("positions", "scales") if self.invariant_slots}
        if self.adaptive_slots:
            if not deterministic and gumbel_noise is None:  # one key draws the initial slots, one the noise
                key = slot_attention_options.get("key")
                key = self.gumbel.gumbel() if key is None else jax.random.fold_in(key, 1)
                gumbel_noise = jax.random.gumbel(key, (batch_size, num_slots, 2))
            outputs["keep"] = self.keep_predictor(slots, None if deterministic else gumbel_noise)  # [B, K]
            masks = drop_slots(masks, outputs["keep"])
        return {
            "reconstruction": jnp.sum(slot_reconstructions * masks, axis=1),
            "slot_reconstructions": slot_reconstructions,
            "masks": masks,
            "slots": slots,
            "attention": aux["attention"],
            **outputs,
        }


class SetPredictor(nnx.Module):
    """Set prediction: strided encoder, Slot Attention, per-slot MLP head with sigmoid.

    Returns a dict: predictions [B, K, 19] in [0, 1], slots [B, K, D], attention [B, T, K, N].
    Slot Attention's variants and call options as in `SlotAutoencoder`.
    """

    def __init__(
        self,
        resolution: int = 128,
        num_slots: int = 10,
        num_iterations: int = 3,
        slot_size: int = 64,
        encoder_features: int = 64,
        mlp_hidden_size: int = 128,
        head_hidden_size: int = 64,
        *,
        implicit_gradients: bool = False,
        learned_queries: bool = False,
        num_heads: int = 1,
        attention_normalisation: str = "mean",
        rngs: nnx.Rngs,
    ):
        strides = (1, 2, 2, 1)
        if resolution % math.prod(strides):
            raise ValueError(f"resolution {resolution} must be a multiple of 4 (the encoder downsamples by 4).")
        self.encoder = SlotEncoder(
            resolution,
            strides,
            encoder_features,
            num_slots,
            slot_size,
            num_iterations,
            mlp_hidden_size,
            rngs=rngs,
            implicit_gradients=implicit_gradients,
            learned_queries=learned_queries,
            num_heads=num_heads,
            attention_normalisation=attention_normalisation,
        )
        self.mlp_classifier = MLP(slot_size, head_hidden_size, OBJECT_SIZE, rngs=rngs)

    def __call__(self, images: jax.Array, **slot_attention_options) -> dict[str, jax.Array]:
        slots, aux = self.encoder(images, **slot_attention_options)
        predictions = jax.nn.sigmoid(at_least_float32(self.mlp_classifier(slots)))
        return {"predictions": predictions, "slots": slots, "attention": aux["attention"]}
