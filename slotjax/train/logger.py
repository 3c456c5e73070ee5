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

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        values = {name: float(value) for name, value in values.items()}
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as file:
            file.write(json.dumps({"step": step, "split": split, "wall_time": time.time(), **values}) + "\n")
        for name, value in values.items():
            self.writer.scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def picture(self, step: int, split: str, picture: np.ndarray) -> str | None:
        if not self.active:
            return None
        path = os.path.join(self.workdir, "images", f"{split}_step_{step:07d}.png")
        visualize.save_png(picture, path)
        self.writer.image(f"{split}/examples", picture, step)
        return path
