"""Every input checked before the expensive work (issue #23), one test per finding: `eval` opens every model, adapter
and export before the first forward pass; a near miss of an embedded corpus name is answered at once; a model without
patches names no patch module to keep in fp32; a refused load names what is missing and how to load anyway."""

import json
import shutil

import pytest
import torch
from helpers import QUICK, assert_one_line_error, random_patch, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import linearpatch.integration.evaluation.opening as opening
from linearpatch.cli import main
from linearpatch.modeling import prune_layers


def _copy(source, target):
    shutil.copytree(source, target)
    return target


# 1. `eval` evaluated the baseline for minutes before finding a candidate's weights truncated.
def test_eval_checks_every_model_adapter_and_export_before_the_first_forward(
    tiny_checkpoint, tiny_pruned, tmp_path, capsys, monkeypatch
):
    for name in ("load_model", "layerwise_model"):  # whole, or layer by layer
        monkeypatch.setattr(opening, name, lambda *a, **k: pytest.fail("a model was loaded"))
    evaluate = ["eval", "--baseline", str(tiny_checkpoint), "--tasks", "--ppl-windows", "1"]

    truncated = _copy(tiny_pruned, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert_one_line_error(main([*evaluate, str(tiny_pruned), str(truncated)]), capsys.readouterr().err, "truncated")

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_pruned).save_pretrained(sharded, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / sorted(set(index["weight_map"].values()))[-1]).unlink()
    assert_one_line_error(main([*evaluate, str(sharded)]), capsys.readouterr().err, "missing")

    # An adapter whose base is the dense model (what stock PEFT recorded before a checkpoint was saved), and one
    # trained for another cut.
    adapter = tmp_path / "adapter"
    arguments = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--adapter-only", "--top-k", "8"]
    monkeypatch.undo()
    assert main([*arguments, *QUICK, "--cache-dir", str(tmp_path / "cache"), "--output", str(adapter)]) == 0
    for name in ("load_model", "layerwise_model"):  # whole, or layer by layer
        monkeypatch.setattr(opening, name, lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    dense_based = _copy(adapter, tmp_path / "dense-based")
    (dense_based / "linearpatch_adapter.json").unlink()
    config = json.loads((dense_based / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_checkpoint)
    (dense_based / "adapter_config.json").write_text(json.dumps(config))
    code = main([*evaluate, str(dense_based)])
    assert_one_line_error(code, capsys.readouterr().err, "not a usable LinearPatch checkpoint", "save_patch_adapter")
    other_cut = tmp_path / "other-cut"
    monkeypatch.undo()
    assert main(["prune", str(tiny_checkpoint), "--layers", "1", *QUICK, "--output", str(other_cut)]) == 0
    for name in ("load_model", "layerwise_model"):  # whole, or layer by layer
        monkeypatch.setattr(opening, name, lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    config["base_model_name_or_path"] = str(other_cut)
    (dense_based / "adapter_config.json").write_text(json.dumps(config))
    assert_one_line_error(main([*evaluate, str(dense_based)]), capsys.readouterr().err, "differently pruned")
    assert not list(tmp_path.glob("**/linearpatch_eval.*"))


# 2. A near miss of an embedded corpus went to the Hub and retried for tens of seconds.
@pytest.mark.parametrize(
    "option, name, message",
    [
        ("--calibration", "wikipedia-calibraton", "did you mean 'wikipedia-calibration'"),
        ("--eval-corpus", "wikipedia-evl", "did you mean 'wikipedia-eval'"),
        ("--calibration", "my-texts/cal.txt", "not found"),
    ],
)
def test_text_sources_that_are_not_dataset_names_never_reach_datasets(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, option, name, message
):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets was asked"))
    arguments = [
        "prune",
        str(tiny_checkpoint),
        "--num-layers",
        "2",
        *QUICK,
        option,
        name,
        "--eval-windows",
        "1",
        "--eval-seq-len",
        "32",
    ]
    assert_one_line_error(main([*arguments, "--output", str(tmp_path / "o")]), capsys.readouterr().err, message)


# 3. `test_keep_in_fp32_modules_exist` (transformers' common tests) failed on models without patches.
def test_only_a_model_with_patches_keeps_patch_modules_in_fp32(tmp_path):
    dense = tiny_llama()
    plain = prune_layers(dense, [2, 3], add_patches=False)
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 1)])
    assert not plain._keep_in_fp32_modules_strict and not plain.model._keep_in_fp32_modules_strict
    assert set(patched._keep_in_fp32_modules_strict) == {"linear_patch"}
    plain.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


# 4. The refusal of missing decoder weights is kept; its message names them and the way to load anyway.
def test_missing_weights_are_named_counted_and_can_be_allowed(tmp_path):
    pruned = prune_layers(tiny_llama(), [2, 3], patches=[random_patch(64, 9)])
    pruned.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(name for name in weights if name.startswith("model.layers.1."))
    for name in dropped:
        del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"{len(dropped)} weights missing from the checkpoint ({', '.join(dropped[:5])}, and " in message
    assert "allow_missing_weights=True" in message
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True, output_loading_info=True)
    assert sorted(info["missing_keys"]) == dropped and model.config.num_hidden_layers == 4
