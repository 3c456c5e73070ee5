"""Set prediction: object properties on CLEVR at 128x128, Hungarian loss, AP (docs/architecture.md).

python train.py --config=configs/set_prediction.py:official
"""

from __future__ import annotations

import ml_collections

from slotjax.configs.common import apply_cpu_preset, common


def get_config(preset: str = "official") -> ml_collections.ConfigDict:
    config = common(preset)
    config.task = "set_prediction"
    config.resolution = 128
    config.batch_size = 512
    config.num_train_steps = 150_000
    config.warmup_steps = 1_000
    config.decay_steps = 50_000
    config.num_slots = 10
    config.head_hidden_size = 64
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    if preset == "cpu":
        apply_cpu_preset(
            config,
            batch_size=32,
            learning_rate=1e-3,
            warmup_steps=500,
            num_train_steps=10_000,
            num_slots=7,
            eval_every=1_000,
            checkpoint_every=1_000,
            num_eval_examples=512,
        )
    return config
