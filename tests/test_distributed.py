"""Data parallelism: 8 devices and 2 processes give single-device training's losses and parameters."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def run_workers(tmp_path, name, num_devices, device_count, num_processes=1, timeout=300):
    """Starts the worker processes (8 forced CPU devices each, or `device_count`), kills them on timeout."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={device_count}", "JAX_PLATFORMS": "cpu"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outputs, processes = [], []
    for process_id in range(num_processes):
        output = tmp_path / f"{name}_{process_id}.npz"
        extra = [f"127.0.0.1:{port}", str(num_processes), str(process_id)] if num_processes > 1 else []
        command = [sys.executable, WORKER, str(output), str(tmp_path / name), str(num_devices), *extra]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs.append(output)
    try:
        for process in processes:
            log = process.communicate(timeout=timeout)[0].decode()
            assert process.returncode == 0, log[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [dict(np.load(output)) for output in outputs]


def assert_same_training(result, reference):
    """Losses within 1e-5 relative, and all parameters together within 1e-5 relative.

    (All together: two parameters have a gradient that is zero in exact
    arithmetic, the alpha-logit bias and norm_slots.bias, which both shift all
    slots alike under a softmax over slots; Adam turns their rounding noise into
    steps of about lr, different for any other order of summation.)
    """
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    names = sorted(name for name in reference if name.isdigit())
    assert names
    ours = np.concatenate([result[name].ravel() for name in names])
    theirs = np.concatenate([reference[name].ravel() for name in names])
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5


@pytest.mark.slow
def test_eight_devices_train_like_one(tmp_path):
    (single,) = run_workers(tmp_path, "one", num_devices=1, device_count=8)
    (eight,) = run_workers(tmp_path, "eight", num_devices=0, device_count=8)
    assert int(eight["device_count"]) == 8 and len(single["losses"]) == 4
    assert_same_training(eight, single)
    # the single-device checkpoint restores on 8 devices, unchanged
    (restored,) = run_workers(tmp_path, "one", num_devices=0, device_count=8)
    for name in single:
        if name.isdigit():
            np.testing.assert_array_equal(restored[name], single[name])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    (single,) = run_workers(tmp_path, "single", num_devices=0, device_count=2)
    first, second = run_workers(tmp_path, "pair", num_devices=0, device_count=1, num_processes=2)
    assert int(first["device_count"]) == 2
    assert_same_training(first, single)
    for name in single:
        if name.isdigit():
            np.testing.assert_array_equal(first[name], second[name])  # both processes hold the same parameters
