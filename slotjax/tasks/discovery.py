"""Object discovery: the slot autoencoder reconstructs the image; MSE loss, FG-ARI and ARI against the ground-truth
segmentation (docs/architecture.md)."""

from __future__ import annotations

import functools
import math

import jax
import ml_collections
import numpy as np
from flax import nnx

from slotjax import visualize
from slotjax.data.files import CLEVR6_MAX_OBJECTS, DATASETS
from slotjax.nn.models import SlotAutoencoder
from slotjax.tasks.task import DataNeeds, Task
from slotjax.train import losses, metrics

MAX_ENTITIES = 11  # ground-truth ids 0..10 (CLEVR with masks has the most: 10 objects + background)
BROADCAST_RESOLUTION = 8  # the official decoder starts from 8x8 and doubles it in each stride-2 layer
PICTURED = ("reconstruction", "masks", "slot_reconstructions")


class Discovery(Task):
    name = "discovery"
    model_fields = ("decoder_features", "adaptive_slots", "invariant_slots")
    torch_model = "SlotAutoencoder"
    datasets = ("scenes", *DATASETS)
    data = DataNeeds(clevr_max_objects=CLEVR6_MAX_OBJECTS, clevr_crop=True)  # CLEVR6, cropped as the official code
    tf_head = "decoder_cnn/"

    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SlotAutoencoder:
        return SlotAutoencoder(**self.model_arguments(config), remat_decoder=config.remat_decoder, rngs=rngs)

    def forward(self, config: ml_collections.ConfigDict, model: nnx.Module, batch: dict, key: jax.Array, step=None):
        """As every task's; adaptive slots are sampled in training and decided by the likelier choice in evaluation."""
        if not config.adaptive_slots:
            return super().forward(config, model, batch, key, step)
        return super().forward(config, functools.partial(model, deterministic=step is None), batch, key, step)

    def loss(self, outputs: dict, batch: dict, config: ml_collections.ConfigDict) -> jax.Array:
        """MSE over B x H x W x C; with adaptive slots plus keep_loss_weight times the share of slots kept, divided by
        H x W x C (AdaSlot's weight on a per-image sum of squared errors)."""
        mse = losses.mse_loss(outputs["reconstruction"], batch["image"])
        if not config.adaptive_slots:
            return mse
        return mse + config.keep_loss_weight * outputs["keep"].mean() / math.prod(batch["image"].shape[1:])

    def scores(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        """Each image's MSE (as "loss" and "mse"), and its FG-ARI, ARI and mBO where the batch has a segmentation
        (docs/metrics.md)."""
        mse = losses.mse_loss(outputs["reconstruction"], batch["image"], axis=(1, 2, 3))
        scores = {"loss": mse, "mse": mse}
        if "segmentation" in batch:
            scores["fg_ari"] = metrics.fg_ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
            scores["ari"] = metrics.ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
            scores["mbo"] = metrics.mbo_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
        if "keep" in outputs:  # adaptive slots
            scores["kept_slots"] = outputs["keep"].sum(axis=1)
        return scores

    def pictured(self, outputs: dict, batch: dict) -> dict[str, jax.Array]:
        return {"image": batch["image"], **{name: outputs[name] for name in PICTURED}}

    def picture(self, pictured: dict[str, np.ndarray]) -> np.ndarray:
        return visualize.discovery_grid(*(pictured[name] for name in ("image", *PICTURED)))

    def tf_names(self, table, torch_names) -> None:
        table.layer("decoder_pos/dense", "decoder_pos.dense", table.DENSE)
        num_layers = sum(name.startswith("decoder_cnn.") and name.endswith(".bias") for name in torch_names)
        for index in range(num_layers):
            table.layer(f"decoder_cnn/layer_with_weights-{index}", f"decoder_cnn.convs.{index}", table.CONV)

    def tf_config(self, config: ml_collections.ConfigDict, variables, required, resolution: int | None) -> None:
        """The decoder's width, and the resolution its number of layers implies (8x8 doubled by each stride-2
        layer; all but the last two are)."""
        num_layers = len({name.split("/")[1] for name in variables if name.startswith(self.tf_head)})
        if num_layers < 3:
            raise ValueError(
                f"{num_layers} decoder_cnn layers; the official decoder has at least one stride-2 layer and two "
                "stride-1 layers."
            )
        config.decoder_features = required("decoder_cnn/layer_with_weights-0/kernel", 4)[2]
        implied = BROADCAST_RESOLUTION * 2 ** (num_layers - 2)
        if resolution is not None and resolution != implied:
            raise ValueError(
                f"a decoder of {num_layers} layers, which produces {implied}x{implied} images, not the "
                f"{resolution}x{resolution} asked for."
            )
        config.resolution = implied


DISCOVERY = Discovery()
