"""`linearpatch export` (issues #11, #12): a folder of the family's stock architecture, loadable without remote code,
exact where the fold is exact, and better than plain pruning where it is not."""

import json

import pytest
import torch
from helpers import FAMILY_OVERRIDES, random_patch, tiny_family, tiny_llama

from linearpatch.cli import main
from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.export import export_model
from linearpatch.modeling import FAMILIES, prune_layers

QUICK = ["--num-samples", "4", "--seq-len", "32", "--eval-windows", "2", "--eval-corpus", "lee-news"]
INPUT_IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
# RMSNorm is scale-invariant up to its eps: a scalar fold is exact to about eps / mean(h^2). For a random model's
# tiny residual stream (RMS ~0.02, so eps / mean(h^2) ~ 1e-3) that is the whole error; for a real model's it is
# negligible (see the SmolLM2 test, which keeps its real eps). These fixtures set eps to 1e-12 so that they measure
# the fold's algebra.
REALISTIC = dict(rms_norm_eps=1e-12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama at a realistic activation scale, with a real tokenizer: what the CLI takes as MODEL."""
    path = tmp_path_factory.mktemp("export-dense")
    tiny_llama(vocab_size=len(smollm2_tokenizer), seed=7, **REALISTIC).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
@pytest.mark.parametrize("tied", [True, False])
def test_scalar_patches_and_a_gap_at_layer_0_fold_exactly(tied, family):
    dense = tiny_family(family, tied=tied, **REALISTIC)
    cases = [
        ("scalar", prune_layers(dense, [2, 3, 5], patches=[1.7 * torch.eye(64), 0.6 * torch.eye(64)])),
        ("scalar", prune_layers(dense, [0, 1, 4], patches=[random_patch(64, 1), 1.3 * torch.eye(64)])),
        ("down-proj", prune_layers(dense, [0, 1], patches=[random_patch(64, 2)])),
    ]
    for fold, patched in cases:
        stock, folds = export_model(patched, fold)
        assert all(item["exact"] for item in folds)
        assert type(stock) is FAMILIES[family].dense_causal_lm_class and stock.config.model_type == family
        with torch.no_grad():
            assert (stock(INPUT_IDS).logits - patched(INPUT_IDS).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
def test_down_proj_fold_brings_the_export_closer_to_the_patched_model_than_plain_pruning(family):
    dense = tiny_family(family, **REALISTIC)
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 4, scale=0.5)])
    windows = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    stock, folds = export_model(patched, "down-proj", windows)
    plain = prune_layers(dense, [2, 3], add_patches=False)
    assert not folds[0]["exact"] and folds[0]["relative_error"] < 1
    with torch.no_grad():
        want = patched(windows).logits
        assert (stock(windows).logits - want).abs().mean() < (plain(windows).logits - want).abs().mean()


def _prune(checkpoint, output, *options):
    assert main(["prune", str(checkpoint), *options, "--num-samples", "4", "--seq-len", "32", "--output", output]) == 0


def test_exported_folders_load_without_remote_code_with_the_patched_logits(checkpoint, tmp_path):
    _prune(checkpoint, str(tmp_path / "scalar"), "--layers", "2-3", "--patch", "scalar")
    _prune(checkpoint, str(tmp_path / "start"), "--layers", "0-1")
    assert main(["export", str(tmp_path / "scalar"), "--fold", "scalar", "--output", str(tmp_path / "s"), *QUICK]) == 0
    assert main(["export", str(tmp_path / "start"), "--output", str(tmp_path / "z"), *QUICK]) == 0
    for folder in ("s", "z"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list((tmp_path / folder).glob("*.py"))
    stock = logits_without_package([f"stock:{tmp_path / 's'}", f"stock:{tmp_path / 'z'}"], INPUT_IDS)
    patched = logits_without_package([tmp_path / "scalar", tmp_path / "start"], INPUT_IDS)
    for name, got, want in zip(("scalar", "gap at 0"), stock, patched, strict=True):
        assert (got - want).abs().max().item() <= 1e-4, (name, (got - want).abs().max().item(), want.abs().max())
    record = json.loads((tmp_path / "s" / "linearpatch_export.json").read_text())
    assert set(record["perplexity"]) == {"patched", "export", "plain"} and record["folds"][0]["exact"]


def test_export_refuses_bad_input(checkpoint, tmp_path, capsys):
    code = main(["export", str(checkpoint), "--output", str(tmp_path / "x")])
    assert code == 2 and "not a LinearPatch checkpoint" in capsys.readouterr().err
    _prune(checkpoint, str(tmp_path / "p"), "--layers", "2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code = main(["export", str(tmp_path / "p"), "--output", str(tmp_path / "taken")])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_push_takes_an_export_and_says_it_is_folded(checkpoint, tmp_path):
    from linearpatch.hub_tools import model_card, validate_folder

    _prune(checkpoint, str(tmp_path / "p"), "--layers", "2-3")
    assert main(["export", str(tmp_path / "p"), "--output", str(tmp_path / "e"), *QUICK]) == 0
    info = validate_folder(tmp_path / "e")
    card = str(model_card(info, "org/tiny-export"))
    assert info.kind == "export" and "folded approximation" in card and "down-proj" in card
    assert "trust_remote_code" not in card
