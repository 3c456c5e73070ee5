"""How far float32 training drifts from float64 training, in slotjax and in torch_reference.

    python benchmarks/precision.py [--steps 100] [--batch-size 4] [--resolution 16]
        [--tasks discovery set_prediction] [--adam-epsilon keras|optax] [--seed 0]

Each task's model at its CPU preset (at 16x16 and batch 4 by default: float64 convolutions are slow on a CPU)
trains from the same weights, on the same batches of the embedded scenes and the same initial-slot noise, with
the preset's optimiser (the paper's Adam, gradients clipped to norm 1): in float64 (JAX with `jax_enable_x64`,
the reference kernel forms; torch in double) and in float32 (slotjax with its CPU kernel forms and with the
reference forms, `slotjax.kernels.use_forms`; torch). Each float32 row gives the run's relative distance from
its own framework's float64 run, ||p32 - p64|| / ||p64|| over all parameters, after steps 1, 2, 5, 10, 20, 50
and 100 (step 1 trains at learning rate 0); "slotjax / torch" is the ratio of the two frameworks' distances.
Two float64 rows follow: the distance that the other placement of Adam's epsilon makes (docs/parity.md), and
the two frameworks' float64 runs from each other, which checks that both compute the same function in float64.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import slotjax
import torch_reference
from slotjax import configs, kernels
from slotjax.convert import flax_to_torch
from slotjax.data import pipeline
from slotjax.train import losses
from slotjax.train.optim import make_optimizer
from torch_reference.train import losses as torch_losses
from torch_reference.train.optim import make_optimizer as make_torch_optimizer

REPORTED_STEPS = (1, 2, 5, 10, 20, 50, 100)
MODELS = {"discovery": "SlotAutoencoder", "set_prediction": "SetPredictor"}  # the same in both frameworks
MODEL_ARGUMENTS = ("resolution", "num_slots", "num_iterations", "slot_size", "encoder_features", "mlp_hidden_size")
Snapshots = dict[int, dict[str, np.ndarray]]  # step -> parameters (torch names) after it, in float64


def fields(config, *names: str) -> dict:
    """The config's values of `names`, by name."""
    return {name: config[name] for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (distances at the reported ones)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (the CPU presets: 16, 32)")
    parser.add_argument("--resolution", type=int, default=16, help="image side (the CPU presets: 32)")
    parser.add_argument("--tasks", nargs="+", default=["discovery", "set_prediction"], choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0, help="initial weights and slot noise (the scenes stay the same)")
    parser.add_argument(
        "--adam-epsilon", default="keras", choices=["keras", "optax"], help="where Adam adds eps (docs/parity.md)"
    )
    return parser


class Task:
    """What both frameworks and both precisions share: a task's configuration, initial model, batches and
    initial-slot noise."""

    def __init__(self, task: str, num_steps: int, batch_size: int, resolution: int, adam_epsilon: str, seed: int):
        self.config = config = configs.get_config(task, "cpu")
        config.update(batch_size=batch_size, resolution=resolution, adam_epsilon=adam_epsilon, seed=seed)
        self.model_class = MODELS[task]
        head = "decoder_features" if task == "discovery" else "head_hidden_size"
        self.model_arguments = fields(config, *MODEL_ARGUMENTS, head)
        model = getattr(slotjax, self.model_class)(**self.model_arguments, rngs=nnx.Rngs(config.seed))
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        batches = pipeline.train_batches(config, 0)
        self.batches = []
        for _ in range(num_steps):  # a model with K slots is matched against the first K rows (train.step)
            batch = next(batches)
            self.batches.append({"image": batch["image"], "target": batch["target"][:, : config.num_slots]})
        rng = np.random.default_rng(seed)
        self.noise = [rng.normal(size=(batch_size, config.num_slots, config.slot_size)) for _ in range(num_steps)]
        self.optimizer = fields(config, "learning_rate", "warmup_steps", "decay_steps", "decay_rate", "adam_epsilon")


def jax_run(task: Task, dtype, forms: str, adam_epsilon: str | None = None) -> Snapshots:
    """slotjax's training in `dtype` with the kernels in `forms` ("cpu" or "reference"); `adam_epsilon`
    overrides the config's placement of Adam's epsilon."""
    config, graphdef, rest = task.config, task.graphdef, task.rest
    settings = task.optimizer | ({"adam_epsilon": adam_epsilon} if adam_epsilon else {})
    optimizer = make_optimizer(**settings, grad_clip_norm=config.grad_clip_norm)

    def loss(params, batch, noise):
        model = nnx.merge(graphdef, params, rest, copy=True)
        slot_attention = model.encoder.slot_attention
        initial_slots = slot_attention.slots_mu[...] + jnp.exp(slot_attention.slots_log_sigma[...]) * noise
        outputs = model(batch["image"], initial_slots=initial_slots)
        if config.task == "discovery":
            return losses.mse_loss(outputs["reconstruction"], batch["image"])
        return losses.hungarian_huber_loss(outputs["predictions"], batch["target"])

    @jax.jit
    def train_step(params, opt_state, batch, noise):
        updates, opt_state = optimizer.update(jax.grad(loss)(params, batch, noise), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    snapshots = {}
    with jax.enable_x64(dtype == jnp.float64), kernels.use_forms(forms):
        params = jax.tree.map(lambda value: jnp.asarray(value, dtype), task.params)
        opt_state = optimizer.init(params)
        for step, (batch, noise) in enumerate(zip(task.batches, task.noise), 1):
            batch = {key: jnp.asarray(value, dtype) for key, value in batch.items()}
            params, opt_state = train_step(params, opt_state, batch, jnp.asarray(noise, dtype))
            if step in REPORTED_STEPS:
                weights = flax_to_torch(nnx.merge(graphdef, params, rest, copy=True))
                snapshots[step] = {name: np.array(value, np.float64) for name, value in weights.items()}
    return snapshots


def torch_run(task: Task, dtype: torch.dtype) -> Snapshots:
    """torch_reference's training in `dtype`, with the same gradient clipping as optax's. The model is built
    with `dtype` as torch's default, so that its constants (the position grids) are computed in it too."""
    config = task.config
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = getattr(torch_reference, task.model_class)(**task.model_arguments)
    finally:
        torch.set_default_dtype(default_dtype)
    weights = flax_to_torch(nnx.merge(task.graphdef, task.params, task.rest, copy=True))
    model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})  # cast to `dtype`
    optimizer, scheduler = make_torch_optimizer(model.parameters(), **task.optimizer)
    snapshots = {}
    for step, (batch, noise) in enumerate(zip(task.batches, task.noise), 1):
        images = torch.from_numpy(batch["image"]).to(dtype).permute(0, 3, 1, 2)
        slot_attention = model.encoder.slot_attention
        noise = torch.from_numpy(noise).to(dtype)
        initial_slots = slot_attention.slots_mu + torch.exp(slot_attention.slots_log_sigma) * noise
        outputs = model(images, initial_slots=initial_slots)
        if config.task == "discovery":
            loss = torch_losses.mse_loss(outputs["reconstruction"], images)
        else:
            targets = torch.from_numpy(batch["target"]).to(dtype)
            loss = torch_losses.hungarian_huber_loss(outputs["predictions"], targets)
        optimizer.zero_grad()
        loss.backward()
        clip_by_global_norm(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        if step in REPORTED_STEPS:
            snapshots[step] = {
                key: value.detach().numpy().astype(np.float64) for key, value in model.state_dict().items()
            }
    return snapshots


@torch.no_grad()
def clip_by_global_norm(parameters, max_norm: float) -> None:
    """optax.clip_by_global_norm on the gradients: g / ||g|| * max_norm where ||g|| > max_norm (0: no clipping)."""
    grads = [parameter.grad for parameter in parameters]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad) for grad in grads]))
    if max_norm and norm > max_norm:
        for grad in grads:
            grad.div_(norm).mul_(max_norm)


def distance(run: Snapshots, reference: Snapshots, step: int) -> float:
    """||run - reference|| / ||reference|| over all parameters after `step`."""
    names = sorted(reference[step])
    difference = sum(np.sum(np.square(run[step][name] - reference[step][name])) for name in names)
    return float(np.sqrt(difference / sum(np.sum(np.square(reference[step][name])) for name in names)))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    reported = [step for step in REPORTED_STEPS if step <= args.steps]
    print(f"{'task':15} {'run':44}" + "".join(f"{step:>9}" for step in reported), flush=True)
    for name in args.tasks:
        task = Task(name, args.steps, args.batch_size, args.resolution, args.adam_epsilon, args.seed)
        jax_float64, torch_float64 = jax_run(task, jnp.float64, "reference"), torch_run(task, torch.float64)

        def print_row(label: str, values: list[float], ratio: bool = False) -> None:
            cells = "".join(f"{value:9.2f}" if ratio else f"{value:9.1e}" for value in values)
            print(f"{name:15} {label:44}{cells}", flush=True)

        torch_line = [distance(torch_run(task, torch.float32), torch_float64, step) for step in reported]
        print_row("torch_reference float32", torch_line)
        for forms in ("cpu", "reference"):
            jax_line = [distance(jax_run(task, jnp.float32, forms), jax_float64, step) for step in reported]
            print_row(f"slotjax float32, {forms} forms", jax_line)
            # nan where neither moved from float64 (step 1: the learning rate is 0)
            print_row("  slotjax / torch", [a / b if b else np.nan for a, b in zip(jax_line, torch_line)], True)
        other = "optax" if args.adam_epsilon == "keras" else "keras"
        other_epsilon = jax_run(task, jnp.float64, "reference", adam_epsilon=other)
        print_row(f"float64, {other}'s Adam epsilon", [distance(other_epsilon, jax_float64, s) for s in reported])
        print_row("float64, slotjax from torch_reference", [distance(jax_float64, torch_float64, s) for s in reported])


if __name__ == "__main__":
    main()
