"""train.py's command line (slotjax.train.cli, slotjax.train.runs): settings checked before anything starts, an
existing run's saved config, exit statuses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from slotjax import configs, convert, cpu_devices
from slotjax.train import runs, trainer
from slotjax.train import step as steps
from tests import fuzz
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_batch_size", 0, r"eval_batch_size must be an integer >= 1, got 0: set --config.eval_batch_size\."),
        ("batch_size", -8, r"batch_size must be an integer >= 1, got -8"),
        ("log_every", 0, r"log_every must be an integer >= 1"),
        ("encoder_features", 0, r"encoder_features must be an integer >= 1"),
        ("num_train_steps", -1, r"num_train_steps must be an integer >= 0"),
        ("compute_dtype", "float8", r"compute_dtype='float8' is not supported; use --config.compute_dtype=float32 or"),
        ("nonfinite_loss", "ignore", r"--config.nonfinite_loss=stop or skip"),
        ("dataset", "mnist", r"Unknown data set 'mnist'; use --config.dataset="),
    ],
)
def test_settings_no_run_can_use_are_refused_naming_the_flag(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        runs.check_config(tiny_config(**{field: value}))
    with pytest.raises(ValueError, match=message):  # the same check for callers other than train.py
        trainer.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path), print_fn=lambda line: None)
    assert not os.listdir(tmp_path)  # refused before anything starts


def test_set_prediction_needs_a_data_set_with_targets():
    runs.check_config(tiny_config("set_prediction"))
    with pytest.raises(ValueError, match="'tetrominoes' has no set_prediction targets"):
        runs.check_config(tiny_config("set_prediction", dataset="tetrominoes"))


def test_batch_sizes_that_do_not_divide_by_the_cores_say_why_fewer_devices_are_used():
    note = cpu_devices.fewer_devices_note({"batch_size": 3, "eval_batch_size": 64}, cores=2)
    assert note.startswith(
        "batch_size=3 and eval_batch_size=64 do not split evenly over the 2 cores: data-parallel over 1 CPU device(s)"
    )
    assert cpu_devices.fewer_devices_note({"batch_size": 16, "eval_batch_size": 64}, cores=2) is None


def write_run(workdir, config, steps_to_save=(3,)) -> None:
    """A run directory with checkpoints of `config`'s (untrained) model: nothing is compiled."""
    model = steps.build_model(config)
    for step in steps_to_save:
        convert.write_checkpoint(model, config, step, str(workdir))


def test_the_saved_config_is_the_newest_that_reads(tmp_path):
    write_run(tmp_path, tiny_config(num_slots=5), steps_to_save=(1, 2))
    assert runs.saved_config(str(tmp_path / "nowhere")) is None
    step, config = runs.saved_config(str(tmp_path))
    assert step == 2 and config.num_slots == 5
    (tmp_path / "checkpoints" / "2" / "config" / "metadata").write_text("{garbage")
    assert runs.saved_config(str(tmp_path))[0] == 1


def test_an_existing_run_keeps_its_model_and_takes_the_other_flags():
    saved = tiny_config(num_slots=5, num_devices=8, cpu_devices=8)
    overrides = {"eval_batch_size": 4, "slot_size": 16, "dataset": "scenes", "grad_clip_norm": 0.0}
    config = runs.existing_run_config(3, saved, "run", {}, overrides, {"num_devices": 0, "cpu_devices": 1})
    assert (config.slot_size, config.eval_batch_size, saved.eval_batch_size) == (16, 4, 8)
    assert (config.grad_clip_norm, config.num_devices, config.cpu_devices) == (0.0, 0, 1)  # training, this machine
    assert runs.existing_run_config(3, saved, "run", {}, {"num_slots": 7}).num_slots == 7  # no parameter
    with pytest.raises(runs.TrainingError, match=r"step 3 in run/checkpoints belongs to another model \(slot_size: "):
        runs.existing_run_config(3, saved, "run", {}, {"slot_size": 8})
    with pytest.raises(runs.TrainingError, match=r"task: checkpoint 'discovery' vs now 'set_prediction'"):
        runs.existing_run_config(3, saved, "run", {"task": "set_prediction"}, {})


def test_a_saved_config_gets_the_defaults_of_fields_added_since(tmp_path):
    write_run(tmp_path, tiny_config(first_eval_seconds=5.0, nonfinite_skip_limit=3))
    path = tmp_path / "checkpoints" / "3" / "config" / "metadata"
    saved = json.loads(path.read_text())
    for name in ("first_eval_seconds", "nonfinite_skip_limit", "adam_epsilon", "remat_decoder"):
        del saved[name]
    path.write_text(json.dumps(saved))
    _, config = runs.saved_config(str(tmp_path))
    defaults = configs.get_config("discovery", "cpu")
    for name in ("first_eval_seconds", "nonfinite_skip_limit", "adam_epsilon", "remat_decoder"):
        assert config[name] == defaults[name], name
    assert config.first_eval_seconds == 60.0 and config.resolution == 16  # the preset's default; the run's model
    restored, _, step = convert.restore_model(str(tmp_path), print_fn=lambda line: None)  # builds and restores
    assert step == 3


def train_py(*arguments, **kwargs) -> subprocess.Popen:
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *arguments],
        cwd=REPO,
        env={**env, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_eval_uses_the_config_saved_with_the_checkpoint(tmp_path):
    """A run trained with --config.num_slots=5 is evaluated without repeating the flag: the saved config is used."""
    write_run(tmp_path / "run", tiny_config(num_slots=5, num_iterations=1))
    process = train_py("--task=discovery", "--mode=eval", f"--workdir={tmp_path / 'run'}", "--split=test")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "eval test at step 3: " in out and "Traceback" not in err
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(row["step"], row["split"]) for row in rows] == [(3, "test")]


@pytest.mark.slow  # three processes: an 8-device training run, a conversion, an evaluation
def test_a_checkpoint_of_eight_devices_converts_and_evaluates_with_one(tmp_path):
    """Restoring builds the state from the config alone (no device mesh), and the devices are the machine's: a run
    on 8 devices (--config.num_devices=8) converts and evaluates in a process with one."""
    run = str(tmp_path / "run")
    flags = fuzz.tiny_flags(num_train_steps=2, checkpoint_every=2, num_devices=8, cpu_devices=8)
    out, err = train_py(f"--workdir={run}", *flags).communicate(timeout=600)
    assert "data-parallel over 8 CPU device(s), 1 examples each" in out, err[-3000:]
    one_device = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    weights = str(tmp_path / "model.safetensors")
    converted = subprocess.run(
        [sys.executable, "-m", "slotjax.convert", f"--workdir={run}", f"--output={weights}"],
        cwd=REPO,
        env=one_device,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert converted.returncode == 0 and converted.stdout.strip() == f"Wrote {weights}", converted.stderr[-3000:]
    process = train_py("--mode=eval", f"--workdir={run}", "--config.cpu_devices=1", "--split=test")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0 and "eval test at step 2: " in out, err[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [(row["step"], row["split"]) for row in rows if row["split"] == "test"] == [(2, "test")]


def test_ctrl_c_while_starting_prints_one_line_and_exits_130(tmp_path):
    process = train_py(f"--workdir={tmp_path / 'run'}")
    time.sleep(1.0)  # Python is importing JAX, or train.py is parsing its flags or building the model
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.count("Stopped by SIGINT; nothing was saved.") == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def huge_pages_help() -> bool:
    """Whether glibc.malloc.hugetlb=1 changes anything here: glibc 2.35+ and transparent huge pages on request."""
    import platform

    libc, version = platform.libc_ver()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            madvise = "[madvise]" in file.read()
    except OSError:
        madvise = False
    return libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35) and madvise


@pytest.mark.slow
@pytest.mark.parametrize("tunables", ["", "glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2"])
def test_train_py_restarts_itself_with_huge_pages_only_where_they_help(tunables):
    """The command prints GLIBC_TUNABLES, then runs train.py (which refuses --task=nope): a restart runs it twice."""
    code = (
        "import os, runpy, sys; print(repr(os.environ.get('GLIBC_TUNABLES', '')), flush=True); "
        "sys.argv = ['train.py', '--task=nope']; runpy.run_path('train.py', run_name='__main__')"
    )
    env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    env = {**env, "GLIBC_TUNABLES": tunables} if tunables else env
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "--task" in result.stderr, result.stderr[-2000:]
    restarted = huge_pages_help() and "hugetlb" not in tunables
    with_huge_pages = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
    assert result.stdout.split() == [repr(tunables)] + ([repr(with_huge_pages)] if restarted else [])
