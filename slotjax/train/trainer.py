"""Training and evaluation loops of both tasks.

The steps (`slotjax.train.step`) are compiled with `jax.jit` over a device mesh: the batch is sharded along
the mesh's "data" axis and the state is replicated, so the same code runs on one device, all local devices,
or several hosts. Checkpoints (orbax) are written atomically; rerunning with the same work directory resumes
from the newest intact one.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slotjax import visualize
from slotjax.data import pipeline
from slotjax.tasks import task_of
from slotjax.train.checkpoints import (
    TrainingError,
    checkpoint_manager,
    restore_latest_intact,
    save_checkpoint,
)
from slotjax.train.logger import Logger
from slotjax.train.runs import Interrupted, check_config, config_from_checkpoint
from slotjax.train.step import TrainState, eval_step, initial_state, make_step_def, train_step

PICTURE_EXAMPLES = 8  # examples of the first evaluation batch drawn in the picture
# NaN for an image without foreground pixels (FG-ARI), pixels (ARI) or objects (mBO): averaged over the others
UNDEFINED_PER_EXAMPLE = ("fg_ari", "ari", "mbo")


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run when one is asked for (flags, $JAX_COORDINATOR_ADDRESS, SLURM, TPU pods).

    A single process on a machine with no cluster environment needs nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = any(
        name in os.environ for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    )
    if not coordinator_address and not cluster:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh ("data") over `num_devices` devices of every process (0 = all)."""
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("num_devices must be 0 (all devices) when training on several processes.")
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


class MeshStep:
    """A jitted step traced and run with its mesh set (`jax.set_mesh`): the kernels see how the batch is split."""

    def __init__(self, mesh: Mesh, jitted):
        self.mesh, self.jitted = mesh, jitted

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


class Trainer:
    """What the loops share: the device mesh, the compiled steps and the config's task."""

    def __init__(self, config: ml_collections.ConfigDict, skip_nonfinite: bool = False):
        self.config, self.task = config, task_of(config)
        self.mesh = make_mesh(config.num_devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.step_def = make_step_def(config, skip_nonfinite)
        self.train_step = MeshStep(self.mesh, jax.jit(functools.partial(train_step, self.step_def), donate_argnums=0))
        self.eval_step = MeshStep(self.mesh, jax.jit(functools.partial(eval_step, self.step_def)))

    def initial_state(self) -> TrainState:
        """`step.initial_state` of the config, replicated over the mesh."""
        return jax.device_put(initial_state(self.config), self.replicated)

    def model(self, params) -> nnx.Module:
        return self.step_def.model(params)

    def shard(self, batch: dict) -> dict:
        """This process's numpy batch -> global arrays sharded along the data axis."""
        pipeline.check_batch(batch, self.config.resolution)
        return {key: jax.make_array_from_process_local_data(self.data_sharding, value) for key, value in batch.items()}

    def evaluate(self, params, split: str, attention: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics over `config.num_eval_examples` examples of `split`, and pictures of the first batch: "examples"
        (the task's), and with `attention` "attention" (each slot's attention in every iteration).

        Only the per-example scores, the arrays the task's metrics pool and the first batch's pictured examples
        cross between hosts.
        """
        scores: dict[str, list[np.ndarray]] = {}
        pooled: dict[str, list[np.ndarray]] = {}
        picture = None
        for batch in pipeline.eval_batches(self.config, split, jax.process_index(), jax.process_count()):
            batch = self.shard(batch)
            batch_scores, outputs = self.eval_step(params, batch)
            gathered = {"scores": batch_scores, "pooled": self.task.pooled(outputs, batch)}
            if picture is None:
                pictured = self.task.pictured(outputs, batch)
                if attention:
                    pictured = {**pictured, "attention_image": batch["image"], "attention": outputs["attention"]}
                gathered["pictured"] = jax.tree.map(lambda array: array[:PICTURE_EXAMPLES], pictured)
            gathered = multihost_utils.process_allgather(gathered, tiled=True)
            for name, values in gathered["scores"].items():
                scores.setdefault(name, []).append(np.asarray(values, np.float64))
            for name, values in gathered["pooled"].items():
                pooled.setdefault(name, []).append(np.asarray(values))
            if picture is None:
                pictured = gathered["pictured"]
                picture = {"examples": self.task.picture(pictured)}
                if attention:
                    picture["attention"] = visualize.attention_grid(pictured["attention_image"], pictured["attention"])
        results = {name: _mean(name, np.concatenate(values)) for name, values in scores.items()}
        if pooled:
            results.update(self.task.metrics({name: np.concatenate(values) for name, values in pooled.items()}))
        return results, picture


def _mean(name: str, values: np.ndarray) -> float:
    """The mean over the examples; NaN or inf when an example's value is (a metric's undefined examples aside)."""
    if name in UNDEFINED_PER_EXAMPLE:
        values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


class _StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks, so it can save and exit cleanly."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, print_fn: Callable[[str], None] = print
) -> dict[str, float]:
    """Trains `config.num_train_steps` steps (resuming from `workdir`), evaluating every `eval_every`; returns the
    last evaluation's results.

    SIGINT or SIGTERM saves a checkpoint at the end of the current step, then raises `Interrupted`.
    """
    nonfinite = NonfinitePolicy(config)
    trainer = start_run(config, ("train", "validation"), nonfinite.skip)
    devices = trainer.mesh.devices.ravel()
    print_fn(
        f"data-parallel over {len(devices)} {devices[0].platform.upper()} device(s), "
        f"{config.batch_size // len(devices)} examples each"
    )
    os.makedirs(workdir, exist_ok=True)
    logger = Logger(workdir)
    manager = checkpoint_manager(workdir, config, print_fn)
    state = resume(trainer, manager, workdir, print_fn)
    start_step = int(state.step)
    if finished(config, start_step, workdir, print_fn):
        manager.close()
        return {}
    batches = pipeline.train_batches(config, start_step, jax.process_index(), jax.process_count())
    progress = Progress(config, start_step, logger, print_fn)
    last_eval: dict[str, float] = {}
    with _StopRequest() as stop:
        for step in range(start_step, config.num_train_steps):
            state, step_metrics = trainer.train_step(state, trainer.shard(next(batches)))
            done = step + 1  # steps are numbered from 1, as in metrics.jsonl and the checkpoints
            nonfinite.check(done, step_metrics, manager.latest_step(), print_fn)
            progress.log(done, step_metrics)
            if checkpoint_due(config, done) or stop.signal_name:
                save_checkpoint(manager, state, config)
            if evaluation_due(config, done) or progress.first_picture_due():
                last_eval = evaluate_and_log(trainer, state.params, done, "validation", logger, print_fn)
                progress.evaluated = True
            if stop.signal_name:
                print_fn(
                    f"Received {stop.signal_name}: saved the checkpoint at step {done}; run the same command to resume."
                )
                break
    manager.close()
    if stop.signal_name:
        raise Interrupted(signal.Signals[stop.signal_name])
    return last_eval


def start_run(config: ml_collections.ConfigDict, splits: tuple[str, ...], skip_nonfinite: bool = False) -> Trainer:
    """The trainer of a run that reads `splits`, after the config and the data files are checked."""
    check_config(config)
    pipeline.check_data(config, splits)
    trainer = Trainer(config, skip_nonfinite)
    check_config(config, trainer.mesh.size)  # the batch splits over the mesh's devices
    return trainer


def resume(trainer: Trainer, manager, workdir: str, print_fn: Callable[[str], None]) -> TrainState:
    """The newest intact checkpoint's state, or the initial state where there is none."""
    state = trainer.initial_state()
    restored = restore_latest_intact(manager, lambda _: state, trainer.config, print_fn)
    if restored is None:
        return state
    print_fn(f"Resuming from the checkpoint at step {int(restored[0].step)} in {workdir}.")
    return restored[0]


def finished(config: ml_collections.ConfigDict, step: int, workdir: str, print_fn: Callable[[str], None]) -> bool:
    """Whether a run resumed at `step` has nothing left to train (and says so)."""
    if not step or step < config.num_train_steps:
        return False
    print_fn(
        f"The run in {workdir} is finished: its checkpoint is at step {step} of "
        f"num_train_steps={config.num_train_steps}. Evaluate it with --mode=eval, or train on with a larger "
        "--config.num_train_steps."
    )
    return True


class NonfinitePolicy:
    """config.nonfinite_loss at a non-finite loss: "stop" training, or "skip" the batch (the compiled step keeps
    the parameters, `StepDef.skip_nonfinite`) up to `nonfinite_skip_limit` batches in a row."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.skip = config.nonfinite_loss == "skip"
        self.limit = config.nonfinite_skip_limit
        self.in_a_row = 0

    def check(self, done: int, step_metrics: dict, last_checkpoint: int | None, print_fn: Callable[[str], None]):
        """After step `done`: nothing if its loss is finite, else a skip line or the TrainingError that stops."""
        self.in_a_row = 0 if bool(step_metrics["finite"]) else self.in_a_row + 1
        if not self.in_a_row:
            return
        message = f"The loss is not finite at step {done} ({float(step_metrics['loss'])})."
        if not self.skip:
            raise TrainingError(
                message + f" Stopped; the last good checkpoint is step {last_checkpoint}. "
                "Lower the learning rate, or set --config.nonfinite_loss=skip to skip such batches."
            )
        if self.in_a_row >= self.limit:
            raise TrainingError(
                message + f" Stopped after {self.in_a_row} non-finite batches in a row "
                f"(--config.nonfinite_skip_limit); the last good checkpoint is step {last_checkpoint}. "
                "Lower the learning rate, or check the data."
            )
        print_fn(message + " Skipped that batch (nonfinite_loss='skip').")


def checkpoint_due(config: ml_collections.ConfigDict, done: int) -> bool:
    return done % config.checkpoint_every == 0 or done == config.num_train_steps


def evaluation_due(config: ml_collections.ConfigDict, done: int) -> bool:
    return done % config.eval_every == 0 or done == config.num_train_steps


class Progress:
    """The log line every `log_every` steps (loss, steps/s and the time left, timed from the end of the first step,
    which compiles), and the first picture's time."""

    def __init__(self, config: ml_collections.ConfigDict, start_step: int, logger: Logger, print_fn):
        self.config, self.logger, self.print_fn = config, logger, print_fn
        self.timer_start, self.timer_step = None, start_step
        self.evaluated = False  # whether this run has evaluated yet

    def log(self, done: int, step_metrics: dict) -> None:
        if self.timer_start is None:  # the first step compiled; time from here
            self.timer_start, self.timer_step = time.perf_counter(), done
        if done % self.config.log_every and done != self.config.num_train_steps:
            return
        elapsed = time.perf_counter() - self.timer_start
        steps_per_second = (done - self.timer_step) / elapsed if elapsed > 0 and done > self.timer_step else 0.0
        eta = (self.config.num_train_steps - done) / steps_per_second if steps_per_second else float("nan")
        loss = float(step_metrics["loss"])
        self.print_fn(
            f"step {done}/{self.config.num_train_steps}  loss {loss:.5f}  {steps_per_second:.2f} steps/s  "
            f"ETA {_duration(eta)}"
        )
        values = {"loss": loss, "learning_rate": step_metrics["learning_rate"], "steps_per_second": steps_per_second}
        self.logger.scalars(done, "train", values)

    def first_picture_due(self) -> bool:
        """The first evaluation also comes after `first_eval_seconds` of training, so a short run leaves a picture
        (one process only: the processes of a multi-host run would disagree on the clock)."""
        return (
            not self.evaluated
            and jax.process_count() == 1
            and time.perf_counter() - self.timer_start >= self.config.first_eval_seconds > 0
        )


def evaluate_and_log(
    trainer: Trainer,
    params,
    step: int,
    split: str,
    logger: Logger,
    print_fn: Callable[[str], None] = print,
    setting: dict | None = None,
) -> dict[str, float]:
    """Evaluates, writes the metrics (with the test-time `setting`, if any) and pictures, and prints one line."""
    results, pictures = trainer.evaluate(params, split, attention=setting is not None)
    logger.scalars(step, split, results, setting)
    paths = [logger.picture(step, split, picture, name) for name, picture in pictures.items()]
    nonfinite = [name for name, value in results.items() if not np.isfinite(value)]
    print_fn(
        f"eval {split} at step {step}: "
        + "  ".join(f"{name} {value:.4f}" for name, value in results.items())
        + (f"  (pictures: {', '.join(paths)})" if all(paths) else "")
        + (f"  NOT FINITE: {', '.join(nonfinite)}" if nonfinite else "")
    )
    return results


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, split: str = "validation", print_fn: Callable[[str], None] = print
) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir` on `split`, logging metrics and pictures there."""
    no_checkpoint = f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: train first with the same --workdir."
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # refused before the manager creates the directory
        raise TrainingError(no_checkpoint)
    manager = checkpoint_manager(workdir, print_fn=print_fn)
    if manager.latest_step() is None:
        raise TrainingError(no_checkpoint)
    trainer = start_run(config, (split,))
    state, _ = restore_latest_intact(manager, lambda _: trainer.initial_state(), config, print_fn)
    setting = test_setting(config_from_checkpoint(manager, int(state.step)), config)
    print_fn(describe_setting(setting))
    results = evaluate_and_log(trainer, state.params, int(state.step), split, Logger(workdir), print_fn, setting)
    report = trainer.task.report(results)
    if report:
        print_fn(report)
    manager.close()
    return results


def test_setting(trained: ml_collections.ConfigDict, tested: ml_collections.ConfigDict) -> dict[str, dict]:
    """What a checkpoint was trained with and what it is evaluated with: slots, iterations and, on the embedded
    scenes, objects per scene (test-time settings that change no parameter)."""
    names = ("num_slots", "num_iterations") + (("min_objects", "max_objects") if tested.dataset == "scenes" else ())
    return {"trained": {name: trained.get(name) for name in names}, "tested": {name: tested[name] for name in names}}


def describe_setting(setting: dict[str, dict]) -> str:
    """ "trained: 7 slots, 3 iterations, 2-6 objects; tested: 11 slots, 5 iterations, 7-10 objects"."""

    def described(values: dict) -> str:
        parts = [f"{values['num_slots']} slots", f"{values['num_iterations']} iterations"]
        if "min_objects" in values:
            parts.append(f"{values['min_objects']}-{values['max_objects']} objects")
        return ", ".join(parts)

    return f"trained: {described(setting['trained'])}; tested: {described(setting['tested'])}"


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
