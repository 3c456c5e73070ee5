"""Training end to end on the embedded scenes: logging, pictures, resume, evaluation, conversion."""

import json
import os
import signal

import jax
import numpy as np
import pytest
import torch

import torch_reference
from slotjax import configs, convert, visualize
from slotjax.data import pipeline
from slotjax.tasks.set_prediction import SET_PREDICTION
from slotjax.train import checkpoints, losses, runs, trainer
from slotjax.train import step as steps
from tests.conftest import tiny_config


def read_metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        return [row for row in map(json.loads, file) if row["split"] == split]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_training_writes_metrics_events_pictures_and_checkpoints(tmp_path, task):
    config = tiny_config(task)
    results = trainer.train_and_evaluate(config, str(tmp_path), print_fn=lambda line: None)
    train_rows = read_metrics(tmp_path)
    assert [row["step"] for row in train_rows] == list(range(1, 7))
    assert all(np.isfinite(row["loss"]) for row in train_rows)
    eval_rows = read_metrics(tmp_path, "validation")
    assert [row["step"] for row in eval_rows] == [3, 6]
    expected = (
        {"loss", "fg_ari", "ari", "mbo", "mse"}
        if task == "discovery"
        else {"loss", "ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125"}
    )
    assert expected <= set(eval_rows[-1]) and expected <= set(results)
    assert sorted(os.listdir(tmp_path / "images")) == ["validation_step_0000003.png", "validation_step_0000006.png"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]


def test_the_first_evaluation_comes_after_first_eval_seconds(tmp_path):
    """A run whose eval_every lies beyond its end still evaluates (and leaves a picture) once its clock says so."""
    config = tiny_config(num_train_steps=4, eval_every=1000, checkpoint_every=1000, first_eval_seconds=1e-9)
    trainer.train_and_evaluate(config, str(tmp_path), print_fn=lambda line: None)
    assert [row["step"] for row in read_metrics(tmp_path, "validation")] == [1, 4]  # then the last step only
    assert sorted(os.listdir(tmp_path / "images")) == ["validation_step_0000001.png", "validation_step_0000004.png"]


def test_evaluation_pictures_label_their_columns():
    images = np.zeros((2, 16, 16, 3))
    masks = np.full((2, 3, 16, 16, 1), 1 / 3)
    grid = visualize.discovery_grid(images, images, masks, np.zeros((2, 3, 16, 16, 3)))
    tile = grid.shape[1] // 5  # input, reconstruction, 3 slots
    header = grid[: visualize.LABEL_HEIGHT]
    for column in range(5):  # dark label text above every column
        assert (header[:, column * tile : (column + 1) * tile] < 128).any(), column
    assert tile >= visualize.MIN_TILE_SIZE  # 16-pixel images are enlarged so that the labels fit


@pytest.mark.slow
def test_a_stopped_run_resumes_with_the_same_losses(tmp_path):
    """SIGINT after step 4 saves and exits; the same call again continues at step 5 exactly as an unbroken run."""
    config = tiny_config(num_train_steps=8, checkpoint_every=100, eval_every=100)
    trainer.train_and_evaluate(config, str(tmp_path / "unbroken"), print_fn=lambda line: None)

    def interrupt_after_step_4(line):
        if line.startswith("step 4/"):
            os.kill(os.getpid(), signal.SIGINT)

    lines = []
    with pytest.raises(runs.Interrupted) as stopped:  # after saving: train.py exits 128 + the signal's number
        trainer.train_and_evaluate(
            config, str(tmp_path / "stopped"), print_fn=lambda line: (lines.append(line), interrupt_after_step_4(line))
        )
    assert stopped.value.signum == signal.SIGINT
    assert any("Received SIGINT" in line for line in lines)
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["4"]
    lines.clear()
    trainer.train_and_evaluate(config, str(tmp_path / "stopped"), print_fn=lines.append)
    assert lines[0] == f"data-parallel over {jax.device_count()} CPU device(s), {8 // jax.device_count()} examples each"
    assert lines[1].startswith("Resuming from the checkpoint at step 4")

    unbroken = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "unbroken")}
    resumed = read_metrics(tmp_path / "stopped")
    assert [row["step"] for row in resumed] == list(range(1, 9))
    for row in resumed:
        assert row["loss"] == unbroken[row["step"]], row["step"]


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_training_settings_follow_the_config(tmp_path):
    trainer.train_and_evaluate(tiny_config(num_train_steps=3), str(tmp_path), print_fn=lambda line: None)
    with pytest.raises(trainer.TrainingError, match=r"belongs to another model \(slot_size: checkpoint 16 vs now 8\)"):
        trainer.train_and_evaluate(tiny_config(num_train_steps=6, slot_size=8), str(tmp_path), print_fn=print)
    # no parameter changes: more slots, no gradient clipping (another optimiser state layout), a larger batch
    config = tiny_config(num_train_steps=4, num_slots=5, grad_clip_norm=0.0, batch_size=16, eval_every=100)
    lines = []
    trainer.train_and_evaluate(config, str(tmp_path), print_fn=lines.append)
    assert "Resuming from the checkpoint at step 3" in "\n".join(lines)
    model, saved, step = convert.restore_model(str(tmp_path), print_fn=lambda line: None)
    assert (step, saved.num_slots, saved.grad_clip_norm) == (4, 5, 0.0)
    state = checkpoints.restore_checkpoint(str(tmp_path / "checkpoints"), steps.initial_state(config), config, 4)
    assert int(jax.tree.leaves(state.opt_state)[0]) == 4  # Adam's count went on from the checkpoint's 3


@pytest.mark.parametrize("dataset, most_objects", [("scenes", 3), ("clevr", 10)])
def test_set_prediction_refuses_fewer_slots_than_objects(dataset, most_objects):
    """The Hungarian matching of K slots against more objects would leave objects unmatched."""
    config = tiny_config("set_prediction", dataset=dataset, max_objects=3, num_slots=2)
    with pytest.raises(
        ValueError,
        match=rf"num_slots=2 is below the {most_objects} objects a scene of '{dataset}' "
        rf"may hold.*--config.num_slots >= {most_objects}",
    ):
        runs.check_config(config)


def test_set_prediction_with_as_many_slots_as_objects_matches_the_first_rows():
    """3 slots on scenes of at most 3 objects: the loss is the set loss against the first 3 target rows."""
    config = tiny_config("set_prediction", num_slots=3, max_objects=3, min_objects=3)
    batch = next(pipeline.train_batches(config, 0, 0, 1))
    outputs = steps.build_model(config)(batch["image"], key=jax.random.key(0))
    assert outputs["predictions"].shape[1] == 3 and batch["target"].shape[1] == 10
    assert np.all(batch["target"][:, 3:] == 0) and np.all(batch["target"][:, :3, 18] == 1)
    loss = SET_PREDICTION.loss(outputs, batch, config)
    np.testing.assert_allclose(loss, losses.hungarian_huber_loss(outputs["predictions"], batch["target"][:, :3]))


@pytest.mark.slow
def test_evaluation_and_conversion_from_a_checkpoint(tmp_path):
    config = tiny_config(num_train_steps=3)
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config, workdir, print_fn=lambda line: None)
    lines = []
    assert trainer.train_and_evaluate(config, workdir, print_fn=lines.append) == {}  # nothing more to train
    assert lines[-1] == (
        f"The run in {workdir} is finished: its checkpoint is at step 3 of num_train_steps=3. Evaluate it with "
        "--mode=eval, or train on with a larger --config.num_train_steps."
    )
    results = trainer.evaluate_checkpoint(config, workdir, "test", print_fn=lambda line: None)
    assert {"fg_ari", "ari", "mse"} <= set(results)
    assert os.path.exists(os.path.join(workdir, "images", "test_step_0000003.png"))

    # checkpoint -> safetensors -> torch_reference: the same reconstruction
    weights = str(tmp_path / "model.safetensors")
    convert.main(["--workdir", workdir, "--output", weights])
    reference = torch_reference.load_model(weights)
    restored, _, _ = convert.restore_model(workdir, print_fn=lambda line: None)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    initial = np.random.default_rng(1).normal(size=(2, 4, 16)).astype(np.float32)
    ours = restored(jax.numpy.asarray(images), initial_slots=initial)["reconstruction"]
    with torch.no_grad():
        theirs = reference(torch.tensor(images).permute(0, 3, 1, 2), initial_slots=torch.tensor(initial))[
            "reconstruction"
        ]
    np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)

    # and back: safetensors -> a checkpoint with the same parameters; and a model saved by torch_reference
    torch_weights = str(tmp_path / "from_torch.pt")
    assert torch_reference.save_model(reference, torch_weights, step=7) == torch_weights
    trained = convert.flax_to_torch(restored)
    for source, target, step in [(weights, "back", 3), (torch_weights, "from_torch", 7)]:
        convert.main(["--input", source, "--output", str(tmp_path / target)])
        model, saved_config, saved_step = convert.restore_model(str(tmp_path / target))
        assert saved_step == step
        assert not runs.model_differences(saved_config, config)
        for name, value in convert.flax_to_torch(model).items():
            np.testing.assert_array_equal(value, trained[name])
    assert saved_config.preset == "official"  # a torch_reference file: the paper's settings, the model's sizes
    assert torch_reference.load_model(torch_weights).arguments == reference.arguments


@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_a_torch_reference_model_converts_with_the_training_settings_saved_with_it(tmp_path, task, capsys):
    """`save_model(..., training=...)` records how a PyTorch model was trained; its checkpoint continues with that
    recipe. A file that records none gets the paper's recipe, and the conversion says so."""
    model = steps.build_model(tiny_config(task))
    reference = torch_reference.load_model(
        convert.save_model_weights(model, tiny_config(task), 0, str(tmp_path / "a.pt"))
    )
    training = dict(batch_size=12, learning_rate=2e-4, num_train_steps=900, grad_clip_norm=0.25)
    for name, recorded in (("with", training), ("without", None)):
        path = torch_reference.save_model(reference, str(tmp_path / f"{name}.safetensors"), step=5, training=recorded)
        capsys.readouterr()
        convert.main(["--input", path, "--output", str(tmp_path / name)])
        _, config, step = convert.restore_model(str(tmp_path / name), print_fn=lambda line: None)
        assert step == 5 and config.slot_size == reference.arguments["slot_size"]
        paper = configs.get_config(task, "official")
        expected = training if recorded else {field: paper[field] for field in training}
        assert {field: config[field] for field in training} == expected
        assert ("records no training settings" in capsys.readouterr().out) == (recorded is None)
    with pytest.raises(convert.ConversionError, match="training settings slotjax does not have: slot_size, speed"):
        bad = torch_reference.save_model(reference, str(tmp_path / "bad.pt"), training=dict(slot_size=8, speed=1))
        convert.restore_weights(bad)
