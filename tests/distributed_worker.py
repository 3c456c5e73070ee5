"""Trains the tiny discovery model a few steps and saves its losses and parameters (run by test_distributed).

python tests/distributed_worker.py OUTPUT.npz WORKDIR NUM_DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slotjax.train import checkpoints, trainer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def main(output, workdir, num_devices, coordinator=None, num_processes=None, process_id=None):
    if coordinator:
        trainer.initialize_distributed(coordinator, int(num_processes), int(process_id))
    import jax
    import numpy as np

    config = tiny_config(num_train_steps=4, num_devices=int(num_devices), eval_every=100, checkpoint_every=2)
    trainer.train_and_evaluate(config, workdir, print_fn=lambda line: None)
    run = trainer.Trainer(config)
    state = checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(workdir), run.initial_state(), config)
    params = {
        "param." + jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value"): np.asarray(
            jax.experimental.multihost_utils.process_allgather(leaf, tiled=True)
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    losses = []
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl")) as file:
            losses = [row["loss"] for row in map(json.loads, file) if row["split"] == "train"]
    np.savez(output, losses=np.asarray(losses), device_count=jax.device_count(), **params)


if __name__ == "__main__":
    main(*sys.argv[1:])
