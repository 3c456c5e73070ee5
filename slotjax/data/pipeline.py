"""Batches for training and evaluation, as numpy dicts, one process's share of each global batch.

Keys: `image` float32 [B, R, R, 3] in [-1, 1]; `segmentation` int32 [B, R, R]
(0 = background) where the data set has masks; `target` float32 [B, 10, 19]
where it has object properties. The embedded scenes have all three.

Training batches of the embedded data set depend only on (seed, step): batch s
holds training scenes s * B ... (s + 1) * B - 1, so a resumed run sees exactly
the batches an uninterrupted one would, whatever the number of devices.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from slotjax.data import files, scenes


def check_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Refuses a batch whose images are not float [B, R, R, 3] (B >= 1), finite and in [-1, 1], whose other
    arrays do not have B rows, or whose set-prediction targets are not finite floats, naming the problem."""
    if not hasattr(batch, "keys") or "image" not in batch:
        holds = sorted(map(str, batch.keys())) if hasattr(batch, "keys") else f"a {type(batch).__name__}"
        raise ValueError(f"the batch has no 'image' entry (it is {holds}); expected a dict of arrays.")
    images = np.asarray(batch["image"])
    if images.ndim != 4 or images.shape[1:] != (resolution, resolution, 3):
        raise ValueError(
            f"images have shape {images.shape}; expected [batch, {resolution}, {resolution}, 3]. "
            "Set --config.resolution to the data's resolution."
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images have dtype {images.dtype}; expected floats in [-1, 1] (uint8 x: x / 127.5 - 1).")
    if images.shape[0] == 0:
        raise ValueError("the batch holds no images.")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf; check the data set files.")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - 1e-5 or high > 1.0 + 1e-5:
        raise ValueError(f"image values span [{low:.3g}, {high:.3g}]; expected [-1, 1] (scale x / 127.5 - 1).")
    for name, value in batch.items():
        shape = np.shape(value)
        if not shape or shape[0] != images.shape[0]:
            raise ValueError(
                f"batch[{name!r}] has shape {shape} but there are {images.shape[0]} images; "
                "every entry needs one row per image."
            )
    if "target" in batch:
        targets = np.asarray(batch["target"])
        if not np.issubdtype(targets.dtype, np.floating):
            raise TypeError(f"targets have dtype {targets.dtype}; expected floats.")
        if not np.isfinite(targets).all():
            raise ValueError("targets contain NaN or inf; check the data set files.")
    return batch


def data_needs(config, splits: Sequence[str]) -> dict[str, int]:
    """{split: global batch size} of a run that reads `splits` (training batches for "train")."""
    return {split: config.batch_size if split == "train" else config.eval_batch_size for split in splits}


def check_files(config, splits: Sequence[str]) -> None:
    """The plain-Python check of the real data set's files (`slotjax.data.files`), before TensorFlow is imported."""
    if config.dataset != "scenes":
        files.check_files(config.dataset, config.data_dir, data_needs(config, splits))


def check_data(config, splits: Sequence[str]) -> None:
    """Opens the real data set's files of `splits` and reads their first record, so that a missing, short or
    damaged file is refused in one message before anything is compiled (the embedded scenes need nothing)."""
    if config.dataset != "scenes":
        from slotjax.data import datasets  # TensorFlow: imported only for real data sets

        datasets.check_dataset(config.dataset, config.data_dir, config.task, data_needs(config, splits))


def _scene_batch(generator: scenes.Scenes, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = generator.batch(indices)
    return {
        "image": batch["image"].astype(np.float32) / 127.5 - 1.0,
        "segmentation": batch["segmentation"].astype(np.int32),
        "target": batch["target"],
    }


def _process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if global_batch_size % process_count:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}."
        )
    per_process = global_batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def train_batches(config, start_step: int, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's part of the global training batch of every step from `start_step` on."""
    share = _process_slice(config.batch_size, process_index, process_count)
    if config.dataset != "scenes":
        from slotjax.data import datasets  # TensorFlow: imported only for real data sets

        return datasets.make_dataset(
            config.dataset,
            config.data_dir,
            "train",
            task=config.task,
            resolution=config.resolution,
            batch_size=share.stop - share.start,
            seed=config.seed + start_step,
            process_index=process_index,
            process_count=process_count,
        )
    generator = _scenes(config)

    def batches():
        step = start_step
        while True:
            positions = np.arange(step * config.batch_size, (step + 1) * config.batch_size)[share]
            yield _scene_batch(generator, scenes.split_indices("train", positions))
            step += 1

    return prefetch(batches())


def eval_batches(config, split: str, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's part of `config.num_eval_examples` examples of `split`, in fixed order."""
    share = _process_slice(config.eval_batch_size, process_index, process_count)
    num_batches = max(config.num_eval_examples // config.eval_batch_size, 1)
    if config.dataset != "scenes":
        from slotjax.data import datasets  # TensorFlow: imported only for real data sets

        dataset = datasets.make_dataset(
            config.dataset,
            config.data_dir,
            split,
            task=config.task,
            resolution=config.resolution,
            batch_size=share.stop - share.start,
            shuffle=False,
            repeat=True,  # every process gets num_batches
            process_index=process_index,
            process_count=process_count,
        )
        return (batch for _, batch in zip(range(num_batches), dataset))
    generator = _scenes(config)

    def batches():
        for batch_index in range(num_batches):
            positions = np.arange(batch_index * config.eval_batch_size, (batch_index + 1) * config.eval_batch_size)
            yield _scene_batch(generator, scenes.split_indices(split, positions[share]))

    return prefetch(batches())


def _scenes(config) -> scenes.Scenes:
    return scenes.Scenes(
        config.resolution, seed=config.seed, min_objects=config.min_objects, max_objects=config.max_objects
    )


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Produces items on a background thread, `size` ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                buffer.put(item)
        except BaseException as error:  # handed to the consumer
            buffer.put(error)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
