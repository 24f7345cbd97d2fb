"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import STORIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not found (set SELFCAL_SHARED_DIR)")
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
