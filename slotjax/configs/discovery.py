"""Object discovery: the slot autoencoder on CLEVR6 at 128x128 (docs/architecture.md).

python train.py --config=configs/discovery.py:official
"""

from __future__ import annotations

import ml_collections

from slotjax.configs.common import apply_cpu_preset, common


def get_config(preset: str = "official") -> ml_collections.ConfigDict:
    config = common(preset)
    config.task = "discovery"
    config.resolution = 128
    config.batch_size = 64
    config.num_train_steps = 500_000
    config.warmup_steps = 10_000
    config.decay_steps = 100_000
    config.num_slots = 7
    config.decoder_features = 64
    config.adaptive_slots = False  # AdaSlot (Fan et al., 2024): the model keeps or drops each slot (docs/variants.md)
    config.keep_loss_weight = 10.0  # adaptive slots: weight of the share of slots kept, as AdaSlot's on CLEVR10
    # Invariant Slot Attention (Biza et al., 2023): slots with positions and scales, each decoded in its own frame
    config.invariant_slots = False
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    if preset == "cpu":
        apply_cpu_preset(
            config,
            batch_size=16,
            learning_rate=4e-4,
            warmup_steps=500,
            num_train_steps=3_500,
            encoder_features=32,
            slot_size=32,
            mlp_hidden_size=64,
            decoder_features=32,
            eval_every=500,
            checkpoint_every=500,
            num_eval_examples=256,
        )
    return config
