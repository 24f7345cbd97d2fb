"""The four methods on tiny random models (tied and untied embeddings), on CPU, each verified
from the saved files: targeted layers compressed, every other tensor bit-identical to the base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from selfcal.calibration.calibset import load_calibration_set
from selfcal.compression import verify
from selfcal.config import parse_params
from selfcal.errors import ConfigError, VerificationError
from selfcal.pipeline import layout
from selfcal.pipeline.compress import compress
from selfcal.pipeline.generate import generate
from tests.helpers import build_tiny_model, small_params, write_params

METHODS = ["gptq", "awq", "sparsegpt", "wanda"]


@pytest.fixture(scope="module", params=["tied", "untied"])
def variant(request, tiny_model, tmp_path_factory):
    """(params, base model dir) for a tied and an untied tiny model, one calibration set each."""
    work = tmp_path_factory.mktemp(f"compress-{request.param}")
    model_dir = tiny_model if request.param == "tied" else build_tiny_model(work / "untied-llama", tie=False)
    p = parse_params(
        small_params(model_dir, work, **{"compression.methods": METHODS, "tracking.enabled": False}), root=work
    )
    generate(p, "self", 0, progress=False)
    return p, model_dir


@pytest.fixture(scope="module")
def params(variant):
    return variant[0]


@pytest.fixture(scope="module")
def checkpoints(variant):
    p, _ = variant
    return {m: (compress(p, "self", 0, m), layout.checkpoint_dir(p, "self", 0, m)) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_reloads_and_links_its_calibration_set(params, checkpoints, method):
    from transformers import AutoModelForCausalLM

    manifest, ckpt = checkpoints[method]
    calib = load_calibration_set(layout.calibration_dir(params, "self", 0))
    assert manifest.calibration.digest == calib.digest
    assert manifest.method == method and manifest.verification["method"] == method
    assert (ckpt / "compression.json").is_file() and "compression.json" in manifest.files
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.isfinite(model(torch.tensor([[1, 7, 9, 11]])).logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_everything_outside_the_targets_is_bit_identical_to_the_base(variant, checkpoints, method):
    """lm_head, the embeddings and the norms (all but AWQ's smoothed norms) read back from the
    saved files exactly as the base model stores them; the targeted linears all changed."""
    from safetensors.torch import load_file

    p, base_dir = variant
    manifest, ckpt = checkpoints[method]
    base = load_file(str(base_dir / "model.safetensors"))
    saved = verify.read_tensors(ckpt)
    tied = json.loads((base_dir / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in base) is (not tied) and ("lm_head.weight" in saved) is (not tied)
    untouched = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    if method != "awq":  # AWQ folds its scales into the norms before the layers it balances
        untouched += [
            f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
        ]
    for name in untouched:
        assert torch.equal(saved[name], base[name]), name
    assert manifest.verification["untouched"]["tensors_checked"] == len(untouched)
    dense = verify.load_dense(ckpt)
    for name, m in dense.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert not torch.equal(m.weight, base[f"{name}.weight"]), f"{name} was not compressed"


def test_a_planted_change_outside_the_targets_fails_naming_the_tensor(variant, checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, base_dir = variant
    _, ckpt = checkpoints["wanda"]
    planted = tmp_path / "planted"
    shutil.copytree(ckpt, planted)
    tensors = load_file(str(planted / "model.safetensors"))
    tensors["model.layers.1.post_attention_layernorm.weight"][3] += 1e-3
    save_file(tensors, str(planted / "model.safetensors"), metadata={"format": "pt"})
    changed = {
        f"model.layers.{i}.{k}"
        for i in range(2)
        for k in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert verify.check_untouched(base_dir, ckpt, changed)["tensors_changed"] == 14
    with pytest.raises(
        VerificationError, match=r"^model.layers.1.post_attention_layernorm.weight: must be bit-identical"
    ):
        verify.check_untouched(base_dir, planted, changed)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_plain_ignore_names_would_prune_lm_head_and_the_stage_refuses_it(variant, method, monkeypatch):
    """The bug this guards against: llm-compressor's pruning modifiers see "lm_head." and a plain
    "lm_head" in ``ignore`` never matched. With those plain names the stage must fail, naming the
    tensor that changed (the tied embeddings, or lm_head), and publish nothing."""
    from selfcal.compression.methods import RecipeContext

    p, _ = variant
    monkeypatch.setattr(RecipeContext, "dense_patterns", property(lambda ctx: list(ctx.dense_layers)))
    out = layout.checkpoint_dir(p, "self", 0, method)
    before = sorted(q.name for q in out.parent.iterdir())
    tied = p.model.path.endswith("tiny-llama")
    expected = "model.embed_tokens.weight" if tied else "lm_head.weight"
    with pytest.raises(VerificationError, match=rf"^{expected}: must be bit-identical"):
        compress(p, "self", 0, method)
    assert sorted(q.name for q in out.parent.iterdir()) == before


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
    with pytest.raises(
        ConfigError, match=r"compression.sparsegpt: .*sparsity 0.7 is impossible with mask_structure 2:4"
    ):
        parse_params(small_params(tiny_model, tmp_path, **{"compression.sparsegpt": {"sparsity": 0.7}}))
    with pytest.raises(ConfigError, match="mask_structure must be 'N:M'"):
        parse_params(small_params(tiny_model, tmp_path, **{"compression.wanda": {"mask_structure": "4:2"}}))
    p = parse_params(
        small_params(
            tiny_model,
            tmp_path,
            **{"compression.methods": ["awq"], "compression.awq": {"group_size": 96}, "tracking.enabled": False},
        ),
        root=tmp_path,
    )
    with pytest.raises(
        ConfigError, match=r"compression.awq.group_size: 96 divides the input width of no targeted layer"
    ):
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
    verify.check_round_trip({"layer": w}, {"layer": w.clone()})
    with pytest.raises(VerificationError, match="^layer: reloaded weights differ"):
        verify.check_round_trip({"layer": w}, {"layer": w + 1e-7})


def test_verification_accepts_exactly_n_of_m_the_requested_sparsity_and_2_to_the_bits_values():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]])  # two of each four kept: sparsity 0.5
    assert verify.check_pruning({"layer": w}, 0.5, (2, 4)) == {"layer": {"sparsity": 0.5, "nm_compliance": 1.0}}
    with pytest.raises(VerificationError, match="^layer: sparsity 0.5000 below the requested 0.6"):
        verify.check_pruning({"layer": w}, 0.6, (2, 4))
    with pytest.raises(VerificationError, match="^layer: input width 6 is not a multiple of 4"):
        verify.check_pruning({"layer": torch.ones(1, 6)}, 0.0, (2, 4))
    sixteen = torch.arange(32, dtype=torch.float32).reshape(2, 16)  # 16 values a group: 4 bits' worth exactly
    exact = verify.check_quantization({"layer": sixteen}, {"layer": sixteen}, 4, 16)
    assert exact["layer"]["max_values_per_group"] == 16
    # ||[3, 4] - [0, 4]|| / ||[0, 4]|| = 3 / 4
    one = verify.check_quantization({"l": torch.tensor([[3.0, 4.0]])}, {"l": torch.tensor([[0.0, 4.0]])}, 4, None)
    assert one["l"] == {"bits": 4, "group_size": None, "max_values_per_group": 2, "rel_error": 0.75}
    # bit-identical, not equal: -0.0 is not 0.0, a NaN is itself
    assert not verify._same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert verify._same_bits(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
    assert verify._same_bits(torch.tensor([1.5]), torch.tensor([1.5], dtype=torch.bfloat16))


def test_untouched_tensors_are_those_of_other_modules_none_missing_none_added(tmp_path):
    from safetensors.torch import save_file

    base = {
        "model.embed_tokens.weight": torch.ones(3, 2),
        "model.layers.0.proj.weight": torch.ones(2, 2),
        "model.layers.0.proj.bias": torch.zeros(2),
        "model.norm.weight": torch.ones(2),
    }

    def folder(name, tensors):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        return tmp_path / name

    changed = {"model.layers.0.proj"}
    compressed = {
        **base,
        "model.layers.0.proj.weight": 2 * torch.ones(2, 2),
        "model.layers.0.proj.scale": torch.ones(2),
    }
    got = verify.check_untouched(folder("base", base), folder("ok", compressed), changed)
    assert got == {"tensors_checked": 2, "tensors_changed": 2}  # the embeddings and the norm; the layer's two
    dropped = {k: v for k, v in compressed.items() if k != "model.norm.weight"}
    with pytest.raises(VerificationError, match="^model.norm.weight: left untouched by the method, but missing"):
        verify.check_untouched(tmp_path / "base", folder("dropped", dropped), changed)
    added = {**compressed, "model.extra.weight": torch.ones(1)}
    with pytest.raises(VerificationError, match="^model.extra.weight: the saved checkpoint adds a tensor outside"):
        verify.check_untouched(tmp_path / "base", folder("added", added), changed)


def test_awq_drops_mappings_that_would_rescale_a_layer_left_dense():
    from selfcal.compression.methods import RecipeContext
    from selfcal.compression.methods.awq import awq_mappings as _awq_mappings

    layers = tuple(
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )
    skipped = tuple(n for n in layers if n.endswith("down_proj"))
    kept = _awq_mappings(RecipeContext("LlamaForCausalLM", layers, skipped))
    assert [m.smooth_layer for m in kept] == ["re:.*input_layernorm$", "re:.*v_proj$", "re:.*post_attention_layernorm$"]
    # One of q/k/v ignored: the norm->qkv mapping would scale it too, so it goes as well.
    kept = _awq_mappings(
        RecipeContext("LlamaForCausalLM", layers, (), ignored_layers=("model.layers.0.self_attn.k_proj",))
    )
    assert [m.smooth_layer for m in kept] == ["re:.*v_proj$", "re:.*post_attention_layernorm$", "re:.*up_proj$"]
    assert _awq_mappings(RecipeContext("LlamaForCausalLM", layers, ())) is None


def test_paper_awq_settings_run_and_verify(tiny_model, tmp_path):
    """ModelOpt-like AWQ (symmetric, alpha grid 0..1 by 0.1, clip search 0.5..1 by 0.05) through the stage."""
    awq = {"group_size": 128, "symmetric": True, "n_grid": 12, "clip_search": {"min_ratio": 0.5, "step": 0.05}}
    p = parse_params(
        small_params(
            tiny_model, tmp_path, **{"compression.methods": ["awq"], "compression.awq": awq, "tracking.enabled": False}
        ),
        root=tmp_path,
    )
    generate(p, "self", 0, progress=False)
    manifest = compress(p, "self", 0, "awq")
    v = manifest.verification
    assert v["max_values_per_group"] <= 16 and v["untouched"]["tensors_checked"] == 2  # embeddings + final norm
    recipe = manifest.recipe
    assert "memoryless_mse" in recipe and "n_grid: 12" in recipe and "symmetric: true" in recipe


TOY_METHOD = '''
"""A fifth method, round-to-nearest W4: one new module and one registry line."""
from selfcal.compression.methods.base import METHODS, QuantConfig, QuantizationMethod, weight_scheme


class RTNConfig(QuantConfig):
    pass


class RTN(QuantizationMethod):
    name = "rtn"
    Config = RTNConfig

    def recipe(self, cfg, ctx):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=weight_scheme(cfg), ignore=ctx.dense_patterns)]


METHODS.register(RTN.name, RTN())
'''


def test_a_fifth_method_is_one_module_and_one_registry_line(tiny_model, tmp_path, monkeypatch):
    """Its params section, layer checks, recipe, verification and lineage come with it: nothing else changes."""
    import importlib
    import sys

    from selfcal.compression.methods import METHODS

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # the toy registers into a copy
    (tmp_path / "toy_rtn_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_rtn_method")
    monkeypatch.delitem(sys.modules, "toy_rtn_method")
    assert "rtn" in METHODS
    data = small_params(
        tiny_model,
        tmp_path,
        **{"compression.methods": ["rtn"], "compression.rtn": {"group_size": 128}, "tracking.enabled": False},
    )
    p = parse_params(data, root=tmp_path)
    assert p.compression.rtn.group_size == 128 and p.compression.rtn.ignore == ["lm_head"]
    with pytest.raises(
        ConfigError, match=r"compression.rtn.group_size: 96 divides the input width of no targeted layer"
    ):
        compress(
            parse_params({**data, "compression": {"methods": ["rtn"], "rtn": {"group_size": 96}}}, root=tmp_path),
            "self",
            0,
            "rtn",
        )
    generate(p, "self", 0, progress=False)
    manifest = compress(p, "self", 0, "rtn")
    assert manifest.method == "rtn" and manifest.verification["max_values_per_group"] <= 16
    assert manifest.verification["untouched"]["tensors_checked"] == 6
    with pytest.raises(
        ConfigError,
        match=r"^params: compression.methods: unknown method 'magic'; known: \['awq', 'gptq', 'rtn', "
        r"'sparsegpt', 'wanda'\]",
    ):
        parse_params({**data, "compression": {"methods": ["magic"]}})


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "wanda"])
def test_a_calibration_batch_gathers_the_same_statistics_as_one_sample_at_a_time(tiny_model, tmp_path, method):
    """``batch_size`` is a speed knob: the Hessians and norms are the same sums in another order, so the
    checkpoint matches the one-sample-at-a-time one up to rounding (masks and 4-bit codes agree, weights
    close), and the manifest records it with the method's params."""
    from safetensors.torch import load_file

    made = {}
    for batch in (1, 4):
        work = tmp_path / f"b{batch}"
        p = parse_params(
            small_params(
                tiny_model,
                work,
                **{
                    "calibration.n_samples": 8,
                    "compression.methods": [method],
                    f"compression.{method}": {"batch_size": batch, **({"group_size": 128} if method == "gptq" else {})},
                    "tracking.enabled": False,
                },
            ),
            root=work,
        )
        generate(p, "self", 0, progress=False)
        manifest = compress(p, "self", 0, method)
        assert manifest.method_params["batch_size"] == batch
        ckpt = layout.checkpoint_dir(p, "self", 0, method)
        made[batch] = (manifest, load_file(ckpt / "model.safetensors"))
    (one, w1), (four, w4) = made[1], made[4]
    assert one.calibration.digest == four.calibration.digest  # the same set, only batched differently
    assert w1.keys() == w4.keys()
    compared = 0
    for name, a in w1.items():
        b = w4[name]
        if a.dtype.is_floating_point and a.ndim == 2 and name.endswith("proj.weight") and method != "gptq":
            assert ((a == 0) == (b == 0)).float().mean() > 0.98, name  # the same 2:4 masks, bar near-ties
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02)
            compared += 1
        elif name.endswith("weight_packed"):
            assert (a == b).float().mean() > 0.9, name  # packed int32 words: 8 codes each, all equal
            compared += 1
    assert compared >= 7  # every targeted projection of the tiny model


def test_ignore_entries_are_whole_dotted_suffixes_or_regexes_matched_from_the_start():
    """MethodConfig.ignore: a name, a dotted suffix ("down_proj", not "proj") or a "re:" regex with re.match; the
    group-size check looks only at the layers left targeted, and any remainder makes a layer indivisible."""
    from selfcal.compression.layers import indivisible_layers, matches

    name = "model.layers.0.mlp.up_proj"
    assert matches(name, [name]) and matches(name, ["up_proj"]) and matches(name, ["mlp.up_proj"])
    assert not matches(name, ["proj"]) and not matches(name, ["p_proj"]) and not matches("lm_head", ["head"])
    assert matches(name, [r"re:model\.layers\.0\."]) and not matches(name, ["re:mlp"])
    layers = {name: (256, 128), "model.layers.0.mlp.down_proj": (128, 129), "lm_head": (512, 100)}
    assert indivisible_layers(layers, 128, ["lm_head"]) == ["model.layers.0.mlp.down_proj"]


def test_the_plan_leaves_every_ignored_layer_dense_and_refuses_to_ignore_them_all(tiny_model):
    from selfcal.compression.apply import plan
    from selfcal.config import CompressionConfig

    config = json.loads((tiny_model / "config.json").read_text())
    cfg = CompressionConfig(methods=["gptq"], gptq={"group_size": 128, "ignore": ["lm_head", "down_proj"]})
    ctx = plan("gptq", cfg, config).context
    down = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert ctx.architecture == "LlamaForCausalLM" and sorted(ctx.dense_layers) == sorted(("lm_head", *down))
    assert len(ctx.targeted_layers) == 12 and not set(ctx.targeted_layers) & {"lm_head", *down}
    (gptq,) = plan("gptq", cfg, config).method.recipe(cfg.gptq, ctx)
    assert gptq.ignore == ctx.dense_patterns and len(gptq.ignore) == 3
    with pytest.raises(ConfigError, match=r"^compression.gptq.ignore: every linear layer is ignored"):
        plan("gptq", CompressionConfig(methods=["gptq"], gptq={"ignore": ["re:.*"]}), config)


def test_each_recipe_carries_its_sections_settings_and_the_papers_defaults():
    """What the recipe hands llm-compressor, setting by setting: a setting dropped on the way would fall back to
    llm-compressor's own default, which for most of these equals ours, so no checkpoint would show it."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    from selfcal.compression.methods import METHODS, RecipeContext
    from selfcal.compression.methods.awq import AWQConfig, _default_mappings
    from selfcal.compression.methods.gptq import GPTQConfig
    from selfcal.compression.methods.sparsegpt import SparseGPTConfig
    from selfcal.compression.methods.wanda import WandaConfig

    ctx = RecipeContext("LlamaForCausalLM", ("model.layers.0.mlp.up_proj", "lm_head"), ignored_layers=("lm_head",))

    def weights(modifier):
        w = modifier.config_groups["group_0"].weights
        return w.num_bits, w.type, w.symmetric, w.strategy, w.group_size

    (gptq,) = METHODS.get("gptq").recipe(GPTQConfig(), ctx)
    assert weights(gptq) == (4, "int", True, "group", 128) and gptq.ignore == ["re:^lm_head\\.?$"]
    assert (gptq.dampening_frac, gptq.block_size, gptq.actorder) == (0.01, 128, "weight")
    (gptq,) = METHODS.get("gptq").recipe(
        GPTQConfig(bits=8, group_size=None, dampening_frac=0.05, block_size=64, actorder=None), ctx
    )
    assert weights(gptq) == (8, "int", True, "channel", None)
    assert (gptq.dampening_frac, gptq.block_size, gptq.actorder) == (0.05, 64, None)
    awq, quant = METHODS.get("awq").recipe(AWQConfig(), ctx)  # the AWQ paper's asymmetric W4 g128
    assert weights(quant) == (4, "int", False, "group", 128) and quant.ignore == ["re:^lm_head\\.?$"]
    assert (awq.duo_scaling, awq.n_grid) == (True, 20)
    awq, quant = METHODS.get("awq").recipe(AWQConfig(symmetric=True, duo_scaling=False, n_grid=5, group_size=64), ctx)
    assert weights(quant) == (4, "int", True, "group", 64) and (awq.duo_scaling, awq.n_grid) == (False, 5)
    assert _default_mappings(RecipeContext("Phi3ForCausalLM")) == AWQ_MAPPING_REGISTRY["Phi3ForCausalLM"]
    assert AWQ_MAPPING_REGISTRY["Phi3ForCausalLM"] != default_mappings  # Phi-3's fused qkv_proj: its own mappings
    (sgpt,) = METHODS.get("sparsegpt").recipe(SparseGPTConfig(), ctx)
    assert (sgpt.sparsity, sgpt.mask_structure, sgpt.dampening_frac, sgpt.block_size) == (0.5, "2:4", 0.01, 128)
    assert sgpt.targets == ["Linear"] and sgpt.ignore == ["re:^lm_head\\.?$"]
    (sgpt,) = METHODS.get("sparsegpt").recipe(
        SparseGPTConfig(sparsity=0.6, mask_structure=None, dampening_frac=0.05, block_size=64), ctx
    )
    assert (sgpt.sparsity, sgpt.mask_structure, sgpt.dampening_frac, sgpt.block_size) == (0.6, "0:0", 0.05, 64)
    (wanda,) = METHODS.get("wanda").recipe(WandaConfig(), ctx)
    assert (wanda.sparsity, wanda.mask_structure, wanda.targets, wanda.ignore) == (
        0.5,
        "2:4",
        ["Linear"],
        ["re:^lm_head\\.?$"],
    )
    # ours keeps 1 of 4; llm-compressor's "n:m" prunes n of m (sgpt_sparsify.py, wanda_sparsify.py: topk smallest)
    (wanda,) = METHODS.get("wanda").recipe(WandaConfig(sparsity=0.75, mask_structure="1:4"), ctx)
    assert (wanda.sparsity, wanda.mask_structure) == (0.75, "3:4")
    (sgpt,) = METHODS.get("sparsegpt").recipe(SparseGPTConfig(sparsity=0.25, mask_structure="6:8"), ctx)
    assert (sgpt.sparsity, sgpt.mask_structure) == (0.25, "2:8")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_an_n_of_m_other_than_half_keeps_n_of_every_m(tiny_model, tmp_path, method):
    """A "1:4" was handed to llm-compressor as is, which prunes 1 of 4 (not keeps): verification failed after the
    compute. Now the checkpoint keeps one weight of every four, as the params say."""
    p = parse_params(
        small_params(
            tiny_model,
            tmp_path,
            **{"compression.methods": [method], f"compression.{method}": {"mask_structure": "1:4", "sparsity": 0.75},
               "tracking.enabled": False},
        ),
        root=tmp_path,
    )  # fmt: skip
    generate(p, "self", 0, progress=False)
    compress(p, "self", 0, method)
    model = verify.load_dense(layout.checkpoint_dir(p, "self", 0, method))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            assert ((m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1) <= 1).all(), name
            assert (m.weight == 0).float().mean() == pytest.approx(0.75, abs=1e-6), name


def test_compress_hands_oneshot_the_calibration_set_as_prepared(tiny_model, monkeypatch):
    """No shuffling, every sample, its own length, the section's batch size (apply.py's docstring): oneshot's
    defaults would shuffle, cap at 512 and re-truncate, which a checkpoint of a few samples cannot show."""
    import llmcompressor
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfcal.compression.apply import compress as apply_compress
    from selfcal.compression.apply import plan
    from selfcal.config import CompressionConfig

    seen = {}

    class Stop(Exception):
        pass

    def oneshot(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(llmcompressor, "oneshot", oneshot)
    cfg = CompressionConfig(methods=["gptq"], gptq={"group_size": 128, "batch_size": 3})
    the_plan = plan("gptq", cfg, json.loads((tiny_model / "config.json").read_text()))
    tokens = np.random.default_rng(0).integers(3, 512, size=(5, 7)).astype(np.int32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(Stop):
        apply_compress(
            model,
            AutoTokenizer.from_pretrained(tiny_model),
            tokens,
            the_plan,
            Path("unused"),
            base_model=None,
            calibration=None,
            device="cpu",
            base_dir=None,
        )
    assert seen["dataset"]["input_ids"] == tokens.tolist() and seen["dataset"]["attention_mask"] == [[1] * 7] * 5
    assert (seen["num_calibration_samples"], seen["max_seq_length"], seen["batch_size"]) == (5, 7, 3)
    assert seen["shuffle_calibration_samples"] is False and seen["model"] is model


def test_llm_compressors_own_logs_go_to_stderr_warnings_only_and_its_metrics_with_verbose(tiny_model, tmp_path, capfd):
    """llm-compressor logged to stdout at INFO: a "Quantizing" line and two METRIC lines per module (~100 lines for
    stories260K's GPTQ), burying the stage's own; with -v its METRIC lines (each module's error) come back."""
    import logging

    p = parse_params(
        small_params(tiny_model, tmp_path, **{"compression.methods": ["gptq"], "tracking.enabled": False}),
        root=tmp_path,
    )
    generate(p, "self", 0, progress=False)
    capfd.readouterr()
    compress(p, "self", 0, "gptq")
    out, err = capfd.readouterr()
    assert "METRIC" not in out + err and "Quantizing" not in out + err and "llmcompressor" not in out
    logging.getLogger("selfcal").setLevel(logging.DEBUG)
    try:
        compress(p, "self", 0, "gptq")
    finally:
        logging.getLogger("selfcal").setLevel(logging.NOTSET)
    out, err = capfd.readouterr()
    assert "METRIC" in err and "METRIC" not in out


def test_no_progress_leaves_no_bar_from_compression_not_even_compressed_tensors(tiny_model, tmp_path):
    """`selfcal --no-progress compress` sets TQDM_DISABLE, but compressed-tensors' "Applying quantization config"
    and "Dispatching model" bars pass disable= themselves, which beats the environment: both still drew."""
    import subprocess
    import sys

    path = write_params(
        tmp_path / "params.yaml",
        small_params(tiny_model, tmp_path, **{"compression.methods": ["gptq"], "tracking.enabled": False}),
    )
    generate(parse_params(yaml.safe_load(path.read_text()), root=tmp_path), "self", 0, progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    cmd = [sys.executable, "-m", "selfcal.cli", "--params", str(path), "compress", "--source", "self", "--seed", "0"]
    done = subprocess.run([*cmd, "--method", "gptq", "--no-progress"], cwd=tmp_path, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    out = (done.stdout + done.stderr).decode()
    assert "%|" not in out and "it/s]" not in out, out
    assert "wrote" in out  # the stage's own log lines stay
