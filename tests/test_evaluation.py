"""Perplexity, lm-eval integration, retained performance, comparison report and plots."""

import json
import math
import os

import pytest
import torch
from helpers import random_patch, tiny_llama

from linearpatch.integration.evaluation.comparison import (
    ModelEvaluation,
    average_accuracy,
    chance_flags,
    comparison,
    comparison_table,
    retained_performance,
)
from linearpatch.integration.evaluation.figures import cosine_matrix, write_report_plots
from linearpatch.integration.evaluation.tasks import (
    OFFLINE_TASKS,
    build_offline_tasks,
    lm_eval_tasks,
    mmlu_dev_documents,
)
from linearpatch.integration.measurement.calibration import calibrate
from linearpatch.integration.measurement.perplexity import chunked_perplexity
from linearpatch.modeling import prune_layers


def test_chunked_perplexity_is_exp_mean_nll():
    model = tiny_llama()
    windows = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            for position in range(len(window) - 1):
                nll -= log_probs[position, window[position + 1]].item()
                count += 1
    assert chunked_perplexity(model, windows) == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert chunked_perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-6)


def _evaluation(name, scores, parameters=100):
    return ModelEvaluation(name, parameters, 4, tasks={t: dict(acc=v) for t, v in scores.items()})


def test_retained_performance_is_mean_of_ratios():
    dense = _evaluation("dense", {"a": 0.80, "b": 0.20})
    pruned = _evaluation("pruned", {"a": 0.40, "b": 0.20}, parameters=75)
    # mean of ratios: (0.5 + 1.0) / 2 = 75%; ratio of means would be 0.30 / 0.50 = 60%.
    assert retained_performance(pruned, dense) == pytest.approx(75.0)
    assert average_accuracy(pruned) == pytest.approx(30.0)
    normed = ModelEvaluation("n", 1, 1, tasks={"a": dict(acc=0.1, acc_norm=0.4), "b": dict(acc=0.2)})
    assert retained_performance(normed, dense) == pytest.approx(100 * (0.4 / 0.8 + 0.2 / 0.2) / 2)
    with pytest.raises(ValueError, match="not evaluated on 'c'"):
        retained_performance(_evaluation("x", {"c": 0.5}), dense)
    data = comparison([pruned], dense)
    assert data["models"][1]["parameter_ratio"] == 0.75
    table = comparison_table(data)
    assert "| pruned | - | 0.0M (0.750) | 40.00 | 20.00 | 30.00 | 75.00 |" in table


def test_offline_tasks_are_built_from_installed_packages(tmp_path):
    directory = build_offline_tasks(tmp_path, num_documents=50)
    for task in OFFLINE_TASKS:
        assert (directory / f"{task}.yaml").exists()
    documents = [json.loads(line) for line in (directory / "wiki_next_sentence.jsonl").read_text().splitlines()]
    assert len(documents) == 50
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in documents)
    assert {d["label"] for d in documents} == {0, 1, 2, 3}
    assert len(mmlu_dev_documents()) > 250


def test_lm_eval_in_memory_on_tiny_model_forks_nothing(tmp_path, smollm2_tokenizer, monkeypatch):
    # lm-eval would bootstrap wiki_last_word's perplexity stderr in a fork pool; a fork of a process with running torch
    # threads can hang (it did in CI), so evaluation must not fork at all.
    def no_fork(*args, **kwargs):
        raise AssertionError("lm_eval_tasks forked a process")

    monkeypatch.setattr(os, "fork", no_fork)
    model = tiny_llama(vocab_size=len(smollm2_tokenizer))
    scores = lm_eval_tasks(
        model,
        smollm2_tokenizer,
        ["wiki_next_sentence", "wiki_last_word"],
        limit=8,
        batch_size=4,
        include_path=str(build_offline_tasks(tmp_path, num_documents=20)),
    )
    assert set(scores["wiki_next_sentence"]) >= {"acc", "acc_norm"}
    assert 0.0 <= scores["wiki_next_sentence"]["acc"] <= 1.0
    # The bootstrapped standard error is still there, and finite.
    assert 0.0 < scores["wiki_last_word"]["perplexity_stderr"] < float("inf")
    assert "DISABLE_MULTIPROC" not in os.environ  # the switch does not outlive the call


def test_plots_show_the_statistics(tmp_path):
    dense = tiny_llama(seed=2)
    windows = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    patched = prune_layers(dense, [2, 3], patches=[random_patch(64, 4)])
    data = write_report_plots(dense, patched, windows, tmp_path)
    for name in ("cosine_heatmap.png", "layer_magnitudes.png", "cut_mismatch.png", "linearpatch_plots.json"):
        assert (tmp_path / name).stat().st_size > 1000
    # Heatmap = the calibration cosines (every pair), symmetric with unit diagonal.
    statistics = calibrate(dense, windows, distances=range(1, 7), progress=False)
    heatmap = torch.tensor(data["cosine_heatmap"]["cosine"], dtype=torch.float64)
    assert torch.allclose(heatmap, cosine_matrix(statistics)) and torch.allclose(heatmap, heatmap.T)
    assert heatmap[1, 3].item() == pytest.approx(statistics.block_cosine(2)[1].item())
    # Magnitudes: dense curve equals mean |X_l| from the calibration pass; the patched curve differs only after
    # the cut (the patch scales the stream entering layer 4).
    dense_curve = data["layer_magnitudes"]["dense"]
    expected = statistics.channel_abs_mean.mean(dim=(0, 2))
    assert dense_curve["layers"] == list(range(7))
    assert torch.allclose(torch.tensor(dense_curve["magnitude"]), expected, rtol=1e-5)
    plain, patched_curve = data["layer_magnitudes"]["plain pruned"], data["layer_magnitudes"]["patched"]
    assert plain["layers"] == patched_curve["layers"] == [0, 1, 4, 5, 6]
    assert plain["magnitude"][:2] == pytest.approx(dense_curve["magnitude"][:2], rel=1e-5)
    assert patched_curve["magnitude"][2] != pytest.approx(plain["magnitude"][2], rel=1e-3)
    # Cut mismatch: before = dense X_2 per channel, target = dense X_4, after = X_2 @ P.
    cut = data["cut_mismatch"][0]
    assert cut["gap"] == [2, 4]
    assert torch.allclose(torch.tensor(cut["target"]), statistics.channel_abs_mean[:, 4].mean(0), rtol=1e-5)
    assert torch.allclose(torch.tensor(cut["before"]), statistics.channel_abs_mean[:, 2].mean(0), rtol=1e-4)


def test_figures_are_labelled(tmp_path):
    dense = tiny_llama(seed=2)
    windows = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    data = write_report_plots(dense, prune_layers(dense, [2, 3], patches=[random_patch(64, 4)]), windows, tmp_path)
    (heatmap,) = data["cosine_heatmap"]["figure"]["axes"]
    assert heatmap["legend"] == ["removed block: cos(X_s, X_e)"] and heatmap["title"]
    (magnitudes,) = data["layer_magnitudes"]["figure"]["axes"]
    assert magnitudes["title"] and magnitudes["ylabel"]
    assert magnitudes["legend"] == ["dense", "plain pruned", "patched", "removed layers"]
    (cut,) = data["cut_mismatch"][0]["figure"]["axes"]
    assert cut["ylabel"] and cut["xlabel"] and cut["title"]
    assert cut["legend"][-1].startswith("dense")  # drawn last, on top of the patched curve that follows it


def test_closeness_by_cut_is_the_whole_pruned_models_closeness(tmp_path):
    """Issue #46's third figure: for every block of the checkpoint's depth, the held-out KL to the dense model of the
    plain and the patched cut equals what `eval` measures for that model built and run whole, the patch fitted on
    the other windows only; the cosine is the calibration's block cosine on them. The checkpoint's cut is marked."""
    from linearpatch.integration.data import TokenWindows
    from linearpatch.integration.defaults import TEACHER_TOP_K
    from linearpatch.integration.measurement.closeness import compare_with, reference_of
    from linearpatch.integration.pruning import closeness_by_cut, estimate_patch

    dense = tiny_llama(seed=2)
    rows = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    closeness = closeness_by_cut(dense, TokenWindows(rows, "test", "random", 0, rows.numel()), 2)
    fit, held = rows[:3], rows[3:]
    assert closeness["windows"] == [3, 1] and closeness["patch"] == "hadamard"
    assert [(cut["start"], cut["end"]) for cut in closeness["cuts"]] == [(s, s + 2) for s in range(5)]
    statistics = calibrate(dense, fit, distances=(1, 2), progress=False)
    reference = reference_of(dense, held, TEACHER_TOP_K)[0]
    for cut in closeness["cuts"]:
        layers = list(range(cut["start"], cut["end"]))
        patch = estimate_patch(statistics, cut["start"], cut["end"], "hadamard")
        plain, plain_perplexity = compare_with(prune_layers(dense, layers, add_patches=False), reference)
        patched, patched_perplexity = compare_with(prune_layers(dense, layers, patches=[patch]), reference)
        assert cut["plain_kl"] == pytest.approx(plain["kl"], rel=1e-5) and cut["plain_kl"] > 1e-4
        assert cut["patched_kl"] == pytest.approx(patched["kl"], rel=1e-5)
        assert cut["patched_kl"] != pytest.approx(cut["plain_kl"], rel=1e-3)
        assert cut["plain_perplexity"] == pytest.approx(plain_perplexity, rel=1e-5)
        assert cut["patched_perplexity"] == pytest.approx(patched_perplexity, rel=1e-5)
        assert cut["cosine"] == pytest.approx(statistics.block_cosine(2)[cut["start"]].item(), rel=1e-6)

    data = write_report_plots(
        dense, prune_layers(dense, [2, 3], patches=[random_patch(64, 4)]), rows, tmp_path, closeness=closeness
    )
    assert (tmp_path / "closeness_by_cut.png").stat().st_size > 1000
    top, bottom = data["closeness_by_cut"]["figure"]["axes"]
    assert top["legend"] == ["plain cut", "hadamard patch", "this checkpoint's cut"] and "KL" in top["ylabel"]
    assert bottom["legend"] == ["cos(X_s, X_s+n)", "this checkpoint's cut"]
    recorded = json.loads((tmp_path / "linearpatch_plots.json").read_text())["closeness_by_cut"]
    assert recorded["cuts"] == closeness["cuts"]


def test_eval_and_report_cli(tiny_checkpoint, tmp_path, capfd, monkeypatch):
    from linearpatch.cli import main

    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval must not print "fatal: not a git repository"

    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(tiny_checkpoint),
                "--layers",
                "1-2",
                "--num-samples",
                "4",
                "--seq-len",
                "32",
                "--output",
                str(pruned),
            ]
        )
        == 0
    )
    arguments = [
        "eval",
        str(pruned),
        "--baseline",
        str(tiny_checkpoint),
        "--tasks",
        "wiki_next_sentence",
        "--limit",
        "4",
        "--ppl-corpus",
        "lee-news",
        "--ppl-windows",
        "2",
        "--seq-len",
        "64",
        "--output",
        str(pruned),
    ]
    assert main(arguments) == 0
    out, err = capfd.readouterr()
    assert "fatal" not in err and "estimated" in out and "RP %" in out
    assert "| KL lee-news | top-1 % | top-10 % | gen prefix | gen same % |" in out  # closeness, issue #34
    data = json.loads((pruned / "linearpatch_eval.json").read_text())
    assert [row["name"] for row in data["models"]] == [str(tiny_checkpoint), str(pruned)]
    assert data["models"][1]["pruned_layers"] == [1, 2] and data["models"][1]["parameter_ratio"] < 1
    assert "lee-news" in data["models"][1]["perplexity"]
    closeness, generation = data["models"][1]["closeness"]["lee-news"], data["models"][1]["generation"]
    assert closeness["kl"] > 0 and 0 <= closeness["top1"] <= 1 and 0 <= generation["identical_tokens"] <= 1
    assert "RP %" in (pruned / "linearpatch_eval.md").read_text()
    assert (pruned / "model.safetensors").exists()  # written beside the checkpoint, which stays whole
    before = (pruned / "linearpatch_eval.json").read_text()
    assert main(arguments) == 2 and "already exists; pass --overwrite" in capfd.readouterr().err
    assert (pruned / "linearpatch_eval.json").read_text() == before
    report = ["report", str(pruned), "--dense", str(tiny_checkpoint), "--num-samples", "2", "--seq-len", "32"]
    assert main(report) == 0
    assert (pruned / "cut_mismatch.png").exists() and (pruned / "linearpatch_plots.json").exists()
    assert (pruned / "closeness_by_cut.png").exists()  # two windows: one to fit, one held out
    assert "calibration" in capfd.readouterr().err  # progress of the long steps
    assert main(report) == 2 and "pass --overwrite" in capfd.readouterr().err
    assert main([*report, "--overwrite"]) == 0


def test_tasks_at_chance_are_flagged_and_left_out_of_the_second_rp():
    dense = ModelEvaluation(
        "dense",
        100,
        4,
        tasks={
            "wiki_next_sentence": dict(acc=0.5, acc_norm=0.56, acc_norm_stderr=0.05),
            "mmlu_dev_offline": dict(acc=0.27, acc_stderr=0.04),  # 0.02 above chance: within 2 stderr
            "wiki_last_word": dict(acc=0.30, acc_stderr=0.03),
        },
    )
    pruned = ModelEvaluation(
        "pruned",
        75,
        3,
        tasks={
            "wiki_next_sentence": dict(acc=0.3, acc_norm=0.28),
            "mmlu_dev_offline": dict(acc=0.27),
            "wiki_last_word": dict(acc=0.15),
        },
    )
    flags = chance_flags(dense)
    assert [task for task, flag in flags.items() if flag["at_chance"]] == ["mmlu_dev_offline"]
    data = comparison([pruned], dense)
    row = data["models"][1]
    assert row["retained_performance"] == pytest.approx(100 * (0.5 + 1.0 + 0.5) / 3)
    assert row["retained_performance_above_chance"] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert data["at_chance"] == ["mmlu_dev_offline"]
    table = comparison_table(data)
    assert "| 66.67 | 50.00 |" in table and "mmlu_dev_offline (27.0 vs chance 25)" in table


def test_last_word_task_asks_for_a_word_the_passage_already_contains():
    from linearpatch.integration.evaluation.tasks import last_word_documents

    documents = last_word_documents()
    assert len(documents) >= 300
    for document in documents:
        word = document["target"]
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 5
        assert word[1:].lower() in document["context"].lower()
        assert word[1:].lower() not in {"said", "says", "told"}
    # No word dominates (news passages end on 'said' a fifth of the time: those are left out).
    counts = {}
    for document in documents:
        counts[document["target"]] = counts.get(document["target"], 0) + 1
    assert max(counts.values()) <= 0.05 * len(documents)
