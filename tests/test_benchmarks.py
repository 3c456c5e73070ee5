"""benchmarks/discovery_diagnostics.py on a tiny trained run: what it measures, and its refusal of other runs."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from slotjax.convert import restore_model
from slotjax.data.encoding import COLOURS
from slotjax.train import trainer
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "discovery_diagnostics.py")


def load_script():
    spec = importlib.util.spec_from_file_location("discovery_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def discovery_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("discovery"))
    trainer.train_and_evaluate(tiny_config("discovery", num_train_steps=3), workdir, print_fn=lambda line: None)
    return workdir


def test_objects_by_colour_scores_every_object(discovery_run):
    diagnostics = load_script()
    model, config, _ = restore_model(discovery_run, print_fn=lambda line: None)
    config.num_eval_examples = 16
    per_colour, fg_ari, fg_ari_without = diagnostics.objects_by_colour(model, config)
    scored = np.concatenate([np.reshape(rows, (-1, 2)) for rows in per_colour.values()])
    assert len(scored) >= 2 * 16  # every scene holds at least two objects, all visible
    assert np.all((scored >= 0) & (scored <= 1))
    assert -1 <= fg_ari <= 1 and fg_ari_without.shape == (len(COLOURS),)
    assert not np.allclose(fg_ari_without, fg_ari)  # leaving objects out changes the score


def test_colour_keys_compares_every_colour(discovery_run):
    diagnostics = load_script()
    model, config, _ = restore_model(discovery_run, print_fn=lambda line: None)
    distance, cosine = diagnostics.colour_keys(model, config.resolution)
    assert distance.shape == (len(COLOURS),) and np.all(np.isfinite(distance)) and np.all(distance > 0)
    np.testing.assert_allclose(np.diag(cosine), 1.0, rtol=1e-5)
    np.testing.assert_allclose(cosine, cosine.T, atol=1e-6)


def run_script(workdir: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, f"--workdir={workdir}", "--num-examples=8"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )


def test_refuses_a_set_prediction_run(tmp_path):
    workdir = str(tmp_path)
    trainer.train_and_evaluate(tiny_config("set_prediction", num_train_steps=3), workdir, print_fn=lambda line: None)
    result = run_script(workdir)
    assert result.returncode == 2
    assert "needs discovery on the embedded scenes" in result.stderr and "Traceback" not in result.stderr


def test_a_directory_without_checkpoints_is_one_error_line(tmp_path):
    result = run_script(str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: No checkpoint in")
