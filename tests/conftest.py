"""Shared fixtures: tiny configurations that train in seconds on a CPU.

Compiled programs are cached on disk (.jax_cache) for the pytest processes: many tests build the same tiny models,
and compilation dominates their time on a CPU. The train.py subprocesses that tests start (and kill) do not use it.
"""

import pathlib

import jax
import pytest

from slotjax import configs

CACHE_SETTINGS = {
    "jax_compilation_cache_dir": str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"),
    "jax_persistent_cache_min_compile_time_secs": 0.2,
}
for name, value in CACHE_SETTINGS.items():
    jax.config.update(name, value)


def pytest_collection_modifyitems(items):
    """Files holding slow tests first: pytest-xdist hands out whole files (`--dist loadfile`) in this order, so
    the longest start early and the two workers finish together instead of one waiting for the other."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order otherwise


def tiny_config(task: str = "discovery", **overrides):
    config = configs.get_config(task, "cpu")
    config.update(
        dict(
            resolution=16,
            batch_size=8,
            eval_batch_size=8,
            num_eval_examples=16,
            encoder_features=16,
            slot_size=16,
            mlp_hidden_size=16,
            num_train_steps=6,
            warmup_steps=2,
            decay_steps=100,
            log_every=1,
            eval_every=3,
            checkpoint_every=3,
            num_slots=4,
            max_objects=3,
            first_eval_seconds=0,
        )
    )
    if task == "discovery":
        config.decoder_features = 8
    else:
        config.update(head_hidden_size=16, num_slots=10)
    config.update(overrides)
    return config


@pytest.fixture
def tiny():
    return tiny_config
