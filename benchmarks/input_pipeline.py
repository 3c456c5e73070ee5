"""Throughput of the real data sets' input pipelines (slotjax.data.datasets), next to the training step's consumption.

    python benchmarks/pipeline.py [--seconds 10] [--num-threads N] [--resolution 128]
        [--train-batch-size 8] [--train-steps 2]

Writes stand-ins in a temporary directory and reads them with
``slotjax.data.datasets.make_dataset`` (shuffled, repeated, as in training):

- clevr: a real TFDS ``clevr:3.1.0`` directory (written by the tests'
  ``store_clevr``) of 256 validation scenes, noisy 320x480 PNGs of about
  CLEVR's file size (~230 KB), 3 to 10 objects each (CLEVR6 keeps half);
- the DeepMind files in their published format (the tests' ``write_records``);
  clevr_with_masks keeps half its scenes (CLEVR6).

Every pipeline reads its ``validation`` split (for the DeepMind files records
0 to 4,999, so the small files need no skipping; the pipeline is the same for
every split).

Official settings: discovery at 128x128, batch 64; set prediction at 128x128,
batch 512. Images per second count the images yielded after a warm-up batch.
Decoding runs on ``num_threads`` TF threads (by default all cores but one).

"step images/s" is what the jitted training step (``slotjax.train.trainer.Trainer``,
official model of the task, the pipeline's own images) consumes on this
machine's default JAX device, timed over --train-steps steps after a compiling
one, at --train-batch-size (default 8: a CPU cannot run the official batch in
reasonable time; on a GPU pass 64 or 512). "headroom" is the pipeline's
images/s over the step's: above 1 the pipeline keeps the device fed.

Results: benchmarks/README.md.

clevr_with_masks is slow by format: a record holds a million one-byte strings
(~25 ms to parse) in a GZIP stream that only one thread can inflate (~8 ms a
record here), so it should top out near 60 CLEVR6 images per second (125
records, half kept) however many cores parse.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

import jax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from slotjax import configs  # noqa: E402
from slotjax.data import datasets  # noqa: E402
from slotjax.train import trainer  # noqa: E402
from tests.test_datasets import store_clevr, write_records  # noqa: E402

CLEVR_SCENES = 256
RECORDS = {"clevr_with_masks": 32, "multi_dsprites": 512, "tetrominoes": 512, "objects_room": 512}
PIPELINES = [  # data set, task, batch size
    ("clevr", "discovery", 64),
    ("clevr", "set_prediction", 512),
    ("clevr_with_masks", "discovery", 64),
    ("multi_dsprites", "discovery", 64),
    ("tetrominoes", "discovery", 64),
    ("objects_room", "discovery", 64),
]


def noisy_scene(index: int) -> np.ndarray:
    """Uint8 [320, 480, 3]: a grey gradient with rendering-like noise, so the PNG is about CLEVR's size."""
    rng = np.random.default_rng(index)
    gradient = np.linspace(90.0, 160.0, 320)[:, None, None] + np.zeros((1, 480, 3))
    return np.clip(gradient + rng.normal(0.0, 3.0, gradient.shape), 0, 255).astype(np.uint8)


def images_per_second(batches, batch_size: int, seconds: float) -> float:
    next(batches)  # warm-up: starts the threads and fills the shuffle buffer
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(batches)
        count += batch_size
    return count / elapsed


def step_images_per_second(name: str, task: str, batch: dict, batch_size: int, steps: int) -> float:
    """Images/s that the training step of the task's official model consumes, fed `batch[:batch_size]`."""
    config = configs.get_config(task, "official", dataset=name)
    config.update(resolution=batch["image"].shape[1], batch_size=batch_size, num_devices=1)
    model_trainer = trainer.Trainer(config)
    state = model_trainer.initial_state()
    batch = model_trainer.shard({key: value[:batch_size] for key, value in batch.items()})
    state, _ = model_trainer.train_step(state, batch)  # compiles
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = model_trainer.train_step(state, batch)
    jax.block_until_ready(state)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per pipeline")
    parser.add_argument("--num-threads", type=int, default=None, help="TF threads (default: cores - 1)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train-batch-size", type=int, default=8, help="batch of the timed training step")
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per task")
    args = parser.parse_args()
    threads = args.num_threads or datasets.default_num_threads()
    tfds.disable_progress_bar()

    with tempfile.TemporaryDirectory() as data_dir:
        store_clevr(data_dir, {"validation": CLEVR_SCENES}, image=noisy_scene)
        for name, num_records in RECORDS.items():
            write_records(name, pathlib.Path(data_dir), num_records)

        print(f"device: {jax.devices()[0].device_kind}; training step batch {args.train_batch_size}")
        print(
            f"{'data set':18} {'task':15} {'res':>4} {'batch':>6} {'threads':>8} {'images/s':>9} "
            f"{'step images/s':>14} {'headroom':>9}"
        )
        step_rates: dict[str, float] = {}  # per task: the models do not depend on the data set
        for name, task, batch_size in PIPELINES:
            batches = datasets.make_dataset(
                name,
                data_dir,
                "validation",
                task=task,
                resolution=args.resolution,
                batch_size=batch_size,
                num_threads=threads,
            )
            rate = images_per_second(batches, batch_size, args.seconds)
            if task not in step_rates:
                step_rates[task] = step_images_per_second(
                    name, task, next(batches), args.train_batch_size, args.train_steps
                )
            print(
                f"{name:18} {task:15} {args.resolution:4d} {batch_size:6d} {threads:8d} {rate:9.0f} "
                f"{step_rates[task]:14.1f} {rate / step_rates[task]:9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
