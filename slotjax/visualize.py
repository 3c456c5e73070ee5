"""Pictures of what the models do, as uint8 arrays and PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from slotjax.data import encoding, scenes


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8; NaN (a diverged model's output) is drawn black."""
    images = np.nan_to_num(np.asarray(images, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


MIN_TILE_SIZE = 96  # small images are enlarged (nearest neighbour) so that a column label fits above them
LABEL_HEIGHT = 14


def tile(rows: list[list[np.ndarray]], labels: list[str] = (), padding: int = 2) -> np.ndarray:
    """Arranges equally sized [H, W, 3] uint8 tiles in a grid with white gaps, under a row of column labels."""
    height, width = rows[0][0].shape[:2]
    scale = max(1, -(-MIN_TILE_SIZE // width))
    height, width = height * scale, width * scale
    num_columns = max(len(row) for row in rows)
    top_margin = LABEL_HEIGHT if labels else 0
    canvas = np.full(
        (top_margin + len(rows) * (height + padding) + padding, num_columns * (width + padding) + padding, 3),
        255,
        np.uint8,
    )
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            top, left = top_margin + padding + i * (height + padding), padding + j * (width + padding)
            canvas[top : top + height, left : left + width] = np.repeat(np.repeat(picture, scale, 0), scale, 1)
    if not labels:
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for j, label in enumerate(labels):
        draw.text((padding + j * (width + padding) + 2, 1), label, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def discovery_grid(images, reconstructions, masks, slot_reconstructions, max_examples: int = 8) -> np.ndarray:
    """One row per example: input, reconstruction, then each slot's reconstruction shown through its mask.

    images, reconstructions [B, H, W, 3]; masks [B, K, H, W, 1]; slot_reconstructions [B, K, H, W, 3].
    """
    images, reconstructions = np.asarray(images), np.asarray(reconstructions)
    masks, slot_reconstructions = np.asarray(masks), np.asarray(slot_reconstructions)
    rows = []
    for b in range(min(len(images), max_examples)):
        # a slot's share of the picture: its reconstruction where its mask is, white elsewhere
        slots = [to_uint8(recon * mask + (1.0 - mask)) for recon, mask in zip(slot_reconstructions[b], masks[b])]
        rows.append([to_uint8(images[b]), to_uint8(reconstructions[b]), *slots])
    labels = ["input", "reconstruction", *(f"slot {k + 1}" for k in range(masks.shape[1]))]
    return tile(rows, labels)


def set_prediction_grid(images, predictions, targets, max_examples: int = 8, scale: int = 4) -> np.ndarray:
    """Each example twice: true objects (left) and predicted ones (right), drawn at their (x, y)
    in their decoded colour, square for cube, circle for sphere, triangle for cylinder; predictions
    whose present-score is below 0.5 are left out. predictions and targets are [B, K, 19]."""
    images = to_uint8(images)
    rows = []
    for b in range(min(len(images), max_examples)):
        base = Image.fromarray(images[b]).resize((images.shape[2] * scale, images.shape[1] * scale), Image.NEAREST)
        rows.append([_draw_objects(base, np.asarray(targets[b])), _draw_objects(base, np.asarray(predictions[b]))])
    return tile(rows, ["true objects", "predicted objects"])


def _draw_objects(base: Image.Image, objects: np.ndarray) -> np.ndarray:
    canvas = base.copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    radius = max(width // 24, 3)
    for obj in objects[encoding.is_present(objects)]:
        x, y = obj[encoding.COORDINATES][:2] * (width, height)  # stored x, y: the column and row / resolution
        _, _, shape, colour_index = encoding.decode_attributes(obj)
        colour = tuple(int(c) for c in scenes.COLOUR_RGB[colour_index])
        box = [x - radius, y - radius, x + radius, y + radius]
        if shape == 0:
            draw.rectangle(box, fill=colour, outline="white")
        elif shape == 1:
            draw.ellipse(box, fill=colour, outline="white")
        else:
            draw.polygon(
                [(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour, outline="white"
            )
    return np.asarray(canvas)


def save_png(picture: np.ndarray, path: str) -> None:
    """Writes atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(picture).save(temporary)
    os.replace(temporary, path)
