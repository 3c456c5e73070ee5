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
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slotjax import visualize
from slotjax.data import pipeline
from slotjax.data.encoding import MAX_OBJECTS
from slotjax.train import metrics
from slotjax.train.checkpoints import (
    TrainingError,
    checkpoint_manager,
    restore_latest_intact,
    save_checkpoint,
)
from slotjax.train.logger import Logger
from slotjax.train.optim import learning_rate_schedule, make_optimizer
from slotjax.train.runs import Interrupted, check_config
from slotjax.train.step import StepDef, TrainState, build_model, eval_step, task_loss, train_step

PICTURE_EXAMPLES = 8  # examples of the first evaluation batch drawn in the picture
UNDEFINED_PER_EXAMPLE = ("fg_ari", "ari")  # NaN for an image without (foreground) pixels: averaged over the others


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
    """Holds what the loops share: the model's structure, optimiser, mesh and compiled steps."""

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config)
        self.config = config
        self.mesh = make_mesh(config.num_devices)
        for name in ("batch_size", "eval_batch_size"):
            if config[name] % self.mesh.size:
                raise ValueError(
                    f"{name}={config[name]} is not divisible by the {self.mesh.size} devices; "
                    f"use a multiple of {self.mesh.size} or set --config.num_devices."
                )
        self.skip_limit = config.get("nonfinite_skip_limit", 10)  # 10 for configs saved without the field
        # the most objects a scene of the data set holds: the embedded scenes' setting, up to 10 in CLEVR
        max_objects = config.max_objects if config.dataset == "scenes" else MAX_OBJECTS
        if config.task == "set_prediction" and config.num_slots < max_objects:
            raise ValueError(
                f"num_slots={config.num_slots} is below the {max_objects} objects a scene of {config.dataset!r} may "
                f"hold: the Hungarian matching would leave objects unmatched. Use --config.num_slots >= {max_objects}."
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        graphdef, self.initial_params, rest = nnx.split(build_model(config), nnx.Param, ...)
        schedule_arguments = (config.learning_rate, config.warmup_steps, config.decay_steps, config.decay_rate)
        self.optimizer = make_optimizer(
            *schedule_arguments, config.get("grad_clip_norm", 0.0), config.get("adam_epsilon", "keras")
        )
        self.step_def = StepDef(
            graphdef,
            rest,
            functools.partial(task_loss, config.task),
            self.optimizer,
            learning_rate_schedule(*schedule_arguments),
            config.nonfinite_loss == "skip",
        )
        self.train_step = MeshStep(self.mesh, jax.jit(functools.partial(train_step, self.step_def), donate_argnums=0))
        self.eval_step = MeshStep(self.mesh, jax.jit(functools.partial(eval_step, self.step_def, config.task)))

    def initial_state(self) -> TrainState:
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=self.initial_params,
            opt_state=self.optimizer.init(self.initial_params),
            rng=jax.random.key_data(jax.random.key(self.config.seed + 1)),
        )
        return jax.device_put(state, self.replicated)

    def model(self, params) -> nnx.Module:
        return self.step_def.model(params)

    def shard(self, batch: dict) -> dict:
        """This process's numpy batch -> global arrays sharded along the data axis."""
        pipeline.check_batch(batch, self.config.resolution)
        return {key: jax.make_array_from_process_local_data(self.data_sharding, value) for key, value in batch.items()}

    def evaluate(self, params, split: str) -> tuple[dict[str, float], np.ndarray]:
        """Metrics over `config.num_eval_examples` examples of `split`, and a picture of the first batch.

        Only the per-example scores, the set-prediction AP inputs and the first batch's pictured examples
        cross between hosts.
        """
        set_prediction = self.config.task == "set_prediction"
        scores: dict[str, list[np.ndarray]] = {}
        predictions, targets, picture = [], [], None
        for batch in pipeline.eval_batches(self.config, split, jax.process_index(), jax.process_count()):
            batch = self.shard(batch)
            batch_scores, outputs = self.eval_step(params, batch)
            gathered = {"scores": batch_scores}
            if set_prediction:
                gathered.update(predictions=outputs["predictions"], targets=batch["target"])
            if picture is None:
                gathered["picture"] = jax.tree.map(
                    lambda array: array[:PICTURE_EXAMPLES], self._pictured(batch, outputs)
                )
            gathered = multihost_utils.process_allgather(gathered, tiled=True)
            for name, values in gathered["scores"].items():
                scores.setdefault(name, []).append(np.asarray(values, np.float64))
            if set_prediction:
                predictions.append(gathered["predictions"])
                targets.append(gathered["targets"])
            if picture is None:
                picture = self.picture(gathered["picture"])
        results = {name: _mean(name, np.concatenate(values)) for name, values in scores.items()}
        if set_prediction:
            results.update(
                metrics.average_precision_at_thresholds(np.concatenate(predictions), np.concatenate(targets))
            )
        return results, picture

    def _pictured(self, batch: dict, outputs: dict) -> dict:
        if self.config.task == "set_prediction":
            return {"image": batch["image"], "target": batch["target"], "predictions": outputs["predictions"]}
        names = ("reconstruction", "masks", "slot_reconstructions")
        return {"image": batch["image"], **{name: outputs[name] for name in names}}

    def picture(self, pictured: dict) -> np.ndarray:
        if self.config.task == "discovery":
            return visualize.discovery_grid(
                pictured["image"], pictured["reconstruction"], pictured["masks"], pictured["slot_reconstructions"]
            )
        return visualize.set_prediction_grid(pictured["image"], pictured["predictions"], pictured["target"])


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
    """Trains `config.num_train_steps` steps (resuming from `workdir`), evaluating every `eval_every`.

    SIGINT or SIGTERM saves a checkpoint at the end of the current step, then raises `Interrupted`.
    """
    pipeline.check_data(config, ("train", "validation"))
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config)
    devices = trainer.mesh.devices.ravel()
    print_fn(
        f"data-parallel over {len(devices)} {devices[0].platform.upper()} device(s), "
        f"{config.batch_size // len(devices)} examples each"
    )
    logger = Logger(workdir)
    manager = checkpoint_manager(workdir, config, print_fn)
    state = trainer.initial_state()
    restored = restore_latest_intact(manager, lambda _: state, config, print_fn)
    if restored is not None:
        state = restored[0]
        print_fn(f"Resuming from the checkpoint at step {int(state.step)} in {workdir}.")
    start_step = int(state.step)
    if start_step and start_step >= config.num_train_steps:
        print_fn(
            f"The run in {workdir} is finished: its checkpoint is at step {start_step} of "
            f"num_train_steps={config.num_train_steps}. Evaluate it with --mode=eval, or train on with a larger "
            "--config.num_train_steps."
        )
        manager.close()
        return {}
    batches = pipeline.train_batches(config, start_step, jax.process_index(), jax.process_count())
    last_eval: dict[str, float] = {}
    timer_start, timer_step = None, start_step
    evaluated = False
    skipped = 0  # non-finite batches in a row
    with _StopRequest() as stop:
        for step in range(start_step, config.num_train_steps):
            state, step_metrics = trainer.train_step(state, trainer.shard(next(batches)))
            done = step + 1  # steps are numbered from 1, as in metrics.jsonl and the checkpoints
            skipped = 0 if bool(step_metrics["finite"]) else skipped + 1
            if skipped:
                message = f"The loss is not finite at step {done} ({float(step_metrics['loss'])})."
                if config.nonfinite_loss == "stop":
                    raise TrainingError(
                        message + f" Stopped; the last good checkpoint is step {manager.latest_step()}. "
                        "Lower the learning rate, or set --config.nonfinite_loss=skip to skip such batches."
                    )
                if skipped >= trainer.skip_limit:
                    raise TrainingError(
                        message + f" Stopped after {skipped} non-finite batches in a row "
                        f"(--config.nonfinite_skip_limit); the last good checkpoint is step {manager.latest_step()}. "
                        "Lower the learning rate, or check the data."
                    )
                print_fn(message + " Skipped that batch (nonfinite_loss='skip').")
            if timer_start is None:  # the first step compiled; time from here
                timer_start, timer_step = time.perf_counter(), done
            if done % config.log_every == 0 or done == config.num_train_steps:
                elapsed = time.perf_counter() - timer_start
                steps_per_second = (done - timer_step) / elapsed if elapsed > 0 and done > timer_step else 0.0
                eta = (config.num_train_steps - done) / steps_per_second if steps_per_second else float("nan")
                loss = float(step_metrics["loss"])
                print_fn(
                    f"step {done}/{config.num_train_steps}  loss {loss:.5f}  {steps_per_second:.2f} steps/s  "
                    f"ETA {_duration(eta)}"
                )
                logger.scalars(
                    done,
                    "train",
                    {
                        "loss": loss,
                        "learning_rate": step_metrics["learning_rate"],
                        "steps_per_second": steps_per_second,
                    },
                )
            if done % config.checkpoint_every == 0 or done == config.num_train_steps or stop.signal_name:
                save_checkpoint(manager, state, config)
            # the first evaluation also comes after `first_eval_seconds` of training, so a short run leaves a picture
            # (one process only: the processes of a multi-host run would disagree on the clock)
            first_due = (
                not evaluated
                and jax.process_count() == 1
                and time.perf_counter() - timer_start >= config.get("first_eval_seconds", 0) > 0
            )
            if done % config.eval_every == 0 or done == config.num_train_steps or first_due:
                last_eval = evaluate_and_log(trainer, state.params, done, "validation", logger, print_fn)
                evaluated = True
            if stop.signal_name:
                print_fn(
                    f"Received {stop.signal_name}: saved the checkpoint at step {done}; run the same command to resume."
                )
                break
    manager.close()
    if stop.signal_name:
        raise Interrupted(signal.Signals[stop.signal_name])
    return last_eval


def evaluate_and_log(
    trainer: Trainer, params, step: int, split: str, logger: Logger, print_fn: Callable[[str], None] = print
) -> dict[str, float]:
    results, picture = trainer.evaluate(params, split)
    logger.scalars(step, split, results)
    path = logger.picture(step, split, picture)
    nonfinite = [name for name, value in results.items() if not np.isfinite(value)]
    print_fn(
        f"eval {split} at step {step}: "
        + "  ".join(f"{name} {value:.4f}" for name, value in results.items())
        + (f"  (pictures: {path})" if path else "")
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
    pipeline.check_data(config, (split,))
    trainer = Trainer(config)
    state, _ = restore_latest_intact(manager, lambda _: trainer.initial_state(), config, print_fn)
    results = evaluate_and_log(trainer, state.params, int(state.step), split, Logger(workdir), print_fn)
    if config.task == "set_prediction":
        print_fn(format_ap_table(results))
    manager.close()
    return results


def format_ap_table(results: dict[str, float]) -> str:
    names = [metrics.ap_metric_name(threshold) for threshold in metrics.AP_THRESHOLDS]
    header = "| threshold | " + " | ".join(str(t if t is not None else "none") for t in metrics.AP_THRESHOLDS) + " |"
    values = "| AP        | " + " | ".join(f"{results[name]:.4f}" for name in names) + " |"
    return "\n".join([header, "|" + "---|" * (len(names) + 1), values])


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
