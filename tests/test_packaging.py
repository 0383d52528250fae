"""pyproject.toml: a backend that writes the license metadata, one Python version throughout."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_build_backend_writes_an_spdx_license_and_ships_its_file():
    (backend,) = PYPROJECT["build-system"]["requires"]
    assert Requirement(backend).specifier == SpecifierSet(">=77")  # PEP 639 license strings
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_one_python_version_in_metadata_ruff_and_the_tests():
    python = SpecifierSet(PYPROJECT["project"]["requires-python"])
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert tested in python and "3.12" not in python and "3.10" not in python
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + tested.replace(".", "")


def test_both_packages_are_typed():
    assert (ROOT / "producer" / "py.typed").exists() and (ROOT / "worker" / "py.typed").exists()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["*"] == ["py.typed"]
