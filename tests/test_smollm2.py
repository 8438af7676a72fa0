"""What only the real SmolLM2-135M shows, on the suite's one shared prune (`smollm2_pruned` in conftest.py): the
checkpoint reloads without the package with the same logits, and the scalar fold is exact with the model's real
RMSNorm eps; and the demo, the main job, runs on it. Quality on SmolLM2 (patch kinds, choosing by outcome,
distillation, export, task separation) is measured and checked by the bench: `python -m bench --check`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.export import export_model
from linearpatch.modeling import prune_layers

pytestmark = pytest.mark.slow


def test_pruned_smollm2_reloads_without_the_package_with_the_same_logits(smollm2_pruned):
    report = json.loads((smollm2_pruned / "linearpatch_report.json").read_text())
    assert report["pruned_layers"] == [20, 21, 22, 23, 24, 29] and report["gaps"] == [[20, 25], [29, 30]]
    assert report["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's Hub id, not a path
    model = AutoModelForCausalLM.from_pretrained(smollm2_pruned).eval()
    assert model.config.num_hidden_layers == 24 and model.config.patch_positions == [20, 24]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned)
    input_ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids).logits
    (got,) = logits_without_package([smollm2_pruned], input_ids)
    assert (want - got).abs().max().item() <= 1e-5
    prompt = input_ids[:, :8]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=10, do_sample=False),
        model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False),
    )


def test_scalar_fold_is_exact_with_smollm2s_real_rmsnorm_eps(smollm2):
    # Tiny random models need eps = 1e-12 for the fold to be exact (their residual stream is small); a real model's
    # stream is large enough that its own eps (1e-5) costs nothing measurable.
    dense, tokenizer = smollm2
    scalar = prune_layers(dense, list(range(20, 25)), patches=[1.9 * torch.eye(576)], patch_kind="scalar")
    stock, folds = export_model(scalar, "scalar")
    assert folds[0]["exact"]
    input_ids = tokenizer("Layer pruning makes language models cheaper to serve.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (stock(input_ids).logits - scalar(input_ids).logits).abs().max().item() <= 1e-4


def test_demo_runs_on_the_embedded_model(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    sizes = ["--num-samples", "8", "--seq-len", "128", "--eval-windows", "2"]
    result = subprocess.run(
        [sys.executable, str(demo), *sizes, "--output", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-> OK" in result.stdout and "LinearPatch and auto improve plain pruning" in result.stdout
