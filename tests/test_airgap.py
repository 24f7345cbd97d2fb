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


def test_pack_fills_transfers_under_the_limit_keeping_each_files_folder(airgap, tmp_path):
    src = tmp_path / "src"
    src.mkdir()

    def blob(name: str, kib: int):
        path = src / name
        path.write_bytes(b"x" * (kib << 10))
        return path

    wheels = [blob(f"w{i}.whl", 300) for i in range(5)]  # 1.5 MiB of wheels
    parts = [blob("model.part000", 700), blob("model.part001", 600)]
    rest = [blob("shared.tar.xz", 200)]
    folders = airgap.pack({"wheels": wheels, "parts": parts, "": rest}, tmp_path / "bundle", transfer_mib=1)
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders]
    assert all(size <= 1 << 20 for size in sizes) and len(folders) == 4  # 3400 KiB: at least 4 transfers of 1 MiB
    merged = {f.relative_to(d).as_posix() for d in folders for f in d.rglob("*") if f.is_file()}
    assert merged == {f"wheels/w{i}.whl" for i in range(5)} | {"parts/model.part000", "parts/model.part001"} | {
        "shared.tar.xz"
    }
    manifest = json.loads((tmp_path / "bundle" / "transfers.json").read_text())
    assert sorted(manifest) == ["c1", "c2", "c3", "c4"]
    with pytest.raises(SystemExit, match="over the 1 MiB transfer: split it"):
        airgap.pack({"": [blob("big.bin", 1100)]}, tmp_path / "bundle2", transfer_mib=1)
