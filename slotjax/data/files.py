"""The real data sets' files: where they are, how to get them, and a check that they are there and long enough.

Plain Python (no TensorFlow), so that train.py refuses a missing, empty, cut-short or foreign file in about a
second, before anything else starts; `slotjax.data.datasets` then reads the files with TensorFlow.

`check_files(dataset, data_dir, needs)` checks the files of the splits in `needs` ({split: global batch
size}): a DeepMind file must be a GZIP TFRecord file whose records reach the end of the first batch of every
split (`RECORD_SPLITS`); a prepared TFDS CLEVR must have a readable `dataset_info.json` whose splits hold a
batch and all their shard files. Files on remote file systems (gs://) are left to TensorFlow.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib

from slotjax.data.encoding import MAX_OBJECTS

DATASETS = ("clevr", "clevr_with_masks", "multi_dsprites", "tetrominoes", "objects_room")
SPLITS = ("train", "train_eval", "validation", "test")
CLEVR6_MAX_OBJECTS = 6  # the paper's CLEVR6: CLEVR scenes with at most 6 objects
CLEVR_CROP = (slice(29, 221), slice(64, 256))  # rows, columns: the official crop of discovery's images

CLEVR_TFDS_NAME = "clevr:3.1.0"
CLEVR_PAGE = "https://cs.stanford.edu/people/jcjohns/clevr/"
DEEPMIND_BUCKET = "gs://multi-object-datasets"
DEEPMIND_PAGE = "https://github.com/google-deepmind/multi_object_datasets"
TRAIN_EVAL_SIZE = 512
# (first record, end record or None for the end of the file) of each split of a DeepMind file.
RECORD_SPLITS: dict[str, tuple[int, int | None]] = {
    "validation": (0, 5_000),
    "test": (5_000, 10_000),
    "train": (10_000, None),
    "train_eval": (10_000, 10_000 + TRAIN_EVAL_SIZE),
}
# CLEVR's splits: (TFDS split, first scene, end scene or None).
CLEVR_SPLITS: dict[str, tuple[str, int, int | None]] = {
    "train": ("train", TRAIN_EVAL_SIZE, None),
    "train_eval": ("train", 0, TRAIN_EVAL_SIZE),
    "validation": ("validation", 0, None),
    "test": ("test", 0, None),
}
RECORD_FILES = {
    "clevr_with_masks": "clevr_with_masks_train.tfrecords",
    "multi_dsprites": "multi_dsprites_colored_on_grayscale.tfrecords",
    "tetrominoes": "tetrominoes_train.tfrecords",
    "objects_room": "objects_room_train.tfrecords",
}
# A file is counted up to this many compressed bytes: far enough for every split's first batch in a file of
# small records, while a large file (clevr_with_masks inflates at ~8 ms a record) is not read twice at start;
# a file that runs out later is reported by the pipeline (`slotjax.data.datasets`).
COUNT_BUDGET_BYTES = 64 << 20


class DatasetNotFoundError(ValueError):
    """The data set's files are not where `data_dir` says."""


class CorruptRecordError(ValueError):
    """A data file could not be read or a record does not parse."""


class DatasetTooSmallError(ValueError):
    """A data file holds fewer records than the splits need."""


def most_objects(config) -> int:
    """The most objects a scene of the config's data set holds: the embedded scenes' setting, up to 10 in CLEVR."""
    return config.max_objects if config.dataset == "scenes" else MAX_OBJECTS


def is_remote(path: str) -> bool:
    return "://" in path


def clevr_directory(data_dir: str) -> str:
    name, version = CLEVR_TFDS_NAME.split(":")
    return os.path.join(data_dir, name, version)


def clevr_instructions(data_dir: str) -> str:
    return (
        f"Prepare it once (downloads 17.7 GiB from {CLEVR_PAGE}) with\n"
        f"  python -m slotjax.data.prepare clevr --data_dir={data_dir or 'DIR'}\n"
        f"and pass that directory as --config.data_dir."
    )


def clevr_not_found(data_dir: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"CLEVR not found: expected the prepared TFDS data set {CLEVR_TFDS_NAME} in {clevr_directory(data_dir)!r} "
        f"(dataset_info.json and clevr-*.tfrecord files; data_dir={data_dir!r}). " + clevr_instructions(data_dir)
    )


def record_candidates(name: str, data_dir: str) -> list[str]:
    """Where a DeepMind file may be: `data_dir/FILE` or `data_dir/NAME/FILE`."""
    return [os.path.join(data_dir, RECORD_FILES[name]), os.path.join(data_dir, name, RECORD_FILES[name])]


def record_instructions(name: str, data_dir: str) -> str:
    bucket_file = f"{DEEPMIND_BUCKET}/{name}/{RECORD_FILES[name]}"
    https_file = bucket_file.replace("gs://", "https://storage.googleapis.com/")
    return (
        f"Get it ({DEEPMIND_PAGE}) with\n"
        f"  gsutil cp {bucket_file} {data_dir or 'DIR'}\n"
        f"or, without gsutil,\n"
        f"  curl -o {os.path.join(data_dir or 'DIR', RECORD_FILES[name])} {https_file}"
    )


def record_not_found(name: str, data_dir: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: expected the file {RECORD_FILES[name]} in data_dir={data_dir!r} "
        f"(looked for {' and '.join(repr(path) for path in record_candidates(name, data_dir))}). "
        + record_instructions(name, data_dir)
    )


def check_files(dataset: str, data_dir: str, needs: dict[str, int]) -> None:
    """Refuses missing, unreadable or too short files of `dataset` for the splits in `needs` ({split: batch})."""
    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown data set {dataset!r}; use one of {', '.join(DATASETS)} (or 'scenes', the embedded one)."
        )
    unknown = sorted(set(needs) - set(SPLITS))
    if unknown:
        raise ValueError(f"Unknown split {unknown[0]!r}; use one of {', '.join(SPLITS)}.")
    if is_remote(data_dir):
        return
    if dataset == "clevr":
        _check_clevr(data_dir, needs)
    else:
        _check_records(dataset, data_dir, needs)


def _check_records(name: str, data_dir: str, needs: dict[str, int]) -> None:
    required = {}
    for split, batch_size in needs.items():
        first, end = RECORD_SPLITS[split]
        if end is not None and end - first < batch_size:
            raise DatasetTooSmallError(
                f"The {split} split of {name} (records {first} to {end - 1}) holds {end - first} records, "
                f"fewer than a batch of {batch_size}; lower the batch size."
            )
        required[split] = first + batch_size
    path = next((path for path in record_candidates(name, data_dir) if data_dir and os.path.isfile(path)), None)
    if path is None:
        raise record_not_found(name, data_dir)
    need = max(required.values(), default=0)
    size = os.path.getsize(path)
    count, complete = count_records(path, need, os.path.getmtime(path), size)
    if complete and count < need:
        split = max(required, key=required.get)
        raise DatasetTooSmallError(
            f"{path} has {count:,} records, the splits need {need:,}: the {split} split reads from record "
            f"{RECORD_SPLITS[split][0]:,} on, in batches of {needs[split]} (validation = records 0-4,999, "
            f"test = 5,000-9,999, train = 10,000 on). Use the complete published file. "
            + record_instructions(name, data_dir)
        )


@functools.lru_cache(maxsize=16)
def count_records(path: str, limit: int, mtime: float = 0.0, size: int = 0) -> tuple[int, bool]:
    """(records counted, whether that is all of them or `limit`) of a GZIP TFRecord file, read up to `limit`
    records or `COUNT_BUDGET_BYTES`; `mtime` and `size` key the cache. Raises `CorruptRecordError` naming the
    file for an empty, foreign, damaged or cut-short file."""
    count, header, skip = 0, b"", 0
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # GZIP
    with open(path, "rb") as file:
        start = file.read(2)
        if not start:
            raise CorruptRecordError(f"{path} is empty (0 bytes): the download did not finish. Get it again.")
        if start != b"\x1f\x8b":
            raise CorruptRecordError(
                f"{path} is not a GZIP-compressed TFRecord file (it starts with bytes {start.hex()}, not 1f8b): "
                "it is damaged or another file. Get it again."
            )
        file.seek(0)
        read = 0
        while count < limit:
            if read >= COUNT_BUDGET_BYTES:
                return count, False
            chunk = file.read(1 << 20)
            read += len(chunk)
            data = b""
            try:
                if not chunk:
                    data = decompressor.flush()
                else:
                    data = decompressor.decompress(chunk)
                    while decompressor.eof and decompressor.unused_data:  # concatenated GZIP members
                        rest = decompressor.unused_data
                        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                        data += decompressor.decompress(rest)
            except zlib.error as error:
                raise CorruptRecordError(
                    f"{path} is damaged after {count} records: its GZIP data does not inflate ({error}). Get it again."
                ) from error
            view, position = memoryview(data), 0
            while position < len(view) and count < limit:
                if skip:
                    taken = min(skip, len(view) - position)
                    skip, position = skip - taken, position + taken
                    count += skip == 0
                    continue
                taken = min(12 - len(header), len(view) - position)
                header, position = header + bytes(view[position : position + taken]), position + taken
                if len(header) == 12:
                    length, checksum = struct.unpack("<QI", header)
                    if checksum != _masked_crc32c(header[:8]):
                        raise CorruptRecordError(
                            f"{path} is damaged or not a TFRecord file: the length of record {count + 1} fails its "
                            "checksum. Get it again."
                        )
                    header, skip = b"", length + 4  # the data and its checksum
            if not chunk:
                if header or skip or not decompressor.eof:
                    raise CorruptRecordError(
                        f"{path} is cut short after {count} complete records: the download did not finish. "
                        "Get it again."
                    )
                return count, True
    return count, False


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _check_clevr(data_dir: str, needs: dict[str, int]) -> None:
    directory = clevr_directory(data_dir)
    info_path = os.path.join(directory, "dataset_info.json")
    if not data_dir or not os.path.isfile(info_path):
        raise clevr_not_found(data_dir)
    try:
        with open(info_path, "rb") as file:
            info = json.loads(file.read().decode("utf-8"))
        split_shards = {split["name"]: [int(length) for length in split["shardLengths"]] for split in info["splits"]}
    except (ValueError, KeyError, TypeError) as error:
        reason = error.args[0] if isinstance(error, KeyError) else error
        raise CorruptRecordError(
            f"{info_path} is damaged: it is not TFDS's description of the data set ({type(error).__name__}: "
            f"{reason}). " + clevr_instructions(data_dir)
        ) from error
    for split, batch_size in needs.items():
        tfds_split, first, end = CLEVR_SPLITS[split]
        if tfds_split not in split_shards:
            raise CorruptRecordError(
                f"{info_path} lists no {tfds_split!r} split (it has {', '.join(sorted(split_shards)) or 'none'}). "
                + clevr_instructions(data_dir)
            )
        size = sum(split_shards[tfds_split])
        available = min(size, end if end is not None else size) - first
        if available < batch_size:
            raise DatasetTooSmallError(
                f"{directory} holds {size} {tfds_split} scenes; the {split} split needs {first + batch_size} "
                f"(from scene {first}, a batch of {batch_size}). " + clevr_instructions(data_dir)
            )
        shards = len(split_shards[tfds_split])
        missing = [
            f"clevr-{tfds_split}.tfrecord-{index:05d}-of-{shards:05d}"
            for index in range(shards)
            if not os.path.isfile(os.path.join(directory, f"clevr-{tfds_split}.tfrecord-{index:05d}-of-{shards:05d}"))
        ]
        if missing:
            raise DatasetNotFoundError(
                f"{directory} lacks {len(missing)} of the {shards} files of the {tfds_split} split "
                f"(e.g. {missing[0]}). " + clevr_instructions(data_dir)
            )
