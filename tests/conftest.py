"""Shared fixtures. Two tiers: unit tests build everything in-process (the tiny model and its
tokenizer); integration tests use ../shared (models, datasets) and skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import DATA, STORIES, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} not found (set SELFCAL_SHARED_DIR)")
    return DATA


@pytest.fixture(scope="session")
def stories() -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not found (set SELFCAL_SHARED_DIR)")
    return STORIES
