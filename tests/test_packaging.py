"""Packaging: the license declared in pyproject.toml, its file, and the Makefile's extra pip arguments."""

import os
import shutil
import subprocess
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_license_is_an_spdx_string_with_its_file():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        pyproject = tomllib.load(file)
    assert pyproject["project"]["license"] == "Apache-2.0"  # a table is deprecated by setuptools >= 77
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
    with open(os.path.join(REPO, "LICENSE")) as file:
        text = file.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_passes_pip_args_to_the_first_install(tmp_path):
    extra = "--extra-index-url https://download.pytorch.org/whl/cpu"
    result = subprocess.run(
        ["make", "-n", "test", f"PIP_ARGS={extra}", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f'pip install --quiet -e ".[dev]" {extra}' in result.stdout
