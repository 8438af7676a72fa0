"""Choosing by outcome (issue #13): held-out scoring of pruned, patched candidates, `--metric loss`, `--patch auto`
and `--target-ppl-ratio`, on tiny random models of every family."""

import json
import math

import pytest
import torch
from helpers import FAMILY_OVERRIDES, random_patch, tiny_family

from linearpatch.common.errors import LinearPatchError
from linearpatch.integration.data import TokenWindows
from linearpatch.integration.measurement.perplexity import chunked_perplexity
from linearpatch.integration.pruning import prune
from linearpatch.integration.pruning.search import HeldOutScorer, patch_variants, split_holdout
from linearpatch.modeling import prune_layers


def windows(count: int = 12, seq_len: int = 24, seed: int = 3) -> TokenWindows:
    ids = torch.randint(3, 256, (count, seq_len), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, source="random", sampling="random", seed=seed, total_tokens=ids.numel())


@pytest.mark.parametrize("family", list(FAMILY_OVERRIDES))
@pytest.mark.parametrize("gap", [(0, 2), (2, 4), (4, 6), (1, 2)])
@pytest.mark.parametrize("patched", [True, False])
def test_scorer_equals_the_perplexity_of_the_whole_pruned_model(family, gap, patched):
    """A candidate scored from the stored residual stream (no layers before the gap run) has exactly the held-out
    perplexity of the pruned model built and run whole, for gaps at the start, middle and end of every family."""
    dense = tiny_family(family, seed=1)
    held = windows(3).input_ids
    patch = random_patch(64, seed=5) if patched else None
    scorer = HeldOutScorer(dense, held, batch_size=2, progress=False)
    scored = scorer.perplexity(*gap, patch)
    whole = prune_layers(
        dense, list(range(*gap)), patches=None if patch is None else [patch], add_patches=patch is not None
    )
    expected = chunked_perplexity(whole, held)
    assert math.isclose(scored, expected, rel_tol=1e-5), (scored, expected)
    assert math.isclose(scorer.dense_perplexity, chunked_perplexity(dense, held), rel_tol=1e-5)


def test_holdout_is_the_last_windows_and_never_fitted():
    data = windows(16)
    fit, held = split_holdout(data, None)
    assert len(held.input_ids) == 2 and torch.equal(held.input_ids, data.input_ids[-2:])
    assert torch.equal(fit.input_ids, data.input_ids[:-2])
    with pytest.raises(ValueError, match="--holdout"):
        split_holdout(data, 16)

    dense = tiny_family("llama", seed=2)
    _, report = prune(dense, None, num_layers=2, metric="loss", calibration=data, holdout=4, progress=False)
    assert report.calibration["num_windows"] == 12  # statistics saw only the fit windows
    assert report.holdout["num_windows"] == 4 and report.holdout["sha256"] == split_holdout(data, 4)[1].fingerprint


def test_auto_keeps_the_best_variant_per_gap_and_records_every_score():
    dense = tiny_family("qwen3", seed=4)
    data = windows(12)
    pruned, report = prune(dense, None, layers=[2, 3], patch="auto", calibration=data, holdout=3, progress=False)
    (choice,) = report.patch_choices
    labels = [variant.label for variant in patch_variants("auto")]
    assert list(choice["scores"]) == labels and len(labels) == 8 and labels[-1] == "none"
    assert choice["heldout_perplexity"] == min(choice["scores"].values())
    assert pruned.config.patch_kind == choice["kind"] == report.patch_kind
    # The saved patch is the chosen variant's, refitted: its held-out perplexity is the recorded one.
    held = split_holdout(data, 3)[1].input_ids
    assert math.isclose(chunked_perplexity(pruned, held), choice["heldout_perplexity"], rel_tol=1e-5)
    # Each fixed kind, pruned on its own, is never better on the held-out windows than the auto choice.
    for kind in ("hadamard", "diag", "scalar", "lstsq"):
        fixed, _ = prune(dense, None, layers=[2, 3], patch=kind, calibration=split_holdout(data, 3)[0], progress=False)
        assert chunked_perplexity(fixed, held) >= choice["heldout_perplexity"] * (1 - 1e-5)


def test_auto_keeps_no_patch_where_every_fitted_patch_is_worse(monkeypatch):
    """The identity is among auto's candidates: when every fitted patch scores worse than none on the held-out
    windows (here each is made 30x the identity), the gap keeps none, and a gap beside it keeps its own patch."""
    from linearpatch.integration.pruning import search

    dense = tiny_family("llama", num_layers=8, seed=6)
    data = windows(12)
    fit = search.PatchVariant.fit

    def ruinous_at_first_gap(variant, statistics, start, end):
        patch = fit(variant, statistics, start, end)
        return 30 * torch.eye(64) if patch is not None and start == 1 else patch

    monkeypatch.setattr(search.PatchVariant, "fit", ruinous_at_first_gap)
    pruned, report = prune(dense, None, layers=[1, 2, 5], patch="auto", calibration=data, holdout=3, progress=False)
    first, second = report.patch_choices
    assert first["kind"] == "none" and first["heldout_perplexity"] == min(first["scores"].values())
    assert second["kind"] != "none"
    # The gap that keeps none holds the identity; the model equals plain pruning there.
    assert torch.equal(pruned.model.layers[1].linear_patch.weight, torch.eye(64))
    plain_first = prune_layers(dense, [1, 2, 5], patches=[torch.eye(64), pruned.model.layers[3].linear_patch.weight])
    held = split_holdout(data, 3)[1].input_ids
    assert math.isclose(chunked_perplexity(pruned, held), chunked_perplexity(plain_first, held), rel_tol=1e-6)


def test_loss_metric_scores_the_top_cosine_blocks_and_keeps_the_best():
    dense = tiny_family("llama", num_layers=8, seed=5)
    data = windows(12)
    _, cosine = prune(dense, None, num_layers=3, calibration=split_holdout(data, 3)[0], progress=False)

    def by_loss(candidates: int):
        options = dict(metric="loss", patch="hadamard", holdout=3, candidates=candidates, progress=False)
        return prune(dense, None, num_layers=3, calibration=data, **options)[1]

    report = by_loss(3)
    top_cosine = [start for start, _ in cosine.top_candidates(3)]
    assert sorted(report.candidate_scores) == sorted(top_cosine)
    best = min(report.candidate_scores, key=report.candidate_scores.get)
    assert report.pruned_layers == [best, best + 1, best + 2] and report.metric == "loss"
    assert report.candidate_patches[best]["hadamard"] == report.candidate_scores[best]
    every = by_loss(0)
    assert sorted(every.candidate_scores) == list(range(6))  # every start, 0 and L - n included
    assert min(every.candidate_scores.values()) <= min(report.candidate_scores.values())


def test_target_ratio_picks_the_deepest_depth_within_it():
    # Random weights predict nearly uniformly, so ratios stay near 1 (below, at some depths); the search's logic is
    # what is tested here, and tests/test_prune_smollm2.py tests it on a real model.
    dense = tiny_family("gemma3_text", num_layers=6, seed=0)
    data = windows(12)
    _, probe = prune(dense, None, target_ppl_ratio=1e9, calibration=data, holdout=3, progress=False)
    curve = probe.depth_curve
    assert [point["num_layers"] for point in curve] == list(range(1, 6))  # never above the target: every depth
    ratios = [point["ratio"] for point in curve]
    target = max(sorted(ratios)[2] * 1.0001, 1 + 1e-6)
    pruned, report = prune(dense, None, target_ppl_ratio=target, calibration=data, holdout=3, progress=False)
    within = [point["num_layers"] for point in report.depth_curve if point["ratio"] <= target]
    assert len(report.pruned_layers) == max(within) and report.metric == "loss" and report.patch == "auto"
    for point in report.depth_curve:
        assert point["ratio"] <= point["fixed_ratio"] * (1 + 1e-6)  # auto includes hadamard at the cosine block
    held = split_holdout(data, 3)[1].input_ids
    ratio = chunked_perplexity(pruned, held) / report.holdout["dense_perplexity"]
    assert ratio <= target and json.loads(json.dumps(report.to_dict()))["depth_curve"] == report.depth_curve
    with pytest.raises(LinearPatchError, match="not above 1"):
        prune(dense, None, target_ppl_ratio=0.9, calibration=data, progress=False)
    with pytest.raises(LinearPatchError, match="exactly one"):
        prune(dense, None, num_layers=2, target_ppl_ratio=1.5, calibration=data, progress=False)


def test_auto_and_target_work_for_a_width_without_a_hadamard_matrix():
    """136 = 17 x 8 has no Hadamard matrix: `--patch hadamard` is refused up front, `auto` leaves it out, and a
    depth curve compares against least squares instead."""
    dense = tiny_family("llama", hidden_size=136, head_dim=34, seed=7)
    data = windows(12)
    with pytest.raises(ValueError, match="No Hadamard matrix of order 136"):
        prune(dense, None, layers=[2, 3], patch="hadamard", calibration=data, progress=False)
    _, report = prune(dense, None, layers=[2, 3], patch="auto", calibration=data, holdout=3, progress=False)
    assert "hadamard" not in report.patch_choices[0]["scores"] and len(report.patch_choices[0]["scores"]) == 7
    _, report = prune(dense, None, target_ppl_ratio=1e9, calibration=data, holdout=3, progress=False)
    assert {point["fixed_patch"] for point in report.depth_curve} == {"lstsq(ridge=0.01)"}


def test_cli_target_ratio_and_its_depth_curve(tiny_checkpoint, tmp_path, linearpatch_cli):
    """`prune --target-ppl-ratio` keeps the deepest cut within the ratio on the held-out windows, stops two depths past
    it, prints and reports the whole curve, saves a model with the recorded held-out perplexity, and `linearpatch
    report` draws the curve; a ratio no depth meets ends in one line and writes nothing. (Random weights keep every
    ratio near 1, so the targets are set just above and below this model's measured ones.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linearpatch.integration.data import token_windows

    output = tmp_path / "target"
    sizes = ["--num-samples", "10", "--seq-len", "32", "--holdout", "3"]
    run = linearpatch_cli("prune", tiny_checkpoint, "--target-ppl-ratio", "1.0001", *sizes, "--output", output)
    assert run.returncode == 0, run.stderr
    report = json.loads((output / "linearpatch_report.json").read_text())
    curve, chosen = report["depth_curve"], len(report["pruned_layers"])
    assert report["metric"] == "loss" and report["patch"] == "auto" and chosen >= 1
    assert [point["num_layers"] for point in curve] == list(range(1, len(curve) + 1))
    # The deepest depth within the target is kept; the search ends two misses in a row, or at the last depth.
    assert chosen == max(point["num_layers"] for point in curve if point["ratio"] <= 1.0001)
    stopped = curve[-1]["ratio"] > 1.0001 and curve[-2]["ratio"] > 1.0001
    assert stopped or len(curve) == report["num_dense_layers"] - 1
    assert all(p["ratio"] <= p["fixed_ratio"] * (1 + 1e-6) for p in curve)  # hadamard at the cosine block: a candidate
    assert f"{chosen} layers" in run.stdout and "plain" in run.stdout
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert model.config.patch_kind == report["patch_kind"] and model.config.selection_metric == "loss"
    windows = token_windows("wikipedia-calibration", AutoTokenizer.from_pretrained(output), 10, 32, seed=0)
    ratio = chunked_perplexity(model, split_holdout(windows, 3)[1]) / report["holdout"]["dense_perplexity"]
    assert ratio == pytest.approx(curve[chosen - 1]["ratio"], rel=1e-4)

    plotted = linearpatch_cli("report", output, "--dense", tiny_checkpoint, "--num-samples", "1", "--seq-len", "32")
    assert plotted.returncode == 0, plotted.stderr
    assert (output / "depth_curve.png").stat().st_size > 1000
    # One window leaves none to hold out: closeness by cut is not drawn, and the summary says why.
    assert not (output / "closeness_by_cut.png").exists() and "--num-samples 2 or more" in plotted.stdout
    plots = json.loads((output / "linearpatch_plots.json").read_text())["depth_curve"]
    assert plots["target"] == 1.0001 and plots["curve"] == curve
    assert plots["figure"]["axes"][0]["legend"][:3] == [
        "plain pruning (cosine block)",
        "hadamard patch (cosine block)",
        "chosen block and patch (held-out loss)",
    ]

    # Plain pruning at the cosine block: removing one layer already costs more than 0.1% here.
    tight = ["--target-ppl-ratio", "1.001", "--metric", "cosine", "--patch", "none", *sizes]
    too_tight = linearpatch_cli("prune", tiny_checkpoint, *tight, "--output", tmp_path / "x")
    assert too_tight.returncode == 2 and "Raise --target-ppl-ratio" in too_tight.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("gap", [(2, 4), (4, 6)])
def test_scorer_kl_equals_the_closeness_of_the_whole_pruned_model(gap):
    """Issue #34: with `closeness`, a candidate's held-out KL to the dense model, from the stored residual stream, is
    what `eval` measures for the pruned model built and run whole (`measurement/closeness.py`), and the dense model's
    own predictions are kept from the same dense forward."""
    from linearpatch.integration.defaults import TEACHER_TOP_K
    from linearpatch.integration.measurement.closeness import compare_with, reference_of

    dense = tiny_family("llama", seed=1)
    held = windows(3).input_ids
    patch = random_patch(64, seed=5)
    scorer = HeldOutScorer(dense, held, batch_size=2, progress=False, closeness=True)
    measured = scorer.measure(*gap, patch)
    assert scorer.forwards == 2  # one dense forward for the stream and the predictions, one candidate
    whole = prune_layers(dense, list(range(*gap)), patches=[patch])
    figures, perplexity = compare_with(whole, reference_of(dense, held, TEACHER_TOP_K)[0])
    assert measured["kl"] == pytest.approx(figures["kl"], rel=1e-5) and measured["kl"] > 1e-4
    assert measured["loss"] == pytest.approx(perplexity, rel=1e-5)
    assert "kl" not in HeldOutScorer(dense, held, progress=False).measure(*gap, patch)


def test_kl_metric_and_score_choose_by_kl_to_the_dense_model(tiny_checkpoint, tmp_path, linearpatch_cli):
    """`prune --metric kl` keeps the candidate block with the lowest held-out KL to the dense model (recorded per
    start), and `--patch auto --score kl` the patch with the lowest KL (every variant's KL and perplexity recorded);
    `--score kl` without `--patch auto` is refused in one line."""
    sizes = ["--num-samples", "10", "--seq-len", "32", "--holdout", "3", "--num-layers", "2"]
    output = tmp_path / "kl"
    run = linearpatch_cli(
        "prune", tiny_checkpoint, *sizes, "--metric", "kl", "--patch", "auto", "--score", "kl", "--output", output
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((output / "linearpatch_report.json").read_text())
    scores, (choice,) = report["candidate_scores"], report["patch_choices"]
    best = min(scores, key=scores.get)
    assert report["metric"] == "kl" and report["pruned_layers"] == [int(best), int(best) + 1] and len(scores) == 4
    assert "Held-out KL to the dense model" in run.stdout
    assert choice["heldout_kl"] == min(choice["kl_scores"].values()) == scores[best]
    assert choice["label"] == min(choice["kl_scores"], key=choice["kl_scores"].get)
    assert list(choice["scores"]) == list(choice["kl_scores"]) and len(choice["scores"]) == 8
    by_loss = linearpatch_cli(
        "prune", tiny_checkpoint, *sizes, "--metric", "loss", "--patch", "auto", "--output", tmp_path / "loss"
    )
    assert by_loss.returncode == 0, by_loss.stderr
    loss_choice = json.loads((tmp_path / "loss" / "linearpatch_report.json").read_text())["patch_choices"][0]
    assert "kl_scores" not in loss_choice  # KL is measured only when something is chosen by it
    refused = linearpatch_cli(
        "prune",
        tiny_checkpoint,
        "--num-layers",
        "2",
        "--patch",
        "hadamard",
        "--score",
        "kl",
        "--output",
        tmp_path / "x",
    )
    assert refused.returncode == 2 and "add --patch auto" in refused.stderr and not (tmp_path / "x").exists()


def test_a_fixed_patch_is_checked_against_no_patch_on_windows_it_never_saw(
    tiny_checkpoint, tmp_path, linearpatch_cli, monkeypatch
):
    """`prune --patch KIND` scores the patch and no patch on windows drawn after the calibration windows (which stay
    exactly those of a prune without the check), records both per gap, and warns in one line when the patch is worse
    (here a ruinous 30 x identity stands in for a patch whose statistic does not fit the block)."""
    from transformers import AutoTokenizer

    from linearpatch.integration.data import token_windows
    from linearpatch.integration.pruning import plan as plan_module

    sizes = ["--num-samples", "8", "--seq-len", "32", "--layers", "2-3", "--patch", "hadamard"]
    run = linearpatch_cli("prune", tiny_checkpoint, *sizes, "--output", tmp_path / "checked")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "checked" / "linearpatch_report.json").read_text())
    (check,) = report["patch_check"]
    assert check["gap"] == [2, 4] and check["patch"] == "hadamard" and "Held-out check, layers 2..3" in run.stdout
    # The check scores exactly the saved model and the plain cut on the one window drawn after the eight fitted.
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    drawn = token_windows("wikipedia-calibration", tokenizer, 9, 32, seed=0).input_ids
    saved = load_saved(tmp_path / "checked")
    assert math.isclose(chunked_perplexity(saved, drawn[8:]), check["perplexity"], rel_tol=1e-5)
    assert check["worse_than_none"] == (check["perplexity"] > check["none_perplexity"])
    # The calibration windows are those of a prune without the check: the same patch.
    fitted = token_windows("wikipedia-calibration", tokenizer, 8, 32)
    options = dict(layers=[2, 3], patch="hadamard", calibration=fitted, progress=False)
    unchecked, _ = prune(load_saved(tiny_checkpoint), None, **options)
    assert torch.allclose(saved.model.layers[2].linear_patch.weight, unchecked.model.layers[2].linear_patch.weight)

    monkeypatch.setattr(plan_module, "estimate_patch", lambda *args, **kwargs: 30 * torch.eye(64))
    run = linearpatch_cli("prune", tiny_checkpoint, *sizes, "--output", tmp_path / "ruined")
    assert run.returncode == 0, run.stderr
    (check,) = json.loads((tmp_path / "ruined" / "linearpatch_report.json").read_text())["patch_check"]
    assert check["worse_than_none"] and check["perplexity"] > check["none_perplexity"]
    warnings = [line for line in run.stderr.splitlines() if "worse than no patch" in line]
    assert len(warnings) == 1 and "layers 2..3" in warnings[0] and "--patch auto" in warnings[0]


def load_saved(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
