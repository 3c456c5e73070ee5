"""Metric writers: `metrics.jsonl`, TensorBoard events and PNG pictures in the work directory."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from slotjax import visualize


class Logger:
    """Metrics to `metrics.jsonl` and TensorBoard, pictures to `images/` (on process 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        if self.active:
            from flax.metrics import tensorboard  # TensorFlow: imported when a run writes its logs

            self.writer = tensorboard.SummaryWriter(workdir)

    def scalars(self, step: int, split: str, values: dict[str, float], setting: dict | None = None) -> None:
        """One row of `metrics.jsonl` (with `setting`, e.g. an evaluation's test-time settings, where given) and
        the values as TensorBoard scalars."""
        if not self.active:
            return
        values = {name: float(value) for name, value in values.items()}
        row = {
            "step": step,
            "split": split,
            "wall_time": time.time(),
            **values,
            **({"setting": setting} if setting else {}),
        }
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as file:
            file.write(json.dumps(row) + "\n")
        for name, value in values.items():
            self.writer.scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def picture(self, step: int, split: str, picture: np.ndarray, name: str = "examples") -> str | None:
        """images/SPLIT_step_STEP.png ("examples") or images/SPLIT_NAME_step_STEP.png, and TensorBoard's SPLIT/NAME."""
        if not self.active:
            return None
        kind = "" if name == "examples" else f"{name}_"
        path = os.path.join(self.workdir, "images", f"{split}_{kind}step_{step:07d}.png")
        visualize.save_png(picture, path)
        self.writer.image(f"{split}/{name}", picture, step)
        return path
