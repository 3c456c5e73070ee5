"""Evaluation with test-time settings: more slots, iterations and objects than in training, mBO, the attention
picture, and the generalisation benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from slotjax import convert
from slotjax.train import step as steps
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(workdir, config) -> None:
    """A run directory holding a checkpoint at step 3 of `config`'s (untrained) model."""
    convert.write_checkpoint(steps.build_model(config), config, 3, str(workdir))


def run(*arguments, cwd=REPO) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, *arguments], cwd=cwd, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True
    )


@pytest.mark.slow
def test_eval_with_more_slots_iterations_and_objects_says_what_was_trained_and_what_is_tested(tmp_path):
    write_run(tmp_path, tiny_config(num_slots=4, num_iterations=2, min_objects=2, max_objects=3))
    overrides = ["--config.num_slots=11", "--config.num_iterations=5", "--config.min_objects=7"]
    process = run(
        "train.py", "--mode=eval", f"--workdir={tmp_path}", "--split=test", *overrides, "--config.max_objects=10"
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "trained: 4 slots, 2 iterations, 2-3 objects; tested: 11 slots, 5 iterations, 7-10 objects" in process.stdout
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["setting"] == {
        "trained": {"num_slots": 4, "num_iterations": 2, "min_objects": 2, "max_objects": 3},
        "tested": {"num_slots": 11, "num_iterations": 5, "min_objects": 7, "max_objects": 10},
    }
    assert 0 <= row["mbo"] <= 1 and 0 <= row["fg_ari"] <= 1
    with Image.open(tmp_path / "images" / "test_attention_step_0000003.png") as picture:
        columns, rows = picture.size
    # 4 scenes x 5 iterations of 16x16 tiles, 12 columns (the image and 11 slots), labels around them
    assert columns > 12 * 16 and rows > 4 * 5 * 16


def test_eval_refuses_a_setting_that_changes_a_parameter_in_one_line(tmp_path):
    write_run(tmp_path, tiny_config())
    process = run("train.py", "--mode=eval", f"--workdir={tmp_path}", "--config.slot_size=32")
    assert process.returncode == 1 and "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "belongs to another model (slot_size: checkpoint 16 vs now 32)" in lines[0]


@pytest.mark.slow
def test_the_generalisation_benchmark_tabulates_and_draws_each_setting(tmp_path):
    write_run(tmp_path, tiny_config(num_slots=4, num_iterations=2))
    arguments = ["--num-examples=8", "--objects", "2", "5", "--slots", "4", "6", "--iterations", "1", "2"]
    process = run("benchmarks/generalisation.py", f"--workdir={tmp_path}", *arguments)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "trained: 4 slots, 2 iterations, 2-3 objects, step 3" in process.stdout
    assert "| K | T | 2 obj. | 5 obj. |" in process.stdout and "| 6 | 1 | " in process.stdout
    saved = json.loads((tmp_path / "generalisation.json").read_text())
    settings = [(row["num_slots"], row["num_iterations"]) for row in saved["rows"]]
    assert settings == [(4, 1), (4, 2), (6, 1), (6, 2)]
    values = [value for row in saved["rows"] for metric in ("fg_ari", "mbo") for value in row[metric].values()]
    assert len(values) == 16 and all(np.isfinite(value) and 0 <= value <= 1 for value in values)
    assert Image.open(tmp_path / "generalisation.png").size[0] > 500
