"""A trained model in one call, and what it sees in a user's own images.

    model, config = slotjax.load("runs/discovery")           # a work directory: its newest intact checkpoint
    model, config = slotjax.load("discovery.safetensors")    # or a weights file, or the paper's TF checkpoint
    images = slotjax.read_images(["a.png", "b.jpg"], config.resolution)  # [B, R, R, 3] in [-1, 1]
    outputs = slotjax.predict(model, images, num_slots=9)    # masks [B, K, R, R, 1], ...

`load` reads what `slotjax.convert` reads (`restore_model`, `restore_weights`, `tf_checkpoint.load_tf_model`);
`read_images` makes model inputs as the data pipeline makes them from a data set's images.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from slotjax.data import encoding, files
from slotjax.tasks import task_of
from slotjax.weights_file import is_weights_file

FRAMEWORKS = ("jax", "torch")
CROPS = ("none", "center", "clevr")  # what `read_images` keeps of an image before resizing it


def load(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    framework: str = "jax",
    print_fn: Callable[[str], None] = print,
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(model, config) of a trained model, with the weights of

    - a training work directory (its `checkpoints/`): the newest intact checkpoint, or the one at `step`; damaged
      newer ones are set aside with one warning line each (`print_fn`);
    - a weights file (.safetensors, .pt) from `python -m slotjax.convert` or `torch_reference.save_model`;
    - an official TensorFlow checkpoint of the paper (its directory or a `ckpt-N` prefix; needs TensorFlow).

    framework="torch" gives the torch_reference twin with the same weights instead (NCHW images). Bad input is
    refused with one line naming the fix: FileNotFoundError, or ValueError (`convert.ConversionError` among them).
    """
    from slotjax import convert  # not at import: slotjax.configs, which it imports, imports slotjax

    if framework not in FRAMEWORKS:
        raise ValueError(f"framework={framework!r}; use one of {', '.join(FRAMEWORKS)}.")
    path = os.fspath(path)
    if not os.path.exists(path) and not os.path.exists(f"{path}.index"):
        raise FileNotFoundError(
            f"No model at {path!r}: give a training work directory, a weights file (.safetensors, .pt) or a "
            "TensorFlow checkpoint."
        )
    if os.path.isdir(os.path.join(path, "checkpoints")) and not is_weights_file(path):
        model, config, _ = convert.restore_model(path, step, print_fn)
    elif is_weights_file(path) or _is_tf_checkpoint(path):
        if step is not None:
            raise ValueError(
                f"step={step} chooses a checkpoint of a work directory, but {path!r} holds one model: leave step out."
            )
        if is_weights_file(path):
            model, config, _ = convert.restore_weights(path)
        else:
            from slotjax import tf_checkpoint

            model, config = tf_checkpoint.load_tf_model(path)
    else:
        raise ValueError(
            f"{path!r} is no work directory (it holds no checkpoints/), no weights file (.safetensors, .pt) "
            "and no TensorFlow checkpoint; give one of these."
        )
    return (torch_twin(model, config) if framework == "torch" else model), config


def _is_tf_checkpoint(path: str) -> bool:
    """A TensorFlow checkpoint directory (its `checkpoint` file) or prefix (`ckpt-N` with `ckpt-N.index`)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "checkpoint"))
    return path.endswith((".index", ".data-00000-of-00001")) or os.path.exists(f"{path}.index")


def torch_twin(model: nnx.Module, config: ml_collections.ConfigDict):
    """The torch_reference model of `config`'s task holding `model`'s weights, in evaluation mode."""
    import torch

    from slotjax.convert import flax_to_torch
    from torch_reference.weights import MODELS

    task = task_of(config)
    twin = MODELS[task.torch_model](**task.model_arguments(config))
    twin.load_state_dict({name: torch.from_numpy(array) for name, array in flax_to_torch(model).items()})
    return twin.eval()


def read_images(images: Sequence[str | os.PathLike | np.ndarray], resolution: int, crop: str = "none") -> np.ndarray:
    """Image files (any format PIL reads) or uint8 arrays [H, W, 3] of any size -> float32 [B, R, R, 3] in [-1, 1].

    As the data pipeline makes a data set's images: `crop` keeps the whole image ("none", as set prediction reads
    CLEVR), its central square ("center", for photographs whose objects should keep their shape) or CLEVR's
    official crop, rows 29:221 and columns 64:256 of a 240x320 or 320x480 image ("clevr", as discovery reads
    CLEVR); the rest is resized to R x R bilinearly without antialiasing (`tf.image.resize`'s default).
    """
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}; use one of {', '.join(CROPS)}.")
    if len(images) == 0:
        raise ValueError("no images given; pass at least one image file or array.")
    return np.stack([_model_input(_read_image(image), resolution, crop) for image in images])


def _read_image(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of an image file or array."""
    if not isinstance(image, np.ndarray):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(image) as opened:
                return np.asarray(opened.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"No image file at {os.fspath(image)!r}.") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{os.fspath(image)!r} is no image PIL can read ({error}).") from None
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"an image array of dtype {image.dtype} and shape {image.shape}; pass uint8 RGB arrays [height, width, 3]."
        )
    return image


def _model_input(image: np.ndarray, resolution: int, crop: str) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [R, R, 3] in [-1, 1] (`read_images`)."""
    height, width, _ = image.shape
    if crop == "clevr":
        rows, columns = files.CLEVR_CROP
        if height < rows.stop or width < columns.stop:
            raise ValueError(
                f"an image of {height}x{width} pixels is smaller than CLEVR's crop (rows {rows.start}:{rows.stop}, "
                f"columns {columns.start}:{columns.stop}); use crop='none' or 'center'."
            )
        image = image[files.CLEVR_CROP]
    elif crop == "center":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
    floats = (jnp.asarray(image, jnp.float32) / 255.0 - 0.5) * 2.0
    resized = jax.image.resize(floats, (resolution, resolution, 3), method="bilinear", antialias=False)
    return np.asarray(jnp.clip(resized, -1.0, 1.0))


def predict(
    model: nnx.Module,
    images,
    *,
    num_slots: int | None = None,
    num_iterations: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The model's outputs on `images` (float [B, R, R, 3] in [-1, 1], e.g. from `read_images`) as numpy arrays,
    with `num_slots` and `num_iterations` in place of the trained ones where given; `seed` draws the initial slots.

    Compiled once per shape and setting. An adaptive-slots model keeps or drops each slot by its more likely choice
    (as when it is evaluated). Discovery: masks [B, K, R, R, 1], reconstruction, slot_reconstructions, slots,
    attention; set prediction: predictions [B, K, 19], slots, attention.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"predict runs slotjax models, not a {type(model).__name__}; call a torch model itself on NCHW images."
        )
    deterministic = bool(getattr(model, "adaptive_slots", False))
    outputs = _forward(model, jnp.asarray(images), jax.random.key(seed), num_slots, num_iterations, deterministic)
    return {name: np.asarray(value) for name, value in outputs.items()}


@functools.partial(nnx.jit, static_argnames=("num_slots", "num_iterations", "deterministic"))
def _forward(model, images, key, num_slots, num_iterations, deterministic):
    options = {"num_slots": num_slots, "num_iterations": num_iterations}
    options = {name: value for name, value in options.items() if value is not None}
    if deterministic:
        options["deterministic"] = True
    return model(images, key=key, **options)


def slot_shares(masks: np.ndarray) -> np.ndarray:
    """masks [B, K, H, W, 1] -> [B, K]: the share of each image's pixels whose largest mask is the slot's."""
    masks = np.asarray(masks)
    winners = masks[..., 0].argmax(axis=1).reshape(len(masks), -1)  # [B, H * W]
    counts = np.stack([np.bincount(row, minlength=masks.shape[1]) for row in winners])
    return counts / winners.shape[1]


def describe_objects(predictions: np.ndarray) -> list[list[str]]:
    """predictions [B, K, 19] -> per image, one line per predicted object (confidence above 0.5), most confident
    first: its size, material, colour and shape, its stored coordinates (x, y, z in [0, 1],
    docs/target_encoding.md) and its confidence."""
    predictions = np.asarray(predictions)
    described = []
    for objects in predictions:
        present = objects[encoding.is_present(objects)]
        present = present[np.argsort(-present[:, encoding.PRESENT], kind="stable")]
        lines = []
        for obj, attributes in zip(present, encoding.decode_attributes(present)):
            size, material, shape, colour = (names[index] for (_, names), index in zip(encoding.ATTRIBUTES, attributes))
            x, y, z, confidence = *obj[encoding.COORDINATES], obj[encoding.PRESENT]
            lines.append(
                f"{size} {material} {colour} {shape} at ({x:.2f}, {y:.2f}, {z:.2f}), confidence {confidence:.2f}"
            )
        described.append(lines)
    return described
