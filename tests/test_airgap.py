"""tools/airgap.py: what an air-gapped GPU box is given (the study's environment on the lent H200)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def airgap():
    spec = importlib.util.spec_from_file_location("airgap", REPO / "tools" / "airgap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pipeline_set_is_the_installed_closure_with_requested_extras_less_what_the_box_has(airgap):
    names = {airgap._norm(n) for n in airgap.closure(airgap.ROOTS["pipeline"])}
    assert {"mlflow", "prefect", "dvc", "lm-eval", "llmcompressor", "pydantic"} <= names
    # prefect asks for sqlalchemy[asyncio]: without greenlet its server does not start (seen on the H200)
    assert "greenlet" in names
    assert not names & {"torch", "transformers", "numpy", "pandas", "tokenizers", "safetensors"}
    assert not any(n.startswith("nvidia-") for n in names)


def test_split_parts_join_back_and_a_changed_part_is_refused(airgap, tmp_path):
    big = tmp_path / "model.bin"
    big.write_bytes(bytes(range(256)) * 9000)  # 2.2 MB
    parts = tmp_path / "parts"
    airgap.split([big], parts, part_mib=1)
    entry = json.loads((parts / "parts.json").read_text())["model.bin"]
    assert len(entry["parts"]) == 3
    out = tmp_path / "out"
    out.mkdir()
    assert airgap.join(parts, out) == [out / "model.bin"]
    assert (out / "model.bin").read_bytes() == big.read_bytes()
    (parts / entry["parts"][1]).write_bytes(b"x" * 10)
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        airgap.join(parts, out)
