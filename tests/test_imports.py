"""slotjax and its models import and run without TensorFlow (needed only for real data sets and TensorBoard)."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from tests.test_cpu_devices import REPO

BUILD_AND_RUN = """
import sys
import jax, jax.numpy as jnp
from flax import nnx
import slotjax
images = jnp.zeros((2, 32, 32, 3))
autoencoder = slotjax.SlotAutoencoder(resolution=32, num_slots=3, slot_size=16, encoder_features=16,
                                      decoder_features=8, mlp_hidden_size=16, rngs=nnx.Rngs(0))
predictor = slotjax.SetPredictor(resolution=32, num_slots=3, slot_size=16, encoder_features=16, mlp_hidden_size=16,
                                 head_hidden_size=16, rngs=nnx.Rngs(0))
assert autoencoder(images, key=jax.random.key(0))["reconstruction"].shape == (2, 32, 32, 3)
assert predictor(images, key=jax.random.key(0))["predictions"].shape == (2, 3, 19)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("tensorflow", "tensorflow_datasets")))
"""


@pytest.mark.slow
def test_models_build_and_run_without_importing_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_RUN],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "[]", result.stdout[-2000:]


def imports_of(path: str) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (functions' imports too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_slotjax_has_no_import_circles():
    """No module of slotjax imports (at its top or in a function) one that imports it back, through any path;
    importing from one's own package is not a circle."""
    modules = {}
    for path in glob.glob(os.path.join(REPO, "slotjax", "**", "*.py"), recursive=True):
        name = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
        modules[name] = path
    graph = {
        name: {
            target
            for target in imports_of(path)
            if target in modules and target != name and not name.startswith(f"{target}.")
        }
        for name, path in modules.items()
    }
    for start in graph:
        reached, frontier = set(), [start]
        while frontier:
            for target in graph[frontier.pop()] - reached:
                reached.add(target)
                frontier.append(target)
        assert start not in reached, f"{start} imports itself back through {sorted(graph[start] & reached)}"


def test_torch_reference_models_import_nothing_from_slotjax():
    for path in glob.glob(os.path.join(REPO, "torch_reference", "nn", "*.py")):
        assert not {name for name in imports_of(path) if name.split(".")[0] == "slotjax"}, path
