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


def tile(
    rows: list[list[np.ndarray]], labels: list[str] = (), row_labels: list[str] = (), padding: int = 2
) -> np.ndarray:
    """Arranges equally sized [H, W, 3] uint8 tiles in a grid with white gaps, under a row of column labels and
    right of a column of row labels (either may be left out)."""
    height, width = rows[0][0].shape[:2]
    scale = max(1, -(-MIN_TILE_SIZE // width))
    height, width = height * scale, width * scale
    num_columns = max(len(row) for row in rows)
    font = ImageFont.load_default()
    top_margin = LABEL_HEIGHT if labels else 0
    left_margin = int(np.ceil(max(font.getlength(label) for label in row_labels))) + 2 * padding if row_labels else 0
    canvas = np.full(
        (
            top_margin + len(rows) * (height + padding) + padding,
            left_margin + num_columns * (width + padding) + padding,
            3,
        ),
        255,
        np.uint8,
    )
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            top, left = top_margin + padding + i * (height + padding), left_margin + padding + j * (width + padding)
            canvas[top : top + height, left : left + width] = np.repeat(np.repeat(picture, scale, 0), scale, 1)
    if not labels and not row_labels:
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(labels):
        draw.text((left_margin + padding + j * (width + padding) + 2, 1), label, fill=(0, 0, 0), font=font)
    for i, label in enumerate(row_labels):
        top = top_margin + padding + i * (height + padding) + height // 2 - LABEL_HEIGHT // 2
        draw.text((padding, top), label, fill=(0, 0, 0), font=font)
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


def attention_grid(images, attention, max_examples: int = 4) -> np.ndarray:
    """Where each slot looks at each iteration (the Slot Attention paper's Figure 3): for each example, one row
    per iteration t = 1..T, the input image in its first row, then each slot's attention map in grey (white: the
    token's whole attention goes to the slot, black: none).

    images [B, H, W, 3] in [-1, 1]; attention [B, T, K, N] (softmax over slots) over h x w = N tokens in row-major
    order, a grid of the image's aspect ratio, enlarged (nearest neighbour) to H x W when smaller.
    """
    images, attention = np.asarray(images), np.asarray(attention, np.float32)
    if attention.ndim != 4 or len(attention) != len(images):
        raise ValueError(
            f"attention has shape {attention.shape} for {len(images)} images; expected [batch, iterations, slots, "
            "tokens] with the images' batch size."
        )
    _, height, width, _ = images.shape
    num_iterations, num_slots, num_tokens = attention.shape[1:]
    grid_height = int(round(np.sqrt(num_tokens * height / width)))
    grid_width = num_tokens // max(grid_height, 1)
    if grid_height * grid_width != num_tokens or grid_height * width != grid_width * height:
        raise ValueError(
            f"attention maps have {num_tokens} tokens, which is no grid of the {height} x {width} images' aspect "
            "ratio; pass the attention over the encoder's h x w feature grid."
        )
    rows_index = np.arange(height) * grid_height // height  # nearest token row of each pixel row
    columns_index = np.arange(width) * grid_width // width
    maps = attention.reshape(attention.shape[:3] + (grid_height, grid_width))[..., rows_index, :][..., columns_index]
    maps = to_uint8(2.0 * maps - 1.0)[..., None].repeat(3, axis=-1)  # [B, T, K, H, W, 3]
    blank = np.full((height, width, 3), 255, np.uint8)
    rows, row_labels = [], []
    for b in range(min(len(images), max_examples)):
        for t in range(num_iterations):
            rows.append([to_uint8(images[b]) if t == 0 else blank, *maps[b, t]])
            row_labels.append(f"iteration {t + 1}")
    labels = ["input", *(f"slot {k + 1}" for k in range(num_slots))]
    return tile(rows, labels, row_labels)


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
