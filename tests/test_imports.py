"""slotjax and its models import and run without TensorFlow (needed only for real data sets and TensorBoard)."""

import os
import subprocess
import sys

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
