"""Training configurations: one file per task (`discovery.py`, `set_prediction.py`), each with presets.

Each file's `get_config(preset)` returns an `ml_collections.ConfigDict`: "official" (the default) holds the
paper's values, "cpu" a small model that trains in minutes on a laptop. train.py reads them with
`--config=configs/TASK.py:PRESET` (or `--task=TASK`) and takes `--config.FIELD=VALUE` overrides.

Every config read from elsewhere (a checkpoint's, a weights file's, a config file of one's own) passes through
`with_defaults`, so a field added after it was written gets its value here and the code reads `config.FIELD`.
"""

from __future__ import annotations

import importlib

import ml_collections

from slotjax import TASKS

PRESETS = ("auto", "official", "cpu")


def preset_for(dataset: str, preset: str = "auto") -> str:
    """The preset "auto" is "cpu" on the embedded scenes and "official" on real data sets."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if preset == "auto":
        return "cpu" if dataset == "scenes" else "official"
    return preset


def get_config(task: str = "discovery", preset: str = "auto", dataset: str = "scenes") -> ml_collections.ConfigDict:
    """The config of `task` with `preset` ("auto": by the data set) for `dataset`."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    try:
        module = importlib.import_module(f"slotjax.configs.{task}")
    except ModuleNotFoundError:
        raise ValueError(f"Task {task!r} has no config file (slotjax/configs/{task}.py).") from None
    config = module.get_config(preset_for(dataset, preset))
    config.dataset = dataset
    return config


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config`, completed in place: each field its task's config file has and it lacks (written before the field
    existed) gets the file's value for the config's preset. A config of no known task is left as it is (the config
    checks refuse it)."""
    if config.get("task") not in TASKS:
        return config
    defaults = get_config(config.task, config.get("preset", "official"), config.get("dataset", "scenes"))
    with config.unlocked():
        for name, value in defaults.items():
            if name not in config:
                config[name] = value
    return config
