"""The model classes against transformers' model contract (issue #11): the checks of transformers' common model tests
that apply to a pruned Llama with patches, run as one table over the checkpoint fixtures."""

import json

import pytest
import torch
from helpers import CASES, FAMILY_OVERRIDES, build_case, random_patch, tiny_family, tiny_llama
from safetensors.torch import load_file, save_file

from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.export import stock_config
from linearpatch.modeling import FAMILIES, LinearPatchForCausalLM, LinearPatchModel, prune_layers, pruned_config

INPUT_IDS = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    saved = {}
    for name, case in CASES.items():
        _, pruned = build_case(**case)
        pruned.save_pretrained(root / name)
        saved[name] = (root / name, pruned, case)
    return saved


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip_and_keep_in_fp32(saved_cases, name):
    path, pruned, case = saved_cases[name]
    for cls in (LinearPatchForCausalLM, LinearPatchModel):
        loaded = cls.from_pretrained(path, dtype=case["dtype"])
        patches = [p for n, p in loaded.named_parameters() if "linear_patch" in n]
        assert patches and all(p.dtype == torch.float32 for p in patches), cls.__name__
        others = [p for n, p in loaded.named_parameters() if "linear_patch" not in n]
        assert all(p.dtype == case["dtype"] for p in others), cls.__name__
    loaded = LinearPatchForCausalLM.from_pretrained(path, dtype=case["dtype"])
    with torch.no_grad():
        assert torch.equal(loaded(INPUT_IDS).logits, pruned(INPUT_IDS).logits)


def test_base_model_in_bf16_keeps_patches_fp32_without_the_package(saved_cases):
    path, pruned, _ = saved_cases["tied-fp32-middle"]
    (hidden,) = logits_without_package([f"base-bf16:{path}"], INPUT_IDS)  # AutoModel, as vLLM builds it
    reference = LinearPatchModel.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(hidden, reference(INPUT_IDS).last_hidden_state.float())


@pytest.mark.parametrize("keep", [True, False])
def test_model_built_in_bf16_hardcodes_fp32_patches(keep):
    config = build_case(**CASES["tied-fp32-middle"])[1].config
    config.keep_patch_in_fp32 = keep
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LinearPatchForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    assert model.model.layers[2].linear_patch.weight.dtype == (torch.float32 if keep else torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert ("linear_patch" in model._keep_in_fp32_modules_strict) == keep
    assert ("linear_patch" in model.model._keep_in_fp32_modules_strict) == keep


@pytest.mark.parametrize("name", list(CASES))
def test_meta_device_init_then_identity_patches(name):
    config = build_case(**CASES[name])[1].config
    with torch.device("meta"):
        model = LinearPatchForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    fresh = LinearPatchForCausalLM(config)  # built normally, a fresh model starts as plain pruning
    for n, p in fresh.named_parameters():
        if "linear_patch" in n:
            assert torch.equal(p, torch.eye(config.hidden_size)), n


def test_missing_head_is_reported_not_refused_and_corruption_still_is(tmp_path):
    pruned = prune_layers(tiny_llama(tied=False), [2, 3], patches=[random_patch(64, 1)])
    pruned.model.save_pretrained(tmp_path / "base")  # a base-model checkpoint: no head
    model, info = LinearPatchForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"} or list(info["missing_keys"]) == ["lm_head.weight"]
    assert torch.equal(model.model.layers[2].linear_patch.weight, pruned.model.layers[2].linear_patch.weight)
    pruned.save_pretrained(tmp_path / "full")  # a causal-LM checkpoint loaded as the base model drops its head
    base = LinearPatchModel.from_pretrained(tmp_path / "full")
    assert torch.equal(base.norm.weight, pruned.model.norm.weight)
    assert LinearPatchForCausalLM.from_pretrained(tmp_path / "full", ignore_mismatched_sizes=True) is not None
    # A mis-shaped decoder weight is corruption, whatever ignore_mismatched_sizes says.
    weights = load_file(tmp_path / "full" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    save_file(weights, tmp_path / "full" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="(?i)shape|size"):
        LinearPatchForCausalLM.from_pretrained(tmp_path / "full", ignore_mismatched_sizes=True)


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_equals_eager(saved_cases, name):
    path, _, case = saved_cases[name]
    tolerance = 1e-5 if case["dtype"] == torch.float32 else 3e-2
    with torch.no_grad():
        sdpa = LinearPatchForCausalLM.from_pretrained(path, attn_implementation="sdpa")(INPUT_IDS).logits
        eager = LinearPatchForCausalLM.from_pretrained(path, attn_implementation="eager")(INPUT_IDS).logits
    assert (sdpa.float() - eager.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", [n for n in CASES if "fp32" in n])
def test_left_padded_batch_equals_single(saved_cases, name):
    path, _, _ = saved_cases[name]
    model = LinearPatchForCausalLM.from_pretrained(path)
    short, long = INPUT_IDS[0, :6], INPUT_IDS[1]
    batch = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    mask = torch.stack(
        [torch.cat([torch.zeros(4, dtype=torch.long), torch.ones(6, dtype=torch.long)]), torch.ones(10)]
    )
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short[None]).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        single = model.generate(short[None], max_new_tokens=5, do_sample=False)
    assert (padded[0, 4:] - alone[0]).abs().max().item() <= 1e-4
    assert torch.equal(generated[0, 4:], single[0])


@pytest.mark.parametrize("name", list(CASES))
def test_cache_equals_no_cache(saved_cases, name):
    path, _, _ = saved_cases[name]
    model = LinearPatchForCausalLM.from_pretrained(path)
    prompt = INPUT_IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("part", ["model", "causal-lm"])
@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_constructors_do_not_drift_from_the_family(family, part):
    """Our `__init__`s restate the family's (to build each layer once): any attribute or submodule the family's own
    class adds must exist here too, so a transformers upgrade that changes a family fails this test instead of
    dropping it silently."""
    entry = FAMILIES[family]
    config = pruned_config(tiny_family(family).config, [1, 4, 5])  # two gaps: a patched layer and a patched norm
    plain = stock_config(config)
    if part == "model":
        ours_model, family_model = entry.model_class(config), type(entry.dense_causal_lm_class(plain).model)(plain)
    else:
        ours_model, family_model = entry.causal_lm_class(config), entry.dense_causal_lm_class(plain)
    assert set(vars(family_model)) <= set(vars(ours_model)), set(vars(family_model)) - set(vars(ours_model))
    family_modules = {n for n, _ in family_model.named_modules()}
    our_modules = {n for n, _ in ours_model.named_modules() if "linear_patch" not in n}
    assert family_modules == our_modules, family_modules ^ our_modules
    assert any("linear_patch" in n for n, _ in ours_model.named_modules())
    ours_by_name = dict(ours_model.named_modules())
    for name, module in family_model.named_modules():
        assert isinstance(ours_by_name[name], type(module)), name  # every module of the family, or a subclass of it


def test_config_json_is_what_the_contract_promises(saved_cases):
    path, pruned, _ = saved_cases["untied-fp32-two-gaps"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "linearpatch_llama" and config["num_hidden_layers"] == 3
    assert config["pruned_layers"] == [1, 4, 5] and config["patch_positions"] == [1, 3]


def test_transformers_4_gets_a_clear_error(tmp_path):
    """What a transformers 4.x user sees when `trust_remote_code` imports the checkpoint's configuration file."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "4.57.1"\n')
    configuration = Path(__file__).resolve().parents[1] / "modeling" / "configuration_linearpatch.py"
    result = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(configuration)!r})"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "ImportError: This LinearPatch checkpoint needs transformers>=5.0 (found 4.57.1)" in result.stderr
