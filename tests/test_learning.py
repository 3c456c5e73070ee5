"""Slow end-to-end check that object discovery learns on the embedded scenes (marked slow: minutes on 2 cores)."""

import pytest

from slotjax import trainer
from tests.conftest import tiny_config

# Small scenes of 2-3 objects at 32x32; a few hundred steps.
LEARNING = dict(resolution=16, batch_size=16, eval_batch_size=64, num_eval_examples=256, encoder_features=32,
                slot_size=32, mlp_hidden_size=64, min_objects=2, max_objects=3, warmup_steps=50, log_every=100,
                checkpoint_every=10_000, learning_rate=1e-3)


def train_and_compare(task: str, num_steps: int, tmp_path, **overrides) -> tuple[dict, dict]:
    """Metrics of the untrained model (step 0 weights) and after `num_steps` steps, on the same validation scenes."""
    config = tiny_config(task, **{**LEARNING, **overrides}, num_train_steps=num_steps, eval_every=num_steps,
                         decay_steps=10 * num_steps)
    run = trainer.Trainer(config)
    untrained, _ = run.evaluate(run.initial_state().params, "validation")
    trained = trainer.train_and_evaluate(config, str(tmp_path), print_fn=lambda line: None)
    return untrained, trained


@pytest.mark.slow
def test_discovery_learns_objects(tmp_path):
    untrained, trained = train_and_compare("discovery", 1000, tmp_path, num_slots=4, decoder_features=16)
    assert trained["mse"] < 0.5 * untrained["mse"]
    assert trained["fg_ari"] > untrained["fg_ari"] + 0.2, (untrained, trained)
