"""Choosing by outcome on the real SmolLM2-135M (issue #13), at test sizes; the acceptance sizes are
`python -m bench --sections search` (README, "Choose by outcome")."""

import json
import subprocess
import sys

import pytest

from linearpatch.integration.data import token_windows
from linearpatch.integration.evaluation.perplexity import chunked_perplexity
from linearpatch.integration.pruning import prune
from linearpatch.integration.pruning.calibration import calibrate
from linearpatch.integration.pruning.search import split_holdout

pytestmark = pytest.mark.slow
BLOCK = list(range(20, 25))
EVAL_CORPORA = ("wikipedia-eval", "lee-news")


@pytest.fixture(scope="module")
def evaluation(smollm2):
    _, tokenizer = smollm2
    return {corpus: token_windows(corpus, tokenizer, 4, 256, sampling="chunked") for corpus in EVAL_CORPORA}


def test_auto_patch_at_the_stress_cut_is_no_worse_than_hadamard_or_lstsq(smollm2, evaluation):
    model, tokenizer = smollm2
    calibration = token_windows("wikipedia-calibration", tokenizer, 24, 256, seed=0)
    fit, held = split_holdout(calibration, 4)
    statistics = calibrate(model, fit, regression_blocks=[(20, 25)], progress=False)
    perplexity = {}
    for kind in ("hadamard", "lstsq"):
        pruned, _ = prune(model, tokenizer, layers=BLOCK, patch=kind, statistics=statistics, progress=False)
        perplexity[kind] = {corpus: chunked_perplexity(pruned, windows) for corpus, windows in evaluation.items()}
    auto, report = prune(model, tokenizer, layers=BLOCK, patch="auto", calibration=calibration, holdout=4)
    perplexity["auto"] = {corpus: chunked_perplexity(auto, windows) for corpus, windows in evaluation.items()}
    print("stress cut, held-out perplexity:", json.dumps(perplexity), report.patch_choices[0]["label"])
    assert report.holdout["sha256"] == held.fingerprint
    for corpus in EVAL_CORPORA:
        assert perplexity["auto"][corpus] <= min(perplexity["hadamard"][corpus], perplexity["lstsq"][corpus])


def test_cli_target_ratio_and_its_depth_curve(tmp_path):
    """`prune --target-ppl-ratio` keeps the deepest cut within the ratio on the held-out windows, reports the whole
    curve, and `linearpatch report` draws it."""
    from transformers import AutoModelForCausalLM

    output = tmp_path / "target"
    command = [sys.executable, "-m", "linearpatch.cli"]
    sizes = ["--num-samples", "10", "--seq-len", "128", "--holdout", "3"]
    run = subprocess.run(
        [*command, "prune", "smollm2-135m", "--target-ppl-ratio", "1.6", *sizes, "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((output / "linearpatch_report.json").read_text())
    curve = report["depth_curve"]
    chosen = len(report["pruned_layers"])
    assert report["metric"] == "loss" and report["patch"] == "auto" and chosen >= 2
    assert [point["num_layers"] for point in curve] == list(range(1, len(curve) + 1))
    assert curve[chosen - 1]["ratio"] <= 1.6 and curve[-1]["ratio"] > 1.6 and curve[-2]["ratio"] > 1.6
    assert all(
        p["ratio"] <= p["fixed_ratio"] * (1 + 1e-6) for p in curve
    )  # hadamard at the cosine block is a candidate
    assert f"{chosen} layers" in run.stdout and "plain" in run.stdout
    # The saved model has the recorded held-out perplexity on the held-out windows.
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert model.config.patch_kind == report["patch_kind"] and model.config.selection_metric == "loss"
    windows = token_windows("wikipedia-calibration", _tokenizer(output), 10, 128, seed=0)
    held = split_holdout(windows, 3)[1]
    ratio = chunked_perplexity(model, held) / report["holdout"]["dense_perplexity"]
    assert ratio == pytest.approx(curve[chosen - 1]["ratio"], rel=1e-4)

    plotted = subprocess.run(
        [*command, "report", str(output), "--num-samples", "1", "--seq-len", "32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    assert (output / "depth_curve.png").stat().st_size > 1000
    plots = json.loads((output / "linearpatch_plots.json").read_text())["depth_curve"]
    assert plots["target"] == 1.6 and plots["curve"] == curve
    assert plots["figure"]["axes"][0]["legend"][:3] == [
        "plain pruning (cosine block)",
        "hadamard patch (cosine block)",
        "chosen block and patch (held-out loss)",
    ]

    too_tight = subprocess.run(
        [*command, "prune", "smollm2-135m", "--target-ppl-ratio", "1.0001", *sizes, "--output", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert too_tight.returncode == 2 and "Raise --target-ppl-ratio" in too_tight.stderr
    assert not (tmp_path / "x").exists()


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
