"""Throughput of the procedural scene data set on one CPU core.

    python benchmarks/scenes_throughput.py [--resolution 64] [--num-scenes 10000]
        [--save-grid docs/scenes.png]

Prints scenes per second (the data set should make at least 2,000 scenes of
64x64 per second on one core). With --save-grid, also saves a 4x4 grid of the
first 16 training scenes, enlarged for viewing.
"""

import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from slotjax.data.scenes import Scenes, split_indices  # noqa: E402

GRID_SIDE = 4
GRID_GAP = 4


def save_grid(scenes: Scenes, path: str, display_size: int = 128) -> None:
    """Saves the first GRID_SIDE**2 training scenes as one PNG grid."""
    images = scenes.batch(split_indices("train", np.arange(GRID_SIDE**2)))["image"]
    zoom = max(1, display_size // scenes.resolution)
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    side = images.shape[1]
    cell = side + GRID_GAP
    grid = np.full((GRID_SIDE * cell + GRID_GAP,) * 2 + (3,), 255, np.uint8)
    for k, image in enumerate(images):
        top = GRID_GAP + (k // GRID_SIDE) * cell
        left = GRID_GAP + (k % GRID_SIDE) * cell
        grid[top : top + side, left : left + side] = image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-scenes", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--save-grid", metavar="PATH")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    scenes = Scenes(resolution=args.resolution)
    indices = split_indices("train", np.arange(args.num_scenes))
    start = time.perf_counter()
    for first in range(0, args.num_scenes, args.batch_size):
        scenes.batch(indices[first : first + args.batch_size])
    seconds = time.perf_counter() - start
    print(
        f"{args.num_scenes / seconds:.0f} scenes/s at "
        f"{args.resolution}x{args.resolution} on one core "
        f"({args.num_scenes} scenes in {seconds:.2f} s)"
    )
    if args.save_grid:
        save_grid(scenes, args.save_grid)


if __name__ == "__main__":
    main()
