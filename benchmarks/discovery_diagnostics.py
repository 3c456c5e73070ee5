"""Where a discovery model on the embedded scenes loses FG-ARI, by object colour.

    python benchmarks/discovery_diagnostics.py --workdir=runs/discovery [--num-examples 512]

Reads the latest intact checkpoint of a discovery run on the embedded scenes and prints, on validation scenes:

- per colour: the objects' mean best-slot IoU (the slot whose argmax mask overlaps the object most), the share
  of their pixels that fall to the background slot (the slot that wins most background pixels), and FG-ARI with
  that colour's objects left out of the score;
- how far Slot Attention's keys at the centre of a square of each colour, drawn alone on the background, lie
  from the keys of the background beside it (relative to the background's), and the cosine between the keys of
  any two colours. Keys that do not tell colours apart make Slot Attention group pixels by position alone.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from slotjax.convert import restore_model
from slotjax.data import pipeline, scenes
from slotjax.data.encoding import COLOUR, COLOURS, MAX_OBJECTS
from slotjax.train import metrics
from slotjax.train.runs import TrainingError

SQUARE = 0.25  # side of the probe square, as a fraction of the image side


def objects_by_colour(model, config) -> tuple[dict[str, list], float, np.ndarray]:
    """Per colour, the objects' (best-slot IoU, share in the background slot); FG-ARI; FG-ARI without each colour."""
    predict = jax.jit(lambda images: model(images, key=jax.random.key(0))["masks"])
    per_colour = {name: [] for name in COLOURS}
    fg_ari, fg_ari_without = [], [[] for _ in COLOURS]
    for batch in pipeline.eval_batches(config, "validation"):
        masks = predict(jnp.asarray(batch["image"]))
        segmentation = np.asarray(batch["segmentation"]).astype(np.int32)  # [B, H, W], 0 = background
        slots = np.asarray(metrics.masks_to_ids(masks))  # [B, H, W]
        colours = np.asarray(batch["target"])[..., COLOUR].argmax(-1)  # [B, 10]
        num_ids, num_slots = MAX_OBJECTS + 1, masks.shape[1]
        fg_ari.append(metrics.fg_ari(segmentation, slots, num_ids, num_slots))
        for colour in range(len(COLOURS)):
            # this colour's objects become background, which FG-ARI ignores: keep[b, id] for ids 0..MAX_OBJECTS
            keep = np.concatenate([np.zeros((len(colours), 1), bool), colours != colour], axis=1)
            kept = np.take_along_axis(keep, segmentation.reshape(len(keep), -1), axis=1).reshape(segmentation.shape)
            fg_ari_without[colour].append(metrics.fg_ari(np.where(kept, segmentation, 0), slots, num_ids, num_slots))
        for ids, pred, image_colours in zip(segmentation, slots, colours):
            background_slot = np.bincount(pred[ids == 0], minlength=num_slots).argmax()
            for obj in range(1, ids.max() + 1):
                pixels = ids == obj
                if not pixels.any():
                    continue
                iou = max((pixels & (pred == k)).sum() / (pixels | (pred == k)).sum() for k in range(num_slots))
                in_background = (pred[pixels] == background_slot).mean()
                per_colour[COLOURS[image_colours[obj - 1]]].append((iou, in_background))
    return per_colour, _mean(fg_ari), np.array([_mean(scores) for scores in fg_ari_without])


def _mean(per_batch: list) -> float:
    """Mean over all images of per-batch per-image scores, skipping images where FG-ARI is undefined (NaN)."""
    return float(np.nanmean(np.concatenate(per_batch)))


def colour_keys(model, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys at a colour square's centre: their distance from the background's keys (relative), and cosines."""
    side = max(2, round(SQUARE * resolution))
    low, centre, edge = (resolution - side) // 2, resolution // 2, max(1, resolution // 10)
    images = np.tile(np.asarray(scenes.BACKGROUND_RGB, np.float32), (len(COLOURS), resolution, resolution, 1))
    for index, rgb in enumerate(scenes.COLOUR_RGB):
        images[index, low : low + side, low : low + side] = rgb
    encoder = model.encoder
    attention = encoder.slot_attention
    keys = attention.project_k(attention.norm_inputs(encoder.tokens(jnp.asarray(images / 127.5 - 1))))
    keys = np.asarray(keys).reshape(len(COLOURS), resolution, resolution, -1)
    at_centre, beside = keys[:, centre, centre], keys[:, edge, centre]
    distance = np.linalg.norm(at_centre - beside, axis=-1) / np.linalg.norm(beside, axis=-1)
    unit = at_centre / np.linalg.norm(at_centre, axis=-1, keepdims=True)
    return distance, unit @ unit.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a discovery run's work directory")
    parser.add_argument("--num-examples", type=int, default=512, help="validation scenes to score")
    args = parser.parse_args()
    try:
        model, config, step = restore_model(args.workdir)
    except (ValueError, FileNotFoundError, TrainingError) as error:  # no checkpoint, or none intact
        parser.exit(2, f"error: {error}\n")
    if config.task != "discovery" or config.dataset != "scenes":
        parser.exit(
            2,
            f"error: {args.workdir} holds a {config.task} run on {config.dataset}; this needs discovery "
            "on the embedded scenes (--task=discovery, the default data set).\n",
        )
    config.num_eval_examples = args.num_examples
    per_colour, fg_ari, fg_ari_without = objects_by_colour(model, config)
    distance, cosine = colour_keys(model, config.resolution)
    print(f"{args.workdir}: step {step}, {args.num_examples} validation scenes, FG-ARI {fg_ari:.3f}\n")
    print("| colour | objects | best-slot IoU | pixels in the background slot | FG-ARI without it | key distance |")
    print("|---|---:|---:|---:|---:|---:|")
    for index, name in enumerate(COLOURS):
        rows = np.array(per_colour[name]).reshape(-1, 2)
        iou, in_background = rows.mean(0) if len(rows) else (np.nan, np.nan)
        print(
            f"| {name} | {len(rows)} | {iou:.2f} | {in_background:.2f} | {fg_ari_without[index]:.3f} "
            f"| {distance[index]:.2f} |"
        )
    print("\ncosine between the colours' keys:\n")
    print("| | " + " | ".join(COLOURS) + " |")
    print("|---|" + "---:|" * len(COLOURS))
    for name, row in zip(COLOURS, cosine):
        print(f"| {name} | " + " | ".join(f"{value:.2f}" for value in row) + " |")


if __name__ == "__main__":
    main()
