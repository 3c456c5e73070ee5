"""Tests for slotjax.data.datasets, offline: CLEVR through TFDS mock data, DeepMind sets through small files.

CLEVR scenes mostly come from a fake TFDS reader (`tfds.testing.mock_data`)
that honours split slicing and returns PNG bytes, as TFDS does when image
decoding is skipped; one test reads a small real TFDS directory written by
`store_clevr`. The DeepMind files are written here in the published format,
from this file's own statement of it (`PUBLISHED_FEATURES`).
`benchmarks/input_pipeline.py` reuses `store_clevr` and `write_records`.
"""

import functools
import gzip
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as tfds_splits

from slotjax.data import datasets, files

# ---------------------------------------------------------------------------- CLEVR (TFDS mock)

CLEVR_SPLIT_SIZES = {"train": 520, "validation": 16, "test": 4}
# The one-hot orders of docs/target_encoding.md, stated independently of the module.
ENCODING_ORDERS = {
    "size": ("small", "large"),
    "material": ("rubber", "metal"),
    "shape": ("cube", "sphere", "cylinder"),
    "color": ("gray", "blue", "brown", "yellow", "red", "green", "purple", "cyan"),
}
ENCODING_COLUMNS = {"size": 3, "material": 5, "shape": 7, "color": 10}


def clevr_image(index: int) -> np.ndarray:
    """Uint8 [320, 480, 3]: red = row, green = column (mod 256), blue a nonlinear pattern that names the scene."""
    rows, columns = np.meshgrid(np.arange(320), np.arange(480), indexing="ij")
    blue = rows * rows + 3 * columns * columns + 7 * index
    return (np.stack([rows, columns, blue], axis=-1) % 256).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def clevr_png(pattern: int) -> bytes:
    return tf.io.encode_png(clevr_image(pattern), compression=1).numpy()


def clevr_num_objects(split: str, index: int) -> int:
    return 0 if split == "test" else 3 + index % 8  # 3 to 10, as CLEVR


def clevr_objects(split: str, index: int) -> list[dict]:
    """Objects of fake scene `index`: names for the labels, x coordinate encoding the index."""
    return [
        {
            "3d_coords": [-3.0 + 6.0 * index / 1000 if k == 0 else 0.5 * k - 2.5, 0.25 * k - 1.0, 0.7],
            "size": ENCODING_ORDERS["size"][(index + k) % 2],
            "material": ENCODING_ORDERS["material"][(index // 2 + k) % 2],
            "shape": ENCODING_ORDERS["shape"][(index + k) % 3],
            "color": ENCODING_ORDERS["color"][(index + 3 * k) % 8],
        }
        for k in range(clevr_num_objects(split, index))
    ]


def fake_clevr_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Stands in for the TFDS CLEVR reader: resolves `split` (slices, even splits) to scene indices."""
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    split_infos = tfds.core.SplitDict(
        [
            tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0, filename_template=None)
            for name, size in CLEVR_SPLIT_SIZES.items()
        ]
    )
    scenes = [
        (instruction.splitname, index)
        for instruction in tfds_splits.AbstractSplit.from_spec(split).to_absolute(split_infos)
        for index in range(*slice(instruction.from_, instruction.to).indices(CLEVR_SPLIT_SIZES[instruction.splitname]))
    ]
    objects_feature = self.info.features["objects"].feature

    def examples():
        for split_name, index in scenes:
            objects = clevr_objects(split_name, index)
            yield {
                "image": clevr_png(index % 64),
                "file_name": f"CLEVR_{split_name}_{index:06d}.png",
                "objects": {
                    "3d_coords": np.array([o["3d_coords"] for o in objects], np.float32).reshape(-1, 3),
                    "pixel_coords": np.zeros((len(objects), 3), np.float32),
                    "rotation": np.zeros(len(objects), np.float32),
                    **{
                        name: np.array([objects_feature[name].str2int(o[name]) for o in objects], np.int64)
                        for name in ENCODING_ORDERS
                    },
                },
                "question_answer": {"question": np.array([], object), "answer": np.array([], object)},
            }

    signature = self.info.features.get_tensor_spec()
    signature["image"] = tf.TensorSpec([], tf.string)
    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def store_clevr(data_dir: str, split_sizes: dict[str, int], image=clevr_image) -> None:
    """Writes a prepared TFDS clevr:3.1.0 (real TFDS files) of fake scenes, `image(index)` their pictures."""

    def examples(split, size):
        for index in range(size):
            objects = clevr_objects(split, index)
            yield (
                index,
                {
                    "image": image(index),
                    "file_name": f"CLEVR_{split}_{index:06d}.png",
                    "objects": {
                        **{name: [o[name] for o in objects] for name in ENCODING_ORDERS},
                        "3d_coords": np.array([o["3d_coords"] for o in objects], np.float32).reshape(-1, 3),
                        "pixel_coords": np.zeros((len(objects), 3), np.float32),
                        "rotation": np.zeros(len(objects), np.float32),
                    },
                    "question_answer": [],
                },
            )

    name, version = datasets.CLEVR_TFDS_NAME.split(":")
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=version,
        features=tfds.builder(datasets.CLEVR_TFDS_NAME, data_dir=data_dir).info.features,
        split_datasets={split: examples(split, size) for split, size in split_sizes.items()},
        data_dir=data_dir,
    )


@pytest.fixture
def clevr_dir(tmp_path):
    """A data_dir that looks like a prepared TFDS CLEVR, read through the fake reader."""
    directory = tmp_path / "clevr" / "3.1.0"
    directory.mkdir(parents=True)
    (directory / "dataset_info.json").write_text("{}")
    with tfds.testing.mock_data(as_dataset_fn=fake_clevr_as_dataset):
        yield str(tmp_path)


def read_all(name, data_dir, split, *, task="discovery", resolution, batch_size=4, **kwargs):
    """Every batch of one unshuffled pass, concatenated per key."""
    batches = list(
        datasets.make_dataset(
            name,
            data_dir,
            split,
            task=task,
            resolution=resolution,
            batch_size=batch_size,
            shuffle=False,
            repeat=False,
            **kwargs,
        )
    )
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize without antialiasing, float64 numpy."""

    def weights(in_size):
        source = np.clip((np.arange(size) + 0.5) * in_size / size - 0.5, 0, in_size - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, in_size - 1), source - low

    top, bottom, row_weight = weights(image.shape[0])
    left, right, column_weight = weights(image.shape[1])
    rows = image[top] * (1 - row_weight)[:, None, None] + image[bottom] * row_weight[:, None, None]
    return rows[:, left] * (1 - column_weight)[None, :, None] + rows[:, right] * column_weight[None, :, None]


def scaled(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) / 255 - 0.5) * 2


def test_clevr_discovery_crops_rows_29_to_221_and_columns_64_to_256_and_scales_to_minus_one_one(clevr_dir):
    batch = read_all("clevr", clevr_dir, "validation", resolution=192)
    # Scenes 0 to 3 and 8 to 11 have <= 6 objects (CLEVR6).
    for image, index in zip(batch["image"], [0, 1, 2, 3, 8, 9, 10, 11]):
        np.testing.assert_allclose(image, scaled(clevr_image(index)[29:221, 64:256]), rtol=0, atol=1e-6)
    assert set(batch) == {"image"} and batch["image"].dtype == np.float32


def test_clevr_discovery_resizes_bilinearly_without_antialiasing(clevr_dir):
    image = read_all("clevr", clevr_dir, "validation", resolution=128)["image"][0]
    crop = scaled(clevr_image(0)[29:221, 64:256]).astype(np.float64)
    np.testing.assert_allclose(image, np.clip(bilinear_reference(crop, 128), -1, 1), rtol=0, atol=2e-6)
    antialiased = tf.image.resize(crop, (128, 128), method="bilinear", antialias=True).numpy()
    assert np.abs(image - antialiased).max() > 0.1


def clevr_indices(targets: np.ndarray) -> list[int]:
    """The indices of fake scenes, from their first object's x coordinate."""
    return np.rint(targets[:, 0, 0] * 1000).astype(int).tolist()


@pytest.mark.slow
def test_clevr_train_eval_is_the_first_512_train_scenes_and_train_the_rest(clevr_dir):
    def indices(split):
        return clevr_indices(
            read_all("clevr", clevr_dir, split, task="set_prediction", resolution=8, batch_size=8)["target"]
        )

    assert indices("train_eval") == list(range(512))  # set prediction keeps scenes of up to 10 objects
    assert indices("train") == list(range(512, 520))
    kept = read_all("clevr", clevr_dir, "train_eval", resolution=8, batch_size=16)["image"]
    assert len(kept) == 256  # CLEVR6: half of them have 3 to 6 objects


def test_clevr_set_prediction_target_encoding_and_padding(clevr_dir):
    batch = read_all("clevr", clevr_dir, "validation", task="set_prediction", resolution=16, batch_size=16)
    assert batch["target"].shape == (16, 10, 19) and batch["target"].dtype == np.float32
    for index, target in enumerate(batch["target"]):
        objects = clevr_objects("validation", index)
        expected = np.zeros((10, 19), np.float32)
        for row, obj in zip(expected, objects):
            row[:3] = (np.array(obj["3d_coords"], np.float32) + 3) / 6
            for name, first_column in ENCODING_COLUMNS.items():
                row[first_column + ENCODING_ORDERS[name].index(obj[name])] = 1
            row[18] = 1
        np.testing.assert_allclose(target, expected, rtol=0, atol=1e-6, err_msg=f"scene {index}")
    # Set prediction resizes the whole 320x480 image, without crop.
    whole = scaled(clevr_image(0)).astype(np.float64)
    np.testing.assert_allclose(batch["image"][0], bilinear_reference(whole, 16), rtol=0, atol=2e-6)


def test_clevr_target_maps_class_labels_by_name():
    reversed_labels = tfds.features.FeaturesDict(
        {name: tfds.features.ClassLabel(names=order[::-1]) for name, order in ENCODING_ORDERS.items()}
    )
    objects = {"3d_coords": tf.constant([[3.0, -3.0, 0.0]]), **{name: tf.constant([0]) for name in ENCODING_ORDERS}}
    target = datasets._clevr_target(objects, datasets._target_label_orders(reversed_labels)).numpy()
    np.testing.assert_allclose(target[0, :3], [1.0, 0.0, 0.5])
    # Class 0 of each reversed feature is the last name of the encoding's order.
    assert np.flatnonzero(target[0]).tolist() == [0, 2, 4, 6, 9, 17, 18]
    np.testing.assert_array_equal(target[1:], 0)


def test_clevr_processes_read_disjoint_shares_of_the_split(clevr_dir):
    shares = [
        read_all(
            "clevr",
            clevr_dir,
            "validation",
            task="set_prediction",
            resolution=8,
            batch_size=8,
            process_index=process,
            process_count=2,
        )["target"]
        for process in range(2)
    ]
    indices = [set(clevr_indices(share)) for share in shares]
    assert indices[0].isdisjoint(indices[1]) and indices[0] | indices[1] == set(range(16))


def test_clevr_test_split_serves_discovery_only(clevr_dir):
    assert read_all("clevr", clevr_dir, "test", resolution=8)["image"].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="validation"):
        datasets.make_dataset("clevr", clevr_dir, "test", task="set_prediction", resolution=8, batch_size=2)


def test_clevr_reads_a_real_tfds_directory(tmp_path):
    store_clevr(str(tmp_path), {"train": 2, "validation": 6})  # TFDS stores the scenes in its own order
    images = read_all("clevr", str(tmp_path), "validation", resolution=192, batch_size=2)["image"]
    crops = {index: scaled(clevr_image(index)[29:221, 64:256]) for index in range(6)}
    matches = [[index for index, crop in crops.items() if np.abs(image - crop).max() < 1e-6] for image in images]
    assert sorted(matches) == [[0], [1], [2], [3]]  # scenes 0 to 3 have <= 6 objects
    shares = [
        read_all(
            "clevr",
            str(tmp_path),
            "validation",
            task="set_prediction",
            resolution=8,
            batch_size=1,
            process_index=process,
            process_count=2,
        )["target"]
        for process in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 3
    assert sorted(clevr_indices(shares[0]) + clevr_indices(shares[1])) == list(range(6))
    for target in np.concatenate(shares):
        num_objects = 3 + clevr_indices(target[None])[0]
        np.testing.assert_array_equal(target[:num_objects, 18], 1)
        np.testing.assert_array_equal(target[num_objects:], 0)
    datasets.check_dataset("clevr", str(tmp_path), "set_prediction", {"validation": 2})  # reads the first scene
    shard = next((tmp_path / "clevr" / "3.1.0").glob("clevr-validation.tfrecord-*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(datasets.CorruptRecordError, match="Could not read .*clevr/3.1.0"):
        datasets.check_dataset("clevr", str(tmp_path), "discovery", {"validation": 2})


def test_missing_clevr_names_the_directory_and_how_to_get_it(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.make_dataset("clevr", str(tmp_path), "train", task="discovery", resolution=128, batch_size=64)
    message = str(error.value)
    for expected in (
        str(tmp_path / "clevr" / "3.1.0"),
        f"python -m slotjax.data.prepare clevr --data_dir={tmp_path}",
        "https://cs.stanford.edu/people/jcjohns/clevr/",
    ):
        assert expected in message
    assert "download=True" not in message  # train.py cannot pass it: the instructions are commands that work


# ---------------------------------------------------------------------------- DeepMind TFRecord files

# The published tf.train.Example features (multi_object_datasets readers): name -> (shape, kind).
PUBLISHED_FEATURES = {
    "clevr_with_masks": {
        "image": ([240, 320, 3], "bytes"),
        "mask": ([11, 240, 320, 1], "bytes"),
        **{name: ([11], "float") for name in ("x", "y", "z", "rotation", "visibility")},
        "pixel_coords": ([11, 3], "float"),
        **{name: ([11], "bytes") for name in ("size", "material", "shape", "color")},
    },
    "multi_dsprites": {
        "image": ([64, 64, 3], "bytes"),
        "mask": ([64, 64, 6, 1], "bytes"),
        **{name: ([6], "float") for name in ("x", "y", "shape", "visibility", "orientation", "scale")},
        "color": ([6, 3], "float"),
    },
    "tetrominoes": {
        "image": ([35, 35, 3], "bytes"),
        "mask": ([4, 35, 35, 1], "bytes"),
        **{name: ([4], "float") for name in ("x", "y", "shape", "visibility")},
        "color": ([4, 3], "float"),
    },
    "objects_room": {"image": ([64, 64, 3], "bytes"), "mask": ([7, 64, 64, 1], "bytes")},
}
PUBLISHED_FILES = {
    "clevr_with_masks": "clevr_with_masks_train.tfrecords",
    "multi_dsprites": "multi_dsprites_colored_on_grayscale.tfrecords",
    "tetrominoes": "tetrominoes_train.tfrecords",
    "objects_room": "objects_room_train.tfrecords",
}
SMALL_RECORD_SPLITS = {"validation": (0, 4), "test": (4, 8), "train": (8, None), "train_eval": (8, 12)}
SINGLE_BYTES = [bytes([value]) for value in range(256)]


def record_scene(name: str, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Uint8 image [H, W, 3], entity ids [H, W] and the number of objects of fake record `index`.

    The red value of the centre pixel (of the crop, for clevr_with_masks) is the
    index; the ids form diagonal stripes (not symmetric, so a transposed mask
    layout would show).
    """
    height, width, _ = PUBLISHED_FEATURES[name]["image"][0]
    num_objects = 3 + 5 * index % 8 if name == "clevr_with_masks" else num_entities(name) - 1
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = (rows // 3 + 2 * (columns // 5) + index) % (num_objects + 1)
    image = np.stack([rows * 7 + columns, 50 * ids + columns, rows + 3 * columns], axis=-1) % 256
    centre = (29 + 96, 64 + 96) if name == "clevr_with_masks" else (height // 2, width // 2)
    image[centre + (0,)] = index
    return image.astype(np.uint8), ids, num_objects


def num_entities(name: str) -> int:
    mask_shape = PUBLISHED_FEATURES[name]["mask"][0]
    return mask_shape[2] if name == "multi_dsprites" else mask_shape[0]


def record_indices(images: np.ndarray) -> list[int]:
    """The indices of fake records from the centre pixels of their images at native resolution."""
    height, width = images.shape[1:3]
    return np.rint((images[:, height // 2, width // 2, 0] + 1) / 2 * 255).astype(int).tolist()


def write_records(name: str, directory, num_records: int) -> str:
    """Writes `num_records` fake scenes in `name`'s published format; returns the file's path."""
    path = str(directory / PUBLISHED_FILES[name])
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for index in range(num_records):
            image, ids, num_objects = record_scene(name, index)
            entities = np.arange(num_entities(name))
            masks = np.where(ids[None] == entities[:, None, None], 255, 0).astype(np.uint8)[..., None]  # [E, H, W, 1]
            values = {
                "image": image,
                "mask": masks.transpose(1, 2, 0, 3) if name == "multi_dsprites" else masks,
                "visibility": (entities <= num_objects).astype(np.float32),
            }
            features = {}
            for feature, (shape, kind) in PUBLISHED_FEATURES[name].items():
                value = values.get(feature, np.zeros(shape, np.uint8 if kind == "bytes" else np.float32))
                assert list(value.shape) == shape, feature
                if kind == "bytes":  # one single-byte string per element, as the published files
                    features[feature] = tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[SINGLE_BYTES[v] for v in value.ravel().tolist()])
                    )
                else:
                    features[feature] = tf.train.Feature(float_list=tf.train.FloatList(value=value.ravel()))
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    return path


@pytest.fixture
def small_splits(monkeypatch):
    monkeypatch.setattr(files, "RECORD_SPLITS", SMALL_RECORD_SPLITS)


def test_feature_specs_are_the_published_ones():
    for name, published in PUBLISHED_FEATURES.items():
        spec = datasets.RECORD_FORMATS[name].feature_spec()
        assert {feature: (list(s.shape), s.dtype) for feature, s in spec.items()} == {
            feature: (shape, tf.string if kind == "bytes" else tf.float32)
            for feature, (shape, kind) in published.items()
        }, name
        assert datasets.RECORD_FORMATS[name].file_name == PUBLISHED_FILES[name]


@pytest.mark.parametrize("name", ["multi_dsprites", "tetrominoes", "objects_room"])
def test_deepmind_images_and_segmentation_at_native_resolution(name, tmp_path, small_splits):
    write_records(name, tmp_path, 8)
    side = PUBLISHED_FEATURES[name]["image"][0][0]
    batch = read_all(name, str(tmp_path), "test", resolution=side, batch_size=2)
    assert batch["segmentation"].dtype == np.int32 and batch["image"].dtype == np.float32
    for position, index in enumerate(range(4, 8)):
        image, ids, _ = record_scene(name, index)
        np.testing.assert_allclose(batch["image"][position], scaled(image), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(batch["segmentation"][position], ids)


def test_clevr_with_masks_crops_filters_clevr6_and_resizes_masks_nearest(tmp_path, small_splits):
    write_records("clevr_with_masks", tmp_path, 8)
    cropped = read_all("clevr_with_masks", str(tmp_path), "test", resolution=192, batch_size=1)
    resized = read_all("clevr_with_masks", str(tmp_path), "test", resolution=64, batch_size=1)
    # Records 4 to 7 have 7, 4, 9 and 6 objects: CLEVR6 keeps 5 and 7.
    kept = [5, 7]
    assert [record_scene("clevr_with_masks", index)[2] for index in range(4, 8)] == [7, 4, 9, 6]
    assert record_indices(cropped["image"]) == kept
    for position, index in enumerate(kept):
        image, ids, _ = record_scene("clevr_with_masks", index)
        np.testing.assert_allclose(cropped["image"][position], scaled(image[29:221, 64:256]), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(cropped["segmentation"][position], ids[29:221, 64:256])
        # Nearest neighbour, half-pixel centred, from 192 to 64: source pixel 3 * i + 1.
        np.testing.assert_array_equal(resized["segmentation"][position], ids[29:221, 64:256][1::3, 1::3])


def test_tetrominoes_resize_images_bilinearly_and_masks_nearest(tmp_path, small_splits):
    write_records("tetrominoes", tmp_path, 8)
    batch = read_all("tetrominoes", str(tmp_path), "validation", resolution=64, batch_size=4)
    image, ids, _ = record_scene("tetrominoes", 0)
    np.testing.assert_allclose(
        batch["image"][0], bilinear_reference(scaled(image).astype(np.float64), 64), rtol=0, atol=2e-6
    )
    nearest = np.floor((np.arange(64) + 0.5) * 35 / 64).astype(int)
    np.testing.assert_array_equal(batch["segmentation"][0], ids[nearest][:, nearest])


def test_record_splits_are_disjoint_index_ranges(tmp_path, small_splits):
    write_records("tetrominoes", tmp_path, 20)

    def indices(split):
        return record_indices(read_all("tetrominoes", str(tmp_path), split, resolution=35, batch_size=1)["image"])

    assert indices("validation") == [0, 1, 2, 3]
    assert indices("test") == [4, 5, 6, 7]
    assert indices("train_eval") == [8, 9, 10, 11]
    assert indices("train") == list(range(8, 20))


def test_processes_read_disjoint_shares_covering_the_split(tmp_path, small_splits):
    write_records("tetrominoes", tmp_path, 24)
    shares = [
        record_indices(
            read_all(
                "tetrominoes",
                str(tmp_path),
                "train",
                resolution=35,
                batch_size=2,
                process_index=process,
                process_count=2,
            )["image"]
        )
        for process in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 8
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(8, 24))


def test_shuffling_is_seeded_and_batches_are_full(tmp_path, small_splits):
    write_records("tetrominoes", tmp_path, 20)

    def first_batches(seed):
        batches = datasets.make_dataset(
            "tetrominoes", str(tmp_path), "train", task="discovery", resolution=35, batch_size=5, seed=seed
        )
        return [record_indices(next(batches)["image"]) for _ in range(4)]

    order = first_batches(seed=1)
    assert order == first_batches(seed=1) and order != first_batches(seed=2)
    assert order[0] != [8, 9, 10, 11, 12]  # shuffled
    assert all(len(batch) == 5 for batch in order)  # 12 records: batches run on across epochs


def test_files_in_a_subdirectory_named_after_the_data_set_are_found(tmp_path, small_splits):
    (tmp_path / "objects_room").mkdir()
    write_records("objects_room", tmp_path / "objects_room", 4)
    assert read_all("objects_room", str(tmp_path), "validation", resolution=64)["image"].shape == (4, 64, 64, 3)


def test_missing_file_names_it_and_the_bucket(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError) as error:
        datasets.make_dataset("multi_dsprites", str(tmp_path), "train", task="discovery", resolution=64, batch_size=64)
    message = str(error.value)
    for expected in (
        "multi_dsprites_colored_on_grayscale.tfrecords",
        str(tmp_path),
        "gsutil cp gs://multi-object-datasets/multi_dsprites/multi_dsprites_colored_on_grayscale.tfrecords",
        "curl -o ",
        "https://storage.googleapis.com/multi-object-datasets/multi_dsprites/multi_dsprites_colored_on_grayscale.tfrecords",
        "https://github.com/google-deepmind/multi_object_datasets",
    ):
        assert expected in message
    assert "download=True" not in message


def test_truncated_file_is_reported_with_its_name(tmp_path, small_splits):
    path = write_records("tetrominoes", tmp_path, 8)
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
    batches = datasets.make_dataset(
        "tetrominoes",
        str(tmp_path),
        "train",
        task="discovery",
        resolution=32,
        batch_size=2,
        shuffle=False,
        repeat=False,
    )  # reads through the whole file
    with pytest.raises(datasets.CorruptRecordError, match="tetrominoes_train.tfrecords") as error:
        list(batches)
    assert not re.search(r"\{\{|\[Op:|node ", str(error.value))  # no TensorFlow graph annotations


def test_records_of_another_format_are_reported_with_the_file_name(tmp_path, small_splits):
    # objects_room records (64x64, 7 masks) under the tetrominoes name do not parse as tetrominoes.
    (tmp_path / PUBLISHED_FILES["tetrominoes"]).write_bytes(
        open(write_records("objects_room", tmp_path, 4), "rb").read()
    )
    batches = datasets.make_dataset(
        "tetrominoes",
        str(tmp_path),
        "validation",
        task="discovery",
        resolution=32,
        batch_size=2,
        shuffle=False,
        repeat=False,
    )
    with pytest.raises(datasets.CorruptRecordError, match="tetrominoes_train.tfrecords") as error:
        next(batches)
    assert not re.search(r"\{\{|\[Op:|node ", str(error.value))
    with pytest.raises(datasets.CorruptRecordError, match="tetrominoes_train.tfrecords"):  # before training starts
        datasets.check_dataset("tetrominoes", str(tmp_path), "discovery", {"validation": 2})


def test_argument_errors():
    with pytest.raises(ValueError, match="clevr, clevr_with_masks, multi_dsprites, tetrominoes, objects_room"):
        datasets.make_dataset("mnist", "/data", "train", task="discovery", resolution=64, batch_size=8)
    with pytest.raises(ValueError, match="no set_prediction targets"):
        datasets.make_dataset("tetrominoes", "/data", "train", task="set_prediction", resolution=64, batch_size=8)
    with pytest.raises(ValueError, match="train_eval"):
        datasets.make_dataset("clevr", "/data", "eval", task="discovery", resolution=64, batch_size=8)


@pytest.mark.slow
def test_training_runs_on_a_deepmind_file_with_fg_ari(tmp_path, small_splits):
    """train_and_evaluate on multi_dsprites records: ground-truth masks feed FG-ARI."""
    from slotjax.train import trainer
    from tests.conftest import tiny_config

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_records("multi_dsprites", data_dir, 24)
    config = tiny_config(
        dataset="multi_dsprites",
        data_dir=str(data_dir),
        num_train_steps=2,
        eval_every=2,
        checkpoint_every=2,
        eval_batch_size=4,
        num_eval_examples=4,
        batch_size=4,
    )
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"), print_fn=lambda line: None)
    assert {"fg_ari", "ari", "mse"} <= set(results) and np.isfinite(results["fg_ari"])


def test_train_py_reports_a_missing_data_set_in_one_message(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "train.py"),
            "--config.dataset=tetrominoes",
            f"--config.data_dir={tmp_path}",
            f"--workdir={tmp_path / 'run'}",
            "--config.resolution=32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "tetrominoes_train.tfrecords" in result.stderr and "gsutil" in result.stderr
    assert "task discovery" not in result.stdout  # refused before JAX starts (train.py's first line)


# ---------------------------------------------------------------------------- checks before training


def test_records_are_counted_as_tensorflow_wrote_them(tmp_path):
    path = write_records("tetrominoes", tmp_path, 20)
    assert files.count_records(path, 100) == (20, True)
    assert files.count_records(path, 5) == (5, False)  # stops at the limit
    concatenated = tmp_path / "two_members.tfrecords"
    concatenated.write_bytes(open(path, "rb").read() * 2)  # GZIP members one after the other
    assert files.count_records(str(concatenated), 100) == (40, True)


def damaged_files(tmp_path) -> dict[str, tuple[bytes, str]]:
    """name -> (content of tetrominoes_train.tfrecords, what the message says)."""
    data = open(write_records("tetrominoes", tmp_path, 6), "rb").read()
    frames = gzip.decompress(data)
    return {
        "short": (data, r"has 6 records, the splits need 10,064: the train split reads from record 10,000 on"),
        "empty": (b"", r"is empty \(0 bytes\)"),
        "random bytes": (np.random.default_rng(0).bytes(3000), "is not a GZIP-compressed TFRecord file"),
        "cut short": (data[: len(data) // 2], "is cut short after [0-5] complete records"),
        "not TFRecord": (gzip.compress(b"x" * 5000), "the length of record 1 fails its checksum"),
        "not compressed": (frames, "is not a GZIP-compressed TFRecord file"),
    }


@pytest.mark.parametrize("damage", ["short", "empty", "random bytes", "cut short", "not TFRecord", "not compressed"])
def test_a_short_or_damaged_record_file_is_refused_before_training_naming_it(tmp_path, damage):
    (tmp_path / "written").mkdir()
    content, message = damaged_files(tmp_path / "written")[damage]
    path = tmp_path / PUBLISHED_FILES["tetrominoes"]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        files.check_files("tetrominoes", str(tmp_path), {"train": 64, "validation": 64})
    assert str(path) in str(error.value) and "download=True" not in str(error.value)


def test_a_split_smaller_than_its_batch_is_refused():
    with pytest.raises(datasets.DatasetTooSmallError, match="validation split of tetrominoes .* holds 5000 records"):
        files.check_files("tetrominoes", "/data", {"validation": 6000})


def test_a_repeated_split_without_a_full_batch_ends_in_one_message_not_stop_iteration(tmp_path, small_splits):
    write_records("tetrominoes", tmp_path, 8)  # records 8 on (train): none
    batches = datasets.make_dataset(
        "tetrominoes", str(tmp_path), "train", task="discovery", resolution=35, batch_size=2
    )
    with pytest.raises(datasets.DatasetTooSmallError, match="train split of .*tetrominoes_train.tfrecords holds no"):
        next(batches)


def clevr_description(data_dir, content: str) -> str:
    directory = os.path.join(files.clevr_directory(str(data_dir)))
    os.makedirs(directory)
    path = os.path.join(directory, "dataset_info.json")
    with open(path, "w") as file:
        file.write(content)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        ("garbage{", "is damaged: it is not TFDS's description of the data set"),
        ('{"name": "clevr"}', "is damaged: it is not TFDS's description"),
        ('{"splits": [{"name": "test", "shardLengths": ["9"]}]}', "lists no 'train' split"),
        ('{"splits": [{"name": "train", "shardLengths": ["515"]}]}', "holds 515 train scenes; the train split needs"),
    ],
)
def test_a_damaged_or_small_clevr_description_is_refused_naming_it(tmp_path, content, message):
    path = clevr_description(tmp_path, content)
    with pytest.raises(ValueError, match=message) as error:
        files.check_files("clevr", str(tmp_path), {"train": 64})
    assert os.path.dirname(path) in str(error.value)


def test_a_damaged_clevr_description_read_by_tfds_names_the_directory(tmp_path):
    clevr_description(tmp_path, "garbage{")
    with pytest.raises(datasets.CorruptRecordError, match="(?s)Could not read the prepared CLEVR in .*prepare clevr"):
        datasets.make_dataset("clevr", str(tmp_path), "validation", task="discovery", resolution=16, batch_size=2)


def test_clevr_shard_files_are_checked(tmp_path):
    clevr_description(tmp_path, '{"splits": [{"name": "train", "shardLengths": ["600", "600"]}]}')
    with pytest.raises(datasets.DatasetNotFoundError, match="lacks 2 of the 2 files of the train split"):
        files.check_files("clevr", str(tmp_path), {"train": 64})
