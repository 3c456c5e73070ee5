"""Splitting a CPU into one data-parallel device per core (slotjax.cpu_devices), as train.py does."""

import os
import subprocess
import sys

import pytest

from slotjax import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "batch_sizes, cores, expected",
    [
        ([16, 64], 2, 2),
        ([16, 64], 12, 8),
        ([16, 64], 3, 2),
        ([16, 64], 1, 1),
        ([7, 64], 4, 1),
        ([6, 9], 8, 3),
    ],
)
def test_device_count_is_the_most_devices_dividing_every_batch(batch_sizes, cores, expected):
    assert cpu_devices.device_count(batch_sizes, cores) == expected


def run_python(code: str, xla_flags: str | None = None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


SPLIT_THEN_COUNT = (
    "from slotjax import cpu_devices; count = cpu_devices.split_host({count}); import jax; "
    "print(count, jax.device_count(), jax.devices()[-1].platform)"
)


def test_split_host_gives_jax_that_many_cpu_devices():
    result = run_python(SPLIT_THEN_COUNT.format(count=3), xla_flags="--xla_cpu_multi_thread_eigen=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "3", "cpu"]


def test_a_device_count_in_xla_flags_wins():
    result = run_python(SPLIT_THEN_COUNT.format(count=3), xla_flags="--xla_force_host_platform_device_count=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "2", "cpu"]


def test_split_host_refuses_after_jax_started_and_counts_below_one():
    result = run_python(
        "import jax; jax.numpy.ones(1); from slotjax import cpu_devices\n"
        "try:\n    cpu_devices.split_host(2)\nexcept RuntimeError as error:\n    print(error)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already started" in result.stdout
    with pytest.raises(ValueError, match="cpu_devices must be >= 1"):
        cpu_devices.split_host(0)
