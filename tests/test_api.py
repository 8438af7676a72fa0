"""The Python API as the README shows it (issue #10, finding 8): one public name per step, the same defaults as the
CLI, and a `base_model` that another machine can resolve."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearpatch
from linearpatch.cli import main
from linearpatch.integration.defaults import CALIBRATION, Sizes


def test_public_names_resolve_lazily():
    """Each public name is the object of the module that defines it, imported only when first asked for (so that
    `import linearpatch` pulls in neither the pruning nor the model code); an unknown name is an AttributeError."""
    import importlib
    import subprocess
    import sys

    from linearpatch.integration.pruning import job, report

    code = "import sys, linearpatch; print(sorted(m for m in sys.modules if m.startswith('linearpatch.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    assert set(linearpatch.__all__) == set(linearpatch._LAZY) | {"__version__"}
    for name, module in linearpatch._LAZY.items():
        assert getattr(linearpatch, name) is getattr(importlib.import_module(module), name), name
    assert linearpatch.prune is job.prune and linearpatch.PruneReport is report.PruneReport
    with pytest.raises(AttributeError, match="no attribute 'prune_everything'"):
        linearpatch.prune_everything  # noqa: B018


def test_default_sizes_follow_the_device_unless_quick(monkeypatch):
    from linearpatch.integration import defaults

    monkeypatch.delenv("LINEARPATCH_QUICK")  # the suite runs at smoke-test sizes (tests/conftest.py)
    assert (defaults.calibration_sizes("cpu"), defaults.calibration_sizes("cuda:1")) == (
        Sizes(32, 512),
        Sizes(128, 2048),
    )
    assert (defaults.distillation_sizes("cpu"), defaults.perplexity_sizes("cuda")) == (
        Sizes(256, 512),
        Sizes(64, 2048),
    )
    assert (defaults.task_limit("cpu"), defaults.task_limit("cuda")) == (100, None)
    monkeypatch.setenv("LINEARPATCH_QUICK", "1")
    for device in ("cpu", "cuda"):
        assert defaults.calibration_sizes(device) == defaults.distillation_sizes(device) == Sizes(4, 64)
        assert (defaults.perplexity_sizes(device), defaults.task_limit(device)) == (Sizes(2, 64), 8)


def test_api_and_cli_use_the_same_default_calibration(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("LINEARPATCH_QUICK")  # the CPU defaults themselves, as a user gets them
    dense, tokenizer = linearpatch.load_model(str(tiny_checkpoint), device="cpu")
    # The Hadamard patch, which fits on every window (the default, auto, holds one in eight out).
    _, report = linearpatch.prune(dense, tokenizer, num_layers=2, patch="hadamard", progress=False)
    cpu = CALIBRATION["cpu"]
    # The default windows, cut to the tiny model's context of 256 tokens (both ways alike).
    context = dense.config.max_position_embeddings
    assert cpu.seq_len > context and (report.calibration["num_windows"], report.calibration["seq_len"]) == (
        cpu.num_samples,
        context,
    )
    cli = ["prune", str(tiny_checkpoint), "--num-layers", "2", "--patch", "hadamard"]
    assert main([*cli, "--output", str(tmp_path / "cli")]) == 0
    from_cli = json.loads((tmp_path / "cli" / "linearpatch_report.json").read_text())
    assert from_cli["calibration"] == {
        **from_cli["calibration"],
        "num_windows": cpu.num_samples,
        "seq_len": context,
    }
    assert from_cli["calibration"]["sha256"] == report.calibration["sha256"]  # the very same windows


def test_save_checkpoint_writes_model_tokenizer_and_report(tiny_checkpoint, tmp_path):
    dense, tokenizer = linearpatch.load_model(str(tiny_checkpoint))
    pruned, report = linearpatch.prune(dense, tokenizer, layers=[1, 2], num_samples=2, seq_len=16, progress=False)
    folder = linearpatch.save_checkpoint(pruned, tokenizer, tmp_path / "saved", report=report)
    assert json.loads((folder / "linearpatch_report.json").read_text())["pruned_layers"] == [1, 2]
    assert (
        AutoTokenizer.from_pretrained(folder, trust_remote_code=False)("a b c").input_ids
        == tokenizer("a b c").input_ids
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, pruned(ids).logits)


def test_base_model_records_what_another_machine_can_resolve(tiny_checkpoint, tmp_path):
    # A Hub download (HF cache layout) records its repo id, not the cache path.
    snapshot = tmp_path / "hub" / "models--some-org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoint, snapshot)
    dense, tokenizer = linearpatch.load_model(str(snapshot))
    pruned, report = linearpatch.prune(dense, tokenizer, layers=[2], num_samples=2, seq_len=16, progress=False)
    assert pruned.config.base_model == report.base_model == "some-org/tiny-llama"
    # A plain local folder has no identity elsewhere: nothing is recorded (not a path), unless --base-model says so.
    quick = ["--layers", "2", "--num-samples", "2", "--seq-len", "16"]
    assert main(["prune", str(tiny_checkpoint), *quick, "--output", str(tmp_path / "local")]) == 0
    assert json.loads((tmp_path / "local" / "config.json").read_text()).get("base_model") is None
    output = str(tmp_path / "named")
    assert main(["prune", str(tiny_checkpoint), *quick, "--base-model", "org/dense", "--output", output]) == 0
    assert json.loads((tmp_path / "named" / "config.json").read_text())["base_model"] == "org/dense"


def test_every_stage_report_follows_the_report_protocol():
    """Issue #31: prune, distill, export, eval and report each return a report with its record file, its JSON and its
    summary, which the CLI prints (and nothing else)."""
    from linearpatch.common.names import DISTILL_RECORD, EVAL_FILES, EXPORT_RECORD, PLOTS_RECORD, PRUNE_RECORD
    from linearpatch.common.reporting import Report
    from linearpatch.integration.distillation.report import DistillReport
    from linearpatch.integration.evaluation import FiguresReport, ModelComparison
    from linearpatch.integration.export.report import ExportReport
    from linearpatch.integration.pruning.report import PruneReport

    reports = [
        (PruneReport(None, 6, [2, 3], [[2, 4]], "manual", "hadamard", output="out"), PRUNE_RECORD),
        (DistillReport("t", 8, {"num_windows": 4}, 1.0, 1e-4, 1, 1, 1.0, "key", 24, output="out"), DISTILL_RECORD),
        (ExportReport(None, "auto", None, [2, 3], [2], architecture="LlamaForCausalLM", output="out"), EXPORT_RECORD),
        (ModelComparison({"models": []}, "| model |\n|---|", written=["out/linearpatch_eval.json"]), EVAL_FILES[0]),
        (FiguresReport("out", ["cosine_heatmap.png"], {"cosine": []}), PLOTS_RECORD),
    ]
    for report, record in reports:
        assert isinstance(report, Report) and report.record == record, type(report).__name__
        assert json.loads(report.to_json()) is not None
        assert "out" in report.summary(), type(report).__name__  # where the output went is part of the summary
