"""Data parallelism over the cores of a CPU: one XLA CPU device per core, the batch split between them.

XLA's CPU client runs a program on one device with a pool of threads, but the YNNPACK kernels that compute
most of a Slot Attention step (its convolutions and matrix products) run on one thread: on 2 cores, the
discovery step took 278-311 ms with one device and 163-192 ms split over two devices, set prediction 92-121
against 57-70 ms (benchmarks/README.md, sixth session). Split into devices, the trainer's data-parallel
mesh (the same one that spans GPUs) runs one shard of the batch per core side by side: the same function,
only the order of the sums over the batch differs.

XLA reads the device count when JAX starts its CPU client, so `split_host` runs before that (train.py calls
it after parsing its flags, before it imports the trainer). It only touches the CPU platform: on a machine
with GPUs or TPUs, JAX's devices are still the accelerators.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_count(batch_sizes: Sequence[int], cores: int | None = None) -> int:
    """The most devices, at most one per core, that divide every batch size (1 if none does)."""
    cores = usable_cores() if cores is None else cores
    return max(count for count in range(1, max(cores, 1) + 1) if all(size % count == 0 for size in batch_sizes))


def split_host(count: int) -> int:
    """Asks XLA for `count` CPU devices; returns the count in effect.

    A count already in $XLA_FLAGS wins (it is returned). Raises if JAX has already started its CPU client,
    where the setting could no longer take effect.
    """
    if count < 1:
        raise ValueError(f"cpu_devices must be >= 1 (or 0: one per core), got {count}.")
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in flags:
        if flag.startswith(FLAG + "="):
            return int(flag.split("=", 1)[1])
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise RuntimeError("JAX has already started its devices: split the CPU before JAX's first computation.")
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{FLAG}={count}"])
    return count
