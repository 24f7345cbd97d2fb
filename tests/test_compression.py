"""The four methods on a tiny random model, on CPU, each verified from the saved files."""

from __future__ import annotations

import json

import pytest
import torch

from selfcal.calibration.calibset import load_calibration_set
from selfcal.compression import verify
from selfcal.config import parse_params
from selfcal.errors import ConfigError, VerificationError
from selfcal.pipeline import layout
from selfcal.pipeline.compress import compress
from selfcal.pipeline.generate import generate
from tests.helpers import small_params

METHODS = ["gptq", "awq", "sparsegpt", "wanda"]


@pytest.fixture(scope="module")
def params(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("compress")
    p = parse_params(small_params(tiny_model, work, **{"compression.methods": METHODS, "tracking.enabled": False}), root=work)
    generate(p, "self", 0, progress=False)
    return p


@pytest.fixture(scope="module")
def checkpoints(params):
    return {m: (compress(params, "self", 0, m), layout.checkpoint_dir(params, "self", 0, m)) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_reloads_and_links_its_calibration_set(params, checkpoints, method):
    from transformers import AutoModelForCausalLM

    manifest, ckpt = checkpoints[method]
    calib = load_calibration_set(layout.calibration_dir(params, "self", 0))
    assert manifest["calibration"]["digest"] == calib.digest
    assert manifest["method"] == method and manifest["verification"]["method"] == method
    assert (ckpt / "compression.json").is_file() and "compression.json" in manifest["files"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.isfinite(model(torch.tensor([[1, 7, 9, 11]])).logits).all()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruned_weights_keep_two_of_every_four_exactly(checkpoints, method):
    _, ckpt = checkpoints[method]
    model = verify.load_dense(ckpt)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            groups = (m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1)
            assert (groups <= 2).all(), name
            assert (m.weight == 0).float().mean() == pytest.approx(0.5, abs=1e-6), name
    report = json.loads((ckpt / "compression.json").read_text())
    assert report["min_nm_compliance"] == 1.0


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_groups_hold_at_most_16_values(checkpoints, method):
    _, ckpt = checkpoints[method]
    model = verify.load_dense(ckpt)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = m.weight.reshape(m.weight.shape[0], -1, 128)
            for row in range(0, w.shape[0], 17):
                for g in range(w.shape[1]):
                    assert w[row, g].unique().numel() <= 16, name
                    checked += 1
    assert checked > 50
    report = json.loads((ckpt / "compression.json").read_text())
    assert report["max_values_per_group"] <= 16
    assert 0 < report["mean_rel_error"] < 0.5
    assert report["size_bytes"] < 0.5 * report["dense_size_bytes"]


def test_impossible_settings_fail_before_loading(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"compression.sparsegpt: .*sparsity 0.7 is impossible with mask_structure 2:4"):
        parse_params(small_params(tiny_model, tmp_path, **{"compression.sparsegpt": {"sparsity": 0.7}}))
    with pytest.raises(ConfigError, match="mask_structure must be 'N:M'"):
        parse_params(small_params(tiny_model, tmp_path, **{"compression.wanda": {"mask_structure": "4:2"}}))
    p = parse_params(small_params(tiny_model, tmp_path, **{"compression.methods": ["awq"], "compression.awq": {"group_size": 96}, "tracking.enabled": False}), root=tmp_path)
    with pytest.raises(ConfigError, match=r"compression.awq.group_size: 96 divides the input width of no targeted layer"):
        compress(p, "self", 0, "awq")


def test_verification_rejects_broken_patterns_and_grids():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    with pytest.raises(VerificationError, match="0.5000 of groups keep the N:M pattern"):
        verify.check_pruning({"layer": w}, 0.5, (2, 4))
    many = torch.arange(32, dtype=torch.float32).reshape(1, 32)
    with pytest.raises(VerificationError, match="holds 32 distinct values, more than 2\\*\\*4"):
        verify.check_quantization({"layer": many}, {"layer": many}, 4, 32)
    ok = verify.check_quantization({"layer": many}, {"layer": many}, 4, 2)
    assert ok["layer"]["max_values_per_group"] == 2 and ok["layer"]["rel_error"] == 0.0


def test_awq_drops_mappings_whose_balance_layers_are_all_left_dense():
    from selfcal.compression.registry import RecipeContext, _awq_mappings

    layers = tuple(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    skipped = tuple(n for n in layers if n.endswith("down_proj"))
    kept = _awq_mappings(RecipeContext("LlamaForCausalLM", layers, skipped))
    assert [m.smooth_layer for m in kept] == ["re:.*input_layernorm$", "re:.*v_proj$", "re:.*post_attention_layernorm$"]
    assert _awq_mappings(RecipeContext("LlamaForCausalLM", layers, ())) is None
