"""The benchmarks' commands in README.md and benchmarks/README.md, run from the root of a fresh checkout (only the
files git tracks: the configs are the installed package's): each answers --help with its documented arguments, and
each script with a small setting runs at it (benchmarks/discovery_diagnostics.py needs a trained run:
tests/test_benchmarks.py trains one; benchmarks/input_pipeline.py writes stand-ins of every data set first, minutes
of work at any setting)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests import fuzz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", os.path.join("benchmarks", "README.md"))
COMMAND = re.compile(r"python (benchmarks/\w+\.py)([^`#\n]*)")
MAKE_BENCH = re.compile(r'make bench ARGS="([^"]*)"')  # the Makefile's `bench`: benchmarks/step_time.py $(ARGS)
SLOW_START = {  # import JAX (and TensorFlow) before they parse their arguments
    "benchmarks/discovery_diagnostics.py",
    "benchmarks/input_pipeline.py",
    "benchmarks/scenes_throughput.py",
}
SMALL = {  # script -> arguments of a run of seconds to a minute ("{tmp}": a fresh directory)
    "benchmarks/convergence.py": [
        "--minutes=5",
        "--seeds",
        "0",
        "--workdir={tmp}",
        "--",
        *fuzz.tiny_flags(num_train_steps=2, eval_every=2, checkpoint_every=2),
    ],
    "benchmarks/scenes_throughput.py": ["--resolution=16", "--num-scenes=16", "--batch-size=8"],
    "benchmarks/step_time.py": ["--only", "set_prediction", "--batch-size=2", "--repeats=1", "--no-compile"],
}


def readme_commands() -> list[tuple[str, tuple[str, ...]]]:
    """(script, arguments) of every benchmark command the READMEs give."""
    commands = set()
    for name in READMES:
        with open(os.path.join(REPO, name)) as file:
            text = file.read()
        commands |= {(script, tuple(shlex.split(arguments))) for script, arguments in COMMAND.findall(text)}
        bench = MAKE_BENCH.findall(text)
        commands |= {("benchmarks/step_time.py", tuple(shlex.split(arguments))) for arguments in bench}
    return sorted(commands)


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the files git tracks, as a fresh clone has them."""
    root = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if os.path.isfile(os.path.join(REPO, name)):  # a tracked file deleted in the working tree is left out
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(root, name))
    return root


def run(checkout, script: str, arguments) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, script, *arguments],
        cwd=checkout,
        env={**environment, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_readmes_give_a_command_of_every_benchmark():
    scripts = {script for script, _ in COMMANDS}
    benchmarks = {f"benchmarks/{name}" for name in os.listdir(os.path.join(REPO, "benchmarks")) if name.endswith(".py")}
    assert {"benchmarks/step_time.py", "benchmarks/input_pipeline.py", "benchmarks/scenes_throughput.py"} <= scripts
    assert scripts <= benchmarks, scripts - benchmarks


@pytest.mark.parametrize(
    "script, arguments",
    [
        pytest.param(script, arguments, marks=[pytest.mark.slow] if script in SLOW_START else [])
        for script, arguments in COMMANDS
    ],
    ids=[" ".join([script, *arguments]) for script, arguments in COMMANDS],
)
@pytest.mark.slow
def test_a_readme_command_answers_help_from_a_fresh_checkout(checkout, script, arguments):
    own = arguments.index("--") if "--" in arguments else len(arguments)  # after "--": train.py's arguments
    result = run(checkout, script, [*arguments[:own], "--help", *arguments[own:]])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {os.path.basename(script)}"), result.stdout[:500]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL))
def test_a_benchmark_runs_at_a_small_setting_from_a_fresh_checkout(checkout, script, tmp_path):
    result = run(checkout, script, [argument.format(tmp=tmp_path) for argument in SMALL[script]])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
