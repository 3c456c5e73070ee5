"""The set-prediction target: each object as 19 numbers (docs/target_encoding.md).

| values | meaning |
|---|---|
| 0-2 | 3-D coordinates x, y, z in [-3, 3] scene units, stored as (c + 3) / 6 |
| 3-4 | size, one-hot: small, large |
| 5-6 | material, one-hot: rubber, metal |
| 7-9 | shape, one-hot: cube, sphere, cylinder |
| 10-17 | colour, one-hot: gray, blue, brown, yellow, red, green, purple, cyan |
| 18 | 1 for a real object, 0 for padding (predictions: the confidence) |

A scene's target holds MAX_OBJECTS rows, real objects first.
"""

from __future__ import annotations

import numpy as np

MAX_OBJECTS = 10  # rows of a target: CLEVR scenes hold up to 10 objects
OBJECT_SIZE = 19

SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
SHAPES = ("cube", "sphere", "cylinder")
COLOURS = ("gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan")
# (name, category names) of the one-hot attributes, in the order of the encoding
ATTRIBUTES = (("size", SIZES), ("material", MATERIALS), ("shape", SHAPES), ("colour", COLOURS))

COORDINATES = slice(0, 3)
SIZE = slice(3, 5)
MATERIAL = slice(5, 7)
SHAPE = slice(7, 10)
COLOUR = slice(10, 18)
ATTRIBUTE_SLICES = (SIZE, MATERIAL, SHAPE, COLOUR)
PRESENT = 18
COORDINATE_SCALE = 6.0  # stored coordinates span [0, 1] for [-3, 3] scene units


def encode(coordinates, size, material, shape, colour) -> np.ndarray:
    """Objects' stored coordinates [n, 3] (in [0, 1]) and class indices [n] each -> float32 [n, 19]."""
    coordinates = np.asarray(coordinates, np.float32).reshape(-1, 3)
    one_hots = [
        np.eye(len(names), dtype=np.float32)[np.asarray(indices, np.int64)]
        for indices, (_, names) in zip((size, material, shape, colour), ATTRIBUTES)
    ]
    return np.concatenate([coordinates, *one_hots, np.ones((len(coordinates), 1), np.float32)], axis=1)


def decode_attributes(objects: np.ndarray) -> np.ndarray:
    """[..., 19] -> int [..., 4]: the size, material, shape and colour class indices (argmax of each one-hot)."""
    objects = np.asarray(objects)
    return np.stack([objects[..., part].argmax(axis=-1) for part in ATTRIBUTE_SLICES], axis=-1)


def is_present(objects: np.ndarray) -> np.ndarray:
    """[..., 19] -> bool [...]: the rows that are real objects (or predictions with confidence above 0.5)."""
    return np.asarray(objects)[..., PRESENT] > 0.5
