"""Step time of slotjax against torch_reference: same configuration, same machine, one run.

    python benchmarks/step_time.py [--repeats 5] [--threads N] [--only NAME ...]
        [--official] [--batch-size B] [--peak-tflops T] [--gpu-float32] [--cpu-devices N]
        [--json PATH]

Rows: the Slot Attention module alone (batch 64, 1024 inputs of size 64, 7
slots of size 64, 3 iterations) and both task models (CPU presets, or the
official 128x128 configurations with --official, batch 64), each as a forward
pass and as a full training step (forward, backward w.r.t. the parameters,
Adam update). `--only discovery` runs the rows whose name starts with it.

JAX: the training step is the trainer's own (`slotjax.train.step.train_step`, the
task's loss; for the module alone, the mean square of the slots), `jax.jit`-ed
with the state donated. PyTorch: eager, and `torch.compile` of the model (the loss and Adam
stay eager; the set-prediction loss solves the matching with scipy on the
host). Compilation and warm-up are excluded from the step times; the JAX
compile time (lower + compile) and the torch.compile time (its two warm-up
calls, compilation included; inductor caches compiled graphs on disk, so a
second run of the script compiles faster) are reported on their own. Times
are medians of --repeats steps, taken in turns (JAX, eager, compiled; three
timed steps after an untimed one, `time_side_by_side`): on a shared machine
the speed drifts within minutes, and alternating shows both frameworks the
same drift. "JAX / eager" is the median over rounds of the ratio of the two
turns' medians. On GPU the table adds
JAX images/s and the share of --peak-tflops that the step's FLOPs reach
(`slotjax.flops.count_flops`: the products and convolutions of the traced step
in the kernels' reference forms, the ones a GPU runs; XLA's cost analysis of
the compiled step misses cuDNN's and cuBLAS's work).

Precision on a GPU: both frameworks get the same arithmetic. By default float32
matrix products and convolutions may use TF32 tensor cores in both (XLA's
default; PyTorch allows it for cuDNN convolutions by default and is told to
allow it for matrix products too); `--gpu-float32` makes both multiply in full
float32 (`jax_default_matmul_precision="highest"`, PyTorch's TF32 switches off).

Threads: torch.set_num_threads(N) for PyTorch; for XLA, PJRT_NPROC=N sizes
the CPU client's intra-op (Eigen) thread pool. The flag once spelled
`intra_op_parallelism_threads` is not an XLA flag (XLA_FLAGS rejects it), so
XLA_FLAGS only gets `--xla_cpu_multi_thread_eigen=true` (the default). Like
train.py, JAX on a CPU runs data-parallel over one device per thread
(`slotjax.cpu_devices`: XLA's YNNPACK kernels use one thread per device), the
batch sharded between them; `--cpu-devices 1` keeps one device.

Memory: glibc's allocator settings come from the environment and apply to both
frameworks (`make bench` sets GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as
`make run` does; the README explains why).
"""

from __future__ import annotations

import argparse
import os


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads for both frameworks (default: all cores this process may use)",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only rows whose name starts with NAME")
    parser.add_argument(
        "--official", action="store_true", help="official 128x128 configurations of both tasks (meant for a GPU)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="batch size of the task models (default: the CPU preset's, or 64 with --official)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the accelerator's peak TFLOP/s, for the FLOP/s share on GPU (e.g. H100 SXM: 67 float32, 495 TF32 dense)",
    )
    parser.add_argument(
        "--gpu-float32",
        action="store_true",
        help="on a GPU, full float32 products in both frameworks (default: TF32 in both)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="JAX on a CPU: data-parallel over this many devices (default: one per thread, as many "
        "as divide the batch sizes; 1: one multi-threaded device, XLA's default)",
    )
    return parser


ARGS = build_parser().parse_args() if __name__ == "__main__" else build_parser().parse_args([])
from slotjax import cpu_devices  # noqa: E402

# Before jax starts its CPU client: the batches of the rows (module 64, task models' batch) divide among the devices.
CPU_DEVICES = cpu_devices.split_host(
    ARGS.cpu_devices or cpu_devices.device_count([64, ARGS.batch_size or 16], ARGS.threads)
)
# Before jax is imported: the size of XLA's CPU thread pool is read when the client starts.
os.environ["PJRT_NPROC"] = str(ARGS.threads)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import slotjax  # noqa: E402
import torch_reference  # noqa: E402
import torch_reference.train.losses  # noqa: E402
import torch_reference.train.optim  # noqa: E402
from slotjax import configs, kernels  # noqa: E402
from slotjax.convert import flax_to_torch  # noqa: E402
from slotjax.data.encoding import MAX_OBJECTS, OBJECT_SIZE  # noqa: E402
from slotjax.flops import count_flops  # noqa: E402
from slotjax.tasks import task_of  # noqa: E402
from slotjax.train import optim, trainer  # noqa: E402
from slotjax.train import step as steps  # noqa: E402

torch.set_num_threads(ARGS.threads)
TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The same arithmetic in both frameworks on a GPU (no effect on a CPU): TF32 tensor cores, or full float32.
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not ARGS.gpu_float32
if ARGS.gpu_float32:
    jax.config.update("jax_default_matmul_precision", "highest")
# The Slot Attention module alone at the paper's sizes (1,024 inputs: a 32x32 map), and the official optimiser.
PROBE = dict(batch_size=64, num_inputs=1024, input_size=64, num_slots=7, slot_size=64, num_iterations=3)
ADAM = dict(learning_rate=4e-4, warmup_steps=10_000, decay_steps=100_000)


@dataclass
class Workload:
    """One model in both frameworks, with the same weights, batch and loss."""

    name: str
    jax_model: nnx.Module
    torch_model: torch.nn.Module
    batch: dict[str, np.ndarray]  # JAX layout; "image" (task models) or "inputs" (the module) is the model's input
    jax_loss: Callable  # (model, batch, key, step) -> scalar, as StepDef.loss
    torch_loss: Callable[[Any, dict], torch.Tensor]  # (outputs, batch) -> scalar
    optimizer: dict  # make_optimizer's arguments

    @property
    def input_name(self) -> str:
        return "image" if "image" in self.batch else "inputs"

    @property
    def batch_size(self) -> int:
        return len(self.batch[self.input_name])

    def torch_batch(self) -> dict[str, torch.Tensor]:
        def convert(name, value):
            if name == "image":  # NHWC -> NCHW
                value = value.transpose(0, 3, 1, 2)
            return torch.from_numpy(np.ascontiguousarray(value)).to(TORCH_DEVICE)

        return {name: convert(name, value) for name, value in self.batch.items()}


def twin(jax_model: nnx.Module, torch_model: torch.nn.Module) -> torch.nn.Module:
    """The torch model with the JAX model's weights (load_state_dict also checks the configurations agree)."""
    torch_model.load_state_dict({name: torch.from_numpy(value) for name, value in flax_to_torch(jax_model).items()})
    return torch_model.to(TORCH_DEVICE)


def slot_attention_workload(official: bool, batch_size: int | None) -> Workload:
    """The module alone (the probe size either way); loss: mean square of the slots."""
    p = PROBE
    jax_model = slotjax.SlotAttention(
        p["num_slots"], p["slot_size"], input_size=p["input_size"], num_iterations=p["num_iterations"], rngs=nnx.Rngs(0)
    )
    torch_model = torch_reference.SlotAttention(
        p["num_slots"], p["slot_size"], input_size=p["input_size"], num_iterations=p["num_iterations"]
    )
    inputs = np.random.default_rng(0).normal(size=(p["batch_size"], p["num_inputs"], p["input_size"]))
    return Workload(
        "slot_attention",
        jax_model,
        twin(jax_model, torch_model),
        {"inputs": inputs.astype(np.float32)},
        jax_loss=lambda model, batch, key, step: jnp.mean(jnp.square(model(batch["inputs"], key=key))),
        torch_loss=lambda slots, batch: torch.mean(torch.square(slots)),
        optimizer=ADAM,
    )


def task_workload(task: str, official: bool, batch_size: int | None) -> Workload:
    """A task model at its CPU preset (or official configuration) with its training loss."""
    config = configs.get_config(task, "official" if official else "cpu")
    batch_size = batch_size or (64 if official else config.batch_size)
    task_record = task_of(config)
    jax_model = steps.build_model(config)
    torch_class = getattr(torch_reference, task_record.torch_model)
    torch_model = twin(jax_model, torch_class(**task_record.model_arguments(config)))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (batch_size, config.resolution, config.resolution, 3)).astype(np.float32)}
    if task == "discovery":
        torch_loss = lambda outputs, batch: torch_reference.train.losses.mse_loss(  # noqa: E731
            outputs["reconstruction"], batch["image"]
        )
    else:
        batch["target"] = rng.uniform(0, 1, (batch_size, MAX_OBJECTS, OBJECT_SIZE)).astype(np.float32)
        torch_loss = lambda outputs, batch: torch_reference.train.losses.hungarian_huber_loss(  # noqa: E731
            outputs["predictions"], batch["target"]
        )
    jax_loss = functools.partial(steps.training_loss, task_record, config)  # the trainer's own
    optimizer = dict(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps,
        decay_rate=config.decay_rate,
    )
    return Workload(task, jax_model, torch_model, batch, jax_loss, torch_loss, optimizer)


WORKLOADS = {
    "slot_attention": slot_attention_workload,
    "discovery": lambda official, batch_size: task_workload("discovery", official, batch_size),
    "set_prediction": lambda official, batch_size: task_workload("set_prediction", official, batch_size),
}


# ---------------------------------------------------------------------------------------------- JAX


def jax_mesh() -> Mesh:
    """The devices JAX runs on: the CPU_DEVICES of a CPU (data-parallel, as in train.py), or one accelerator."""
    return trainer.make_mesh(CPU_DEVICES if jax.default_backend() == "cpu" else 1)


def prepare_jax(step: Callable, state, batch) -> tuple[Callable[[], None], dict[str, float]]:
    """`step(state, batch) -> (state, output)` compiled with the state donated, and warmed up.

    Returns a function running one step (the state carried from step to step) and the compile seconds and
    FLOPs. The state is replicated over `jax_mesh()`, the batch split along its first axis.
    """
    mesh = jax_mesh()
    state = jax.device_put(jax.tree.map(jnp.copy, state), NamedSharding(mesh, PartitionSpec()))  # donated below
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):  # as the trainer: the kernels see how the batch is split
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        with kernels.use_forms("reference"):  # the forms a GPU runs
            flops = count_flops(step, state, batch)
    carried = [jax.block_until_ready(compiled(state, batch))[0]]  # warm-up

    def run_step():
        carried[0] = jax.block_until_ready(compiled(carried[0], batch))[0]

    return run_step, {"jax_compile_s": compile_s, "flops": flops}


def jax_forward(workload: Workload) -> tuple[Callable[[], None], dict[str, float]]:
    graphdef, params, rest = nnx.split(workload.jax_model, nnx.Param, ...)

    def step(params, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return params, model(batch[workload.input_name], key=jax.random.key(0))

    return prepare_jax(step, params, workload.batch)


def jax_train(workload: Workload) -> tuple[Callable[[], None], dict[str, float]]:
    """The trainer's training step (`slotjax.train.step.train_step`) with the workload's loss."""
    graphdef, params, rest = nnx.split(workload.jax_model, nnx.Param, ...)
    optimizer = optim.make_optimizer(**workload.optimizer)
    step_def = steps.StepDef(
        graphdef, rest, workload.jax_loss, optimizer, optim.learning_rate_schedule(**workload.optimizer)
    )
    state = steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    return prepare_jax(functools.partial(steps.train_step, step_def), state, workload.batch)


# ------------------------------------------------------------------------------------------ PyTorch


def _synchronize() -> None:
    if TORCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()


def prepare_torch(step: Callable[[], Any], warmup: int = 2) -> tuple[Callable[[], None], float]:
    """`step` made synchronous, after `warmup` calls, and the seconds those calls took (compilation included)."""

    def run_step():
        step()
        _synchronize()

    start = time.perf_counter()
    for _ in range(warmup):
        run_step()
    return run_step, time.perf_counter() - start


def time_side_by_side(
    steps: dict[str, Callable[[], None]], repeats: int, turn: int = 3
) -> dict[str, list[list[float]]]:
    """Each step's seconds, turn by turn: in a round, each step in turn runs once untimed and then `turn`
    times timed, the order rotating from round to round, until `repeats` steps of each are timed.

    The turns alternate so that both frameworks see the same machine: on a shared VM a step's time drifts
    by 10-30% within minutes, which timing one framework after the other reads as a difference. The first
    step of a turn is not timed: right after the other framework's step, JAX's ran 7-13% slower (PyTorch's
    up to 4%), which a training loop, running one framework's steps back to back, does not pay.
    """
    turns: dict[str, list[list[float]]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(math.ceil(repeats / turn)):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            steps[name]()  # right after another step
            times = []
            for _ in range(turn):
                start = time.perf_counter()
                steps[name]()
                times.append(time.perf_counter() - start)
            turns[name].append(times)
    return turns


def torch_forward_step(workload: Workload, model: Callable) -> Callable[[], Any]:
    batch = workload.torch_batch()

    @torch.no_grad()
    def step():
        return model(batch[workload.input_name])

    return step


def torch_train_step(workload: Workload, model: Callable) -> Callable[[], Any]:
    batch = workload.torch_batch()
    optimizer, scheduler = torch_reference.train.optim.make_optimizer(
        workload.torch_model.parameters(), **workload.optimizer
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = workload.torch_loss(model(batch[workload.input_name]), batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    return step


def timed_row(workload: Workload, jax_step: Callable, make_torch_step: Callable, args) -> dict[str, Any]:
    """JAX, PyTorch eager and torch.compile of the model ("n/a" and the reason where it fails), side by side."""
    run_jax, row = jax_step(workload)
    steps = {"jax_ms": run_jax, "torch_ms": prepare_torch(make_torch_step(workload, workload.torch_model))[0]}
    row["torch_compile_ms"] = None
    if not args.no_compile:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(workload.torch_model)
            steps["torch_compile_ms"], row["torch_compile_s"] = prepare_torch(make_torch_step(workload, compiled))
        except Exception as error:  # noqa: BLE001 - any failure of torch.compile is reported, not fatal
            row["torch_compile_note"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    turns = time_side_by_side(steps, args.repeats)
    for name, times in turns.items():
        row[name] = 1e3 * statistics.median([seconds for turn in times for seconds in turn][: args.repeats])
    # round by round, so that drift cancels: the median of the ratios of the two turns' medians
    row["ratio_jax_over_torch"] = statistics.median(
        statistics.median(jax_turn) / statistics.median(torch_turn)
        for jax_turn, torch_turn in zip(turns["jax_ms"], turns["torch_ms"])
    )
    return row


# --------------------------------------------------------------------------------------------- Rows


STEPS = {"forward": (jax_forward, torch_forward_step), "train_step": (jax_train, torch_train_step)}
ROWS = {f"{workload}/{mode}": (workload, steps) for workload in WORKLOADS for mode, steps in STEPS.items()}


def run(args: argparse.Namespace, report: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """The rows named by --only, each passed to `report` (with those before it) as soon as it is timed."""
    names = [name for name in ROWS if not args.only or any(name.startswith(prefix) for prefix in args.only)]
    if not names:
        raise SystemExit(f"--only {' '.join(args.only)} matches none of: {', '.join(ROWS)}")
    workloads: dict[str, Workload] = {}
    rows = []
    for name in names:
        workload_name, (jax_step, make_torch_step) = ROWS[name]
        if workload_name not in workloads:
            workloads[workload_name] = WORKLOADS[workload_name](args.official, args.batch_size)
        workload = workloads[workload_name]
        print(f"running {name} (batch {workload.batch_size}) ...", flush=True)
        row = {"name": name, "batch_size": workload.batch_size, **timed_row(workload, jax_step, make_torch_step, args)}
        row["jax_images_per_s"] = workload.batch_size / (row["jax_ms"] / 1e3)
        if args.peak_tflops:
            row["jax_flops_share"] = row["flops"] / (row["jax_ms"] / 1e3) / (args.peak_tflops * 1e12)
        rows.append(row)
        compiled = row["torch_compile_ms"]
        print(
            f"  JAX {row['jax_ms']:.1f} ms, eager {row['torch_ms']:.1f} ms, torch.compile "
            f"{'n/a' if compiled is None else f'{compiled:.1f} ms'}, JAX / eager {row['ratio_jax_over_torch']:.2f}",
            flush=True,
        )
        report(rows)
    return rows


def markdown_table(rows: list[dict[str, Any]], gpu: bool) -> str:
    def cell(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    columns = [
        ("name", "name", None),
        ("jax_ms", "JAX ms", 1),
        ("torch_ms", "PyTorch eager ms", 1),
        ("torch_compile_ms", "torch.compile ms", 1),
        ("ratio_jax_over_torch", "JAX / eager", 2),
        ("jax_compile_s", "JAX compile s", 1),
        ("torch_compile_s", "torch.compile s", 1),
    ]
    if gpu:
        columns += [("jax_images_per_s", "JAX images/s", 0), ("jax_flops_share", "share of peak FLOP/s", 3)]
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" if digits is None else "---:" for _, _, digits in columns) + "|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(row[key] if digits is None else cell(row.get(key), digits) for key, _, digits in columns)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    args = ARGS
    gpu = jax.default_backend() == "gpu"
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    devices = jax_mesh().devices.ravel()
    print(
        f"JAX {jax.__version__} (jaxlib {jaxlib.__version__}, {jax.default_backend()}: {len(devices)} x {devices[0]}), "
        f"Flax {flax.__version__}, torch {torch.__version__} ({TORCH_DEVICE}); CPU {cpu}, "
        f"{args.threads} threads; {'official' if args.official else 'CPU preset'} configurations; "
        f"{('float32' if args.gpu_float32 else 'TF32') + ' products; ' if gpu else ''}"
        f"median of {args.repeats}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
        flush=True,
    )

    def write_json(rows):  # after every row, whole or not at all: an interrupted run keeps the rows it timed
        if args.json:
            with open(args.json + ".tmp", "w") as file:
                json.dump(
                    {
                        "rows": rows,
                        "threads": args.threads,
                        "repeats": args.repeats,
                        "official": args.official,
                        "gpu_float32": args.gpu_float32,
                        "backend": jax.default_backend(),
                        "jax_devices": len(devices),
                        "cpu": cpu,
                        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                    },
                    file,
                    indent=2,
                )
            os.replace(args.json + ".tmp", args.json)

    rows = run(args, write_json)
    print()
    print(markdown_table(rows, gpu))
    for row in rows:
        if row.get("torch_compile_note"):
            print(f"\ntorch.compile n/a for {row['name']}: {row['torch_compile_note']}")
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
