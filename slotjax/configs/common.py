"""Fields shared by both tasks, and the CPU preset's changes to the official values."""

from __future__ import annotations

import ml_collections


def common(preset: str) -> ml_collections.ConfigDict:
    if preset not in ("official", "cpu"):
        raise ValueError(f"Unknown preset {preset!r}; choose official or cpu.")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.dataset = "scenes"  # embedded procedural scenes; or clevr, clevr_with_masks, multi_dsprites, ...
    config.data_dir = ""  # where real data sets live (TFDS directory or the DeepMind TFRecord files)
    config.seed = 0
    config.learning_rate = 4e-4
    config.decay_rate = 0.5
    config.grad_clip_norm = 0.0  # 0: no clipping (the paper); > 0: clip gradients to this global norm
    # where Adam adds its epsilon: "keras" to sqrt(v) before the step size's bias correction (the paper's code),
    # "optax" to sqrt(v_hat) after it (optax's and torch's Adam); docs/parity.md
    config.adam_epsilon = "keras"
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
    # train.py on a CPU: split its cores into this many JAX devices, one batch shard each (slotjax.cpu_devices);
    # 0 = one per core (the most that divide the batch sizes, at least num_devices), 1 = one multi-threaded device
    config.cpu_devices = 0
    config.nonfinite_loss = "stop"  # "stop" training, or "skip" the batch
    config.nonfinite_skip_limit = 10  # with "skip": stop after this many non-finite batches in a row
    config.compute_dtype = "float32"  # "bfloat16": mixed precision (float32 parameters, softmax, normalisations)
    config.remat_decoder = False  # recompute the decoder's activations in the backward pass (less memory)
    # Slot Attention's variants (docs/variants.md); each default is the paper's module.
    config.implicit_gradients = False  # gradients through the last iteration only (Chang et al., 2022)
    config.learned_queries = False  # learned initial slots, straight-through to them (BO-QSA, Jia et al., 2023)
    config.query_noise_anneal_steps = 0  # learned queries: training noise on them, 1 -> 0 over this many steps
    config.num_heads = 1  # heads of the attention step
    config.attention_normalisation = "mean"  # "mean" over the inputs (the paper) or "scaled_sum" (Krimmel et al.)
    # Embedded data set: objects per scene (the data set itself, not the model).
    config.min_objects = 2
    config.max_objects = 6
    return config


def apply_cpu_preset(config: ml_collections.ConfigDict, **task_fields) -> None:
    """Minutes on 2 CPU cores: 32x32 images, small layers, gradients clipped to norm 1 (later Slot Attention work
    clips; the paper does not). benchmarks/README.md holds the search behind these values."""
    config.update(dict(resolution=32, decay_steps=100_000, grad_clip_norm=1.0, log_every=100, **task_fields))
