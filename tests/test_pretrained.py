"""slotjax.load, read_images and predict (slotjax/pretrained.py), and examples/segment_images.py: a trained model from
each place it is kept, with its own outputs, on a user's own images."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import slotjax
import torch_reference
from slotjax import convert, pretrained, visualize
from slotjax.data import encoding, scenes
from slotjax.train.step import build_model
from tests.conftest import CACHE_SETTINGS, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "segment_images.py")
SEED = 7  # the saved weights' seed: another model than the config's seed builds, so a load that ignored them fails
STEP = 3


def trained(task: str):
    """A tiny model of `task` with weights no config builds, and its config."""
    config = tiny_config(task, num_iterations=2)
    return build_model(config, seed=SEED), config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{source: path} of one tiny discovery model, kept in each place `load` reads, and the model and config."""
    directory = tmp_path_factory.mktemp("saved")
    model, config = trained("discovery")
    twin = pretrained.torch_twin(model, config)
    paths = {
        "work directory": convert.write_checkpoint(model, config, STEP, str(directory / "run")),
        "convert .safetensors": convert.save_model_weights(model, config, STEP, str(directory / "convert.safetensors")),
        "convert .pt": convert.save_model_weights(model, config, STEP, str(directory / "convert.pt")),
        "save_model .safetensors": torch_reference.save_model(twin, str(directory / "torch.safetensors"), STEP),
        "save_model .pt": torch_reference.save_model(twin, str(directory / "torch.pt"), STEP),
    }
    return paths, model, config


def scene_images(resolution: int, count: int = 3) -> np.ndarray:
    return slotjax.read_images(list(scenes.Scenes(resolution).batch(range(count))["image"]), resolution)


@pytest.mark.parametrize(
    "source",
    ["work directory", "convert .safetensors", "convert .pt", "save_model .safetensors", "save_model .pt"],
)
def test_a_loaded_model_computes_what_the_saved_one_did(saved, source):
    paths, model, config = saved
    loaded, loaded_config = slotjax.load(paths[source])
    for field in ("task", "resolution", "slot_size", "encoder_features", "decoder_features", "num_iterations"):
        assert loaded_config[field] == config[field], field
    images = scene_images(config.resolution)
    expected, outputs = slotjax.predict(model, images, seed=1), slotjax.predict(loaded, images, seed=1)
    assert outputs.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)


@pytest.mark.slow
def test_step_chooses_a_checkpoint_of_a_work_directory(tmp_path):
    first, config = trained("discovery")
    second = build_model(config, seed=SEED + 1)
    workdir = str(tmp_path / "run")
    convert.write_checkpoint(first, config, 2, workdir)
    convert.write_checkpoint(second, config, 4, workdir)
    images = scene_images(config.resolution, 2)
    for step, model in ((2, first), (4, second), (None, second)):
        loaded, _ = slotjax.load(workdir, step=step)
        expected, outputs = slotjax.predict(model, images), slotjax.predict(loaded, images)
        np.testing.assert_array_equal(outputs["masks"], expected["masks"], err_msg=f"step {step}")


def test_a_paper_tensorflow_checkpoint_loads_from_its_directory_and_its_prefix(tmp_path):
    from slotjax import tf_checkpoint

    model, config = trained("discovery")
    prefix = tf_checkpoint.write_tf_checkpoint(model, config, STEP, tmp_path / "official")
    (tmp_path / "official" / tf_checkpoint.CONFIG_FILE).unlink()  # the paper's checkpoints have only TF's files
    images = scene_images(config.resolution, 2)
    counts = dict(num_slots=config.num_slots, num_iterations=config.num_iterations)  # not in TF's checkpoints
    expected = slotjax.predict(model, images, **counts)
    for path in (tmp_path / "official", prefix):
        loaded, loaded_config = slotjax.load(path)
        assert loaded_config.resolution == config.resolution
        assert (loaded_config.num_slots, loaded_config.num_iterations) == (7, 3)  # the paper's
        outputs = slotjax.predict(loaded, images, **counts)
        np.testing.assert_array_equal(outputs["masks"], expected["masks"], err_msg=str(path))


@pytest.mark.parametrize("task", ["discovery", "set_prediction"])
def test_framework_torch_gives_the_twin_with_the_same_weights(tmp_path, task):
    model, config = trained(task)
    path = convert.save_model_weights(model, config, STEP, str(tmp_path / "model.safetensors"))
    twin, loaded_config = slotjax.load(path, framework="torch")
    assert isinstance(twin, torch.nn.Module) and not twin.training and loaded_config.task == task
    images = scene_images(config.resolution, 2)
    initial_slots = np.random.default_rng(0).normal(size=(2, config.num_slots, config.slot_size)).astype(np.float32)
    expected = model(images, initial_slots=initial_slots)
    with torch.no_grad():
        outputs = twin(torch.tensor(images).permute(0, 3, 1, 2), initial_slots=torch.tensor(initial_slots))
    name, layout = ("masks", (0, 1, 3, 4, 2)) if task == "discovery" else ("predictions", (0, 1, 2))
    reference = np.asarray(expected[name])
    error = np.linalg.norm(outputs[name].permute(*layout).numpy() - reference) / np.linalg.norm(reference)
    assert error <= 1e-5


def test_predict_takes_other_numbers_of_slots_and_iterations(saved):
    _, model, config = saved
    images = scene_images(config.resolution, 2)
    for num_slots, num_iterations in ((9, 1), (1, 4)):
        outputs = slotjax.predict(model, images, num_slots=num_slots, num_iterations=num_iterations)
        assert outputs["masks"].shape == (2, num_slots, config.resolution, config.resolution, 1)
        assert outputs["attention"].shape[1:3] == (num_iterations, num_slots)
        np.testing.assert_allclose(outputs["masks"].sum(axis=1), 1.0, rtol=1e-6)
        shares = pretrained.slot_shares(outputs["masks"])
        assert shares.shape == (2, num_slots)
        np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    default = slotjax.predict(model, images)
    assert default["masks"].shape[1] == config.num_slots
    different_seed = slotjax.predict(model, images, seed=1)
    assert not np.array_equal(default["masks"], different_seed["masks"])  # the seed draws the initial slots


def test_predict_refuses_a_torch_model_in_one_line(saved):
    paths, _, config = saved
    twin, _ = slotjax.load(paths["convert .safetensors"], framework="torch")
    with pytest.raises(TypeError, match="predict runs slotjax models, not a SlotAutoencoder; call a torch model"):
        slotjax.predict(twin, scene_images(config.resolution, 1))


def test_slot_shares_count_the_pixels_each_slot_wins():
    masks = np.full((2, 3, 2, 2, 1), 0.1)
    masks[0, 0, 0, :], masks[0, 2, 1, :] = 0.8, 0.8  # image 0: slot 1 wins the top row, slot 3 the bottom one
    masks[1, 1] = 0.8  # image 1: slot 2 wins everything
    np.testing.assert_array_equal(pretrained.slot_shares(masks), [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])


def test_describe_objects_names_the_confident_predictions_most_confident_first():
    objects = encoding.encode(
        [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]], [0, 1, 1], [1, 0, 0], [2, 1, 0], [4, 7, 0]
    )
    objects[:, encoding.PRESENT] = [0.6, 0.9, 0.4]
    (lines,) = pretrained.describe_objects(objects[None])
    assert lines == [
        "large rubber cyan sphere at (0.40, 0.50, 0.60), confidence 0.90",
        "small metal red cylinder at (0.10, 0.20, 0.30), confidence 0.60",
    ]


def test_read_images_makes_what_the_data_pipeline_makes(tmp_path):
    """The CLEVR crop and the resize of slotjax.data.datasets (TensorFlow), from a file and from an array."""
    from slotjax.data import datasets

    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    for crop in (True, False):
        expected = datasets._preprocess(image, None, crop=crop, resolution=32)["image"].numpy()
        read = slotjax.read_images([tmp_path / "scene.png", image], 32, crop="clevr" if crop else "none")
        assert read.shape == (2, 32, 32, 3) and read.dtype == np.float32
        np.testing.assert_allclose(read, np.stack([expected, expected]), atol=1e-6)


def test_read_images_center_crop_keeps_the_central_square():
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, 10:40] = 255  # the central 30x30 square is white, the sides black
    np.testing.assert_array_equal(slotjax.read_images([image], 15, crop="center"), 1.0)
    assert (slotjax.read_images([image], 15)[0, :, 0] == -1.0).all()  # without a crop the black sides stay


@pytest.mark.parametrize(
    "name, step, framework, error, message",
    [
        ("missing", None, "jax", FileNotFoundError, "No model at .*: give a training work directory"),
        (".", None, "jax", ValueError, "is no work directory .*no weights file .*no TensorFlow checkpoint"),
        ("notes.txt", None, "jax", ValueError, "is no work directory"),
        ("run", 5, "jax", ValueError, r"No checkpoint at step 5 .*\(steps: \[3\]\)"),
        ("convert.safetensors", 3, "jax", ValueError, "step=3 chooses a checkpoint .* leave step out"),
        (".", 3, "jax", ValueError, "is no work directory"),
        ("run", None, "tensorflow", ValueError, "framework='tensorflow'; use one of jax, torch"),
    ],
)
def test_bad_paths_and_options_are_refused_in_one_line(saved, name, step, framework, error, message):
    paths, _, _ = saved
    directory = os.path.dirname(paths["convert .safetensors"])
    with open(os.path.join(directory, "notes.txt"), "w") as file:
        file.write("not a model")
    with pytest.raises(error, match=message) as raised:
        slotjax.load(os.path.join(directory, name), step=step, framework=framework)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "images, message",
    [
        (["missing.png"], "No image file at 'missing.png'"),
        (["notes.txt"], "'notes.txt' is no image PIL can read"),
        ([np.zeros((8, 8, 3), np.float32)], "an image array of dtype float32 .* pass uint8 RGB arrays"),
        ([np.zeros((8, 8), np.uint8)], "an image array of dtype uint8 and shape \\(8, 8\\)"),
        ([], "no images given"),
    ],
)
def test_unreadable_images_are_refused_in_one_line(tmp_path, monkeypatch, images, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises((FileNotFoundError, ValueError), match=message) as raised:
        slotjax.read_images(images, 16)
    assert "\n" not in str(raised.value)


def test_read_images_refuses_a_crop_larger_than_the_image():
    with pytest.raises(ValueError, match="smaller than CLEVR's crop .*use crop='none' or 'center'"):
        slotjax.read_images([np.zeros((64, 64, 3), np.uint8)], 16, crop="clevr")
    with pytest.raises(ValueError, match="crop='middle'; use one of none, center, clevr"):
        slotjax.read_images([np.zeros((64, 64, 3), np.uint8)], 16, crop="middle")


def run_example(*arguments) -> subprocess.CompletedProcess:
    """The example as a user runs it, sharing the tests' compilation cache."""
    cache = {name.upper(): str(value) for name, value in CACHE_SETTINGS.items()}
    return subprocess.run(
        [sys.executable, EXAMPLE, *map(str, arguments)],
        cwd=REPO,
        env={**os.environ, **cache, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def expected_picture_size(num_images: int, num_slots: int, resolution: int) -> tuple[int, int]:
    """(width, height) of discovery_grid's picture of `num_images` rows."""
    images = np.zeros((num_images, resolution, resolution, 3))
    masks = np.zeros((num_images, num_slots, resolution, resolution, 1))
    picture = visualize.discovery_grid(images, images, masks, masks.repeat(3, axis=-1), max_examples=num_images)
    return picture.shape[1], picture.shape[0]


@pytest.mark.slow
def test_the_example_draws_the_masks_of_the_embedded_scenes(saved, tmp_path):
    paths, _, config = saved
    output = tmp_path / "masks.png"
    result = run_example(f"--model={paths['convert .safetensors']}", "--num_slots=5", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"A discovery model of 16x16 images, run with 5 slots and {config.num_iterations} iterations."
    shares = [line for line in lines if line.startswith("scene ")]
    assert len(shares) == 4 and all(line.count("%") == 5 for line in shares)
    with Image.open(output) as picture:
        assert picture.size == expected_picture_size(4, 5, config.resolution)


@pytest.mark.slow
def test_the_example_draws_the_masks_of_an_image_file(saved, tmp_path):
    paths, _, config = saved
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(photo)
    output = tmp_path / "masks.png"
    result = run_example(f"--model={paths['save_model .pt']}", "--crop=center", photo, f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{photo}: slot 1 " in result.stdout
    with Image.open(output) as picture:
        assert picture.size == expected_picture_size(1, config.num_slots, config.resolution)


def load_example():
    spec = importlib.util.spec_from_file_location("segment_images", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_prints_the_objects_of_a_set_prediction_model(tmp_path, capsys):
    model, config = trained("set_prediction")
    path = convert.save_model_weights(model, config, STEP, str(tmp_path / "model.safetensors"))
    example = load_example()
    example.main([f"--model={path}", f"--output={tmp_path / 'objects.png'}"])
    lines = capsys.readouterr().out.splitlines()
    outputs = slotjax.predict(model, scene_images(config.resolution, 4))  # the example's scenes: the test split's
    assert lines[0].startswith("A set prediction model of 16x16 images, run with 10 slots")
    printed = [line.strip() for line in lines[1:] if line.startswith("  ")]
    assert printed and printed == [
        line for image in pretrained.describe_objects(outputs["predictions"]) for line in image
    ]
    assert os.path.getsize(tmp_path / "objects.png") > 0


def test_the_example_refuses_bad_input_in_one_line(saved, tmp_path):
    paths, _, _ = saved
    example = load_example()
    model, config = trained("set_prediction")
    set_prediction = convert.save_model_weights(model, config, STEP, str(tmp_path / "model.safetensors"))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photo)
    for arguments, message in [
        ([f"--model={tmp_path / 'missing'}"], "error: No model at"),
        ([f"--model={paths['work directory']}", "--num_slots=0"], "error: num_slots must be an integer >= 1, got 0."),
        ([f"--model={paths['work directory']}", str(tmp_path / "missing.png")], "error: No image file at"),
        ([f"--model={set_prediction}", str(photo), "--output=x.png"], "error: the set-prediction picture draws"),
    ]:
        with pytest.raises(SystemExit) as raised:
            example.main(arguments)
        assert str(raised.value).startswith(message) and "\n" not in str(raised.value), arguments
