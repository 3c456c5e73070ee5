"""One config per task. Defaults are the paper's official values; `cpu` presets train quickly on a laptop.

`get_config(task, preset)` returns an `ml_collections.ConfigDict`; `train.py`
lets every field be overridden with `--config.FIELD=VALUE`. The preset "auto"
picks "cpu" for the embedded data set (`dataset="scenes"`) and "official" for
real data sets.
"""

from __future__ import annotations

import ml_collections

TASKS = ("discovery", "set_prediction")
PRESETS = ("auto", "official", "cpu")


def _common() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "scenes"  # embedded procedural scenes; or clevr, clevr_with_masks, multi_dsprites, ...
    config.data_dir = ""  # where real data sets live (TFDS directory or the DeepMind TFRecord files)
    config.seed = 0
    config.learning_rate = 4e-4
    config.decay_rate = 0.5
    config.grad_clip_norm = 0.0  # 0: no clipping (the paper); > 0: clip gradients to this global norm
    config.num_iterations = 3
    config.slot_size = 64
    config.encoder_features = 64
    config.mlp_hidden_size = 128
    config.log_every = 50
    config.num_eval_examples = 512  # evaluated on the validation split
    config.first_eval_seconds = 60.0  # also evaluate (metrics and a picture) once after this much training; 0: off
    config.eval_batch_size = 64
    config.max_checkpoints_to_keep = 3
    config.num_devices = 0  # data-parallel over this many local devices; 0 = all
    # train.py on a CPU: split its cores into this many XLA devices, one batch shard each (slotjax.cpu_devices);
    # 0 = one per core (the most that divide the batch sizes, at least num_devices), 1 = one multi-threaded device
    config.cpu_devices = 0
    config.nonfinite_loss = "stop"  # "stop" training, or "skip" the batch
    config.compute_dtype = "float32"  # "bfloat16": mixed precision (float32 parameters, softmax, normalisations)
    config.remat_decoder = False  # recompute the decoder's activations in the backward pass (less memory)
    # Embedded data set: objects per scene (the data set itself, not the model).
    config.min_objects = 2
    config.max_objects = 6
    return config


def _apply_cpu_preset(config: ml_collections.ConfigDict, **task_fields) -> None:
    """Minutes on 2 CPU cores: 32x32 images, small layers, gradients clipped to norm 1 (later Slot Attention work
    clips; the paper does not). benchmarks/README.md holds the search behind these values."""
    config.update(dict(resolution=32, decay_steps=100_000, grad_clip_norm=1.0, log_every=100, **task_fields))


def discovery(preset: str = "official") -> ml_collections.ConfigDict:
    """Object discovery (SPEC section 2): slot autoencoder on CLEVR6 at 128x128."""
    config = _common()
    config.task = "discovery"
    config.resolution = 128
    config.batch_size = 64
    config.num_train_steps = 500_000
    config.warmup_steps = 10_000
    config.decay_steps = 100_000
    config.num_slots = 7
    config.decoder_features = 64
    config.eval_every = 5_000
    config.checkpoint_every = 5_000
    if preset == "cpu":
        _apply_cpu_preset(config, batch_size=16, learning_rate=4e-4, warmup_steps=500, num_train_steps=3_500,
                          encoder_features=32, slot_size=32, mlp_hidden_size=64, decoder_features=32,
                          eval_every=500, checkpoint_every=500, num_eval_examples=256)
    return config


def set_prediction(preset: str = "official") -> ml_collections.ConfigDict:
    """Set prediction (SPEC section 3): property prediction on CLEVR at 128x128."""
    config = _common()
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
        _apply_cpu_preset(config, batch_size=32, learning_rate=1e-3, warmup_steps=500, num_train_steps=10_000,
                          num_slots=7, eval_every=1_000, checkpoint_every=1_000, num_eval_examples=512)
    return config


def get_config(task: str = "discovery", preset: str = "auto", dataset: str = "scenes") -> ml_collections.ConfigDict:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if preset == "auto":
        preset = "cpu" if dataset == "scenes" else "official"
    config = {"discovery": discovery, "set_prediction": set_prediction}[task](preset)
    config.dataset = dataset
    config.preset = preset
    return config
