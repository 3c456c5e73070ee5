"""A trained model on your own images: which pixels each slot takes (discovery) or which objects it finds (set
prediction).

    python examples/segment_images.py --model=runs/discovery --num_slots=9 img1.png img2.png --output=masks.png
    python examples/segment_images.py --model=discovery.safetensors          # a few embedded scenes, no files

--model is a training work directory, a weights file (.safetensors, .pt) or the paper's TensorFlow checkpoint.
Images of any size are resized to the model's resolution; --crop=clevr cuts CLEVR's 240x320 or 320x480 images as
the discovery model was trained on them, --crop=center keeps the central square of a photograph.
"""

import argparse

import slotjax
from slotjax import visualize
from slotjax.data import scenes
from slotjax.pretrained import CROPS, describe_objects, slot_shares

NUM_SCENES = 4  # embedded scenes run when no image file is given


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: a few embedded scenes)")
    parser.add_argument("--model", required=True, help="work directory, weights file or TensorFlow checkpoint")
    parser.add_argument("--step", type=int, help="checkpoint step of a work directory (default: the newest)")
    parser.add_argument("--num_slots", type=int, help="slots at test time (default: the trained number)")
    parser.add_argument("--num_iterations", type=int, help="Slot Attention iterations (default: the trained number)")
    parser.add_argument("--crop", choices=CROPS, default="none", help="what to keep of each image before resizing")
    parser.add_argument("--seed", type=int, default=0, help="draws the initial slots")
    parser.add_argument("--output", help="PNG file for a labelled picture of the masks (or of the objects)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None


def run(args: argparse.Namespace) -> None:
    model, config = slotjax.load(args.model, step=args.step)
    if args.images:
        names, targets = args.images, None
        images = slotjax.read_images(args.images, config.resolution, args.crop)
    else:  # scenes of the test split, drawn at the model's resolution
        batch = scenes.Scenes(config.resolution).batch(scenes.split_indices("test", range(NUM_SCENES)))
        names, targets = [f"scene {index}" for index in range(NUM_SCENES)], batch["target"]
        images = slotjax.read_images(list(batch["image"]), config.resolution)
    set_prediction = config.task == "set_prediction"
    if set_prediction and args.output and targets is None:
        raise ValueError(
            "the set-prediction picture draws the true objects beside the predicted ones, and image files have no "
            "true objects: leave out --output (the objects are printed) or the image files."
        )
    outputs = slotjax.predict(
        model, images, num_slots=args.num_slots, num_iterations=args.num_iterations, seed=args.seed
    )
    print(
        f"A {config.task.replace('_', ' ')} model of {config.resolution}x{config.resolution} images, run with "
        f"{args.num_slots or config.num_slots} slots and {args.num_iterations or config.num_iterations} iterations."
    )
    if set_prediction:
        for name, objects in zip(names, describe_objects(outputs["predictions"])):
            print(
                f"{name}: {len(objects)} object{'' if len(objects) == 1 else 's'}"
                + "".join(f"\n  {line}" for line in objects)
            )
    else:
        for name, shares in zip(names, slot_shares(outputs["masks"])):
            print(f"{name}: " + ", ".join(f"slot {k + 1} {share:.1%}" for k, share in enumerate(shares)))
    if args.output:
        if set_prediction:
            picture = visualize.set_prediction_grid(images, outputs["predictions"], targets, max_examples=len(images))
        else:
            pictured = (outputs[name] for name in ("reconstruction", "masks", "slot_reconstructions"))
            picture = visualize.discovery_grid(images, *pictured, max_examples=len(images))
        visualize.save_png(picture, args.output)
        print(f"Wrote {args.output} ({picture.shape[1]}x{picture.shape[0]} pixels, one row per image)")


if __name__ == "__main__":
    main()
