"""Training and evaluation loops of both tasks.

The training step is a pure function of (state, batch) compiled with `jax.jit`
over a device mesh: the batch is sharded along the mesh's "data" axis and the
state is replicated (pmap's modern form), so the same code runs on one device,
all local devices, or several hosts. Checkpoints (orbax) are written
atomically; rerunning with the same work directory resumes from the last one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slotjax import input_pipeline, losses, metrics, scenes, visualize
from slotjax.models import SetPredictor, SlotAutoencoder
from slotjax.modules import set_compute_dtype
from slotjax.optim import learning_rate_schedule, make_optimizer

MAX_ENTITIES = 11  # ground-truth ids 0..10 (CLEVR with masks has the most: 10 objects + background)
# Fields that decide the model's parameters: a checkpoint only fits a model built with the same values.
MODEL_FIELDS = ("task", "resolution", "num_slots", "slot_size", "encoder_features", "decoder_features",
                "mlp_hidden_size", "head_hidden_size")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint of another model)."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's parameters
    opt_state: Any
    rng: jax.Array


def model_spec(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """The model class name and constructor arguments a config asks for (the same in torch_reference)."""
    arguments = dict(resolution=config.resolution, num_slots=config.num_slots, num_iterations=config.num_iterations,
                     slot_size=config.slot_size, encoder_features=config.encoder_features,
                     mlp_hidden_size=config.mlp_hidden_size)
    if config.task == "discovery":
        return "SlotAutoencoder", {**arguments, "decoder_features": config.decoder_features}
    return "SetPredictor", {**arguments, "head_hidden_size": config.head_hidden_size}


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Module:
    name, arguments = model_spec(config)
    if name == "SlotAutoencoder":
        arguments["remat_decoder"] = config.get("remat_decoder", False)
    model_class = {"SlotAutoencoder": SlotAutoencoder, "SetPredictor": SetPredictor}[name]
    model = model_class(**arguments, rngs=nnx.Rngs(config.seed if seed is None else seed))
    if config.get("compute_dtype", "float32") != "float32":
        set_compute_dtype(model, jnp.dtype(config.compute_dtype))
    return model


def compute_loss(task: str, outputs: dict, batch: dict) -> jax.Array:
    if task == "discovery":
        return losses.mse_loss(outputs["reconstruction"], batch["image"])
    # Rows past the data's largest scene are padding (the trainer refuses fewer slots than that), so a model with
    # K < 10 slots is matched against the first K rows: the same loss without padding rows left unmatched.
    predictions = outputs["predictions"]
    return losses.hungarian_huber_loss(predictions, batch["target"][:, : predictions.shape[1]])


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run when one is asked for (flags, $JAX_COORDINATOR_ADDRESS, SLURM, TPU pods).

    A single process on a machine with no cluster environment needs nothing.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = any(name in os.environ for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
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


class Trainer:
    """Holds what the loops share: the model's structure, optimiser, mesh and compiled steps."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.mesh = make_mesh(config.num_devices)
        for name in ("batch_size", "eval_batch_size"):
            if config[name] % self.mesh.size:
                raise ValueError(
                    f"{name}={config[name]} is not divisible by the {self.mesh.size} devices; "
                    f"use a multiple of {self.mesh.size} or set --config.num_devices."
                )
        if config.nonfinite_loss not in ("stop", "skip"):
            raise ValueError(
                f"nonfinite_loss={config.nonfinite_loss!r} is not a policy; use --config.nonfinite_loss=stop or skip."
            )
        # the most objects a scene of the data set holds: the embedded scenes' setting, up to 10 in CLEVR
        max_objects = config.max_objects if config.dataset == "scenes" else scenes.MAX_OBJECTS_TARGET
        if config.task == "set_prediction" and config.num_slots < max_objects:
            raise ValueError(
                f"num_slots={config.num_slots} is below the {max_objects} objects a scene of {config.dataset!r} may "
                f"hold: the Hungarian matching would leave objects unmatched. Use --config.num_slots >= {max_objects}."
            )
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        model = build_model(config)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.optimizer = make_optimizer(config.learning_rate, config.warmup_steps, config.decay_steps,
                                        config.decay_rate, config.get("grad_clip_norm", 0.0))
        self.schedule = learning_rate_schedule(config.learning_rate, config.warmup_steps, config.decay_steps,
                                               config.decay_rate)
        self.initial_params = params
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step)

    def initial_state(self) -> TrainState:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=self.initial_params,
                           opt_state=self.optimizer.init(self.initial_params),
                           rng=jax.random.key_data(jax.random.key(self.config.seed + 1)))
        return jax.device_put(state, self.replicated)

    def model(self, params) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest, copy=True)

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            outputs = self.model(params)(batch["image"], key=key)
            return compute_loss(self.config.task, outputs, batch)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        finite = jnp.isfinite(loss)
        if self.config.nonfinite_loss == "skip":  # keep the old parameters, move on to the next batch
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     state.replace(step=state.step + 1))
        return new_state, {"loss": loss, "finite": finite, "learning_rate": self.schedule(state.step)}

    def _eval_step(self, params, batch: dict) -> dict:
        # a fixed key: evaluation of a checkpoint is reproducible
        outputs = self.model(params)(batch["image"], key=jax.random.key(0))
        result = {"loss": compute_loss(self.config.task, outputs, batch), "outputs": outputs}
        if self.config.task == "discovery":
            result["mse"] = losses.mse_loss(outputs["reconstruction"], batch["image"])
            if "segmentation" in batch:
                result["fg_ari"] = metrics.fg_ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
                result["ari"] = metrics.ari_from_masks(batch["segmentation"], outputs["masks"], MAX_ENTITIES)
        return result

    def shard(self, batch: dict) -> dict:
        """This process's numpy batch -> global arrays sharded along the data axis."""
        input_pipeline.check_batch(batch, self.config.resolution)
        return {key: jax.make_array_from_process_local_data(self.data_sharding, value) for key, value in batch.items()}

    def evaluate(self, params, split: str) -> tuple[dict[str, float], np.ndarray]:
        """Metrics over `config.num_eval_examples` examples of `split`, and a picture of the first batch."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        predictions, targets, picture = [], [], None
        for batch in input_pipeline.eval_batches(self.config, split, jax.process_index(), jax.process_count()):
            global_batch = self.shard(batch)
            # every process gets the whole global batch and its outputs (numpy)
            result, batch = multihost_utils.process_allgather((self.eval_step(params, global_batch), global_batch),
                                                              tiled=True)
            outputs = result.pop("outputs")
            for name, value in result.items():
                value = np.asarray(value, np.float64).ravel()
                valid = value[np.isfinite(value)]  # FG-ARI is undefined for images without foreground
                sums[name] = sums.get(name, 0.0) + valid.sum()
                counts[name] = counts.get(name, 0) + valid.size
            if self.config.task == "set_prediction":
                predictions.append(outputs["predictions"])
                targets.append(batch["target"])
            if picture is None:
                picture = self.picture(batch, outputs)
        results = {name: sums[name] / max(counts[name], 1) for name in sums}
        if predictions:
            results.update(metrics.average_precision_at_thresholds(np.concatenate(predictions), np.concatenate(targets)))
        return results, picture

    def picture(self, batch: dict, outputs: dict) -> np.ndarray:
        if self.config.task == "discovery":
            return visualize.discovery_grid(batch["image"], outputs["reconstruction"], outputs["masks"],
                                            outputs["slot_reconstructions"])
        return visualize.set_prediction_grid(batch["image"], outputs["predictions"], batch["target"])


class Logger:
    """Metrics to `metrics.jsonl` and TensorBoard, pictures to `images/` (on process 0 only)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        if self.active:
            from flax.metrics import tensorboard

            self.writer = tensorboard.SummaryWriter(workdir)

    def scalars(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        values = {name: float(value) for name, value in values.items()}
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as file:
            file.write(json.dumps({"step": step, "split": split, "wall_time": time.time(), **values}) + "\n")
        for name, value in values.items():
            self.writer.scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def picture(self, step: int, split: str, picture: np.ndarray) -> str | None:
        if not self.active:
            return None
        path = os.path.join(self.workdir, "images", f"{split}_step_{step:07d}.png")
        visualize.save_png(picture, path)
        self.writer.image(f"{split}/examples", picture, step)
        return path


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_checkpoints_to_keep if config else None, create=True,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict) -> None:
    step = int(state.step)
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()


def config_from_checkpoint(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with."""
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ml_collections.ConfigDict(saved)


def restore_checkpoint(manager: ocp.CheckpointManager, target: TrainState, config, step: int | None = None):
    """Restores the latest (or given) checkpoint into the shape and sharding of `target`; refuses another model's."""
    step = manager.latest_step() if step is None else step
    saved_config = config_from_checkpoint(manager, step)
    differing = {name: (saved_config.get(name), config.get(name)) for name in MODEL_FIELDS
                 if saved_config.get(name) != config.get(name)}
    if differing:
        details = ", ".join(f"{name}: checkpoint {saved!r} vs now {now!r}" for name, (saved, now) in differing.items())
        raise TrainingError(
            f"The checkpoint at step {step} in {manager.directory} belongs to another model ({details}). "
            "Use the configuration it was trained with, or another --workdir."
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Trains `config.num_train_steps` steps (resuming from `workdir`), evaluating every `eval_every`."""
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config)
    devices = trainer.mesh.devices.ravel()
    print_fn(f"data-parallel over {len(devices)} {devices[0].platform.upper()} device(s), "
             f"{config.batch_size // len(devices)} examples each")
    logger = Logger(workdir)
    manager = checkpoint_manager(workdir, config)
    state = trainer.initial_state()
    if manager.latest_step() is not None:
        state = restore_checkpoint(manager, state, config)
        print_fn(f"Resuming from the checkpoint at step {int(state.step)} in {workdir}.")
    start_step = int(state.step)
    batches = input_pipeline.train_batches(config, start_step, jax.process_index(), jax.process_count())
    last_eval: dict[str, float] = {}
    timer_start, timer_step = None, start_step
    evaluated = False
    with _StopRequest() as stop:
        for step in range(start_step, config.num_train_steps):
            state, step_metrics = trainer.train_step(state, trainer.shard(next(batches)))
            done = step + 1  # steps are numbered from 1, as in metrics.jsonl and the checkpoints
            if not bool(step_metrics["finite"]):
                message = f"The loss is not finite at step {done} ({float(step_metrics['loss'])})."
                if config.nonfinite_loss == "skip":
                    print_fn(message + " Skipped that batch (nonfinite_loss='skip').")
                else:
                    raise TrainingError(
                        message + f" Stopped; the last good checkpoint is step {manager.latest_step()}. "
                        "Lower the learning rate, or set --config.nonfinite_loss=skip to skip such batches."
                    )
            if timer_start is None:  # the first step compiled; time from here
                timer_start, timer_step = time.perf_counter(), done
            if done % config.log_every == 0 or done == config.num_train_steps:
                elapsed = time.perf_counter() - timer_start
                steps_per_second = (done - timer_step) / elapsed if elapsed > 0 and done > timer_step else 0.0
                eta = (config.num_train_steps - done) / steps_per_second if steps_per_second else float("nan")
                loss = float(step_metrics["loss"])
                print_fn(f"step {done}/{config.num_train_steps}  loss {loss:.5f}  {steps_per_second:.2f} steps/s  "
                         f"ETA {_duration(eta)}")
                logger.scalars(done, "train", {"loss": loss, "learning_rate": step_metrics["learning_rate"],
                                               "steps_per_second": steps_per_second})
            if done % config.checkpoint_every == 0 or done == config.num_train_steps or stop.signal_name:
                save_checkpoint(manager, state, config)
            # the first evaluation also comes after `first_eval_seconds` of training, so a short run leaves a picture
            # (one process only: the processes of a multi-host run would disagree on the clock)
            first_due = (not evaluated and jax.process_count() == 1
                         and time.perf_counter() - timer_start >= config.get("first_eval_seconds", 0) > 0)
            if done % config.eval_every == 0 or done == config.num_train_steps or first_due:
                last_eval = evaluate_and_log(trainer, state.params, done, "validation", logger, print_fn)
                evaluated = True
            if stop.signal_name:
                print_fn(f"Received {stop.signal_name}: saved the checkpoint at step {done}; "
                         "run the same command to resume.")
                break
    manager.close()
    return last_eval


def evaluate_and_log(trainer: Trainer, params, step: int, split: str, logger: Logger,
                     print_fn: Callable[[str], None] = print) -> dict[str, float]:
    results, picture = trainer.evaluate(params, split)
    logger.scalars(step, split, results)
    path = logger.picture(step, split, picture)
    print_fn(f"eval {split} at step {step}: " + "  ".join(f"{name} {value:.4f}" for name, value in results.items())
             + (f"  (pictures: {path})" if path else ""))
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = "validation",
                        print_fn: Callable[[str], None] = print) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir` on `split`, logging metrics and pictures there."""
    manager = checkpoint_manager(workdir)
    if manager.latest_step() is None:
        raise TrainingError(f"No checkpoint in {os.path.join(workdir, 'checkpoints')}: train first with the same --workdir.")
    trainer = Trainer(config)
    state = restore_checkpoint(manager, trainer.initial_state(), config)
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
