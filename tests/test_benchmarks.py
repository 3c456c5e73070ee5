"""benchmarks/discovery_diagnostics.py on a tiny trained run: what it measures, and its refusal of other runs;
benchmarks/convergence.py on runs that end early: what its summary shows and that it reports them, not fails;
benchmarks/precision.py on two steps: its rows, and the bound it checks."""

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
CONVERGENCE = os.path.join(REPO, "benchmarks", "convergence.py")


def load_script(path: str = SCRIPT):
    spec = importlib.util.spec_from_file_location(os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def discovery_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("discovery"))
    trainer.train_and_evaluate(tiny_config("discovery", num_train_steps=3), workdir, print_fn=lambda line: None)
    return workdir


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_convergence_summary_leaves_the_minutes_past_a_stopped_run_empty():
    convergence = load_script(CONVERGENCE)
    rows = [{"minutes": 1.2, "fg_ari": 0.1}, {"minutes": 2.0, "fg_ari": 0.3}]
    stopped = {"rows": rows, "minutes": 2.4, "finished": False}
    cells = [convergence.summary_cell(stopped, "fg_ari", minutes) for minutes in (1, 2, 5, 15)]
    assert cells == ["-", "0.300", "not reached", "not reached"]
    finished = {**stopped, "finished": True}  # the trained model holds its last value
    assert [convergence.summary_cell(finished, "fg_ari", minutes) for minutes in (1, 5, 15)] == ["-", "0.300", "0.300"]


# Stands in for train.py: writes one training and one validation row, sleeps --sleep seconds, exits with --status.
FAKE_TRAIN = """
import json, os, sys, time
flags = dict(argument[2:].split("=", 1) for argument in sys.argv[1:])
os.makedirs(flags["workdir"])
with open(os.path.join(flags["workdir"], "metrics.jsonl"), "w") as file:
    for split, value in (("train", 0.1), ("validation", 0.5)):
        file.write(json.dumps({"step": 2, "split": split, "wall_time": time.time(), "fg_ari": value}) + "\\n")
time.sleep(float(flags["sleep"]))
sys.exit(int(flags["status"]))
"""


@pytest.fixture
def convergence_with_fake_train(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    convergence = load_script(CONVERGENCE)
    monkeypatch.setattr(convergence, "REPO", str(tmp_path))
    return convergence


def test_convergence_reads_runs_that_finish_or_are_stopped(convergence_with_fake_train, tmp_path):
    run = convergence_with_fake_train.run
    finished = run("discovery", 0, 1.0, str(tmp_path / "finished"), ["--sleep=0", "--status=0"])
    assert finished["finished"] and 0 < finished["minutes"] < 1.0
    assert [(row["step"], row["fg_ari"]) for row in finished["rows"]] == [(2, 0.5)]  # validation only
    stopped = run("discovery", 1, 0.1, str(tmp_path / "stopped"), ["--sleep=600", "--status=0"])
    assert not stopped["finished"] and stopped["minutes"] == 0.1 and len(stopped["rows"]) == 1
    with pytest.raises(SystemExit, match="train.py exited with status 3"):
        run("discovery", 2, 1.0, str(tmp_path / "failed"), ["--sleep=0", "--status=3"])


def test_convergence_reports_a_run_stopped_before_its_first_evaluation(tmp_path):
    result = subprocess.run(
        [sys.executable, CONVERGENCE, "--minutes=0.05", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "seed 0: no evaluation finished within 0.05 minutes" in result.stdout
    assert "| 0 | not reached | not reached | not reached | - |" in result.stdout
    assert (tmp_path / "convergence.json").exists() and (tmp_path / "convergence.png").exists()


@pytest.mark.slow
def test_precision_compares_each_float32_run_with_its_own_float64_run():
    """benchmarks/precision.py, two steps of set prediction: both frameworks compute the same float64 training, and
    slotjax's float32 is no more than twice as far from its float64 as torch_reference's."""
    script = os.path.join(REPO, "benchmarks", "precision.py")
    arguments = ["--steps=2", "--batch-size=2", "--tasks", "set_prediction"]
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {}  # run -> its distances after steps 1 and 2
    for line in result.stdout.splitlines()[1:]:
        task, *words = line.split()
        assert task == "set_prediction", line
        rows[" ".join(words[:-2])] = [float(word) for word in words[-2:]]
    assert rows["slotjax / torch"][1] <= 2  # the two "slotjax / torch" rows share a label: the last is kept
    torch_float32 = rows["torch_reference float32"][1]
    for forms in ("cpu", "reference"):
        assert 0 < rows[f"slotjax float32, {forms} forms"][1] <= 2 * torch_float32 < 1e-5
    assert rows["float64, slotjax from torch_reference"][1] < 1e-9
    assert rows["float64, optax's Adam epsilon"][1] > 1e-8  # the placement of epsilon shows at step 2
