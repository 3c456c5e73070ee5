"""Shared fixtures: tiny configurations that train in seconds on a CPU."""

import pytest

from slotjax import configs


def tiny_config(task: str = "discovery", **overrides):
    config = configs.get_config(task, "cpu")
    config.update(dict(resolution=16, batch_size=8, eval_batch_size=8, num_eval_examples=16, encoder_features=16,
                       slot_size=16, mlp_hidden_size=16, num_train_steps=6, warmup_steps=2, decay_steps=100,
                       log_every=1, eval_every=3, checkpoint_every=3, num_slots=4, max_objects=3))
    if task == "discovery":
        config.decoder_features = 8
    else:
        config.update(head_hidden_size=16, num_slots=10)
    config.update(overrides)
    return config


@pytest.fixture
def tiny():
    return tiny_config
