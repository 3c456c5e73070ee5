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


# Parameter entries whose gradient is zero in exact arithmetic, as (name, index): they shift every slot alike
# under a softmax over slots (the alpha-logit bias, channel 3 of the last decoder conv of the tiny model, and
# norm_slots.bias). Their gradients are rounding noise, which Adam turns into steps of up to about lr, different
# for any other order of summation (here: per-device partial sums).
ZERO_GRADIENT_ENTRIES = (("param.decoder_cnn.convs.2.bias", 3), ("param.encoder.slot_attention.norm_slots.bias", ...))


def assert_same_training(result, reference, num_steps=4, learning_rate=1e-3):
    """Losses within 1e-5 relative; all parameters but the zero-gradient entries together within 1e-5
    relative; those entries within Adam's largest total step (num_steps x lr)."""
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    names = sorted(name for name in reference if name.startswith("param."))
    assert {name for name, _ in ZERO_GRADIENT_ENTRIES} <= set(names), names
    ours, theirs = ({name: np.array(params[name]) for name in names} for params in (result, reference))
    for name, index in ZERO_GRADIENT_ENTRIES:
        np.testing.assert_allclose(ours[name][index], theirs[name][index], rtol=0, atol=1.1 * num_steps * learning_rate)
        ours[name][index] = theirs[name][index] = 0.0  # left out of the comparison below
    ours, theirs = (np.concatenate([params[name].ravel() for name in names]) for params in (ours, theirs))
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """Training on one of 8 forced CPU devices, the reference of both tests; (directory of its run, result)."""
    directory = tmp_path_factory.mktemp("single_device")
    (result,) = run_workers(directory, "one", num_devices=1, device_count=8)
    assert len(result["losses"]) == 4
    return directory, result


@pytest.mark.slow
def test_eight_devices_train_like_one(tmp_path, single_device_run):
    directory, single = single_device_run
    (eight,) = run_workers(tmp_path, "eight", num_devices=0, device_count=8)
    assert int(eight["device_count"]) == 8
    assert_same_training(eight, single)
    # the single-device checkpoint restores on 8 devices, unchanged
    (restored,) = run_workers(directory, "one", num_devices=0, device_count=8)
    for name in single:
        if name.startswith("param."):
            np.testing.assert_array_equal(restored[name], single[name])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, single_device_run):
    _, single = single_device_run
    first, second = run_workers(tmp_path, "pair", num_devices=0, device_count=1, num_processes=2)
    assert int(first["device_count"]) == 2
    assert_same_training(first, single)
    for name in single:
        if name.startswith("param."):
            np.testing.assert_array_equal(first[name], second[name])  # both processes hold the same parameters
