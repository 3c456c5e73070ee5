"""Exported weights files get the usual permissions of a new file (0666 less the umask), like any file the user writes,
although they are written to a temporary name and renamed."""

import os
import stat

import numpy as np
import pytest
from flax import nnx

import slotjax
from slotjax import convert, weights_file


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_weights_file_has_the_mode_the_umask_gives(tmp_path, suffix, umask):
    path = tmp_path / f"weights{suffix}"
    module = slotjax.SlotAttention(3, 8, mlp_hidden_size=8, rngs=nnx.Rngs(0))
    previous = os.umask(umask)
    try:
        convert.save_weights(module, path, {"step": "1"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


@pytest.mark.parametrize("suffix", ["", ".pt"])
def test_writing_over_a_directory_is_refused_in_one_line_and_leaves_nothing(tmp_path, suffix):
    directory = tmp_path / f"run{suffix}"
    directory.mkdir()
    with pytest.raises(weights_file.ConversionError, match=r"is a directory; name the weights file to write"):
        weights_file.write(directory, {"w": np.zeros(2, np.float32)}, {})
    assert sorted(path.name for path in tmp_path.iterdir()) == [directory.name]
    assert list(directory.iterdir()) == []
