"""The weights file: a torch-layout state dict {name: array} and metadata strings, in safetensors (or torch's .pt).

Its metadata carries a SHA-256 checksum of the tensors (`CHECKSUM_KEY`), checked when the file is read; a .pt file is
read with `torch.load(weights_only=True)`, which never runs code from the file. `slotjax.convert` and
`torch_reference.save_model` / `load_model` read and write the files here and nothing else of each other: this module
knows no model. torch is imported only for .pt files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping

import numpy as np

CHECKSUM_KEY = "tensors_sha256"  # metadata of the weights files; files without it load unchecked
SUFFIXES = (".safetensors", ".pt", ".pth")


class ConversionError(ValueError):
    """Weights that do not fit the model they are loaded into, or a damaged weights file."""


def is_weights_file(path: str) -> bool:
    """Whether `path` names a weights file (by its suffix)."""
    return os.fspath(path).endswith(SUFFIXES)


def tensors_checksum(state_dict: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every tensor, in the order of their names."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        array = np.ascontiguousarray(state_dict[name])
        digest.update(f"{name}\0{array.dtype.str}{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Writes `state_dict` with `metadata` and the tensors' checksum to `path` (.safetensors, or .pt), atomically."""
    state_dict = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
    metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(state_dict)}
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConversionError(
            f"--output {path!r} is a directory; name the weights file to write (.safetensors or .pt), e.g. "
            f"{os.path.join(path, 'model.safetensors')!r}."
        )
    with written_whole(path) as temporary:
        if path.endswith((".pt", ".pth")):
            import torch

            tensors = {name: torch.tensor(value) for name, value in state_dict.items()}
            torch.save({"state_dict": tensors, "metadata": metadata}, temporary)
        else:
            from safetensors.numpy import save

            with open(temporary, "wb") as file:  # open's mode, 0666 less the umask (save_file makes 0600)
                file.write(save(state_dict, metadata=metadata))


@contextlib.contextmanager
def written_whole(path: str):
    """A temporary path beside `path` to write to: renamed to `path` when the block ends, removed if it fails, so
    `path` holds a whole file or what it held before."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
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


def to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 widened to float32, which holds it exactly) or array-like as a numpy array."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


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
        return {name: to_numpy(value) for name, value in loaded.items()}, dict(metadata)
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
