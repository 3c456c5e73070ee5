"""Converters between slotjax's training checkpoints, torch_reference's weights files and the paper's TensorFlow
checkpoints.

The weights of a model are the same in slotjax (Flax NNX) and torch_reference (PyTorch) up to names and axis
orders (`slotjax.torch_layout`); a weights file (`slotjax.weights_file`) holds them in torch's layout with the
model's description. The paper's TensorFlow checkpoints are read and written by `slotjax.tf_checkpoint`.

Command line (training checkpoint <-> torch_reference weights; the paper's TensorFlow checkpoints -> either):
    python -m slotjax.convert --workdir=RUN_DIR --output=model.safetensors
    python -m slotjax.convert --input=model.safetensors --output=NEW_RUN_DIR
    python -m slotjax.convert --input=TF_CHECKPOINT_DIR_OR_PREFIX --output=NEW_RUN_DIR   (slotjax/tf_checkpoint.py)
    python -m slotjax.convert --workdir=RUN_DIR --output=TF_CHECKPOINT_DIR --tf           (the official layout)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from slotjax import configs, tf_checkpoint, weights_file
from slotjax.tasks import TASKS, task_of
from slotjax.torch_layout import flax_to_torch, torch_to_flax
from slotjax.train.runs import model_fields
from slotjax.weights_file import ConversionError, is_weights_file


def save_weights(module: nnx.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes the module's torch-layout weights to `path` (.safetensors, or .pt), atomically, with `metadata`
    (strings; `torch_reference.load_model` reads the model's description from there) and the tensors' checksum."""
    weights_file.write(path, flax_to_torch(module), metadata or {})


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch-layout state dict from .safetensors or .pt without executing code from the file."""
    return weights_file.read(path)[0]


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata strings stored with the weights (empty if none)."""
    return weights_file.read(path)[1]


def save_model_weights(model: nnx.Module, config, step: int, output: str) -> str:
    """Writes the model's torch-layout weights with what `torch_reference.load_model` and
    `weights_to_checkpoint` need: the torch twin's name and arguments, the config and the step."""
    task = task_of(config)
    metadata = {
        "model": task.torch_model,
        "arguments": json.dumps(task.model_arguments(config)),
        "config": config.to_json(),
        "step": str(step),
    }
    save_weights(model, output, metadata)
    return output


@contextlib.contextmanager
def _checkpoint_manager(workdir: str, config=None, print_fn=print):
    """The work directory's checkpoint manager, closed after use; the refusals of `slotjax.train.checkpoints`
    (a damaged checkpoint, another model's) become ConversionErrors."""
    from slotjax.train import checkpoints

    manager = None
    try:
        manager = checkpoints.checkpoint_manager(workdir, config, print_fn)
        yield manager
    except checkpoints.TrainingError as error:
        raise ConversionError(str(error)) from None
    finally:
        if manager is not None:
            manager.close()


def write_checkpoint(model: nnx.Module, config, step: int, workdir: str) -> str:
    """Writes the model's parameters as a training checkpoint at `step` in `workdir` (a fresh optimiser state).

    Refuses a work directory that already holds checkpoints of another model, or one at this step or a later one
    (a resumed run would start from that one, not from these weights).
    """
    from slotjax.train import checkpoints, runs
    from slotjax.train.step import initial_state

    with _checkpoint_manager(workdir, config) as manager:
        state = initial_state(config)
        state = state.replace(params=nnx.state(model, nnx.Param), step=jnp.asarray(step, jnp.int32))
        latest = manager.latest_step()
        if latest is not None:
            differences = runs.model_differences(checkpoints.config_from_checkpoint(manager, latest), config)
            if differences:
                raise ConversionError(
                    f"{workdir!r} holds checkpoints of another model ({differences}); choose a new --output directory."
                )
            if step <= latest:
                raise ConversionError(
                    f"{workdir!r} already holds a checkpoint at step {latest}, not older than the weights' step "
                    f"{step}, so training would not resume from them; choose a new --output directory."
                )
        checkpoints.save_checkpoint(manager, state, config)
    return workdir


def restore_model(workdir: str, step: int | None = None, print_fn=print):
    """(model, config, step) of the training checkpoint in `workdir` (the latest intact one, or `step`).

    Damaged checkpoints newer than the latest intact one are set aside with one warning line each
    (`checkpoints.restore_latest_intact`); a damaged `step` is refused. No device mesh is built: a checkpoint of
    a run on any number of devices restores on one.
    """
    from slotjax.train import checkpoints
    from slotjax.train.step import build_model, initial_state

    no_checkpoint = f"No checkpoint in {os.path.join(workdir, 'checkpoints')}."
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # refused before the manager creates the directory
        raise ConversionError(no_checkpoint)
    with _checkpoint_manager(workdir, print_fn=print_fn) as manager:
        if step is None:
            restored = checkpoints.restore_latest_intact(manager, initial_state, print_fn=print_fn)
            if restored is None:
                raise ConversionError(no_checkpoint)
            state, config = restored
        elif step not in manager.all_steps():
            raise ConversionError(
                f"No checkpoint at step {step} in {os.path.join(workdir, 'checkpoints')} "
                f"(steps: {list(manager.all_steps()) or 'none'})."
            )
        else:
            config = checkpoints.config_from_checkpoint(manager, step)
            state = checkpoints.restore_checkpoint(manager, initial_state(config), config, step)
    model = build_model(config)
    nnx.update(model, state.params)
    return model, config, int(state.step)


def checkpoint_to_weights(workdir: str, output: str, step: int | None = None) -> str:
    """Training checkpoint in `workdir` -> torch-layout weights file with the model's description."""
    return save_model_weights(*restore_model(workdir, step), output)


def restore_weights(weights: str):
    """(model, config, step) of a torch-layout weights file (made by `checkpoint_to_weights` or
    `torch_reference.save_model`)."""
    from slotjax.train.step import build_model

    state_dict, metadata = weights_file.read(weights)
    config = config_from_metadata(metadata, weights)
    try:
        model = build_model(config)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a damaged config
        raise ConversionError(f"{weights!r} describes a model slotjax cannot build: {error}") from error
    model = torch_to_flax(state_dict, model)
    step = metadata.get("step", "0")
    if not step.isdigit():
        raise ConversionError(f"{weights!r} holds damaged metadata: its step {step!r} is no integer >= 0.")
    return model, config, int(step)


def weights_to_checkpoint(weights: str, workdir: str) -> str:
    """Torch-layout weights file (made by `checkpoint_to_weights` or `torch_reference.save_model`) -> a training
    checkpoint in `workdir`, from which `train.py --workdir` evaluates or continues training."""
    model, config, step = restore_weights(weights)
    return write_checkpoint(model, config, step, workdir)


def config_from_metadata(metadata: Mapping[str, str], weights: str) -> ml_collections.ConfigDict:
    """The slotjax config of a weights file: the one slotjax saved with it, or, for a file from
    `torch_reference.save_model`, the paper's config of its task with the model's constructor arguments and the
    training settings saved with it (the paper's where it records none)."""
    try:
        described = {key: json.loads(metadata[key]) for key in ("config", "arguments") if key in metadata}
    except ValueError as error:
        raise ConversionError(f"{weights!r} holds damaged metadata (not JSON: {error}).") from error
    if not all(isinstance(value, dict) for value in described.values()):
        raise ConversionError(f"{weights!r} holds damaged metadata (its config or arguments are no mapping).")
    if "config" in described:
        return configs.with_defaults(ml_collections.ConfigDict(described["config"]))
    tasks = {task.torch_model: name for name, task in TASKS.items() if task.torch_model}
    if metadata.get("model") not in tasks or "arguments" not in described:
        raise ConversionError(
            f"{weights!r} names no slotjax config or torch_reference model in its metadata; it was not written by "
            "slotjax or torch_reference.save_model, so the model it belongs to is unknown."
        )
    arguments = described["arguments"]
    if arguments.pop("broadcast_resolution", 8) != 8:
        raise ConversionError(f"{weights!r} holds a decoder broadcast at another size than slotjax's 8x8.")
    config = configs.get_config(tasks[metadata["model"]], "official")
    unknown = sorted(set(arguments) - set(config))
    if unknown:
        raise ConversionError(f"{weights!r} names model arguments slotjax does not have: {', '.join(unknown)}.")
    config.update(arguments)
    try:
        training = json.loads(metadata.get("training", "{}"))
    except ValueError as error:
        raise ConversionError(f"{weights!r} holds damaged metadata (training settings not JSON: {error}).") from error
    if not isinstance(training, dict):
        raise ConversionError(f"{weights!r} holds damaged metadata (its training settings are no mapping).")
    not_training = sorted(set(training) - set(config) | set(training) & set(model_fields(config)))
    if not_training:
        raise ConversionError(
            f"{weights!r} records training settings slotjax does not have: {', '.join(not_training)}."
        )
    config.update(training)
    return config


def convert_tf_checkpoint(path: str | os.PathLike, output: str, resolution: int | None = None) -> str:
    """Official TensorFlow checkpoint -> `output`: torch_reference weights (.safetensors / .pt), or else a slotjax
    work directory that `train.py --workdir=output` evaluates (`--mode=eval`) or fine-tunes."""
    from slotjax.train.step import build_model

    checkpoint = tf_checkpoint.read_tf_checkpoint(path, resolution)
    model = torch_to_flax(checkpoint.state_dict, build_model(checkpoint.config))
    if is_weights_file(output):
        save_model_weights(model, checkpoint.config, checkpoint.step, output)
    else:
        write_checkpoint(model, checkpoint.config, checkpoint.step, output)
    return output


def export_tf_checkpoint(workdir: str, directory: str | os.PathLike, step: int | None = None) -> str:
    """A slotjax work directory's checkpoint (the latest, or `step`) -> the official TensorFlow layout in
    `directory`, which the official code restores and `tf_checkpoint` reads back; returns the checkpoint prefix."""
    model, config, step = restore_model(workdir, step)
    return tf_checkpoint.write_tf_checkpoint(model, config, step, directory)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="training work directory (its checkpoints/)")
    parser.add_argument(
        "--input",
        help="a weights file (.safetensors or .pt), or an official TensorFlow checkpoint "
        "(its directory or a ckpt-N prefix), to turn into a checkpoint or weights",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="weights file (.safetensors, .pt) or work directory to "
        "write; with --tf, the TensorFlow checkpoint directory",
    )
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--tf",
        action="store_true",
        help="with --workdir: write the official TensorFlow checkpoint layout into the --output directory",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="image size of a TensorFlow set-prediction checkpoint (default "
        "128, the paper's; discovery's follows from its decoder)",
    )
    args = parser.parse_args(argv)
    if args.tf or (args.input and not is_weights_file(args.input)):
        # TensorFlow only reads and writes files here: without its oneDNN kernels it prints no start-up notice either
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.tf:
            if not args.workdir:
                parser.error("--tf writes a work directory's checkpoint: give --workdir")
            print(f"Wrote {export_tf_checkpoint(args.workdir, args.output, args.step)}")
        elif args.input and not is_weights_file(args.input):
            written = convert_tf_checkpoint(args.input, args.output, args.resolution)
            print(f"Wrote {'the weights' if is_weights_file(written) else 'a checkpoint'} to {written}")
        elif args.input:
            print(f"Wrote a checkpoint to {weights_to_checkpoint(args.input, args.output)}")
            if not {"config", "training"} & set(load_metadata(args.input)):
                print(
                    f"{args.input} records no training settings, so the checkpoint carries the paper's (batch size, "
                    "learning rate, steps); train.py's --config.FIELD flags set others."
                )
        elif args.workdir:
            print(f"Wrote {checkpoint_to_weights(args.workdir, args.output, args.step)}")
        else:
            parser.error("give --workdir (checkpoint -> weights) or --input (weights or TF checkpoint -> checkpoint)")
    except (ConversionError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
