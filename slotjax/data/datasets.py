"""The real data sets of the paper, as tf.data pipelines that yield numpy batches.

``make_dataset(name, data_dir, split, task=..., resolution=..., batch_size=...)``
returns an endless (or, with ``repeat=False``, a single pass) iterator of
dicts, the same keys as the embedded scenes (``slotjax.data.scenes``):

- ``image``: float32 [B, R, R, 3] in [-1, 1], ``(x / 255 - 0.5) * 2``, resized
  bilinearly without antialiasing (as TF's and the official code's
  ``tf.image.resize``), clipped to [-1, 1];
- ``segmentation``: int32 [B, R, R], per-pixel entity id (0 = background), for
  the data sets with masks: the argmax over the entity axis of the 0/255
  masks, cropped like the image and resized with nearest neighbour;
- ``target``: float32 [B, 10, 19], set prediction on ``clevr`` only
  (``slotjax.data.encoding``, rows past the last object all zero).

``batch_size`` is the batch of this process; each of ``process_count``
processes reads a disjoint share of the split. Batches are always full (the
remainder is dropped).

Data sets (``data_dir`` is where they live, locally or on ``gs://``):

- ``clevr``: TFDS ``clevr:3.1.0`` under ``data_dir/clevr/3.1.0`` (320x480
  PNGs; train 70k, validation 15k, test 15k scenes, test without objects).
  Splits as the official code: ``train`` = TFDS train minus its first 512
  scenes, ``train_eval`` = those 512, ``validation`` and ``test`` = TFDS's.
  Discovery keeps scenes with <= 6 objects (CLEVR6) and crops rows 29:221,
  columns 64:256 before resizing (the official crop; it was made for 240x320
  images and is not centred on CLEVR's 320x480). Set prediction keeps all
  scenes (<= 10 objects), resizes the whole image (no crop) and encodes each
  object as 3-D coordinates ``(c + 3) / 6``, one-hot size, material, shape and
  colour in the orders of ``slotjax.data.encoding`` (TFDS's class labels are
  mapped by name) and 1 for present. The test split has no objects, so it serves
  discovery only (CLEVR6 filtering keeps all its scenes).
- DeepMind multi-object data sets (github.com/google-deepmind/multi_object_datasets):
  one GZIP TFRecord file each, in ``data_dir`` or ``data_dir/<name>/``, of
  tf.train.Example records whose byte features hold one single-byte string per
  element (decoded with ``decode_raw`` and squeezed), masks 0/255 with entity 0
  the background:

  - ``clevr_with_masks`` (``clevr_with_masks_train.tfrecords``, 100k scenes):
    240x320, 11 entities, masks [11, 240, 320, 1]; per-entity x, y, z,
    rotation, visibility, pixel_coords [11, 3] floats and size, material,
    shape, color byte codes. CLEVR6: keeps scenes with at most 6 objects,
    counted as the entities 1 to 10 with nonzero ``visibility`` (the data
    set's flag for objects present; entity 0 is the background). Same crop as
    CLEVR, then resize.
  - ``multi_dsprites`` (``multi_dsprites_colored_on_grayscale.tfrecords``, 1M):
    64x64, 6 entities, masks stored [64, 64, 6, 1] (transposed to entities
    first); x, y, shape, visibility, orientation, scale and color [6, 3] floats.
  - ``tetrominoes`` (``tetrominoes_train.tfrecords``, 1M): 35x35, 4 entities;
    x, y, shape, visibility and color [4, 3] floats. Images are resized
    bilinearly (masks nearest) to ``resolution``, e.g. 32 or 64, sizes the
    decoder can produce.
  - ``objects_room`` (``objects_room_train.tfrecords``, 1M): 64x64, 7 entities
    (sky, floor, two wall halves, up to 3 objects); image and masks only.

  Each file is one published "train" set, split here by record index
  (``slotjax.data.files.RECORD_SPLITS``): ``validation`` = records 0 to 4,999, ``test`` = 5,000
  to 9,999, ``train`` = the rest, ``train_eval`` = the first 512 records of
  ``train``. A GZIP file is read from its start, so the split evaluated
  during training comes first and starting ``train`` skips 10,000 records
  (about a minute for clevr_with_masks, a few seconds for the others). The
  CLEVR6 filter applies after the split. These data sets have no set
  prediction targets.

Pipelines decode in parallel on a private pool of TF threads (``num_threads``,
by default all cores but one), shuffle with a seeded buffer after
preprocessing, and prefetch. TF is kept off the GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from slotjax.data import files  # noqa: E402
from slotjax.data.encoding import COLOURS, MATERIALS, MAX_OBJECTS, OBJECT_SIZE, SHAPES, SIZES  # noqa: E402
from slotjax.data.files import CLEVR6_MAX_OBJECTS, CLEVR_TFDS_NAME, DATASETS, SPLITS  # noqa: E402
from slotjax.tasks import DataNeeds, task_named  # noqa: E402

# The errors of make_dataset and check_dataset (defined with the plain-Python file checks).
DatasetNotFoundError = files.DatasetNotFoundError
CorruptRecordError = files.CorruptRecordError
DatasetTooSmallError = files.DatasetTooSmallError

try:
    tf.config.set_visible_devices([], "GPU")  # leave the accelerator to JAX
except RuntimeError:  # TF already initialised its devices elsewhere
    pass

# TFDS clevr feature name -> the one-hot order of the set prediction target.
TARGET_PROPERTIES = (("size", SIZES), ("material", MATERIALS), ("shape", SHAPES), ("color", COLOURS))
_CLEVR_TEST_HAS_NO_OBJECTS = "CLEVR's test split has no object annotations; use 'validation' for set prediction."


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """One DeepMind multi-object TFRecord file: its name and tf.train.Example features."""

    file_name: str
    image_size: tuple[int, int]
    num_entities: int
    float_features: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    byte_attributes: tuple[str, ...] = ()  # per-entity one-byte codes
    masks_entities_last: bool = False  # masks stored [H, W, entities, 1]
    crop: bool = False
    max_objects: int | None = None  # keep scenes with at most this many objects (nonzero visibility)

    def feature_spec(self) -> dict[str, tf.io.FixedLenFeature]:
        height, width = self.image_size
        entities = self.num_entities
        mask_shape = [height, width, entities, 1] if self.masks_entities_last else [entities, height, width, 1]
        spec = {
            "image": tf.io.FixedLenFeature([height, width, 3], tf.string),
            "mask": tf.io.FixedLenFeature(mask_shape, tf.string),
        }
        spec |= {name: tf.io.FixedLenFeature([entities], tf.string) for name in self.byte_attributes}
        spec |= {name: tf.io.FixedLenFeature(list(shape), tf.float32) for name, shape in self.float_features.items()}
        return spec


def _entity_floats(entities: int, scalars: tuple[str, ...], triples: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {name: (entities,) for name in scalars} | {name: (entities, 3) for name in triples}


RECORD_FORMATS = {
    "clevr_with_masks": RecordFormat(
        files.RECORD_FILES["clevr_with_masks"],
        (240, 320),
        11,
        _entity_floats(11, ("x", "y", "z", "rotation", "visibility"), ("pixel_coords",)),
        byte_attributes=("size", "material", "shape", "color"),
        crop=True,
        max_objects=CLEVR6_MAX_OBJECTS,
    ),
    "multi_dsprites": RecordFormat(
        files.RECORD_FILES["multi_dsprites"],
        (64, 64),
        6,
        _entity_floats(6, ("x", "y", "shape", "visibility", "orientation", "scale"), ("color",)),
        masks_entities_last=True,
    ),
    "tetrominoes": RecordFormat(
        files.RECORD_FILES["tetrominoes"],
        (35, 35),
        4,
        _entity_floats(4, ("x", "y", "shape", "visibility"), ("color",)),
    ),
    "objects_room": RecordFormat(files.RECORD_FILES["objects_room"], (64, 64), 7),
}


def make_dataset(
    name: str,
    data_dir: str,
    split: str,
    *,
    task: str,
    resolution: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    download: bool = False,
    shuffle_buffer: int = 1024,
    num_threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `split` of data set `name` for `task`, this process's share (see the module docstring).

    `download=True` fetches a missing data set into `data_dir` first (CLEVR via
    TFDS, 17.7 GiB; the DeepMind files from their bucket). Raises
    `DatasetNotFoundError` when the files are missing, `CorruptRecordError`
    (while iterating) when they do not read.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}; use one of {', '.join(DATASETS)} (or 'scenes', the embedded one)."
        )
    task_needs = task_named(task).data
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if task_needs.targets and name != "clevr":
        raise ValueError(
            f"Data set {name!r} has no {task} targets; only 'clevr' (TFDS) gives them. "
            "Use dataset='clevr' or another task."
        )
    if resolution < 1 or batch_size < 1:
        raise ValueError(f"resolution ({resolution}) and batch_size ({batch_size}) must be positive.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")

    if name == "clevr":
        examples, source = _clevr_examples(
            data_dir, split, task_needs, resolution, shuffle, seed, process_index, process_count, download
        )
    else:
        examples, source = _record_examples(
            RECORD_FORMATS[name], name, data_dir, split, resolution, process_index, process_count, download
        )
    if shuffle:
        examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        examples = examples.repeat()
    batches = examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.threading.private_threadpool_size = num_threads or default_num_threads()
    options.threading.max_intra_op_parallelism = 1
    batches = _numpy_batches(batches.with_options(options), source)
    return _endless(batches, source, split, batch_size) if repeat else batches


def default_num_threads() -> int:
    """TF threads for decoding: all the cores this process may use but one (left to the training loop)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def check_dataset(name: str, data_dir: str, task: str, needs: dict[str, int]) -> None:
    """Opens the files of the splits in `needs` ({split: global batch size}) and parses their first record,
    refusing missing, short or unreadable files in one message naming the file (`slotjax.data.files` checks
    what plain Python can first)."""
    files.check_files(name, data_dir, needs)
    if task_named(task).data.targets and name == "clevr" and "test" in needs:
        raise ValueError(_CLEVR_TEST_HAS_NO_OBJECTS)
    if name == "clevr":
        builder = _clevr_builder(data_dir, download=False)
        for split in needs:
            tfds_split, first, _ = files.CLEVR_SPLITS[split]
            examples = builder.as_dataset(
                split=f"{tfds_split}[{first}:{first + 1}]", decoders={"image": tfds.decode.SkipDecoding()}
            )
            source = files.clevr_directory(data_dir)
            for example in _numpy_batches(examples.take(1), source):
                _decode_png(example["image"], source)
    else:
        record_format = RECORD_FORMATS[name]
        path = _record_file(record_format, name, data_dir, download=False)
        records = tf.data.TFRecordDataset(path, compression_type="GZIP").take(1)
        list(_numpy_batches(records.map(lambda record: _parse_record(record, record_format)), path))


def _decode_png(image: bytes, source: str) -> None:
    try:
        tf.io.decode_png(image)
    except tf.errors.InvalidArgumentError as error:
        message = f"Could not read {source}: an image does not decode ({_tf_message(error)})."
        raise CorruptRecordError(message) from error


def _numpy_batches(batches: tf.data.Dataset, source: str) -> Iterator[dict[str, np.ndarray]]:
    """Iterates as numpy, reporting unreadable data as `CorruptRecordError` naming `source`."""
    try:
        yield from batches.as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        raise CorruptRecordError(
            f"Could not read {source}: {_tf_message(error)}. The data is truncated, corrupt or not in "
            "the published format; download (or prepare) it again."
        ) from error


def _endless(batches: Iterator, source: str, split: str, batch_size: int) -> Iterator:
    """A repeated data set's batches; one that ends held no full batch: `DatasetTooSmallError` naming it."""
    yield from batches
    raise DatasetTooSmallError(
        f"The {split} split of {source} holds no full batch of {batch_size} scenes (counted after the filter "
        "by number of objects, where one applies): the data set is smaller than its splits need "
        "(slotjax.data.files). Use the complete published data set, or lower the batch size."
    )


def _tf_message(error: tf.errors.OpError) -> str:
    """TensorFlow's message without its graph annotations ({{function_node ...}}, [[{{node ...}}]], [Op:...])."""
    message = re.sub(r"\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]|\s+name:\s*$", " ", error.message)
    message = " ".join(message.split()).strip(" .;:")
    return message or type(error).__name__


def _preprocess(image: tf.Tensor, segmentation: tf.Tensor | None, crop: bool, resolution: int) -> dict[str, tf.Tensor]:
    """Uint8 image [H, W, 3] (and int32 ids [H, W, 1]) -> model inputs at `resolution` (module docstring)."""
    image = (tf.cast(image, tf.float32) / 255.0 - 0.5) * 2.0
    if crop:
        image = image[files.CLEVR_CROP]
    size = (resolution, resolution)
    image = tf.image.resize(image, size, method="bilinear", antialias=False)
    features = {"image": tf.clip_by_value(image, -1.0, 1.0)}
    if segmentation is not None:
        if crop:
            segmentation = segmentation[files.CLEVR_CROP]
        features["segmentation"] = tf.image.resize(segmentation, size, method="nearest")[..., 0]
    return features


# CLEVR (TFDS) ---------------------------------------------------------------


def _clevr_examples(
    data_dir: str,
    split: str,
    task_needs: DataNeeds,
    resolution: int,
    shuffle: bool,
    seed: int,
    process_index: int,
    process_count: int,
    download: bool,
) -> tuple[tf.data.Dataset, str]:
    """Preprocessed CLEVR examples of this process's share of `split`, and their directory."""
    if task_needs.targets and split == "test":
        raise ValueError(_CLEVR_TEST_HAS_NO_OBJECTS)
    builder = _clevr_builder(data_dir, download)
    tfds_split, first, end = files.CLEVR_SPLITS[split]
    if first or end is not None:
        tfds_split = f"{tfds_split}[{first or ''}:{end or ''}]"
    examples = builder.as_dataset(
        split=tfds.even_splits(tfds_split, n=process_count)[process_index],
        shuffle_files=shuffle,
        decoders={"image": tfds.decode.SkipDecoding()},  # decode only the scenes kept
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    max_objects = task_needs.clevr_max_objects
    examples = examples.filter(lambda example: tf.shape(example["objects"]["3d_coords"])[0] <= max_objects)
    features = builder.info.features
    label_orders = _target_label_orders(features["objects"].feature)

    def preprocess(example):
        image = features["image"].decode_example(example["image"])
        inputs = _preprocess(image, None, crop=task_needs.clevr_crop, resolution=resolution)
        if task_needs.targets:
            inputs["target"] = _clevr_target(example["objects"], label_orders)
        return inputs

    return examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE), files.clevr_directory(data_dir)


def _clevr_builder(data_dir: str, download: bool) -> tfds.core.DatasetBuilder:
    """TFDS's CLEVR builder of the prepared data set in `data_dir` (prepared first if asked)."""
    directory = files.clevr_directory(data_dir)
    prepared = bool(data_dir) and tf.io.gfile.exists(os.path.join(directory, "dataset_info.json"))
    if not prepared and not (download and data_dir):
        raise files.clevr_not_found(data_dir)
    try:
        builder = tfds.builder(CLEVR_TFDS_NAME, data_dir=data_dir)
    except Exception as error:  # TFDS's errors (RuntimeError, ValueError, ...) on damaged metadata
        raise CorruptRecordError(
            f"Could not read the prepared CLEVR in {directory!r}: {str(error).splitlines()[0].rstrip('.')}. "
            + files.clevr_instructions(data_dir)
        ) from error
    if not prepared:
        builder.download_and_prepare()
    return builder


def _target_label_orders(objects_features: tfds.features.FeaturesDict) -> dict[str, tf.Tensor]:
    """For each class label feature, TFDS class index -> index in the target's one-hot order, matched by name."""
    return {
        feature: tf.constant([order.index(label) for label in objects_features[feature].names])
        for feature, order in TARGET_PROPERTIES
    }


def _clevr_target(objects: dict[str, tf.Tensor], label_orders: dict[str, tf.Tensor]) -> tf.Tensor:
    """Float32 [10, 19] set prediction target (`slotjax.data.encoding`) of one scene's objects."""
    columns = [(objects["3d_coords"] + 3.0) / 6.0]
    for feature, order in TARGET_PROPERTIES:
        columns.append(tf.one_hot(tf.gather(label_orders[feature], objects[feature]), len(order)))
    num_objects = tf.shape(columns[0])[0]
    columns.append(tf.ones([num_objects, 1]))
    target = tf.pad(tf.concat(columns, axis=1), [[0, MAX_OBJECTS - num_objects], [0, 0]])
    return tf.ensure_shape(target, [MAX_OBJECTS, OBJECT_SIZE])


# DeepMind multi-object data sets (TFRecord) ---------------------------------


def _record_examples(
    record_format: RecordFormat,
    name: str,
    data_dir: str,
    split: str,
    resolution: int,
    process_index: int,
    process_count: int,
    download: bool,
) -> tuple[tf.data.Dataset, str]:
    """Preprocessed examples of this process's share of `split` of one DeepMind file, and the file."""
    path = _record_file(record_format, name, data_dir, download)
    first, end = files.RECORD_SPLITS[split]
    records = tf.data.TFRecordDataset(path, compression_type="GZIP", buffer_size=8 << 20).skip(first)
    if end is not None:
        records = records.take(end - first)
    records = records.shard(process_count, process_index)
    if record_format.max_objects is not None:
        # Parsing `visibility` alone is ~60x cheaper than the whole record (a million one-byte strings).
        visibility_spec = {"visibility": record_format.feature_spec()["visibility"]}
        records = records.filter(
            lambda record: (
                tf.math.count_nonzero(tf.io.parse_single_example(record, visibility_spec)["visibility"][1:])
                <= record_format.max_objects
            )
        )

    def preprocess(record):
        example = _parse_record(record, record_format)
        segmentation = tf.argmax(example["mask"], axis=0, output_type=tf.int32)  # [H, W, 1]
        return _preprocess(example["image"], segmentation, record_format.crop, resolution)

    return records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE), path


def _record_file(record_format: RecordFormat, name: str, data_dir: str, download: bool) -> str:
    """The data set's file in `data_dir` (or `data_dir/name/`), fetched from the bucket if asked."""
    candidates = files.record_candidates(name, data_dir)
    for path in candidates:
        if data_dir and tf.io.gfile.exists(path):
            return path
    if download and data_dir:
        tf.io.gfile.makedirs(data_dir)
        tf.io.gfile.copy(f"{files.DEEPMIND_BUCKET}/{name}/{record_format.file_name}", candidates[0])
        return candidates[0]
    raise files.record_not_found(name, data_dir)


def _parse_record(record: tf.Tensor, record_format: RecordFormat) -> dict[str, tf.Tensor]:
    """One serialized tf.train.Example -> uint8 image [H, W, 3], masks [E, H, W, 1] and the other features."""
    example = tf.io.parse_single_example(record, record_format.feature_spec())
    for feature in ("image", "mask", *record_format.byte_attributes):
        example[feature] = tf.squeeze(tf.io.decode_raw(example[feature], tf.uint8), axis=-1)
    if record_format.masks_entities_last:
        example["mask"] = tf.transpose(example["mask"], [2, 0, 1, 3])
    return example
