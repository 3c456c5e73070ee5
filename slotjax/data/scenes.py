"""Procedural multi-object scenes: slotjax's default data set (nothing to download).

Each scene shows 2 to 6 objects (configurable) on a plain, light background.
Every object draws four CLEVR-like attributes, each uniformly:

- shape: square, circle or triangle, named ``cube``, ``sphere``, ``cylinder``
  (CLEVR's order) in the target;
- size: ``small`` or ``large`` (0.14 and 0.26 of the image side, at least 5
  and 7 pixels);
- material: ``rubber`` (flat colour) or ``metal`` (shaded from a light at the
  upper left, with a white highlight);
- colour: ``gray, blue, brown, yellow, red, green, purple, cyan`` (CLEVR's
  order and RGB values).

Objects lie wholly inside the image and stand on a ground plane seen from the
front and above, as in CLEVR: an object higher in the image is farther away.
The painter draws far to near, so lower objects occlude higher ones. Layouts
where an object keeps less than a quarter of its pixels visible are redrawn,
so every object in the target can be seen.

A scene is a dict:

- ``image``: uint8 [R, R, 3];
- ``segmentation``: uint8 [R, R]; 0 = background, k = the k-th object painted;
- ``target``: float32 [10, 19], one row per object in painting order, encoded
  like the set prediction target of CLEVR (``slotjax.data.encoding``,
  docs/target_encoding.md), rows past the last object all zero:

  - 0-2: scene coordinates x, y, z in [-3, 3], stored as (c + 3) / 6.
    x and y come from the object's centroid (centre of mass of its whole,
    unoccluded shape) in pixels: x = 6 * column / R - 3, y = 6 * row / R - 3,
    so the stored values are column / R and row / R. z is the depth (distance
    from the viewer), z = -y: stored 1 - row / R, largest for the object
    painted first. Painting order is therefore decreasing z.
  - 3-4 size, 5-6 material, 7-9 shape, 10-17 colour: one-hot, orders above;
  - 18: 1 for a real object.
- ``num_objects``: the number of objects.

Scene ``i`` of seed ``s`` comes from its own random generator seeded with
``[s, i]``, so any scene is made directly, alone or in a batch, with the same
result. ``SPLITS`` gives disjoint index ranges for test, validation and train;
``train_eval`` is a fixed subset of train (its first 512 scenes) for
evaluating on training data.
"""

import operator
from collections.abc import Sequence

import numpy as np

from slotjax.data import encoding
from slotjax.data.encoding import MAX_OBJECTS, OBJECT_SIZE

# CLEVR's RGB values of encoding.COLOURS; shapes cube, sphere, cylinder are drawn as square, circle, triangle
COLOUR_RGB = np.array(
    [
        [87, 87, 87],
        [42, 75, 215],
        [129, 74, 25],
        [255, 238, 51],
        [173, 35, 35],
        [29, 105, 20],
        [129, 38, 192],
        [41, 208, 208],
    ],
    dtype=np.float64,
)
BACKGROUND_RGB = (196, 192, 182)
SIZE_FRACTIONS = (0.14, 0.26)  # object side / image side, small and large
MIN_SIDES = (5, 7)  # in pixels, so that shapes stay recognisable at low resolution
MIN_VISIBLE_FRACTION = 0.25
MAX_LAYOUT_ATTEMPTS = 1000

SPLITS: dict[str, tuple[int, int | None]] = {
    "test": (0, 10_000),
    "validation": (10_000, 20_000),
    "train": (20_000, None),
    "train_eval": (20_000, 20_512),
}


def split_indices(split: str, positions) -> np.ndarray:
    """Maps positions within a split to global scene indices (int64)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {sorted(SPLITS)}.")
    first, end = SPLITS[split]
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError(f"Negative position {positions.min()} in split {split!r}; positions count from 0.")
    if end is not None and positions.size and positions.max() >= end - first:
        raise ValueError(
            f"Position {positions.max()} is beyond split {split!r}, which holds "
            f"{end - first} scenes; use positions 0 to {end - first - 1}."
        )
    return first + positions


def _integer(value, name: str) -> int:
    """`value` as a Python int; a float (even 2.0), string or None is refused rather than truncated."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is not an integer.") from None


def _shape_masks(side: int) -> np.ndarray:
    """Bool [3, side, side]: square, circle, triangle (apex up) filling the box."""
    centres = np.arange(side) + 0.5
    row, column = centres[:, None], centres[None, :]
    half = side / 2
    square = np.ones((side, side), dtype=bool)
    circle = (row - half) ** 2 + (column - half) ** 2 <= half**2
    # Half a pixel of slack keeps a (two-pixel) apex in the top row of even sides.
    triangle = np.abs(column - half) <= (row + 0.5) / 2
    return np.stack([square, circle, triangle])


def _shaded_sprites(masks: np.ndarray) -> np.ndarray:
    """Uint8 [3 shapes, 2 materials, 8 colours, side, side, 3] object pictures."""
    side = masks.shape[-1]
    centres = np.arange(side) + 0.5
    sprites = []
    for mask in masks:
        rows, columns = np.nonzero(mask)
        # The light sits up and to the left of the shape's centroid.
        light_row = rows.mean() + 0.5 - 0.15 * side
        light_column = columns.mean() + 0.5 - 0.15 * side
        distance = np.hypot(centres[:, None] - light_row, centres[None, :] - light_column) / side
        shade = np.clip(1.2 - 1.1 * distance, 0.35, 1.2)[..., None]
        highlight = (np.clip(1 - distance / 0.18, 0, 1) ** 2)[..., None]
        rubber = np.broadcast_to(COLOUR_RGB[:, None, None, :], (8, side, side, 3))
        metal = COLOUR_RGB[:, None, None, :] * shade * (1 - highlight) + 255 * highlight
        sprites.append(np.stack([rubber, metal]))
    return np.clip(np.rint(np.stack(sprites)), 0, 255).astype(np.uint8)


class Scenes:
    """Deterministic, random-access procedural scenes (see the module docstring)."""

    def __init__(
        self,
        resolution: int = 64,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 6,
    ):
        resolution, seed, min_objects, max_objects = (
            _integer(value, name)
            for value, name in (
                (resolution, "resolution"),
                (seed, "seed"),
                (min_objects, "min_objects"),
                (max_objects, "max_objects"),
            )
        )
        if resolution < 16:
            raise ValueError(f"resolution={resolution} is too small to draw the shapes; use 16 or more.")
        if seed < 0:
            raise ValueError(f"seed={seed} is negative; use a seed >= 0.")
        if min_objects < 1:
            raise ValueError(f"min_objects={min_objects}; use at least 1.")
        if max_objects > MAX_OBJECTS:
            raise ValueError(
                f"max_objects={max_objects} exceeds the {MAX_OBJECTS} target rows; use at most {MAX_OBJECTS}."
            )
        if min_objects > max_objects:
            raise ValueError(f"min_objects={min_objects} > max_objects={max_objects}; make min_objects <= max_objects.")
        self.resolution = resolution
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects

        self._sides = [max(low, round(fraction * resolution)) for low, fraction in zip(MIN_SIDES, SIZE_FRACTIONS)]
        self._masks = [_shape_masks(side) for side in self._sides]
        self._sprites = [_shaded_sprites(masks) for masks in self._masks]
        # Centroid (row, column) and area of each [shape, size] sprite, in pixels.
        self._centroids = np.array([[np.argwhere(m).mean(0) + 0.5 for m in masks] for masks in self._masks]).transpose(
            1, 0, 2
        )
        self._areas = np.array([masks.sum((1, 2)) for masks in self._masks]).T
        self._background = np.empty((resolution, resolution, 3), np.uint8)
        self._background[:] = BACKGROUND_RGB

    def scene(self, index: int) -> dict:
        """Scene number `index` (>= 0) of this seed."""
        resolution = self.resolution
        image = np.empty((resolution, resolution, 3), np.uint8)
        segmentation = np.empty((resolution, resolution), np.uint8)
        target = np.zeros((MAX_OBJECTS, OBJECT_SIZE), np.float32)
        num_objects = self._render(index, image, segmentation, target)
        return dict(
            image=image,
            segmentation=segmentation,
            target=target,
            num_objects=num_objects,
        )

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict:
        """The scenes at `indices`, stacked along a leading batch axis."""
        indices = np.asarray(indices).reshape(-1)
        size, resolution = len(indices), self.resolution
        images = np.empty((size, resolution, resolution, 3), np.uint8)
        segmentations = np.empty((size, resolution, resolution), np.uint8)
        targets = np.zeros((size, MAX_OBJECTS, OBJECT_SIZE), np.float32)
        num_objects = np.empty(size, np.int32)
        for b, index in enumerate(indices):
            num_objects[b] = self._render(index, images[b], segmentations[b], targets[b])
        return dict(
            image=images,
            segmentation=segmentations,
            target=targets,
            num_objects=num_objects,
        )

    def _render(self, index, image, segmentation, target) -> int:
        """Draws scene `index` into the given zeroed target and uninitialised
        image and segmentation; returns its number of objects."""
        index = _integer(index, "scene index")
        if index < 0:
            raise ValueError(f"Scene index {index} is negative; use an index >= 0.")
        rng = np.random.default_rng([self.seed, index])
        num = int(rng.integers(self.min_objects, self.max_objects + 1))
        size, material = rng.integers(0, 2, size=(2, num))
        shape = rng.integers(0, 3, size=num)
        colour = rng.integers(0, 8, size=num)
        sides = np.array(self._sides)[size]
        centroids = self._centroids[shape, size]
        areas = self._areas[shape, size]
        corner_ends = self.resolution - sides[:, None] + 1
        for _ in range(MAX_LAYOUT_ATTEMPTS):
            corners = rng.integers(0, corner_ends, size=(num, 2))
            # Far (high in the image) to near.
            order = np.argsort(corners[:, 0] + centroids[:, 0], kind="stable")
            image[:] = self._background
            segmentation[:] = 0
            for rank, k in enumerate(order):
                (top, left), side = corners[k], sides[k]
                mask = self._masks[size[k]][shape[k]]
                window = (slice(top, top + side), slice(left, left + side))
                np.copyto(
                    image[window],
                    self._sprites[size[k]][shape[k], material[k], colour[k]],
                    where=mask[..., None],
                )
                np.copyto(segmentation[window], rank + 1, where=mask)
            visible = np.bincount(segmentation.ravel(), minlength=num + 1)[1:]
            if np.all(visible >= MIN_VISIBLE_FRACTION * areas[order]):
                break
        else:
            raise RuntimeError(
                f"Could not place {num} visible objects at resolution "
                f"{self.resolution}; lower max_objects or raise the resolution."
            )

        row, column = ((corners + centroids)[order] / self.resolution).T
        coordinates = np.stack([column, row, 1 - row], axis=1)
        target[:num] = encoding.encode(coordinates, size[order], material[order], shape[order], colour[order])
        return num
