"""Shared fixtures: the tiny random Mllama, built once per test session."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-mllama"))
