"""Reliability: bad input, interrupted runs, and safe loading.

1. Interrupted runs: a non-finite loss stops (or skips) cleanly, SIGTERM saves and exits 143, and SIGKILL at
   random moments never leaves a checkpoint that a rerun would trip over; the rerun's losses are an
   uninterrupted run's.
2. Safe loading: weight files never run code, and broken files give a ConversionError.
3. Fuzzing: every public entry answers random shapes, dtypes and values with a result of the documented
   shape or a ValueError / TypeError (ConversionError is a ValueError), never an IndexError or an XLA crash.
4. Determinism: two fresh runs of the same config give bit-identical losses.
5. The command line: bad input gives one message, no traceback, and a non-zero exit status.

The `train.py` runs share one JAX compilation cache (a temporary directory of this module), so only the
first run of a configuration pays for compiling the training step.
"""

import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

import slotjax
import torch_reference
from slotjax import convert, cpu_devices
from slotjax.data import pipeline, scenes
from slotjax.train import checkpoints, losses, metrics, runs, trainer
from slotjax.train import step as steps
from slotjax.train.logger import Logger
from slotjax.weights_file import CHECKSUM_KEY, tensors_checksum
from tests import fuzz
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")
ALLOWED = (ValueError, TypeError)  # the documented errors; convert.ConversionError is a ValueError


def tiny_flags(**overrides) -> list[str]:
    """Flags of a tiny discovery model for train.py (tests/fuzz.py's), checkpointing every step."""
    return fuzz.tiny_flags(**{"checkpoint_every": 1, **overrides})


def tiny_cli_config(**overrides) -> ml_collections.ConfigDict:
    """The config `train.py` builds from `tiny_flags(**overrides)`."""
    return fuzz.tiny_config(**{"checkpoint_every": 1, **overrides})


def read_rows(workdir, split="train") -> list[dict]:
    """The rows of metrics.jsonl; a line still being written (no newline yet) is left for later."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as file:
        lines = [line for line in file if line.endswith("\n")]
    return [row for row in map(json.loads, lines) if row["split"] == split]


def last_loss_per_step(rows) -> dict[int, float]:
    """Steps replayed after a kill are logged again: the last row of a step is the one that counts."""
    return {row["step"]: row["loss"] for row in rows}


def checkpoint_names(workdir) -> list[str]:
    directory = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def latest_complete_checkpoint(workdir) -> int | None:
    """The highest step whose checkpoint directory was renamed into place (orbax's sign of a finished write)."""
    return max((int(name) for name in checkpoint_names(workdir) if name.isdigit()), default=None)


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    """Environment of the train.py runs: no XLA_FLAGS (train.py splits the CPU itself), a compilation cache
    shared by the runs of this module."""
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def start(workdir, flags, env, log_name="log") -> subprocess.Popen:
    """Starts train.py in the background; its output goes to files next to the work directory."""
    os.makedirs(os.path.dirname(str(workdir)), exist_ok=True)
    out = open(f"{workdir}.{log_name}.out", "w")
    err = open(f"{workdir}.{log_name}.err", "w")
    process = subprocess.Popen(
        [sys.executable, TRAIN_PY, "--task=discovery", f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=err,
    )
    out.close(), err.close()
    process.log_name = log_name
    return process


def finish(process, workdir, timeout=300) -> tuple[int, str, str]:
    """Waits for a started run (killing it on timeout); returns (return code, stdout, stderr)."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with open(f"{workdir}.{process.log_name}.out") as out, open(f"{workdir}.{process.log_name}.err") as err:
        return process.returncode, out.read(), err.read()


def run_train(workdir, flags, env, timeout=300, log_name="log") -> tuple[int, str, str]:
    return finish(start(workdir, flags, env, log_name), workdir, timeout)


def wait_for_rows(workdir, count, process, timeout=240) -> None:
    """Polls metrics.jsonl until it holds `count` training rows or the process ends."""
    deadline = time.monotonic() + timeout
    while len(read_rows(workdir)) < count and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no progress to {count} rows in {timeout} s")
        time.sleep(0.05)


NUM_STEPS = 20


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, subprocess_env):
    """An uninterrupted 20-step train.py run (compiles the tiny model into the shared cache)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    code, out, err = run_train(workdir, tiny_flags(num_train_steps=NUM_STEPS), subprocess_env)
    assert code == 0, out[-2000:] + err[-3000:]
    # train.py splits the CPU into one device per core (as many as divide the batch sizes, 8 and 8)
    assert f"data-parallel over {cpu_devices.device_count([8, 8])} CPU device(s), " in out
    rows = read_rows(workdir)
    assert [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
    return workdir, rows


# ---------------------------------------------------------------------------------------------------------
# 1. Interrupted runs
# ---------------------------------------------------------------------------------------------------------


def poison_step(monkeypatch, bad_step):
    """The loss (and so every gradient) of training step `bad_step` (0-based; or of each step in a range) becomes
    NaN."""
    original_batches, original_loss = pipeline.train_batches, steps.training_loss
    bad_steps = bad_step if isinstance(bad_step, range) else range(bad_step, bad_step + 1)

    def train_batches(config, start_step, *args):
        for step, batch in enumerate(original_batches(config, start_step, *args), start_step):
            yield {**batch, "poison": np.full(len(batch["image"]), step in bad_steps, np.float32)}

    def training_loss(task, config, model, batch, key, step):
        loss = original_loss(task, config, model, batch, key, step)
        return loss * jnp.where(batch["poison"].max() > 0, jnp.nan, 1.0) if "poison" in batch else loss

    monkeypatch.setattr(pipeline, "train_batches", train_batches)
    monkeypatch.setattr(steps, "training_loss", training_loss)
    monkeypatch.setattr(trainer, "evaluate_and_log", lambda *args, **kwargs: {})  # not under test: saves a compile


def restore(workdir, config, step):
    manager = checkpoints.checkpoint_manager(str(workdir))
    state = checkpoints.restore_checkpoint(manager, steps.initial_state(config), config, step)
    manager.close()
    return state


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # the NaN step would end at step 4, a checkpoint step: the NaN state must not be saved
    config = tiny_config(num_iterations=1, num_train_steps=6, checkpoint_every=2, eval_every=100)
    poison_step(monkeypatch, bad_step=3)
    lines = []
    with pytest.raises(trainer.TrainingError, match=r"not finite at step 4 \(nan\).*last good checkpoint is step 2"):
        trainer.train_and_evaluate(config, str(tmp_path), print_fn=lines.append)
    assert checkpoint_names(tmp_path) == ["2"]
    rows = read_rows(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)
    assert all_finite(restore(tmp_path, config, 2).params)


@pytest.mark.slow
def test_nonfinite_loss_skip_goes_on_with_the_parameters_before_the_bad_batch(tmp_path, monkeypatch):
    config = tiny_config(
        num_iterations=1,
        num_train_steps=5,
        checkpoint_every=1,
        max_checkpoints_to_keep=None,
        eval_every=100,
        nonfinite_loss="skip",
    )
    poison_step(monkeypatch, bad_step=2)
    lines = []
    trainer.train_and_evaluate(config, str(tmp_path), print_fn=lines.append)
    assert any("not finite at step 3" in line and "Skipped" in line for line in lines), lines
    losses_by_step = last_loss_per_step(read_rows(tmp_path))
    assert sorted(losses_by_step) == [1, 2, 3, 4, 5]
    assert np.isnan(losses_by_step[3]) and all(np.isfinite(losses_by_step[step]) for step in (1, 2, 4, 5))
    assert checkpoint_names(tmp_path) == ["1", "2", "3", "4", "5"]
    before, skipped, after = (restore(tmp_path, config, step) for step in (2, 3, 4))
    assert int(skipped.step) == 3
    unchanged = zip(
        jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((skipped.params, skipped.opt_state))
    )
    for old, new in unchanged:
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))  # the bad batch changed nothing
    assert all_finite(after.params) and all_finite(restore(tmp_path, config, 5).params)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(after.params)))


@pytest.mark.slow
def test_nonfinite_loss_skip_stops_after_too_many_bad_batches_in_a_row(tmp_path, monkeypatch):
    """A model that is non-finite on every batch does not skip forever, and its checkpoints stay the good ones."""
    config = tiny_config(
        num_iterations=1,
        num_train_steps=20,
        checkpoint_every=1,
        max_checkpoints_to_keep=2,
        eval_every=100,
        nonfinite_loss="skip",
        nonfinite_skip_limit=3,
    )
    poison_step(monkeypatch, bad_step=range(2, 100))
    lines = []
    with pytest.raises(
        trainer.TrainingError,
        match=r"not finite at step 5 \(nan\)\. Stopped after 3 non-finite batches in a row "
        r"\(--config.nonfinite_skip_limit\); the last good checkpoint is step 4",
    ):
        trainer.train_and_evaluate(config, str(tmp_path), print_fn=lines.append)
    assert sum("Skipped that batch" in line for line in lines) == 2
    assert checkpoint_names(tmp_path) == ["3", "4"]
    good = restore(tmp_path, config, 4)
    assert all_finite(good.params)
    for kept, trained in zip(jax.tree.leaves(good.params), jax.tree.leaves(restore(tmp_path, config, 3).params)):
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(trained))


@pytest.mark.parametrize("limit", [0, -3])
def test_a_skip_limit_that_is_no_positive_integer_is_refused(limit):
    with pytest.raises(ValueError, match=f"nonfinite_skip_limit must be an integer >= 1, got {limit!r}"):
        runs.check_config(tiny_config(nonfinite_skip_limit=limit))


def test_evaluation_shows_nonfinite_metrics_as_nan_and_flags_them(tmp_path):
    run = trainer.Trainer(tiny_config(num_eval_examples=8))
    broken = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), run.initial_state().params)
    lines = []
    results = trainer.evaluate_and_log(run, broken, 1, "validation", Logger(str(tmp_path)), lines.append)
    assert np.isnan(results["loss"]) and np.isnan(results["mse"])
    assert re.search(r"loss nan .*mse nan.*  NOT FINITE: .*loss, mse", lines[0]), lines
    assert np.isnan(read_rows(tmp_path, "validation")[0]["loss"])


def test_only_undefined_ari_examples_are_left_out_of_the_means():
    values = np.array([0.5, np.nan, 1.0])
    assert trainer._mean("fg_ari", values) == 0.75  # an image without foreground: FG-ARI is undefined
    assert np.isnan(trainer._mean("fg_ari", np.full(3, np.nan)))  # no image with foreground: nan, never 0
    assert np.isnan(trainer._mean("loss", values)) and np.isinf(trainer._mean("mse", np.array([1.0, np.inf])))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, subprocess_env, reference_run):
    """(reference_run: the tiny model's compiled training step is in the shared cache by then.)"""
    workdir = tmp_path / "run"
    process = start(workdir, tiny_flags(num_train_steps=1000, checkpoint_every=1000), subprocess_env)
    try:
        wait_for_rows(workdir, 2, process)
        assert process.poll() is None, "train.py ended early"
        process.send_signal(signal.SIGTERM)
    finally:
        code, out, err = finish(process, workdir, timeout=120)
    assert code == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]  # 143: a scheduler sees an interrupted run
    assert "Traceback" not in err
    last_step = read_rows(workdir)[-1]["step"]
    assert f"Received SIGTERM: saved the checkpoint at step {last_step}; run the same command to resume." in out
    assert checkpoint_names(workdir) == [str(last_step)]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_finishes_like_an_uninterrupted_run(
    tmp_path, subprocess_env, reference_run
):
    """Kills train.py (SIGKILL: no handler, no clean-up) 3 times at random moments of training, often in the
    middle of writing a checkpoint; the same command then finishes from the last complete checkpoint."""
    _, reference_rows = reference_run
    training_seconds = reference_rows[-1]["wall_time"] - reference_rows[0]["wall_time"]
    workdir, flags = tmp_path / "run", tiny_flags(num_train_steps=NUM_STEPS)
    rng = np.random.default_rng(2024)
    kills = []
    for attempt in range(3):
        rows_before, latest = len(read_rows(workdir)), latest_complete_checkpoint(workdir)
        process = start(workdir, flags, subprocess_env, log_name=f"killed{attempt}")
        try:
            wait_for_rows(workdir, rows_before + 1, process)  # training (not compiling) when it is killed
            time.sleep(rng.uniform(0, 0.5 * training_seconds))
            process.send_signal(signal.SIGKILL)
        finally:
            code, out, err = finish(process, workdir, timeout=120)
        assert code in (-signal.SIGKILL, 0), out[-2000:] + err[-3000:]
        if latest is not None:
            assert f"Resuming from the checkpoint at step {latest} " in out
        kills.append((code, len(read_rows(workdir)), checkpoint_names(workdir)))
    print("return code, rows, checkpoints after each kill:", *kills, sep="\n")
    assert any(code == -signal.SIGKILL for code, _, _ in kills)

    latest = latest_complete_checkpoint(workdir)
    code, out, err = run_train(workdir, flags, subprocess_env, log_name="final")
    assert code == 0, out[-2000:] + err[-3000:]
    if latest is not None and latest < NUM_STEPS:
        assert f"Resuming from the checkpoint at step {latest} " in out
    rows = read_rows(workdir)
    assert sorted(last_loss_per_step(rows)) == list(range(1, NUM_STEPS + 1))
    assert last_loss_per_step(rows) == last_loss_per_step(reference_rows)
    assert str(NUM_STEPS) in checkpoint_names(workdir)


def small_state(step: int) -> steps.TrainState:
    """A stand-in for a model's training state: what matters here is how checkpoints are written and found."""
    return steps.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((3, 2), float(step))},
        opt_state={"m": jnp.zeros(3)},
        rng=jnp.zeros(2, jnp.uint32),
    )


@pytest.mark.parametrize("temporary_name", ["7.orbax-checkpoint-tmp", "7.orbax-checkpoint-tmp-1700000000123456"])
def test_a_half_written_checkpoint_directory_is_ignored(tmp_path, temporary_name):
    """Orbax writes `STEP.orbax-checkpoint-tmp` (some versions add `-TIME`) and renames it when complete; a kill
    leaves it behind. It is never taken for the latest checkpoint, and saving that step later still works."""
    config = tiny_config()
    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    checkpoints.save_checkpoint(manager, small_state(3), config)
    manager.close()
    directory = tmp_path / "checkpoints"
    half_written = directory / temporary_name
    shutil.copytree(directory / "3", half_written)
    for path in sorted(half_written.rglob("*"))[::2]:  # drop files here and there
        if path.is_file():
            path.unlink()

    manager = checkpoints.checkpoint_manager(str(tmp_path), config)
    assert manager.latest_step() == 3
    restored = checkpoints.restore_checkpoint(manager, small_state(0), config)
    assert int(restored.step) == 3 and float(restored.params["w"][0, 0]) == 3.0
    checkpoints.save_checkpoint(manager, small_state(7), config)
    assert manager.latest_step() == 7
    restored = checkpoints.restore_checkpoint(manager, small_state(0), config)
    assert int(restored.step) == 7 and float(restored.params["w"][0, 0]) == 7.0
    manager.close()


# ---------------------------------------------------------------------------------------------------------
# 2. Safe loading
# ---------------------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.system: a file holding it must be refused before it runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_weights_that_would_run_code_are_refused_and_never_run(tmp_path, writer):
    marker, path = tmp_path / "code_ran", tmp_path / "weights.pt"
    payload = {"state_dict": {"slots_mu": RunsCode(marker)}, "metadata": {}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(payload, file)
    with pytest.raises(convert.ConversionError, match="Refused to load .*pickled Python objects"):
        convert.load_weights(path)
    with pytest.raises(convert.ConversionError, match="Refused to load"):
        convert.weights_to_checkpoint(str(path), str(tmp_path / "run"))
    assert not marker.exists()


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    convert.save_weights(slotjax.SlotAttention(3, 8, mlp_hidden_size=8, rngs=nnx.Rngs(0)), path, {"step": "1"})
    return path


def alter(data: bytes, how: str) -> bytes:
    header_size = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + header_size]
    if how == "truncated in the data":
        return data[: len(data) - 10]
    if how == "truncated in the header":
        return data[: 8 + header_size // 2]
    if how == "shorter than the header size":
        return data[:5]
    if how == "header byte":
        return data[:8] + b"x" + data[9:]
    if how == "header size":
        return struct.pack("<Q", 2**40) + data[8:]
    if how == "dtype":
        return data[:8] + header.replace(b'"F32"', b'"F64"', 1) + data[8 + header_size :]
    if how == "offsets":
        return data[:8] + header.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1) + data[8 + header_size :]
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated in the data",
        "truncated in the header",
        "shorter than the header size",
        "header byte",
        "header size",
        "dtype",
        "offsets",
    ],
)
def test_a_broken_safetensors_file_gives_a_conversion_error(weights_file, how):
    data = weights_file.read_bytes()
    assert convert.load_weights(weights_file)  # intact
    weights_file.write_bytes(alter(data, how))
    with pytest.raises(convert.ConversionError, match=f"Could not read weights from '{weights_file}'"):
        convert.load_weights(weights_file)
    with pytest.raises(convert.ConversionError):
        convert.load_metadata(weights_file)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_altered_tensors_in_a_weights_file_give_a_conversion_error(tmp_path, suffix):
    """40 bytes changed inside a tensor make a file that still parses: the checksum in its metadata finds them."""
    path = tmp_path / f"weights{suffix}"
    module = slotjax.SlotAttention(3, 8, mlp_hidden_size=8, rngs=nnx.Rngs(0))
    convert.save_weights(module, path, {"step": "1"})
    assert convert.load_metadata(path)[CHECKSUM_KEY] == tensors_checksum(convert.flax_to_torch(module))
    data = bytearray(path.read_bytes())
    original = convert.flax_to_torch(module)["slots_mu"].tobytes()
    start = data.find(original)  # where the tensor's bytes lie (in a .pt, inside its zip archive, uncompressed)
    assert start > 0
    data[start : start + 40] = bytes(byte ^ 0x55 for byte in data[start : start + 40])
    path.write_bytes(bytes(data))
    with pytest.raises(convert.ConversionError, match=f"The tensors in '{path}' do not match the checksum"):
        convert.load_weights(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_altered_tensors_in_a_torch_reference_file_are_refused(tmp_path, suffix):
    """`torch_reference.save_model` writes the same checksum, so its files are checked on both sides too."""
    path = str(tmp_path / f"model{suffix}")
    reference = torch_reference.SlotAutoencoder(
        resolution=8,
        num_slots=2,
        slot_size=8,
        encoder_features=8,
        decoder_features=8,
        mlp_hidden_size=8,
        broadcast_resolution=8,
    )
    torch_reference.save_model(reference, path, step=3)
    assert torch_reference.load_model(path).arguments == reference.arguments
    data = bytearray(open(path, "rb").read())
    original = reference.state_dict()["encoder.slot_attention.slots_mu"].numpy().tobytes()
    start = data.find(original)
    assert start > 0
    data[start : start + 4] = bytes(byte ^ 0x55 for byte in data[start : start + 4])
    open(path, "wb").write(bytes(data))
    for read in (convert.load_weights, torch_reference.load_model):
        with pytest.raises(convert.ConversionError, match="do not match the checksum"):
            read(path)


def test_weights_without_a_checksum_still_load(tmp_path):
    """Files from other tools carry no checksum: they load as before."""
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    state_dict = convert.flax_to_torch(slotjax.SlotAttention(3, 8, rngs=nnx.Rngs(0)))
    save_file(state_dict, str(path), metadata={"step": "1"})
    loaded = convert.load_weights(path)
    assert sorted(loaded) == sorted(state_dict) and convert.load_metadata(path) == {"step": "1"}


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "holds a list, not a state dict"),
        ({"state_dict": {"a": torch.zeros(2)}, "metadata": 3}, "holds a dict, not a state dict"),
        ({"a": "text"}, "not a tensor"),
    ],
)
def test_a_pt_file_that_is_no_state_dict_gives_a_conversion_error(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    with pytest.raises(convert.ConversionError, match=message):
        convert.load_weights(path)


def test_a_pt_file_cut_short_gives_a_conversion_error(tmp_path):
    path = tmp_path / "weights.pt"
    convert.save_weights(slotjax.SlotAttention(3, 8, rngs=nnx.Rngs(0)), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(convert.ConversionError, match="Could not read weights"):
        convert.load_weights(path)


# ---------------------------------------------------------------------------------------------------------
# 3. Fuzzing the public entries
# ---------------------------------------------------------------------------------------------------------

DTYPES = (np.float32, np.float16, np.float64, np.int32, np.bool_)
SPECIAL_VALUES = (np.nan, np.inf, -np.inf, 1e30, -7.0, 3.0)


def random_array(rng, shape, dtype=None, special=0.3) -> np.ndarray:
    """Uniform [-1, 1] values of a random dtype (or one of a list), with NaN / inf / out-of-range values now and
    then."""
    dtypes = DTYPES if dtype is None else dtype if isinstance(dtype, list) else [dtype]
    dtype = dtypes[rng.integers(len(dtypes))]
    values = rng.uniform(-1, 1, shape)
    if values.size and rng.random() < special:
        values.flat[rng.integers(values.size)] = SPECIAL_VALUES[rng.integers(len(SPECIAL_VALUES))]
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype)


def is_ordinary(*arrays) -> bool:
    """Float arrays with values in [-1, 1]: the outputs must then be finite."""
    return all(
        np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and np.abs(a).max(initial=0) <= 1 for a in arrays
    )


def random_shape(rng, valid, dims=(0, 1, 2, 3, 5)) -> tuple[int, ...]:
    """`valid` half of the time, else the same shape with one axis changed, dropped or added."""
    shape = list(valid)
    choice = rng.integers(6)  # 0-2: valid
    if choice == 3:
        axis = rng.integers(len(shape))
        shape[axis] = int(rng.choice([d for d in dims if d != shape[axis]] or [shape[axis] + 1]))
    elif choice == 4:
        del shape[rng.integers(len(shape))]
    elif choice == 5:
        shape.insert(rng.integers(len(shape) + 1), int(rng.choice(dims[1:])))
    return tuple(shape)


class Fuzz:
    """Calls an entry: its result, or None if it refused the input with a documented error. Counts both."""

    def __init__(self):
        self.accepted = self.refused = 0

    def __call__(self, function, *args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except ALLOWED:
            self.refused += 1
            return None
        self.accepted += 1
        return result

    def check(self, at_least):
        """Both ways were taken often enough for the loop to mean something."""
        assert self.accepted >= at_least and self.refused >= at_least, vars(self)


def test_fuzz_slot_attention():
    module = slotjax.SlotAttention(num_slots=3, slot_size=8, input_size=6, mlp_hidden_size=8, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    call = Fuzz()
    for _ in range(40):
        inputs = random_array(
            rng, random_shape(rng, (2, 4, 6), dims=(0, 1, 5)), [np.float32, np.float32, np.float16, np.int32, np.bool_]
        )
        options = {}
        if rng.random() < 0.3:
            options["num_slots"] = [0, -1, 2, 2.0, True, None, "3"][rng.integers(7)]
        if rng.random() < 0.3:
            options["num_iterations"] = [0, 1, 2, 1.5, None][rng.integers(5)]
        if rng.random() < 0.3:
            initial_slots = random_array(rng, random_shape(rng, (2, 2, 8), dims=(1, 3)), np.float32)
            options["initial_slots"] = jnp.asarray(initial_slots)
        outputs = call(module, jnp.asarray(inputs), key=jax.random.key(0), return_attention=True, **options)
        if outputs is None:
            continue
        slots, aux = outputs
        num_slots = options["initial_slots"].shape[1] if "initial_slots" in options else options.get("num_slots") or 3
        num_iterations = options.get("num_iterations") or module.num_iterations
        assert slots.shape == (inputs.shape[0], num_slots, 8) and jnp.issubdtype(slots.dtype, jnp.floating)
        assert aux["attention"].shape == (inputs.shape[0], num_iterations, num_slots, inputs.shape[1])
        if is_ordinary(inputs, *([np.asarray(options["initial_slots"])] if "initial_slots" in options else [])):
            assert np.isfinite(np.asarray(slots)).all()
    call.check(5)


@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_fuzz_models(task):
    model = steps.build_model(tiny_config(task, num_iterations=1))  # SlotAutoencoder / SetPredictor, 16x16
    num_slots = model.encoder.slot_attention.num_slots
    apply = nnx.jit(lambda model, images: model(images, key=jax.random.key(0)))
    rng = np.random.default_rng(1)
    call = Fuzz()
    for _ in range(30):
        shape = random_shape(rng, (2, 16, 16, 3), dims=(1, 3, 8, 32))
        if shape[1:] == (16, 16, 3):
            shape = (2, 16, 16, 3)  # one batch size: each new one would compile the model again
        images = random_array(rng, shape)
        outputs = call(apply, model, jnp.asarray(images))
        if outputs is None:
            continue
        if task == "discovery":
            assert outputs["reconstruction"].shape == images.shape
            assert outputs["masks"].shape == (images.shape[0], num_slots, 16, 16, 1)
            result = outputs["reconstruction"]
        else:
            assert outputs["predictions"].shape == (images.shape[0], num_slots, 19)
            result = outputs["predictions"]
        if is_ordinary(images):
            assert np.isfinite(np.asarray(result)).all()
    call.check(5)


@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_models_refuse_an_empty_batch(task):
    model = steps.build_model(tiny_config(task, num_iterations=1))
    with pytest.raises(ValueError, match="the batch holds no images; pass at least one"):
        model(jnp.zeros((0, 16, 16, 3)), key=jax.random.key(0))


def test_numpy_integers_are_integers_for_slot_attention():
    module = slotjax.SlotAttention(num_slots=np.int64(3), slot_size=8, rngs=nnx.Rngs(0))
    assert module(jnp.zeros((1, 4, 8)), num_slots=np.int32(2), key=jax.random.key(0)).shape == (1, 2, 8)


def random_batch(rng, resolution=16) -> dict:
    batch_size = int(rng.choice([0, 1, 2, 4]))
    shape = random_shape(rng, (batch_size, resolution, resolution, 3), dims=(0, 1, 3, 8, 16))
    images = random_array(rng, shape)
    if rng.random() < 0.25:  # 0..255 instead of -1..1
        with np.errstate(invalid="ignore", over="ignore"):
            images = (images * 255).astype(images.dtype)
    batch = {"image": images}
    if rng.random() < 0.5:
        batch["segmentation"] = rng.integers(0, 7, random_shape(rng, (batch_size, resolution, resolution)))
    if rng.random() < 0.5:
        batch["target"] = random_array(rng, random_shape(rng, (batch_size, 10, 19)))
    if rng.random() < 0.1:
        batch.pop("image")
    if rng.random() < 0.1:
        batch["image"] = batch.get("image", np.zeros(0)).tolist()
    return batch


def test_fuzz_check_batch():
    rng = np.random.default_rng(2)
    call = Fuzz()
    for _ in range(300):
        batch = random_batch(rng)
        if call(pipeline.check_batch, batch, 16) is None:
            continue
        images = np.asarray(batch["image"])
        assert images.shape[1:] == (16, 16, 3) and len(images) >= 1 and np.isfinite(images).all()
        assert np.issubdtype(images.dtype, np.floating) and np.abs(images).max() <= 1 + 1e-5
        assert all(len(value) == len(images) for value in batch.values())
        assert "target" not in batch or np.isfinite(batch["target"]).all()
    call.check(20)
    # a few by name
    good = {"image": np.zeros((2, 16, 16, 3), np.float32), "segmentation": np.zeros((2, 16, 16), np.int32)}
    assert pipeline.check_batch(good, 16) is good
    for batch, error, message in [
        ({"segmentation": good["segmentation"]}, ValueError, "no 'image' entry"),
        ({"image": good["image"][:0]}, ValueError, "holds no images"),
        (
            {**good, "segmentation": good["segmentation"][:1]},
            ValueError,
            r"batch\['segmentation'\] has shape \(1, 16, 16\)",
        ),
        ({**good, "target": np.full((2, 10, 19), np.nan, np.float32)}, ValueError, "targets contain NaN"),
        ({"image": good["image"].astype(np.uint8)}, TypeError, "dtype uint8"),
        ({"image": good["image"] + 2}, ValueError, r"span \[2, 2\]"),
    ]:
        with pytest.raises(error, match=message):
            pipeline.check_batch(batch, 16)


def test_fuzz_torch_to_flax():
    module = slotjax.SlotAttention(num_slots=3, slot_size=8, mlp_hidden_size=8, rngs=nnx.Rngs(0))
    good = convert.flax_to_torch(module)
    names = sorted(good)
    rng = np.random.default_rng(3)
    call = Fuzz()
    for _ in range(60):
        state_dict = {name: rng.normal(size=value.shape).astype(np.float32) for name, value in good.items()}
        for _ in range(rng.integers(0, 3)):
            name = names[rng.integers(len(names))]
            how = rng.integers(9)
            if how == 0:
                state_dict.pop(name, None)
            elif how == 1:
                state_dict[f"extra{rng.integers(3)}"] = state_dict.get(name, 0)
            elif how == 2:
                state_dict[name] = random_array(rng, random_shape(rng, good[name].shape, dims=(1, 2, 8, 24)))
            elif how == 3:
                state_dict[name] = random_array(rng, good[name].shape)  # a random dtype, maybe NaN / inf
            elif how == 4:
                dtype = [torch.bfloat16, torch.float16, torch.int64][rng.integers(3)]
                state_dict[name] = torch.tensor(good[name]).to(dtype)
            elif how == 5:
                state_dict[name] = good[name].tolist()
            elif how == 6:
                state_dict[name] = [None, "text", 3.0, b"bytes"][rng.integers(4)]
            elif how == 7:
                state_dict[name] = good[name].astype(np.complex64)
            else:
                state_dict[rng.integers(5)] = good[name]  # a key that is no string
        before = convert.flax_to_torch(module)
        if call(convert.torch_to_flax, state_dict, module) is None:
            for name, value in convert.flax_to_torch(module).items():  # nothing half-loaded
                np.testing.assert_array_equal(value, before[name])
            continue
        for name, value in convert.flax_to_torch(module).items():
            given = state_dict[name]
            given = given.float().numpy() if isinstance(given, torch.Tensor) else np.asarray(given)
            np.testing.assert_array_equal(value, given.astype(np.float32))
    call.check(5)
    for state_dict, module_argument in [(list(good.items()), module), (good, "not a module")]:
        with pytest.raises(TypeError):
            convert.torch_to_flax(state_dict, module_argument)


def test_fuzz_scenes():
    rng = np.random.default_rng(4)
    odd = [None, "16", 16.5, 2.0, -3, 0, True, np.int64(1), 10**20]
    call = Fuzz()
    for _ in range(60):
        arguments = dict(
            resolution=int(rng.choice([8, 15, 16, 24, 32])),
            seed=int(rng.integers(0, 2**40)),
            min_objects=int(rng.integers(0, 5)),
            max_objects=int(rng.integers(1, 12)),
        )
        if rng.random() < 0.5:
            arguments[list(arguments)[rng.integers(4)]] = odd[rng.integers(len(odd))]
        if arguments["resolution"] == 10**20:
            continue  # a petabyte image: MemoryError is the right answer, not worth asking for
        generator = call(scenes.Scenes, **arguments)
        if generator is None:
            continue
        index_choices = [[0, 1], [5], [], [-1], [1.5], [np.inf], ["a"], [2**70], [[3, 4]]]
        indices = index_choices[rng.integers(len(index_choices))]
        try:
            batch = call(generator.batch, indices)
        except RuntimeError as error:  # documented: too many objects for the resolution
            assert "lower max_objects or raise the resolution" in str(error)
            continue
        if batch is None:
            continue
        size = len(np.ravel(np.asarray(indices, dtype=object)))
        resolution = generator.resolution
        assert batch["image"].shape == (size, resolution, resolution, 3) and batch["image"].dtype == np.uint8
        assert batch["target"].shape == (size, 10, 19) and np.isfinite(batch["target"]).all()
        assert all(generator.min_objects <= n <= generator.max_objects for n in batch["num_objects"])
    call.check(5)


def random_sets(rng, features=19, dtypes=None):
    """Predictions [B, K, features] and targets [B, M, features] (now and then of other shapes)."""
    batch = int(rng.choice([0, 1, 2]))
    predictions = random_array(
        rng, random_shape(rng, (batch, int(rng.choice([0, 1, 3])), features), dims=(0, 1, 2, 4)), dtypes
    )
    targets = random_array(
        rng, random_shape(rng, (batch, int(rng.choice([0, 2, 3])), features), dims=(0, 1, 2, 4)), dtypes
    )
    return predictions, targets


def test_fuzz_average_precision():
    rng = np.random.default_rng(5)
    call = Fuzz()
    for _ in range(300):
        predictions, targets = random_sets(rng)
        if rng.random() < 0.5:  # mostly valid presence flags
            targets[..., -1:] = rng.random(targets[..., -1:].shape) > 0.3
        threshold = [None, 1.0, 0.125, 0, -1.0, np.nan, "1", 2j][rng.integers(8)]
        value = call(metrics.average_precision, predictions, targets, threshold)
        if value is None:
            continue
        assert isinstance(value, float) and (np.isnan(value) or 0.0 <= value <= 1.0)
        has_targets = targets.shape[1:] and np.sum(np.asarray(targets, np.float64)[..., 18] > 0.5) > 0
        assert np.isnan(value) != bool(has_targets)
    call.check(50)


def test_fuzz_hungarian_huber_loss():
    rng = np.random.default_rng(6)
    call = Fuzz()
    for _ in range(40):
        predictions, targets = random_sets(
            rng,
            features=int(rng.choice([19, 4])),
            dtypes=[np.float32, np.float32, np.float16, np.float64, np.int32, np.bool_],
        )
        loss = call(losses.hungarian_huber_loss, jnp.asarray(predictions), jnp.asarray(targets))
        if loss is None:
            continue
        assert loss.shape == ()
        if is_ordinary(predictions, targets) and predictions.shape[0]:
            assert np.isfinite(float(loss)) and float(loss) >= 0
    call.check(3)


# ---------------------------------------------------------------------------------------------------------
# 4. Determinism
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_and_config_give_bit_identical_losses(tmp_path, subprocess_env, reference_run):
    """A second fresh run with its own (empty) compilation cache: compiling again gives the same program."""
    _, reference_rows = reference_run
    env = {**subprocess_env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "own_cache")}
    code, out, err = run_train(tmp_path / "again", tiny_flags(num_train_steps=NUM_STEPS), env)
    assert code == 0, out[-2000:] + err[-3000:]
    rows = read_rows(tmp_path / "again")
    assert [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
    assert [row["loss"] for row in rows] == [row["loss"] for row in reference_rows]


# ---------------------------------------------------------------------------------------------------------
# 5. The command line
# ---------------------------------------------------------------------------------------------------------

BAD_COMMANDS = {
    # name: (extra arguments, environment changes, pattern the one message matches)
    "unknown task": (["--task=nope"], {}, r"flag --task=nope: value should be one of <discovery\|set_prediction>"),
    "unknown config field": (["--config.nope=1"], {}, r"error: unknown config field 'nope' in '--config.nope=1'"),
    "unknown nested field": (["--config.seed.x=1"], {}, r"error: unknown config field 'seed.x'"),
    "batch not divisible": (
        ["--config.batch_size=3"],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        r"error: batch_size=3 is not divisible by the 2 devices",
    ),
    "resolution": (["--config.resolution=20"], {}, r"error: resolution 20 is not 8 times a power of two"),
    "no slots": (["--config.num_slots=0"], {}, r"error: num_slots must be an integer >= 1, got 0"),
    "not a number": (["--config.num_slots=many"], {}, r"flag --config.num_slots=many: invalid literal for int"),
    "eval without checkpoint": (["--mode=eval"], {}, r"error: No checkpoint in .*train first"),
    "another model's checkpoint": (
        ["--config.slot_size=8"],
        {},
        r"error: The checkpoint at step 0 .* belongs to another model "
        r"\(slot_size: checkpoint 16 vs now 8\)",
    ),
    "unknown nonfinite_loss policy": (
        ["--config.nonfinite_loss=skp", "--config.num_train_steps=0"],
        {},
        r"error: .*nonfinite_loss",
    ),
}


@pytest.fixture(scope="module")
def bad_command_results(tmp_path_factory, subprocess_env):
    """Runs the bad commands side by side (none gets as far as compiling a training step)."""
    root = tmp_path_factory.mktemp("cli")
    # a checkpoint written with the tiny model's config (slot size 16) for "another model's checkpoint"
    config = tiny_cli_config()
    manager = checkpoints.checkpoint_manager(str(root / "another model's checkpoint"), config)
    checkpoints.save_checkpoint(manager, small_state(0), config)
    manager.close()

    def launch(names):
        processes = {}
        for name in names:
            arguments, env_changes, _ = BAD_COMMANDS[name]
            overridden = {argument.split("=")[0] for argument in arguments}
            flags = [flag for flag in tiny_flags(num_train_steps=2) if flag.split("=")[0] not in overridden]
            command = [sys.executable, TRAIN_PY, f"--workdir={root / name}", *flags, *arguments]
            processes[name] = subprocess.Popen(
                command,
                cwd=REPO,
                env={**subprocess_env, **env_changes},
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        try:
            for name, process in processes.items():
                out, err = process.communicate(timeout=240)
                results[name] = (process.returncode, out, err)
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()

    results = {}
    # this one builds the model first, which fills the compilation cache for the others that do
    launch(["another model's checkpoint"])
    launch([name for name in BAD_COMMANDS if name not in results])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_COMMANDS))
def test_bad_command_line_gives_one_message_and_a_failure_status(bad_command_results, name):
    code, out, err = bad_command_results[name]
    assert code != 0, out[-2000:] + err[-2000:]
    assert "Traceback" not in err + out, err[-3000:]
    assert len(re.findall(BAD_COMMANDS[name][2], err)) == 1, err[-3000:]
    assert not any(line.startswith("step ") for line in out.splitlines())  # nothing trained
