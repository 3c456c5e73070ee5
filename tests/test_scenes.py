"""Tests for slotjax.data.scenes: determinism, rendering, target encoding, splits."""

import numpy as np
import pytest

from slotjax.data import scenes as scenes_lib
from slotjax.data.encoding import MAX_OBJECTS
from slotjax.data.scenes import SPLITS, Scenes, split_indices

NUM_SCENES = 300
# Target column groups: size, material, shape, colour.
ONE_HOT_GROUPS = [slice(3, 5), slice(5, 7), slice(7, 10), slice(10, 18)]


@pytest.fixture(scope="module")
def batch():
    return Scenes(resolution=64).batch(np.arange(NUM_SCENES))


def _assert_scenes_equal(a, b):
    for key in ("image", "segmentation", "target", "num_objects"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_and_index_give_the_same_scene():
    _assert_scenes_equal(Scenes(seed=3).scene(17), Scenes(seed=3).scene(17))


def test_different_seeds_and_indices_differ():
    image = Scenes().scene(5)["image"]
    assert not np.array_equal(image, Scenes(seed=1).scene(5)["image"])
    assert not np.array_equal(image, Scenes().scene(6)["image"])


def test_batch_equals_scenes_made_one_at_a_time():
    scenes = Scenes(resolution=32)
    indices = [7, 3, 123_456_789, 3]
    batch = scenes.batch(indices)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["segmentation"].shape == (4, 32, 32)
    assert batch["segmentation"].dtype == np.uint8
    assert batch["target"].shape == (4, MAX_OBJECTS, 19)
    assert batch["target"].dtype == np.float32
    assert batch["num_objects"].dtype == np.int32
    for k, index in enumerate(indices):
        one_scene = {key: value[k] for key, value in batch.items()}
        _assert_scenes_equal(one_scene, scenes.scene(index))


def test_random_access_does_not_depend_on_what_came_before():
    fresh = Scenes().scene(10**12)
    used = Scenes()
    used.batch(np.arange(50))
    _assert_scenes_equal(fresh, used.scene(10**12))


def test_object_counts_cover_the_requested_range(batch):
    counts = batch["num_objects"]
    assert set(counts.tolist()) == {2, 3, 4, 5, 6}
    for low, high in [(1, 1), (10, 10)]:
        scenes = Scenes(min_objects=low, max_objects=high)
        assert np.all(scenes.batch(np.arange(20))["num_objects"] == low)


def test_segmentation_ids_match_objects_and_every_object_is_visible(batch):
    for segmentation, num in zip(batch["segmentation"], batch["num_objects"]):
        assert set(np.unique(segmentation).tolist()) == set(range(num + 1))
        assert np.all(np.bincount(segmentation.ravel())[1:] >= 5)


def test_target_encoding(batch):
    for target, num in zip(batch["target"], batch["num_objects"]):
        real, padding = target[:num], target[num:]
        assert np.all(padding == 0)
        assert np.all(real[:, 18] == 1)
        for group in ONE_HOT_GROUPS:
            assert np.all(np.isin(real[:, group], [0, 1]))
            np.testing.assert_array_equal(real[:, group].sum(1), 1)
        coordinates = real[:, :3]
        assert np.all((coordinates >= 0) & (coordinates <= 1))
        np.testing.assert_allclose(coordinates[:, 2], 1 - coordinates[:, 1], atol=1e-6)
        # Painted far to near: depth z never increases along the painting order.
        assert np.all(np.diff(coordinates[:, 2]) <= 1e-6)


def _object_pixels(scene_batch, b, object_id):
    """Rows, columns and RGB values of object `object_id`'s visible pixels."""
    rows, columns = np.nonzero(scene_batch["segmentation"][b] == object_id)
    return rows, columns, scene_batch["image"][b][rows, columns].astype(float)


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_unoccluded_object_matches_its_target(resolution):
    """The object painted last is whole: check position, size, shape and colour."""
    scene_batch = Scenes(resolution=resolution).batch(np.arange(100))
    fill_ranges = [(1.0, 1.0), (0.74, 0.9), (0.5, 0.7)]  # square, circle, triangle
    for b, num in enumerate(scene_batch["num_objects"]):
        row = scene_batch["target"][b, num - 1]
        rows, columns, pixels = _object_pixels(scene_batch, b, num)
        centroid = np.array([columns.mean(), rows.mean()]) + 0.5
        np.testing.assert_allclose(row[:2], centroid / resolution, atol=1e-5)

        size = np.argmax(row[3:5])
        side = rows.max() - rows.min() + 1
        scaled_side = round(scenes_lib.SIZE_FRACTIONS[size] * resolution)
        assert side == max(scenes_lib.MIN_SIDES[size], scaled_side)
        low, high = fill_ranges[np.argmax(row[7:10])]
        assert low <= len(rows) / side**2 <= high

        if np.argmax(row[5:7]) == 0:  # rubber: flat, the colour of its label
            colour = scenes_lib.COLOUR_RGB[np.argmax(row[10:18])]
            np.testing.assert_array_equal(pixels, np.broadcast_to(colour, pixels.shape))


def test_partly_hidden_objects_stay_near_their_target_position(batch):
    resolution = batch["image"].shape[1]
    large = scenes_lib.SIZE_FRACTIONS[1]
    for b, num in enumerate(batch["num_objects"]):
        for object_id in range(1, num + 1):
            rows, columns, _ = _object_pixels(batch, b, object_id)
            centroid = np.array([columns.mean(), rows.mean()]) + 0.5
            target_xy = batch["target"][b, object_id - 1, :2]
            assert np.all(np.abs(centroid / resolution - target_xy) < large / 2)


def test_metal_is_shaded_and_rubber_is_flat(batch):
    spreads = {0: [], 1: []}
    for b, num in enumerate(batch["num_objects"]):
        for object_id in range(1, num + 1):
            material = np.argmax(batch["target"][b, object_id - 1, 5:7])
            _, _, pixels = _object_pixels(batch, b, object_id)
            spreads[material].append(pixels.std(0).max())
    assert max(spreads[0]) == 0
    assert min(spreads[1]) > 10


def test_background_differs_from_every_object_colour():
    differences = np.abs(scenes_lib.COLOUR_RGB - scenes_lib.BACKGROUND_RGB).max(1)
    assert differences.min() > 40


def test_splits_are_disjoint_and_train_eval_is_part_of_train():
    test, validation, train = SPLITS["test"], SPLITS["validation"], SPLITS["train"]
    assert test[0] == 0 and test[1] == validation[0] and validation[1] == train[0]
    assert train[1] is None
    train_eval = SPLITS["train_eval"]
    assert train[0] <= train_eval[0] < train_eval[1]

    np.testing.assert_array_equal(split_indices("test", [0, 9_999]), [0, 9_999])
    np.testing.assert_array_equal(split_indices("validation", [0]), [validation[0]])
    np.testing.assert_array_equal(split_indices("train", np.array([0, 10**9])), [train[0], train[0] + 10**9])
    np.testing.assert_array_equal(split_indices("train_eval", np.arange(3)), train_eval[0] + np.arange(3))


def test_split_errors():
    with pytest.raises(ValueError, match="Unknown split 'dev'.*train"):
        split_indices("dev", [0])
    with pytest.raises(ValueError, match="beyond split 'test', which holds 10000"):
        split_indices("test", [10_000])
    with pytest.raises(ValueError, match="Negative position"):
        split_indices("train", [-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=8), "resolution=8 is too small.*16 or more"),
        (dict(seed=-1), "seed=-1 is negative"),
        (dict(min_objects=0), "min_objects=0; use at least 1"),
        (dict(max_objects=11), "max_objects=11 exceeds the 10 target rows"),
        (dict(min_objects=4, max_objects=3), "min_objects=4 > max_objects=3"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Scenes(**kwargs)


def test_negative_index_is_refused():
    with pytest.raises(ValueError, match="index -1 is negative"):
        Scenes().scene(-1)
    with pytest.raises(ValueError, match="index -2 is negative"):
        Scenes().batch([0, -2])


def test_impossible_layout_says_what_to_change(monkeypatch):
    monkeypatch.setattr(scenes_lib, "MAX_LAYOUT_ATTEMPTS", 0)
    with pytest.raises(RuntimeError, match="lower max_objects or raise the resolution"):
        Scenes(resolution=16).scene(0)
