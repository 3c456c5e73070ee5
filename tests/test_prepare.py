"""python -m slotjax.data.prepare: TFDS's own download_and_prepare of clevr:3.1.0 with only the download replaced (by a
small CLEVR_v1.0 tree as the published zip unpacks), read back by slotjax's loader; and its one-line refusals."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from PIL import Image

from slotjax.data import datasets, files, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_SIZES = {"train": 2, "val": 3, "test": 1}  # the zip's folder names; TFDS calls "val" validation
OBJECT = {
    "color": "red",
    "material": "metal",
    "shape": "cube",
    "size": "large",
    "rotation": 10.0,
    "pixel_coords": [1.0, 2.0, 3.0],
    "3d_coords": [0.5, -1.0, 0.35],
}


def fake_clevr_download(root) -> str:
    """CLEVR_v1.0/{images,questions,scenes}: 320x480 PNGs of one grey level each, one object per scene (the test
    split has no scenes file, as published)."""
    for split, size in SPLIT_SIZES.items():
        for folder in ("images", "questions", "scenes"):
            os.makedirs(root / "CLEVR_v1.0" / folder / split, exist_ok=True)
        for index in range(size):
            image = np.full((320, 480, 3), 40 * index, np.uint8)
            Image.fromarray(image).save(root / "CLEVR_v1.0" / "images" / split / f"CLEVR_{split}_{index:06d}.png")
        questions = [{"image_filename": f"CLEVR_{split}_000000.png", "question": "Is it red?", "answer": "yes"}]
        (root / "CLEVR_v1.0" / "questions" / f"CLEVR_{split}_questions.json").write_text(
            json.dumps({"questions": questions})
        )
        if split != "test":
            scenes = {"scenes": [{"objects": [OBJECT]} for _ in range(size)]}
            (root / "CLEVR_v1.0" / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps(scenes))
    return str(root)


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """The URLs TFDS downloads; the download returns the fake tree."""
    fetched = []
    tree = fake_clevr_download(tmp_path / "zip")

    def download_and_extract(self, url):
        fetched.append(url)
        return tree

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    return fetched


def test_prepares_clevr_as_train_py_reads_it_and_reuses_it(tmp_path, downloads, monkeypatch, capsys):
    checked = []
    monkeypatch.setattr(prepare, "check_reachable", checked.append)
    data_dir = str(tmp_path / "data")
    prepare.main(["clevr", f"--data_dir={data_dir}"])
    url = prepare.TFDS_DATASETS["clevr"][1]
    assert checked == downloads == [url]  # the URL checked is the one TFDS's builder fetches
    directory = os.path.join(data_dir, "clevr", "3.1.0")
    assert f"clevr is prepared in {directory}" in capsys.readouterr().out
    splits = tfds.builder(files.CLEVR_TFDS_NAME, data_dir=data_dir).info.splits
    assert {name: splits[name].num_examples for name in ("train", "validation", "test")} == {
        "train": 2,
        "validation": 3,
        "test": 1,
    }
    files.check_files("clevr", data_dir, {"validation": 3})
    batch = next(
        datasets.make_dataset("clevr", data_dir, "validation", task="set_prediction", resolution=8, batch_size=3)
    )
    assert sorted(np.unique(batch["image"]).round(4)) == [-1.0, round(40 / 255 * 2 - 1, 4), round(80 / 255 * 2 - 1, 4)]
    np.testing.assert_allclose(batch["target"][:, 0, :3], [[(0.5 + 3) / 6, (-1.0 + 3) / 6, (0.35 + 3) / 6]] * 3)
    prepare.main(["clevr", f"--data_dir={data_dir}"])  # prepared already: no download, no network check
    assert checked == downloads == [url]


def test_no_network_is_one_line_before_any_download(tmp_path, downloads, monkeypatch):
    for proxy in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)

    def unresolved(address, timeout):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unresolved)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["clevr", f"--data_dir={tmp_path}"])
    message = str(stopped.value.code)
    assert message.startswith("error: cannot reach dl.fbaipublicfiles.com") and "Name or service not known" in message
    assert "\n" not in message and downloads == []
    assert not os.path.exists(tmp_path / "clevr")


def test_a_download_that_breaks_is_one_line(tmp_path, downloads, monkeypatch):
    def broken(self, url):
        raise requests.exceptions.ConnectionError("Connection broken: IncompleteRead\n(more detail)")

    monkeypatch.setattr(prepare, "check_reachable", lambda url: None)  # reachable, then the transfer breaks
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", broken)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["clevr", f"--data_dir={tmp_path}"])
    assert stopped.value.code == "error: clevr: Connection broken: IncompleteRead"


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--help"])
    assert stopped.value.code == 0
    assert "python -m slotjax.data.prepare clevr --data_dir=DIR" in capsys.readouterr().out


def test_an_unknown_name_is_one_error_line_and_status_1():
    result = subprocess.run(
        [sys.executable, "-m", "slotjax.data.prepare", "clevr6", "--data_dir=DIR"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: 'clevr6' is not a data set to prepare: prepare clevr; the DeepMind data sets (clevr_with_masks, "
        "multi_dsprites, tetrominoes, objects_room) are single files (name one to see where to get it), and the "
        "embedded 'scenes' need nothing."
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("scenes", "error: 'scenes' is not a data set to prepare"),
        (
            "tetrominoes",
            "curl -o DIR/tetrominoes_train.tfrecords "
            "https://storage.googleapis.com/multi-object-datasets/tetrominoes/tetrominoes_train.tfrecords",
        ),
        ("clevr_with_masks", "clevr_with_masks/clevr_with_masks_train.tfrecords"),
    ],
)
def test_other_names_are_one_error_line(name, expected):
    with pytest.raises(SystemExit) as stopped:
        prepare.main([name, "--data_dir=DIR"])
    assert expected in stopped.value.code and "\n" not in stopped.value.code
