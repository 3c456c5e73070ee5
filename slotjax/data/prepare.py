"""Downloads and prepares CLEVR, the data set slotjax reads from TensorFlow Datasets, with the project's own packages.

    python -m slotjax.data.prepare clevr --data_dir=DIR

Runs TFDS's `tfds.builder("clevr:3.1.0", data_dir=DIR).download_and_prepare()`: downloads CLEVR v1.0 (17.7 GiB)
into DIR/downloads, unpacks it there and writes the prepared data set (dataset_info.json and clevr-*.tfrecord files)
to DIR/clevr/3.1.0, which `python train.py --config.dataset=clevr --config.data_dir=DIR` reads; TFDS shows the
progress. A data set already prepared there is reused. DIR/downloads is not needed once it is prepared. (TFDS's own
command line, `tfds build`, needs apache_beam, which the project does not install.)

The DeepMind data sets (clevr_with_masks, multi_dsprites, tetrominoes, objects_room) are single TFRecord files read
as published: for those the command says where to get them. Errors are one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.parse
import urllib.request

from slotjax.data import files

# name -> (TFDS name:version, the URL its builder downloads from)
TFDS_DATASETS = {"clevr": (files.CLEVR_TFDS_NAME, "https://dl.fbaipublicfiles.com/clevr/CLEVR_v1.0.zip")}
DOWNLOAD_SIZE = {"clevr": "17.7 GiB"}
CONNECT_TIMEOUT_SECONDS = 20


class PrepareError(Exception):
    """A data set that cannot be prepared, with the reason and what to do."""


def prepared_directory(name: str, data_dir: str) -> str:
    """Where TFDS writes the prepared data set `name`: DATA_DIR/NAME/VERSION."""
    return os.path.join(data_dir, *TFDS_DATASETS[name][0].split(":"))


def check_reachable(url: str) -> None:
    """Refuses at once a download server that cannot be reached, which TFDS would retry for minutes. Left to TFDS
    behind a proxy (the environment's https_proxy), which is the one that connects."""
    if urllib.request.getproxies().get("https"):
        return
    host = urllib.parse.urlsplit(url).hostname
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise PrepareError(
            f"cannot reach {host} to download {url} ({error.strerror or error}): check the network connection "
            "(or set https_proxy) and run the command again."
        ) from None


def prepare(name: str, data_dir: str) -> str:
    """Downloads and prepares the TFDS data set `name` in `data_dir` as train.py reads it; returns its directory."""
    if name in files.RECORD_FILES:
        url = f"{files.DEEPMIND_BUCKET}/{name}/{files.RECORD_FILES[name]}".replace(
            "gs://", "https://storage.googleapis.com/"
        )
        raise PrepareError(
            f"{name} is one of DeepMind's TFRecord files ({files.DEEPMIND_PAGE}), read as published, not prepared by "
            f"TFDS: get it with `curl -o {os.path.join(data_dir, files.RECORD_FILES[name])} {url}`."
        )
    if name not in TFDS_DATASETS:
        raise PrepareError(
            f"{name!r} is not a data set to prepare: prepare {', '.join(TFDS_DATASETS)}; the DeepMind data sets "
            f"({', '.join(files.RECORD_FILES)}) are single files (name one to see where to get it), and the embedded "
            "'scenes' need nothing."
        )
    tfds_name, url = TFDS_DATASETS[name]
    directory = prepared_directory(name, data_dir)
    if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
        check_reachable(url)
        print(f"Preparing {tfds_name} in {directory}: downloads {DOWNLOAD_SIZE[name]} from {url}.", flush=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads and writes files here
    import tensorflow_datasets as tfds

    tfds.builder(tfds_name, data_dir=data_dir).download_and_prepare()
    # What train.py checks before it starts: every split described, with all its files.
    files.check_files(name, data_dir, {"train_eval": 1, "validation": 1, "test": 1})
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m slotjax.data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", help=f"the data set to prepare: {', '.join(TFDS_DATASETS)}")
    parser.add_argument("--data_dir", required=True, help="directory of the data sets (--config.data_dir of train.py)")
    args = parser.parse_args(argv)
    try:
        if not args.data_dir:
            raise PrepareError("--data_dir is empty: give the directory to prepare the data set in, --data_dir=DIR.")
        directory = prepare(args.dataset, args.data_dir)
    except KeyboardInterrupt:
        print(f"Stopped: {args.dataset} is not prepared; run the same command again.", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # TFDS's and the network's errors of every kind: one line, no traceback
        message = (str(error).strip() or type(error).__name__).splitlines()[0]
        sys.exit(f"error: {message}" if isinstance(error, PrepareError) else f"error: {args.dataset}: {message}")
    print(
        f"{args.dataset} is prepared in {directory}; train on it with --config.dataset={args.dataset} "
        f"--config.data_dir={args.data_dir}"
    )


if __name__ == "__main__":
    main()
