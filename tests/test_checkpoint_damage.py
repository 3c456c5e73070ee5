"""Damaged checkpoints: found by their checksum and files, set aside, and the newest intact one restored.

Also `convert --input` into an existing work directory, which must not shadow or mix with its checkpoints.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from slotjax import convert
from slotjax.train import checkpoints
from slotjax.train import step as steps
from tests.conftest import tiny_config
from tests.test_reliability import REPO, TRAIN_PY, tiny_cli_config, tiny_flags


def random_state(step: int) -> steps.TrainState:
    """A stand-in training state with arrays too large to be stored inline (so they sit in data files) and
    random values (which zstd cannot compress: altered bytes change values without a decoding error)."""
    rng = np.random.default_rng(step)
    return steps.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)},
        opt_state={"m": jnp.zeros(3)},
        rng=jnp.zeros(2, jnp.uint32),
    )


def largest_data_file(step_directory) -> str:
    return max(glob.glob(os.path.join(step_directory, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def damage(step_directory, how: str) -> str:
    """Damages a checkpoint's directory; returns what the message about it names."""
    if how == "truncated":
        path = largest_data_file(step_directory)
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
        return "could not be read"
    if how == "bytes flipped":
        path = largest_data_file(step_directory)
        data = bytearray(open(path, "rb").read())
        middle = len(data) // 2
        data[middle : middle + 40] = bytes(byte ^ 0xFF for byte in data[middle : middle + 40])
        open(path, "wb").write(bytes(data))
        return "do not match the checksum in _CHECKPOINT_METADATA"
    if how == "manifest missing":
        os.remove(os.path.join(step_directory, "state", "manifest.ocdbt"))
        return "state/manifest.ocdbt is missing"
    if how == "config garbage":
        open(os.path.join(step_directory, "config", "metadata"), "w").write("{'num_slots': ")
        return "config/metadata is not valid JSON"
    if how == "step metadata garbage":
        open(os.path.join(step_directory, "_CHECKPOINT_METADATA"), "wb").write(b"\x00\xff garbage")
        return "_CHECKPOINT_METADATA is not valid JSON"
    raise ValueError(how)


DAMAGES = ["truncated", "bytes flipped", "manifest missing", "config garbage", "step metadata garbage"]


def save_steps(workdir, config, *step_numbers):
    manager = checkpoints.checkpoint_manager(str(workdir), config)
    for step in step_numbers:
        checkpoints.save_checkpoint(manager, random_state(step), config)
    manager.close()


def test_each_checkpoint_stores_the_checksum_of_its_arrays(tmp_path):
    config = tiny_config()
    save_steps(tmp_path, config, 1)
    metadata = json.load(open(tmp_path / "checkpoints" / "1" / "_CHECKPOINT_METADATA"))
    assert metadata["custom_metadata"][checkpoints.CHECKSUM_KEY] == checkpoints.state_checksum(random_state(1))
    assert checkpoints.state_checksum(random_state(1)) != checkpoints.state_checksum(random_state(2))


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, capfd, how):
    config = tiny_config()
    save_steps(tmp_path, config, 1, 2)
    named = damage(tmp_path / "checkpoints" / "2", how)
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    with pytest.raises(checkpoints.DamagedCheckpoint, match=f"step 2 .* damaged: .*{re.escape(named)}"):
        checkpoints.restore_checkpoint(manager, random_state(0), config)

    lines = []
    state, _ = checkpoints.restore_latest_intact(manager, lambda _: random_state(0), config, lines.append)
    assert int(state.step) == 1
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(random_state(1).params["w"]))
    assert len(lines) == 1 and lines[0].startswith("warning: the checkpoint at step 2 is damaged") and named in lines[0]
    assert f"moved it to {tmp_path / 'damaged' / '2'} and restored step 1" in lines[0]
    assert manager.all_steps() == [1]
    manager.close()
    assert (tmp_path / "damaged" / "2").is_dir() and not (tmp_path / "checkpoints" / "2").exists()
    assert checkpoints.checkpoint_manager(str(tmp_path)).all_steps() == [1]  # orbax no longer lists it
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def test_step_metadata_that_orbax_rejects_is_set_aside_before_the_steps_are_listed(tmp_path):
    """Orbax lists no step at all when one `_CHECKPOINT_METADATA` is JSON of another shape."""
    config = tiny_config()
    save_steps(tmp_path, config, 1, 2, 3)
    for step in (2, 3):
        open(tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA", "w").write('{"custom_metadata": 3}')
    assert "_CHECKPOINT_METADATA is not orbax's step metadata" in checkpoints.verify_checkpoint(str(tmp_path), 3)
    assert (tmp_path / "checkpoints" / "3").is_dir()  # verifying moves nothing
    lines = []
    manager = checkpoints.checkpoint_manager(str(tmp_path), config, lines.append)
    assert manager.all_steps() == [1]
    assert len(lines) == 2 and all(f"checkpoint at step {step} is damaged" in lines[step - 2] for step in (2, 3))
    assert all("_CHECKPOINT_METADATA is not orbax's step metadata" in line for line in lines)
    assert (tmp_path / "damaged" / "3").is_dir()
    manager.close()

    open(tmp_path / "checkpoints" / "1" / "_CHECKPOINT_METADATA", "w").write("[]")
    with pytest.raises(checkpoints.TrainingError, match="No intact checkpoint .*step 1: _CHECKPOINT_METADATA is not"):
        checkpoints.checkpoint_manager(str(tmp_path), config)
    assert (tmp_path / "checkpoints" / "1").is_dir()  # the last one is not moved


def test_when_every_checkpoint_is_damaged_nothing_is_moved_and_one_error_names_them(tmp_path):
    config = tiny_config()
    save_steps(tmp_path, config, 1, 2)
    damage(tmp_path / "checkpoints" / "1", "config garbage")
    damage(tmp_path / "checkpoints" / "2", "bytes flipped")
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    with pytest.raises(checkpoints.TrainingError, match="No intact checkpoint .*step 2: .*checksum.*step 1: .*JSON"):
        checkpoints.restore_latest_intact(manager, lambda _: random_state(0), config, print)
    assert manager.all_steps() == [1, 2] and not (tmp_path / "damaged").exists()
    manager.close()


def test_a_damaged_step_set_aside_twice_keeps_both_copies(tmp_path):
    config = tiny_config()
    save_steps(tmp_path, config, 1, 2)
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    assert checkpoints.set_aside(manager, 2) == str(tmp_path / "damaged" / "2")
    checkpoints.save_checkpoint(manager, random_state(2), config)
    assert checkpoints.set_aside(manager, 2) == str(tmp_path / "damaged" / "2.1")
    assert manager.all_steps() == [1]
    manager.close()


def test_a_nonfinite_state_is_never_saved_and_the_last_good_checkpoint_stays(tmp_path):
    config = tiny_config(max_checkpoints_to_keep=1)
    save_steps(tmp_path, config, 1)
    bad = random_state(2)
    bad = bad.replace(params={"w": bad.params["w"].at[0, 0].set(jnp.nan)})
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    with pytest.raises(checkpoints.TrainingError, match="not finite at step 2: not saved; the last good .* step 1"):
        checkpoints.save_checkpoint(manager, bad, config)
    assert manager.all_steps() == [1]
    manager.close()


def test_another_training_state_is_refused_not_taken_for_damage(tmp_path):
    """A checkpoint whose arrays are neither the state asked for nor the state its own config builds (another
    version of slotjax) is refused as such, and not set aside."""
    config = tiny_config()
    save_steps(tmp_path, config, 1, 2)
    other = random_state(0).replace(opt_state=({}, {"m": jnp.zeros(3)}))
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    with pytest.raises(checkpoints.TrainingError, match="holds another training state than its config") as error:
        checkpoints.restore_latest_intact(manager, lambda _: other, config, print)
    assert not isinstance(error.value, checkpoints.DamagedCheckpoint)
    assert manager.all_steps() == [1, 2]
    manager.close()


# ---------------------------------------------------------------------------------------------------------
# Converting into an existing work directory, and out of a damaged one
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_and_weights(tmp_path_factory):
    """A work directory with the tiny model's checkpoint at step 5 (tests copy it), and a function writing weights
    files."""
    root = tmp_path_factory.mktemp("convert")
    config = tiny_cli_config()
    convert.write_checkpoint(steps.build_model(config), config, 5, str(root / "run"))

    def weights(step, **overrides):
        other = tiny_cli_config(**overrides)
        path = str(root / f"weights_{step}_{len(os.listdir(root))}.safetensors")
        return convert.save_model_weights(steps.build_model(other, seed=1), other, step, path)

    return str(root / "run"), weights


@pytest.fixture
def run_copy(run_and_weights, tmp_path):
    workdir, weights = run_and_weights
    shutil.copytree(workdir, tmp_path / "run")
    return str(tmp_path / "run"), weights


@pytest.mark.parametrize(
    "step, overrides, message",
    [
        (3, {}, r"already holds a checkpoint at step 5, not older than the weights' step 3"),
        (5, {}, r"already holds a checkpoint at step 5, not older than the weights' step 5"),
        (7, {"slot_size": 8}, r"holds checkpoints of another model \(slot_size: checkpoint 16 vs now 8\)"),
    ],
)
def test_convert_input_into_a_run_it_does_not_continue_is_refused(run_copy, capsys, step, overrides, message):
    workdir, weights = run_copy
    path = weights(step, **overrides)
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        convert.main(["--input", path, "--output", workdir])
    assert "Wrote" not in capsys.readouterr().out
    assert checkpoints.checkpoint_manager(workdir).all_steps() == [5]


@pytest.mark.parametrize("overrides", [{}, {"grad_clip_norm": 0.0, "num_slots": 5, "batch_size": 4}])
def test_convert_input_into_a_run_with_a_newer_step_of_the_same_model_adds_it(run_copy, capsys, overrides):
    """Training settings and the number of slots (no parameter) do not make another model."""
    workdir, weights = run_copy
    convert.main(["--input", weights(7, **overrides), "--output", workdir])
    assert f"Wrote a checkpoint to {workdir}" in capsys.readouterr().out
    assert checkpoints.checkpoint_manager(workdir).all_steps() == [5, 7]
    assert checkpoints.verify_checkpoint(workdir, 7) is None


@pytest.mark.slow
def test_convert_reads_the_newest_intact_checkpoint_of_a_damaged_run(run_copy):
    workdir, weights = run_copy
    convert.weights_to_checkpoint(weights(7), workdir)
    named = damage(os.path.join(workdir, "checkpoints", "7"), "truncated")
    assert named in checkpoints.verify_checkpoint(workdir, 7) and checkpoints.verify_checkpoint(workdir, 5) is None
    with pytest.raises(convert.ConversionError, match="step 7 .* damaged: the arrays in state/ could not be read"):
        convert.restore_model(workdir, 7)
    lines = []
    _, config, step = convert.restore_model(workdir, print_fn=lines.append)
    assert step == 5 and config.num_slots == 4
    assert len(lines) == 1 and "checkpoint at step 7 is damaged" in lines[0]
    assert checkpoints.verify_checkpoint(workdir, 7) == "there is no checkpoint at step 7"


# ---------------------------------------------------------------------------------------------------------
# The command line: one warning and a resumed run, or one error; never a traceback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_on_damaged_checkpoints(tmp_path):
    """train.py resumes from the intact step 1 after one warning about step 2 (its data file cut short);
    convert refuses a run whose every checkpoint is damaged with one line. Both run side by side."""
    config = tiny_cli_config(num_train_steps=1)
    resumable, broken = str(tmp_path / "resumable"), str(tmp_path / "broken")
    for workdir in (resumable, broken):
        for step in (1, 2):
            convert.write_checkpoint(steps.build_model(config), config, step, workdir)
    damage(os.path.join(resumable, "checkpoints", "2"), "truncated")
    damage(os.path.join(broken, "checkpoints", "2"), "manifest missing")
    damage(os.path.join(broken, "checkpoints", "1"), "truncated")
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    commands = {
        "train": [
            sys.executable,
            TRAIN_PY,
            "--task=discovery",
            f"--workdir={resumable}",
            *tiny_flags(num_train_steps=1),
        ],
        "convert": [sys.executable, "-m", "slotjax.convert", f"--workdir={broken}", f"--output={tmp_path / 'w.pt'}"],
    }
    processes = {
        name: subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, command in commands.items()
    }
    results = {name: process.communicate(timeout=300) for name, process in processes.items()}
    codes = {name: process.returncode for name, process in processes.items()}

    out, err = results["train"]
    assert codes["train"] == 0, out[-2000:] + err[-3000:]
    damaged = [line for line in (out + err).splitlines() if " is damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith("warning: the checkpoint at step 2 is damaged"), out + err

    assert f"Resuming from the checkpoint at step 1 in {resumable}" in out
    assert "Traceback" not in err and "Event loop" not in err, err[-3000:]
    assert checkpoints.verify_checkpoint(resumable, 1) is None
    assert os.path.isdir(os.path.join(resumable, "damaged", "2"))

    out, err = results["convert"]
    assert codes["convert"] != 0
    assert err.strip().count("\n") == 0 and err.startswith("error: No intact checkpoint in "), err[-3000:]
    assert "step 2: state/manifest.ocdbt is missing" in err and "step 1: the arrays in state/ could not" in err
    assert not os.path.exists(os.path.join(broken, "damaged")) and not os.path.exists(tmp_path / "w.pt")
