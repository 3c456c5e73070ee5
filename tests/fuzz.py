"""A fuzzer of the command lines: `python train.py` (training and `--mode=eval`) and `python -m slotjax.convert`
against generated bad flags, damaged data files, damaged weight files, damaged checkpoints and signals.

    python tests/fuzz.py --cases 50 --seed 0 [--jobs 2] [--kinds flag data weights checkpoint signal]

Each case ends in one of these ways, or fails:

- refused: exit status not 0, exactly one line "error: ..." (stdout and stderr together) and it names what the
  case broke (a flag, a field, a file);
- resumed: a damaged latest checkpoint with an intact earlier one: exit status 0 after exactly one line naming
  the damaged step (training goes on from the earlier step);
- interrupted: SIGINT or SIGTERM: exit status 130 or 143 (128 + the signal; a signal that arrives before
  Python took it over ends the process as the signal does);
- accepted unchanged: a damaged weights file whose parameters are still the original ones (damage in
  padding) may convert.

Never a traceback, and the intact checkpoints of the run a case reads are still there and load.
tests/test_fuzz.py runs a fixed sample; `make_fixtures` builds what the cases damage (a tiny model's run with
checkpoints at steps 2 and 4, its weights, small data files in the published layouts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slotjax.data import files  # noqa: E402

KINDS = ("flag", "data", "weights", "checkpoint", "signal")
# A tiny discovery model: train.py compiles and runs it in seconds.
TINY = dict(
    resolution=16,
    encoder_features=8,
    decoder_features=8,
    slot_size=16,
    mlp_hidden_size=16,
    num_slots=4,
    num_iterations=1,
    batch_size=8,
    eval_batch_size=8,
    num_eval_examples=8,
    warmup_steps=2,
    decay_steps=100,
    max_objects=3,
    log_every=1,
    eval_every=1000,
    checkpoint_every=2,
    num_train_steps=4,
    first_eval_seconds=0,
)
STEPS = (2, 4)  # the fixture run's checkpoints
DAMAGE_WORDS = r"damaged|corrupt|unreadable|not readable|cannot be read|could not be read|set aside|broken|fails"


def tiny_flags(**overrides) -> list[str]:
    return [f"--config.{name}={value}" for name, value in {**TINY, **overrides}.items()]


def tiny_config(**overrides):
    from slotjax import configs

    config = configs.get_config("discovery", "cpu")
    config.update({**TINY, **overrides})
    return config


@dataclasses.dataclass
class Case:
    kind: str
    name: str  # what the case breaks, for the table
    command: list[str]
    expect: str  # refused, resumed, interrupted
    names: str = ""  # a pattern the error line must match (refused)
    run: str | None = None  # a run directory whose intact checkpoints must survive
    intact: tuple[int, ...] = ()
    damaged_step: int | None = None
    signum: int | None = None
    delay: float = 0.0
    original_weights: str | None = None  # weights: the undamaged file (a conversion must give its parameters)
    original_run: str | None = None  # checkpoints: the undamaged run (a checkpoint read must hold its arrays)
    damaged: tuple[int, ...] = ()
    output: str | None = None


@dataclasses.dataclass
class Result:
    case: Case
    passed: bool
    why: str
    seconds: float
    code: int | None
    output: str


# ------------------------------------------------------------------------------------------------- fixtures


def write_tfrecords(path: Path, payloads: list[bytes], compress: bool = True) -> Path:
    """A TFRecord file (GZIP unless `compress` is False) holding `payloads`, framed as TensorFlow frames them."""
    frames = b"".join(
        struct.pack("<Q", len(payload))
        + struct.pack("<I", files._masked_crc32c(struct.pack("<Q", len(payload))))
        + payload
        + struct.pack("<I", files._masked_crc32c(payload))
        for payload in payloads
    )
    path.write_bytes(gzip.compress(frames) if compress else frames)
    return path


def example_payload(rng: np.random.Generator) -> bytes:
    """A serialized tf.train.Example of another layout than the data sets' (one float feature "x")."""
    value = struct.pack("<f", float(rng.normal()))
    floats = b"\x0a\x04" + value  # FloatList.value, packed
    feature = b"\x12" + bytes([len(floats)]) + floats  # Feature.float_list
    entry = b"\x0a\x01x" + b"\x12" + bytes([len(feature)]) + feature  # map entry "x" -> feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    return b"\x0a" + bytes([len(features)]) + features  # Example.features


def make_fixtures(root: Path, weights_formats=("safetensors", "pt")) -> dict:
    """The fixture run (checkpoints at steps 2 and 4 of a tiny untrained model), its weights files, and a
    small TFDS CLEVR description, under `root`."""
    import jax.numpy as jnp

    from slotjax import convert
    from slotjax.train import checkpoints
    from slotjax.train import step as steps

    config = tiny_config()
    state = steps.initial_state(config)
    manager = checkpoints.checkpoint_manager(str(root / "run"), config)
    for step in STEPS:
        checkpoints.save_checkpoint(manager, state.replace(step=jnp.asarray(step, jnp.int32)), config)
    manager.close()
    fixtures = {"root": root, "run": root / "run", "weights": {}}
    for extension in weights_formats:
        path = root / f"model.{extension}"
        convert.save_model_weights(steps.build_model(config), config, STEPS[-1], str(path))
        fixtures["weights"][extension] = path
    return fixtures


def copy_run(fixtures: dict, directory: Path) -> Path:
    destination = directory / "run"
    shutil.copytree(fixtures["run"], destination)
    return destination


# ------------------------------------------------------------------------------------------------- cases

FIELD_VALUES = {
    "batch_size": ["0", "-8"],
    "eval_batch_size": ["0", "-1"],
    "log_every": ["0"],
    "eval_every": ["0", "-5"],
    "checkpoint_every": ["0"],
    "num_slots": ["0", "-3"],
    "num_iterations": ["0"],
    "resolution": ["0", "20", "12", "-16"],
    "slot_size": ["0"],
    "encoder_features": ["0"],
    "decoder_features": ["0"],
    "mlp_hidden_size": ["0"],
    "compute_dtype": ["float8", "bf16", "half"],
    "nonfinite_loss": ["ignore", "STOP"],
    "dataset": ["mnist", "clevr6", ""],
    "num_train_steps": ["-1", "many", "2.5"],
    "learning_rate": ["fast", "1e-3x"],
    "seed": ["-1", "x"],
    "min_objects": ["0", "9"],
    "max_objects": ["0"],
    "num_devices": ["-1", "64"],
    "cpu_devices": ["-2"],
    "task": ["nope", "set_prediction"],
}


def flag_case(directory: Path, fixtures: dict, arguments: list[str], names: str, existing: bool = False) -> Case:
    """`train.py` with the tiny flags and `arguments` on a fresh work directory (or a copy of the fixture run)."""
    if existing:
        run = copy_run(fixtures, directory)
        return Case(
            "flag",
            " ".join(arguments) + " (existing run)",
            [sys.executable, str(REPO / "train.py"), f"--workdir={run}", *arguments],
            "refused",
            names,
            run=str(run),
            intact=STEPS,
        )
    overridden = {argument.split("=")[0] for argument in arguments}
    if "--task=set_prediction" in arguments:  # a field of the discovery model only
        overridden.add("--config.decoder_features")
    flags = [flag for flag in tiny_flags(num_train_steps=2) if flag.split("=")[0] not in overridden]
    command = [sys.executable, str(REPO / "train.py"), f"--workdir={directory / 'run'}", *arguments, *flags]
    return Case("flag", " ".join(arguments), command, "refused", names)


def random_flag_case(rng: np.random.Generator, directory: Path, fixtures: dict) -> Case:
    choice = rng.integers(10)
    if choice < 6:
        field = str(rng.choice(sorted(FIELD_VALUES)))
        value = str(rng.choice(FIELD_VALUES[field]))
        return flag_case(directory, fixtures, [f"--config.{field}={value}"], re.escape(field))
    if choice == 6:
        name = str(rng.choice(["nope", "num_slot", "lr", "seed.x"]))
        return flag_case(directory, fixtures, [f"--config.{name}=1"], re.escape(name))
    if choice == 7:
        arguments, names = [
            (["--task=nope"], "task"),
            (["--preset=fast"], "preset"),
            (["--mode=test"], "mode"),
            (["--split=eval"], "split"),
            (["--worker=3"], "worker"),
            (["extra"], "extra"),
            (["--config=configs/nope.py"], "nope.py"),
            (["--config=configs/discovery.py:fast"], "fast"),
            (["--task=discovery", "--config.task=set_prediction"], "task"),
            (["--task=set_prediction", "--config.dataset=tetrominoes"], "tetrominoes"),
        ][rng.integers(10)]
        return flag_case(directory, fixtures, arguments, re.escape(names))
    # flags that would change the model of an existing run (training or evaluation)
    arguments, names = [
        (["--config.encoder_features=16"], "encoder_features"),
        (["--config.resolution=32"], "resolution"),
        (["--task=set_prediction"], "task"),
        (["--preset=official"], "resolution"),
        (["--config.slot_size=32", "--config.num_slots=4"], "slot_size"),
    ][rng.integers(5)]
    mode = ["--mode=eval"] if rng.random() < 0.5 else []
    return flag_case(directory, fixtures, arguments + mode, names, existing=True)


DEEPMIND = tuple(files.RECORD_FILES)
RECORD_DAMAGE = (
    "missing",
    "empty",
    "random bytes",
    "cut short",
    "few records",
    "not GZIP-compressed",
    "GZIP of random bytes",
    "records of another layout",
)
CLEVR_DAMAGE = (
    "missing",
    "garbage dataset_info.json",
    "dataset_info.json of another kind",
    "shard missing",
    "few scenes",
)


def data_case(directory: Path, fixtures: dict, dataset: str, damage: str, mode: str, seed: int = 0) -> Case:
    """`train.py` (fresh run) or `--mode=eval` (a copy of the fixture run) on a damaged copy of `dataset`."""
    rng = np.random.default_rng(seed)
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if dataset == "clevr":
        names = _damage_clevr(data_dir, damage, rng)
    else:
        names = _damage_records(data_dir / files.RECORD_FILES[dataset], damage, rng)
    data_flags = [f"--config.dataset={dataset}", f"--config.data_dir={data_dir}"]
    if mode == "eval":
        run = copy_run(fixtures, directory)
        command = [sys.executable, str(REPO / "train.py"), "--mode=eval", f"--workdir={run}", *data_flags]
        return Case("data", f"{dataset}: {damage} (eval)", command, "refused", names, run=str(run), intact=STEPS)
    command = [sys.executable, str(REPO / "train.py"), f"--workdir={directory / 'run'}", *tiny_flags(), *data_flags]
    return Case("data", f"{dataset}: {damage} (train)", command, "refused", names)


def _damage_records(path: Path, damage: str, rng: np.random.Generator) -> str:
    payloads = [example_payload(rng) for _ in range(12)]
    if damage == "missing":
        return re.escape(path.name)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(rng.bytes(int(rng.integers(1, 20000))))
    elif damage == "cut short":
        data = write_tfrecords(path, payloads).read_bytes()
        path.write_bytes(data[: int(rng.integers(10, len(data) - 1))])
    elif damage == "few records":
        write_tfrecords(path, payloads[: int(rng.integers(0, 12))])
    elif damage == "not GZIP-compressed":
        write_tfrecords(path, payloads, compress=False)
    elif damage == "GZIP of random bytes":
        path.write_bytes(gzip.compress(rng.bytes(int(rng.integers(1, 5000)))))
    elif damage == "records of another layout":
        write_tfrecords(path, payloads)
    else:
        raise ValueError(damage)
    return re.escape(path.name)


def _damage_clevr(data_dir: Path, damage: str, rng: np.random.Generator) -> str:
    directory = Path(files.clevr_directory(str(data_dir)))
    if damage == "missing":
        return "CLEVR not found"
    directory.mkdir(parents=True)
    info = directory / "dataset_info.json"
    splits = [
        {"name": "train", "shardLengths": ["600"], "numBytes": "0"},
        {"name": "validation", "shardLengths": ["20"], "numBytes": "0"},
    ]
    for split in splits:
        (directory / f"clevr-{split['name']}.tfrecord-00000-of-00001").write_bytes(b"")
    if damage == "garbage dataset_info.json":
        info.write_bytes(rng.bytes(int(rng.integers(1, 300))))
        return "dataset_info.json"
    if damage == "dataset_info.json of another kind":
        info.write_text(json.dumps([{"splits": 3}] if rng.random() < 0.5 else {"name": "clevr"}))
        return "dataset_info.json"
    if damage == "shard missing":
        info.write_text(json.dumps({"splits": splits}))
        for path in directory.glob("clevr-*.tfrecord-*"):
            path.unlink()
        return r"clevr-(train|validation)\.tfrecord-00000-of-00001"
    if damage == "few scenes":
        for split in splits:
            split["shardLengths"] = ["3"]
        info.write_text(json.dumps({"splits": splits}))
        return "3 (train|validation) scenes"
    raise ValueError(damage)


WEIGHTS_DAMAGE = ("cut short", "bytes flipped", "empty", "random bytes", "header garbage")


def weights_case(directory: Path, fixtures: dict, extension: str, damage: str, seed: int = 0) -> Case:
    """`python -m slotjax.convert --input=DAMAGED --output=NEW_RUN` on a damaged copy of the fixture weights."""
    rng = np.random.default_rng(seed)
    original = fixtures["weights"][extension]
    data = original.read_bytes()
    path = directory / f"damaged.{extension}"
    name = damage
    if damage == "cut short":
        data = data[: int(rng.integers(0, len(data)))]
    elif damage == "bytes flipped":
        count = int(rng.choice([1, 8, 40, 400]))
        data = bytearray(data)
        for position in rng.integers(0, len(data), count):
            data[position] ^= int(rng.integers(1, 256))
        name = f"{count} bytes flipped"
    elif damage == "empty":
        data = b""
    elif damage == "random bytes":
        data = rng.bytes(len(data))
    elif damage == "header garbage":
        data = bytearray(data)
        start = 8 if extension == "safetensors" else 0
        for position in range(start, start + 64):
            data[position] = int(rng.integers(32, 127))
    else:
        raise ValueError(damage)
    path.write_bytes(bytes(data))
    output = directory / "converted"
    command = [sys.executable, "-m", "slotjax.convert", f"--input={path}", f"--output={output}"]
    return Case(
        "weights",
        f".{extension}: {name}",
        command,
        "refused",
        re.escape(str(path)),
        original_weights=str(original),
        output=str(output),
    )


CHECKPOINT_DAMAGE = (
    "array data cut short",
    "array data bytes flipped",
    "manifest.ocdbt missing",
    "array data files missing",
    "garbage config",
    "garbage array metadata",
)


def checkpoint_case(
    directory: Path, fixtures: dict, damage: str, command_name: str, all_steps: bool = False, seed: int = 0
) -> Case:
    """Training, evaluation or conversion of a copy of the fixture run whose latest (or every) checkpoint is
    damaged."""
    rng = np.random.default_rng(seed)
    run = copy_run(fixtures, directory)
    damaged = STEPS if all_steps else STEPS[-1:]
    for step in damaged:
        _damage_checkpoint(run / "checkpoints" / str(step), damage, rng)
    intact = tuple(step for step in STEPS if step not in damaged)
    if command_name == "train":
        command = [sys.executable, str(REPO / "train.py"), f"--workdir={run}"]
    elif command_name == "eval":
        command = [sys.executable, str(REPO / "train.py"), "--mode=eval", f"--workdir={run}"]
    else:
        command = [
            sys.executable,
            "-m",
            "slotjax.convert",
            f"--workdir={run}",
            f"--output={directory / 'w.safetensors'}",
        ]
    return Case(
        "checkpoint",
        f"{damage}, {'every checkpoint' if all_steps else 'latest'} ({command_name})",
        command,
        "resumed" if intact else "refused",
        "checkpoint",
        run=str(run),
        intact=intact,
        damaged_step=damaged[-1],
        original_run=str(fixtures["run"]),
        damaged=tuple(damaged),
    )


def _damage_checkpoint(checkpoint: Path, damage: str, rng: np.random.Generator) -> None:
    state = checkpoint / "state"
    data_files = sorted(path for path in state.rglob("*") if path.is_file() and path.parent.name == "d")
    if damage == "array data cut short":
        path = max(data_files, key=lambda path: path.stat().st_size)
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, len(data)))])
    elif damage == "array data bytes flipped":
        path = max(data_files, key=lambda path: path.stat().st_size)
        data = bytearray(path.read_bytes())
        for position in rng.integers(0, len(data), int(rng.choice([1, 40, 400]))):
            data[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
    elif damage == "manifest.ocdbt missing":
        for path in state.rglob("manifest.ocdbt"):
            path.unlink()
    elif damage == "array data files missing":
        for path in data_files:
            path.unlink()
    elif damage == "garbage config":
        (checkpoint / "config" / "metadata").write_bytes(rng.bytes(int(rng.integers(1, 200))))
    elif damage == "garbage array metadata":
        (state / "_METADATA").write_bytes(b"{" + rng.bytes(int(rng.integers(1, 200))))
    else:
        raise ValueError(damage)


def signal_case(directory: Path, signum: int, delay: float) -> Case:
    """A long training run of the tiny model, sent `signum` after `delay` seconds."""
    flags = tiny_flags(num_train_steps=100_000, checkpoint_every=100_000)
    command = [sys.executable, str(REPO / "train.py"), f"--workdir={directory / 'run'}", *flags]
    name = f"{signal.Signals(signum).name} after {delay:.1f} s"
    return Case("signal", name, command, "interrupted", run=str(directory / "run"), signum=signum, delay=delay)


def random_case(rng: np.random.Generator, kind: str, directory: Path, fixtures: dict) -> Case:
    seed = int(rng.integers(2**31))
    if kind == "flag":
        return random_flag_case(rng, directory, fixtures)
    if kind == "data":
        dataset = str(rng.choice(DEEPMIND + ("clevr",)))
        damage = str(rng.choice(CLEVR_DAMAGE if dataset == "clevr" else RECORD_DAMAGE))
        return data_case(directory, fixtures, dataset, damage, str(rng.choice(["train", "eval"])), seed)
    if kind == "weights":
        extension = str(rng.choice(sorted(fixtures["weights"])))
        return weights_case(directory, fixtures, extension, str(rng.choice(WEIGHTS_DAMAGE)), seed)
    if kind == "checkpoint":
        damage = str(rng.choice(CHECKPOINT_DAMAGE))
        command = str(rng.choice(["train", "eval", "convert"]))
        return checkpoint_case(directory, fixtures, damage, command, all_steps=rng.random() < 0.2, seed=seed)
    if kind == "signal":
        return signal_case(directory, int(rng.choice([signal.SIGINT, signal.SIGTERM])), float(rng.uniform(0.5, 40)))
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------- running


def environment(cache: Path) -> dict[str, str]:
    """The command lines' environment: this repository first on the path, the CPU, a shared compilation cache."""
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_case(case: Case, env: dict[str, str], timeout: float = 600) -> Result:
    start = time.monotonic()
    process = subprocess.Popen(
        case.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        if case.signum is not None:
            time.sleep(case.delay)
            process.send_signal(case.signum)
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return Result(case, False, f"no end in {timeout:.0f} s", time.monotonic() - start, None, output)
    passed, why = judge(case, process.returncode, output)
    return Result(case, passed, why, time.monotonic() - start, process.returncode, output)


def judge(case: Case, code: int, output: str) -> tuple[bool, str]:
    lines = output.splitlines()
    if "Traceback" in output:
        return False, "traceback"
    errors = [line for line in lines if line.startswith("error:")]
    if case.expect == "refused":
        if code == 0 and case.original_weights:
            if _same_parameters(case.original_weights, case.output):
                return True, "accepted unchanged"
            return False, "accepted a damaged weights file with other parameters"
        if code == 0 and case.original_run:  # flipped bytes may miss every array: then the checkpoint is intact
            if _damage_missed_the_arrays(case):
                return True, "accepted unchanged"
            return False, "went on from a damaged checkpoint"
        if code == 0:
            return False, "exit status 0 (not refused)"
        if len(errors) != 1:
            return False, f"{len(errors)} error lines"
        if not re.search(case.names, errors[0]):
            return False, f"the error line does not name {case.names!r}"
        why = "refused"
    elif case.expect == "resumed":
        if code != 0:
            return False, f"exit status {code}: {errors[-1] if errors else lines[-1:]}"
        step = case.damaged_step
        named = [line for line in lines if re.search(rf"\b{step}\b", line) and re.search(DAMAGE_WORDS, line, re.I)]
        if not named and _damage_missed_the_arrays(case):  # e.g. only bytes past the last array were cut
            why = "accepted unchanged"
        elif len(named) != 1:
            return False, f"{len(named)} lines name the damaged step {step}"
        elif (
            "train.py" in " ".join(case.command)
            and "--mode=eval" not in case.command
            and not any(line.startswith(f"Resuming from the checkpoint at step {case.intact[0]} ") for line in lines)
        ):
            return False, f"did not resume from step {case.intact[0]}"
        else:
            why = "resumed"
    else:
        if code not in (128 + case.signum, -case.signum):
            return False, f"exit status {code}, not {128 + case.signum}"
        saved = re.findall(r"saved the checkpoint at step (\d+)", output)
        why = "interrupted" + (f", saved step {saved[0]}" if saved else "")
        if saved and not _loads(case.run, int(saved[0])):
            return False, f"the checkpoint it saved (step {saved[0]}) does not load"
    for step in case.intact:
        if not _loads(case.run, step):
            return False, f"the intact checkpoint at step {step} no longer loads"
    return True, why


def _restored(workdir: str, step: int):
    """The training state of the checkpoint at `step` in `workdir`, or None where it does not load."""
    from slotjax.train import checkpoints, runs
    from slotjax.train import step as steps

    saved = runs.saved_config(workdir)
    if saved is None:
        return None
    config = saved[1]
    manager = checkpoints.checkpoint_manager(workdir)
    try:
        if step not in manager.all_steps():
            return None
        return checkpoints.restore_checkpoint(manager, steps.initial_state(config), config, step)
    except Exception:  # whatever a damaged checkpoint raises
        return None
    finally:
        manager.close()


def _loads(workdir: str, step: int) -> bool:
    state = _restored(workdir, step)
    return state is not None and int(state.step) == step


def _damage_missed_the_arrays(case: Case) -> bool:
    """Whether each damaged checkpoint that the command left in place holds exactly the original's arrays."""
    import jax

    kept = [step for step in case.damaged if not (Path(case.run) / "damaged" / str(step)).exists()]
    for step in kept:
        damaged, original = _restored(case.run, step), _restored(case.original_run, step)
        if damaged is None or original is None:
            return False
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(damaged), jax.tree.leaves(original))):
            return False
    return bool(kept)


def _same_parameters(original: str, workdir: str) -> bool:
    from slotjax import convert

    try:
        model = convert.restore_model(workdir)[0]
    except Exception:  # no checkpoint written, or a damaged one
        return False
    converted, reference = convert.flax_to_torch(model), convert.load_weights(original)
    return converted.keys() == reference.keys() and all(
        np.array_equal(converted[name], reference[name]) for name in converted
    )


def run_cases(cases: list[Case], cache: Path, jobs: int) -> list[Result]:
    env = environment(cache)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda case: run_case(case, env), cases))


def summary(results: list[Result]) -> str:
    rows = ["| kind | cases | passed | failed |", "|---|---|---|---|"]
    for kind in KINDS:
        of_kind = [result for result in results if result.case.kind == kind]
        if of_kind:
            passed = sum(result.passed for result in of_kind)
            rows.append(f"| {kind} | {len(of_kind)} | {passed} | {len(of_kind) - passed} |")
    rows.append(f"| all | {len(results)} | {sum(r.passed for r in results)} | {sum(not r.passed for r in results)} |")
    lines = ["\n".join(rows), "", "case | outcome | exit | seconds"]
    for result in results:
        outcome = ("ok: " if result.passed else "FAIL: ") + result.why
        lines.append(f"{result.case.kind}: {result.case.name} | {outcome} | {result.code} | {result.seconds:.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="cases run side by side")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--keep", help="a directory for the cases' files (kept); default: a temporary one")
    parser.add_argument("--failures", action="store_true", help="print the output of failed cases")
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="slotjax-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    fixtures = make_fixtures(root / "fixtures")
    rng = np.random.default_rng(args.seed)
    cases = []
    for index in range(args.cases):
        directory = root / f"case{index:03d}"
        directory.mkdir()
        cases.append(random_case(rng, str(rng.choice(args.kinds)), directory, fixtures))
    results = run_cases(cases, root / "jax_cache", args.jobs)
    print(summary(results))
    if args.failures:
        for result in results:
            if not result.passed:
                print(f"\n--- {result.case.kind}: {result.case.name}\n$ {' '.join(result.case.command)}")
                print("\n".join(result.output.splitlines()[-15:]))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
