"""Weight converters between slotjax (Flax NNX) and torch_reference (PyTorch).

The two packages use the same module and parameter names, so a parameter's
torch name is its Flax path with the leaf renamed, and its torch value is its
Flax value with the axes permuted. `LEAF_TABLE` below is the whole mapping;
`PARENT_RENAMES` covers torch.nn.GRUCell, whose parameters have torch's own
names. Round trips are bit-identical in both directions (only transposes).

State dicts here are plain `{name: numpy array}` mappings, so torch is needed
only to load or save `.pt` files; safetensors files are the default format.

Command line (training checkpoint <-> torch_reference weights; the paper's TensorFlow checkpoints -> either):
    python -m slotjax.convert --workdir=RUN_DIR --output=model.safetensors
    python -m slotjax.convert --input=model.safetensors --output=NEW_RUN_DIR
    python -m slotjax.convert --input=TF_CHECKPOINT_DIR_OR_PREFIX --output=NEW_RUN_DIR   (slotjax/tf_checkpoint.py)
    python -m slotjax.convert --workdir=RUN_DIR --output=TF_CHECKPOINT_DIR --tf           (the official layout)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from slotjax.nn import layers

# (Flax module type, Flax leaf) -> (torch leaf, axis order turning the Flax array into torch's).
LEAF_TABLE: dict[tuple[type, str], tuple[str, tuple[int, ...] | None]] = {
    (layers.Dense, "kernel"): ("weight", (1, 0)),  # [in, out] -> [out, in]
    (layers.Dense, "bias"): ("bias", None),
    (layers.LayerNorm, "scale"): ("weight", None),
    (layers.LayerNorm, "bias"): ("bias", None),
    (layers.Conv, "kernel"): ("weight", (3, 2, 0, 1)),  # [k, k, in, out] -> [out, in, k, k]
    (layers.Conv, "bias"): ("bias", None),
    (layers.ConvTranspose, "kernel"): ("weight", (3, 2, 0, 1)),  # [k, k, out, in] -> [in, out, k, k]
    (layers.ConvTranspose, "bias"): ("bias", None),
}

# Parent module type -> {Flax "child.leaf": torch leaf}: torch.nn.GRUCell's names.
PARENT_RENAMES: dict[type, dict[str, str]] = {
    layers.GRUCell: {
        "input_dense.kernel": "weight_ih",
        "input_dense.bias": "bias_ih",
        "hidden_dense.kernel": "weight_hh",
        "hidden_dense.bias": "bias_hh",
    },
}


CHECKSUM_KEY = "tensors_sha256"  # metadata of the weights files written here; files without it load unchecked


class ConversionError(ValueError):
    """Weights that do not fit the model they are loaded into."""


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _plan(module: nnx.Module) -> dict[str, tuple[tuple, tuple[int, ...] | None]]:
    """torch name -> (Flax path, axis order Flax -> torch) for every parameter of `module`."""
    plan = {}
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        owners = [module]
        for key in path[:-1]:
            owners.append(_child(owners[-1], key))
        leaf, owner = path[-1], owners[-1]
        torch_path = [str(key) for key in path]
        order = None
        rule = LEAF_TABLE.get((type(owner), leaf))
        if rule is not None:
            torch_path[-1], order = rule
        elif type(owner).__module__.startswith("flax."):
            raise ConversionError(f"No conversion rule for {type(owner).__name__}.{leaf} at {_dotted(path)}.")
        # else: a parameter of our own (e.g. slots_mu), same name and layout on both sides.
        if len(path) > 1 and (renamed := PARENT_RENAMES.get(type(owners[-2]), {}).get(f"{path[-2]}.{leaf}")):
            torch_path[-2:] = [renamed]
        plan[".".join(torch_path)] = (path, order)
    return plan


def _dotted(path: tuple) -> str:
    return ".".join(str(key) for key in path)


def flax_to_torch(module: nnx.Module) -> dict[str, np.ndarray]:
    """The `torch_reference` state dict (as numpy arrays) of a slotjax module."""
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    state_dict = {}
    for torch_name, (path, order) in _plan(module).items():
        value = np.asarray(params[path][...])
        state_dict[torch_name] = np.array(value if order is None else value.transpose(order), order="C")
    return state_dict


def torch_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """torch_reference parameter name -> shape, for `module` (also an abstract one, from `nnx.eval_shape`)."""
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return {name: _expected_torch_shape(params[path].shape, order) for name, (path, order) in _plan(module).items()}


def torch_to_flax(state_dict: Mapping[str, object], module: nnx.Module) -> nnx.Module:
    """Loads a `torch_reference` state dict (torch tensors or arrays) into `module`, in place.

    Refuses missing, unexpected, misshapen, non-numeric or non-finite parameters, naming each one.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module is a {type(module).__name__}; expected the nnx.Module to load the weights into.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict is a {type(state_dict).__name__}; expected a mapping {{name: tensor or array}}.")
    plan = _plan(module)
    missing = sorted(set(plan) - set(state_dict), key=str)
    unexpected = sorted(set(state_dict) - set(plan), key=str)
    if missing or unexpected:
        raise ConversionError(
            f"The weights do not belong to this {type(module).__name__}: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}. Build the model with the configuration the weights were trained with."
        )
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    converted = {}  # everything is checked before anything is written
    for torch_name, (path, order) in plan.items():
        try:
            value = _to_numpy(state_dict[torch_name])
        except (TypeError, ValueError) as error:  # e.g. ragged nested lists
            raise ConversionError(f"Parameter {torch_name!r} is not an array: {error}") from error
        expected = _expected_torch_shape(params[path].shape, order)
        if value.shape != expected:
            raise ConversionError(
                f"Parameter {torch_name!r} (Flax {_dotted(path)}) has shape {value.shape} in the weights "
                f"but the model expects {expected}. "
                "Build the model with the configuration the weights were trained with."
            )
        if value.dtype.kind not in "biuf" and not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 is kind "V"
            raise ConversionError(f"Parameter {torch_name!r} has dtype {value.dtype}; expected real numbers.")
        with np.errstate(over="ignore"):
            value = np.asarray(value, dtype=params[path].dtype)
        if not np.isfinite(value).all():
            raise ConversionError(
                f"Parameter {torch_name!r} holds NaN or inf (in the model's {value.dtype}); "
                "the weights are broken (a diverged run?)."
            )
        converted[path] = value if order is None else value.transpose(np.argsort(order))
    for path, value in converted.items():
        params[path][...] = value
    return module


def _expected_torch_shape(flax_shape, order) -> tuple[int, ...]:
    return tuple(flax_shape) if order is None else tuple(flax_shape[axis] for axis in order)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def tensors_checksum(state_dict: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every tensor, in the order of their names."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        array = np.ascontiguousarray(state_dict[name])
        digest.update(f"{name}\0{array.dtype.str}{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_weights(module: nnx.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes the module's torch-layout weights to `path` (.safetensors, or .pt), atomically.

    `metadata` (strings) goes into the safetensors header, or next to the
    state dict of a .pt file; `torch_reference.load_model` reads the model's
    description from there. The tensors' checksum (`tensors_checksum`) goes there too, and reading the file
    checks it.
    """
    state_dict = flax_to_torch(module)
    metadata = {**(metadata or {}), CHECKSUM_KEY: tensors_checksum(state_dict)}
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    if path.endswith((".pt", ".pth")):
        import torch

        tensors = {name: torch.tensor(value) for name, value in state_dict.items()}
        torch.save({"state_dict": tensors, "metadata": metadata}, temporary)
    else:
        from safetensors.numpy import save_file

        save_file(state_dict, temporary, metadata=metadata)
    os.replace(temporary, path)


def load_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch-layout state dict from .safetensors or .pt without executing code from the file."""
    return read_weights(path)[0]


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata strings stored with the weights (empty if none)."""
    return read_weights(path)[1]


def read_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, metadata) of a weights file, checked against the checksum in its metadata where it has one."""
    path = os.fspath(path)
    state_dict, metadata = _read_unchecked(path)
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != tensors_checksum(state_dict):
        raise ConversionError(
            f"The tensors in {path!r} do not match the checksum ({CHECKSUM_KEY}) in its metadata: "
            "the file was altered after it was written. Export it again."
        )
    return state_dict, metadata


def _read_unchecked(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if path.endswith((".pt", ".pth")):
        import pickle

        import torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except pickle.UnpicklingError as error:
            raise ConversionError(
                f"Refused to load {path!r}: it holds pickled Python objects other than tensors, which could run code "
                f"when loaded (torch.load(weights_only=True) says: {_unpickling_reason(error)})."
            ) from error
        except Exception as error:  # truncated or foreign files
            raise ConversionError(f"Could not read weights from {path!r}: {error}. Is the file complete?") from error
        metadata = {}
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded, metadata = loaded["state_dict"], loaded.get("metadata", {})
        if not isinstance(loaded, dict) or not isinstance(metadata, dict):
            raise ConversionError(
                f"{path!r} holds a {type(loaded).__name__}, not a state dict {{name: tensor}} "
                "(or {'state_dict': ..., 'metadata': ...})."
            )
        for name, value in loaded.items():
            if not isinstance(value, torch.Tensor):
                raise ConversionError(f"{path!r} holds a {type(value).__name__} at {name!r}, not a tensor.")
        return {name: _to_numpy(value) for name, value in loaded.items()}, dict(metadata)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as file:
            return {name: file.get_tensor(name) for name in file.keys()}, dict(file.metadata() or {})
    except Exception as error:  # truncated, altered or foreign files
        raise ConversionError(f"Could not read weights from {path!r}: {error}. Is the file complete?") from error


def _unpickling_reason(error: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file an issue"))]
    return (details or lines or [type(error).__name__])[0]


def is_weights_file(path: str) -> bool:
    """Whether `path` names a torch-layout weights file (else a work directory)."""
    return path.endswith((".safetensors", ".pt", ".pth"))


def save_model_weights(model: nnx.Module, config, step: int, output: str) -> str:
    """Writes the model's torch-layout weights with what `torch_reference.load_model` and
    `weights_to_checkpoint` need: the model's name and arguments, the config and the step."""
    from slotjax.train import step as steps

    name, arguments = steps.model_spec(config)
    save_weights(
        model,
        output,
        {"model": name, "arguments": json.dumps(arguments), "config": config.to_json(), "step": str(step)},
    )
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

    Refuses a work directory that already holds checkpoints of another model or training state, or one at this
    step or a later one (a resumed run would start from that one, not from these weights).
    """
    from slotjax.train import checkpoints, trainer

    with _checkpoint_manager(workdir, config) as manager:
        state = trainer.Trainer(config).initial_state()
        state = state.replace(params=nnx.state(model, nnx.Param), step=jnp.asarray(step, jnp.int32))
        latest = manager.latest_step()
        if latest is not None:
            saved = checkpoints.config_from_checkpoint(manager, latest)
            differing = [
                f"{field}: {saved.get(field)!r} there, {config.get(field)!r} here"
                for field in checkpoints.MODEL_FIELDS
                if saved.get(field) != config.get(field)
            ]
            if not differing and checkpoints.saved_array_paths(manager, latest) != checkpoints.array_paths(state):
                differing = [f"grad_clip_norm: {saved.get('grad_clip_norm')!r} there, {config.grad_clip_norm!r} here"]
            if differing:
                raise ConversionError(
                    f"{workdir!r} holds checkpoints of another model ({', '.join(differing)}); "
                    "choose a new --output directory."
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
    (`checkpoints.restore_latest_intact`); a damaged `step` is refused.
    """
    from slotjax.train import checkpoints, trainer
    from slotjax.train import step as steps

    def target(config):
        return trainer.Trainer(config).initial_state()

    no_checkpoint = f"No checkpoint in {os.path.join(workdir, 'checkpoints')}."
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # refused before the manager creates the directory
        raise ConversionError(no_checkpoint)
    with _checkpoint_manager(workdir, print_fn=print_fn) as manager:
        if step is None:
            restored = checkpoints.restore_latest_intact(manager, target, print_fn=print_fn)
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
            state = checkpoints.restore_checkpoint(manager, target(config), config, step)
    model = steps.build_model(config)
    nnx.update(model, state.params)
    return model, config, int(state.step)


def checkpoint_to_weights(workdir: str, output: str, step: int | None = None) -> str:
    """Training checkpoint in `workdir` -> torch-layout weights file with the model's description."""
    return save_model_weights(*restore_model(workdir, step), output)


def weights_to_checkpoint(weights: str, workdir: str) -> str:
    """Torch-layout weights file (made by `checkpoint_to_weights` or `torch_reference.save_model`) -> a training
    checkpoint in `workdir`, from which `train.py --workdir` evaluates or continues training."""
    from slotjax.train import step as steps

    metadata = load_metadata(weights)
    config = config_from_metadata(metadata, weights)
    try:
        model = steps.build_model(config)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a damaged config
        raise ConversionError(f"{weights!r} describes a model slotjax cannot build: {error}") from error
    model = torch_to_flax(load_weights(weights), model)
    step = metadata.get("step", "0")
    if not step.isdigit():
        raise ConversionError(f"{weights!r} holds damaged metadata: its step {step!r} is no integer >= 0.")
    return write_checkpoint(model, config, int(step), workdir)


TORCH_TASKS = {"SlotAutoencoder": "discovery", "SetPredictor": "set_prediction"}


def config_from_metadata(metadata: Mapping[str, str], weights: str):
    """The slotjax config of a weights file: the one slotjax saved with it, or, for a file from
    `torch_reference.save_model`, the paper's config of its task with the model's constructor arguments."""
    import ml_collections

    try:
        described = {key: json.loads(metadata[key]) for key in ("config", "arguments") if key in metadata}
    except ValueError as error:
        raise ConversionError(f"{weights!r} holds damaged metadata (not JSON: {error}).") from error
    if not all(isinstance(value, dict) for value in described.values()):
        raise ConversionError(f"{weights!r} holds damaged metadata (its config or arguments are no mapping).")
    if "config" in described:
        return ml_collections.ConfigDict(described["config"])
    if metadata.get("model") not in TORCH_TASKS or "arguments" not in described:
        raise ConversionError(
            f"{weights!r} names no slotjax config or torch_reference model in its metadata; it was not written by "
            "slotjax or torch_reference.save_model, so the model it belongs to is unknown."
        )
    from slotjax import configs

    arguments = described["arguments"]
    if arguments.pop("broadcast_resolution", 8) != 8:
        raise ConversionError(f"{weights!r} holds a decoder broadcast at another size than slotjax's 8x8.")
    config = configs.get_config(TORCH_TASKS[metadata["model"]], "official")
    unknown = sorted(set(arguments) - set(config))
    if unknown:
        raise ConversionError(f"{weights!r} names model arguments slotjax does not have: {', '.join(unknown)}.")
    config.update(arguments)
    return config


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
            from slotjax import tf_checkpoint

            print(f"Wrote {tf_checkpoint.export_tf_checkpoint(args.workdir, args.output, args.step)}")
        elif args.input and not is_weights_file(args.input):
            from slotjax import tf_checkpoint

            written = tf_checkpoint.convert_tf_checkpoint(args.input, args.output, args.resolution)
            print(f"Wrote {'the weights' if is_weights_file(written) else 'a checkpoint'} to {written}")
        elif args.input:
            print(f"Wrote a checkpoint to {weights_to_checkpoint(args.input, args.output)}")
        elif args.workdir:
            print(f"Wrote {checkpoint_to_weights(args.workdir, args.output, args.step)}")
        else:
            parser.error("give --workdir (checkpoint -> weights) or --input (weights or TF checkpoint -> checkpoint)")
    except (ConversionError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
