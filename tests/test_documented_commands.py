"""Every command in a ```bash block of README.md and benchmarks/README.md works as written, shortened.

The blocks are read when the tests are collected, so a new command is covered at once: `plan` decides, by the
rules below, how each command runs (tiny settings, `--help`, or as written where it must be refused in one line),
or states why it is not run; a command that no rule covers fails `test_every_command_runs_or_says_why_not` until
someone decides. The commands run in a copy of the repository's tracked files (a fresh checkout), with the
environment's python on PATH as `python`. Commands that name the same work directory or file run in document
order, so a later one finds what an earlier one made (the conversion walkthrough converts the run that the
training commands trained); groups that share nothing run side by side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "benchmarks/README.md")
TIMEOUT_SECONDS = 300  # one command

# train.py: a few steps of a small batch, one evaluation of 8 examples at 32x32 (the CPU preset's size)
TINY_TRAINING = (
    "--config.num_train_steps=2",
    "--config.eval_every=2",
    "--config.log_every=1",
    "--config.checkpoint_every=2",
    "--config.first_eval_seconds=0",
    "--config.batch_size=8",
    "--config.resolution=32",
)
TINY_EVALUATION = ("--config.num_eval_examples=8", "--config.eval_batch_size=8")
# scripts that run in seconds as written (or with these arguments appended); with a placeholder, their --help
QUICK_SCRIPTS = {
    "-m slotjax.convert": (),
    "examples/segment_images.py": (),
    "examples/slot_attention_demo.py": (),
}
# scripts that would run for minutes or download: their --help, after the documented arguments
HELP_SCRIPTS = {
    "tests/fuzz.py": "runs many generated cases",
    "-m slotjax.data.prepare": "downloads a data set",
}
BENCHMARKS = "tests/test_benchmark_commands.py runs each benchmark command with --help and at a small setting"
NOT_RUN = {
    "make": "creates .venv and installs packages; make test is this suite, make run takes minutes",
    "pip": "installs packages",
    "srun": "needs a SLURM cluster",
    "gsutil": "downloads a data set",
    "tensorboard": "starts a server",
    "-m pytest": "the test suite itself",
}
# words (or flag values) that stand for what the reader supplies
PLACEHOLDERS = {
    "...": "flags left out of an illustration",
    "host0:1234": "needs several hosts",
    "DIR": "needs a real data set in DIR",
    "object_discovery": "needs the paper's TensorFlow checkpoint (a download)",
    "WORKDIR": "needs a training run of the reader's",
    "RUN": "needs a training run of the reader's",
}


@dataclasses.dataclass(frozen=True)
class Command:
    document: str
    line: int
    text: str  # as documented, continuation lines joined, comment dropped

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a command runs: `argv` None is not run (`why` says why); else it must end as `expect` says."""

    argv: tuple[str, ...] | None
    why: str
    expect: str = "success"  # "success": exit 0; "help": exit 0 with usage; "refused": one `error:` line, exit 1
    refusal_names: tuple[str, ...] = ()  # "refused": its error line names one of these (not a bad flag, say)


def documented_commands(document: str) -> list[Command]:
    """The commands of `document`'s ```bash blocks, with the line each starts on."""
    text = (REPO / document).read_text()
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        first_line = text.count("\n", 0, block.start(1)) + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(1).splitlines()):
            if start is None:
                start = first_line + offset
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            words = shlex.split(pending, comments=True)
            if words:
                commands.append(Command(document, start, shlex.join(words)))
            pending, start = "", None
    return commands


def program(words: list[str]) -> str:
    """What a command runs: `make`, `pip`, `train.py`, `-m slotjax.convert`, `benchmarks/step_time.py`, ..."""
    if words[0] != "python":
        return words[0]
    return f"-m {words[2]}" if words[1] == "-m" else words[1]


def plan(command: Command) -> Plan | None:
    """The rule for `command`, or None where no rule covers it."""
    words = shlex.split(command.text)
    name = program(words)
    values = {part.split("/")[0] for word in words for part in word.split("=")}
    placeholders = [why for mark, why in PLACEHOLDERS.items() if mark in values]
    if name in NOT_RUN:
        return Plan(None, BENCHMARKS if words[:2] == ["make", "bench"] else NOT_RUN[name])
    if name.startswith("benchmarks/"):
        return Plan(None, BENCHMARKS)
    if name == "train.py":
        if placeholders == [PLACEHOLDERS["DIR"]]:  # flags checked; no data files (or checkpoints) there
            workdirs = tuple(word.partition("=")[2] for word in words if word.startswith("--workdir="))
            return Plan(tuple(words), "refused for want of data", "refused", refusal_names=("DIR", *workdirs))
        if placeholders:
            return Plan(None, placeholders[0])
        mode_eval = "--mode=eval" in words
        extra = TINY_EVALUATION if mode_eval else TINY_TRAINING + TINY_EVALUATION
        return Plan((*words, *extra), "evaluation of 8 examples" if mode_eval else "2 steps, 8 examples")
    if name in QUICK_SCRIPTS and not placeholders:
        return Plan((*words, *QUICK_SCRIPTS[name]), "as written" if not QUICK_SCRIPTS[name] else "small settings")
    if name in QUICK_SCRIPTS or name in HELP_SCRIPTS:
        return Plan((*words, "--help"), f"--help: {(placeholders or [HELP_SCRIPTS.get(name)])[0]}", expect="help")
    return None


def all_commands() -> list[Command]:
    return [command for document in DOCUMENTS for command in documented_commands(document)]


def test_every_command_runs_or_says_why_not():
    commands = all_commands()
    assert {command.document for command in commands} == set(DOCUMENTS), "a document lost its command blocks"
    without_rule = [f"{command.name}: {command.text}" for command in commands if plan(command) is None]
    assert not without_rule, "no rule in tests/test_documented_commands.py for:\n" + "\n".join(without_rule)
    plans = [plan(command) for command in commands]
    assert all(p.why for p in plans if p.argv is None)
    assert any(p.argv and "train.py" in p.argv for p in plans), "no training command is run"


def fresh_checkout(root: pathlib.Path) -> None:
    """The repository's tracked files, as they are in the working tree, copied into `root`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for relative in filter(None, listed.decode().split("\0")):
        source = REPO / relative
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / relative)


def environment(root: pathlib.Path) -> dict[str, str]:
    """This interpreter as `python`, the copy's packages first, JAX on the CPU with the suite's compilation cache."""
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    python = bin_dir / "python"  # a script, not a link: a venv's interpreter finds its packages by its own path
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(root),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        MPLBACKEND="Agg",
    )
    return env


def run(command: Command, steps: Plan, root: pathlib.Path, env: dict[str, str]) -> str | None:
    """Runs one planned command in `root`; a description of what went wrong, or None."""
    try:
        result = subprocess.run(
            steps.argv, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{command.name}: {shlex.join(steps.argv)}\n  ran over {TIMEOUT_SECONDS} s"
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if "Traceback" in output:
        problem = "a traceback"
    elif steps.expect == "refused" and (result.returncode != 1 or len(errors) != 1):
        problem = f"exit status {result.returncode} and {len(errors)} error lines, where one refusal was expected"
    elif steps.expect == "refused" and not any(name in errors[0] for name in steps.refusal_names):
        problem = f"a refusal that names none of {', '.join(steps.refusal_names)}"
    elif steps.expect != "refused" and result.returncode != 0:
        problem = f"exit status {result.returncode}"
    elif steps.expect == "help" and "usage:" not in result.stdout:
        problem = "no usage text"
    else:
        return None
    tail = "\n".join(f"    {line}" for line in output.strip().splitlines()[-15:])
    return f"{command.name}: {shlex.join(steps.argv)}\n  {problem}:\n{tail}"


def paths(command: Command) -> set[str]:
    """The work directories and files `command` names (train.py's default work directory runs/TASK included)."""
    words = shlex.split(command.text)
    named = {
        os.path.normpath(value)
        for flag, _, value in (word.partition("=") for word in words)
        if flag in ("--workdir", "--model", "--input", "--output")
    }
    if program(words) == "train.py" and not any(word.startswith("--workdir=") for word in words):
        task = next((word.partition("=")[2] for word in words if word.startswith("--task=")), "discovery")
        named.add(f"runs/{task}")
    return named


def chains(planned: list[tuple[Command, Plan]]) -> list[list[tuple[Command, Plan]]]:
    """The planned commands in groups that share no path, each in document order, the longest first: a command
    that uses what an earlier one made runs after it, and the groups can run side by side."""
    groups: list[tuple[set[str], list[tuple[Command, Plan]]]] = []
    for command, steps in planned:
        named, members = paths(command), [(command, steps)]
        for group in [group for group in groups if group[0] & named]:
            groups.remove(group)
            named |= group[0]
            members = sorted(group[1] + members, key=planned.index)
        groups.append((named, members))
    return sorted((members for _, members in groups), key=len, reverse=True)


@pytest.mark.slow
def test_documented_commands_work_as_written(tmp_path):
    """Groups of commands that share no path run side by side, two at a time (this machine's cores)."""
    fresh_checkout(tmp_path)
    env = environment(tmp_path)
    planned = [(command, plan(command)) for command in all_commands()]
    assert all(steps is not None for _, steps in planned), "see test_every_command_runs_or_says_why_not"
    to_run = [(command, steps) for command, steps in planned if steps.argv]

    def run_chain(chain: list[tuple[Command, Plan]]) -> list[str | None]:
        return [run(command, steps, tmp_path, env) for command, steps in chain]

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        problems = [problem for results in pool.map(run_chain, chains(to_run)) for problem in results if problem]
    assert not problems, f"{len(problems)} documented commands failed:\n" + "\n".join(problems)
