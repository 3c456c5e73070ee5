"""Data parallelism over the cores of a CPU: one JAX CPU device per core, the batch split between them.

XLA's CPU client runs a program on one device with a pool of threads, but the YNNPACK kernels that compute
most of a Slot Attention step (its convolutions and matrix products) run on one thread. Split into devices,
the trainer's data-parallel mesh (the same one that spans GPUs) runs one shard of the batch per core side by
side: the same function, only the order of the sums over the batch differs.

JAX reads the device count when it starts its CPU client, so `split_host` runs before that (train.py calls it
after parsing its flags, before the first computation). It only touches the CPU platform: on a machine with
GPUs or TPUs, JAX's devices are still the accelerators.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

XLA_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_count(batch_sizes: Sequence[int], cores: int | None = None) -> int:
    """The most devices, at most one per core, that divide every batch size (1 if none does)."""
    cores = usable_cores() if cores is None else cores
    return max(count for count in range(1, max(cores, 1) + 1) if all(size % count == 0 for size in batch_sizes))


def fewer_devices_note(batch_sizes: dict[str, int], cores: int | None = None) -> str | None:
    """One line saying why `device_count` leaves cores without a device ({name: batch size}), or None."""
    cores = usable_cores() if cores is None else cores
    count = device_count(list(batch_sizes.values()), cores)
    if count >= cores:
        return None
    sizes = " and ".join(f"{name}={size}" for name, size in batch_sizes.items())
    return (
        f"{sizes} do not split evenly over the {cores} cores: data-parallel over {count} CPU device(s), the most "
        f"that divide them; batch sizes divisible by {cores} use every core."
    )


def split_host(count: int) -> int:
    """Asks JAX for `count` CPU devices (its option `jax_num_cpu_devices`); returns the count in effect.

    A count already given in $XLA_FLAGS wins (it is returned). Raises if JAX has already started its CPU client,
    where the setting could no longer take effect.
    """
    if count < 1:
        raise ValueError(f"cpu_devices must be >= 1 (or 0: one per core), got {count}.")
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith(XLA_FLAG + "="):
            return int(flag.split("=", 1)[1])
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:  # JAX's own message says why; ours says what to do
        raise RuntimeError(
            "JAX has already started its devices: split the CPU before JAX's first computation."
        ) from error
    return count
