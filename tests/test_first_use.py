"""What a new user hit in the new commands (issue #24), one test per finding: no command exits 0 with a non-finite or
untrained result, bad input ends in one line before any expensive work, and the README's adapter and serve steps work
as written (nothing overwritten or lost: tests/test_nothing_lost.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import QUICK, assert_one_line_error, tiny_family, tiny_llama

import linearpatch.integration.distillation.job as distill_pipeline
import linearpatch.integration.pruning.plan as prune_pipeline
from linearpatch.cli import main

DISTILL = ["--top-k", "8", *QUICK]


@pytest.fixture(scope="module")
def qwen3_and_mistral(tmp_path_factory, smollm2_tokenizer):
    """A pruned tiny Qwen3 and a tiny Mistral with the same vocabulary and tokenizer (another family)."""
    root = tmp_path_factory.mktemp("families")
    vocabulary = len(smollm2_tokenizer)
    for family in ("qwen3", "mistral"):
        tiny_family(family, vocab_size=vocabulary, seed=1).save_pretrained(root / family)
        smollm2_tokenizer.save_pretrained(root / family)
    pruned = root / "qwen3-pruned"
    assert main(["prune", str(root / "qwen3"), "--layers", "2-3", *QUICK, "--output", str(pruned)]) == 0
    return pruned, root / "mistral"


def no_teacher_cache(monkeypatch):
    monkeypatch.setattr(
        distill_pipeline, "build_cache_in_subprocess", lambda *a, **k: pytest.fail("the teacher cache was built")
    )


def no_calibration(monkeypatch):
    monkeypatch.setattr(prune_pipeline, "calibrate", lambda *a, **k: pytest.fail("calibration ran"))


# 1. Silent wrong results, exit 0 (the recipes that cannot train: tests/test_refusals.py).
def test_distill_writes_nothing_for_a_diverged_or_untrained_patch(
    tiny_checkpoint, tiny_pruned, tmp_path, capsys, monkeypatch
):
    from linearpatch.integration.distillation.trainer import get_patch_peft_model

    trained = distill_pipeline.distill

    def diverged(student, cache, *args, **kwargs):
        model, history = trained(student, cache, *args, **kwargs)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "ln_tuning_layers" in name:
                    parameter.fill_(float("nan"))
        return model, history

    arguments = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), *DISTILL]
    arguments += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "o")]
    monkeypatch.setattr(distill_pipeline, "distill", diverged)
    assert_one_line_error(main(arguments), capsys.readouterr().err, "Training diverged", "Lower --lr")
    monkeypatch.setattr(distill_pipeline, "distill", lambda student, *a, **k: (get_patch_peft_model(student), []))
    assert_one_line_error(main(arguments), capsys.readouterr().err, "No training step changed the patches")
    assert not (tmp_path / "o").exists()


def test_a_teacher_or_dense_model_of_another_family_is_refused(qwen3_and_mistral, tmp_path, capsys, monkeypatch):
    pruned, mistral = qwen3_and_mistral
    no_teacher_cache(monkeypatch)
    code = main(["distill", str(pruned), "--teacher", str(mistral), "--output", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "is not the model this checkpoint was pruned from", "mistral")
    before = sorted(p.name for p in pruned.iterdir())
    code = main(["report", str(pruned), "--dense", str(mistral), "--num-samples", "1", "--seq-len", "16"])
    assert_one_line_error(code, capsys.readouterr().err, "not the model this checkpoint was pruned from")
    assert sorted(p.name for p in pruned.iterdir()) == before  # no figures


def test_non_finite_weights_are_refused_not_copied(tiny_pruned, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in tiny_pruned.iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    weights = bytearray((corrupt / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(weights[:8], "little") + 4096  # inside the data, past the header
    weights[start : start + 4096] = b"\xff" * 4096  # 0xFFFFFFFF is a float32 NaN
    (corrupt / "model.safetensors").write_bytes(bytes(weights))
    code = main(["export", str(corrupt), "--output", str(tmp_path / "e"), *QUICK, "--eval-windows", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "holds NaN or inf values")
    assert not (tmp_path / "e").exists()


# 3. `serve` checks its checkpoint like every other command, and says why vLLM stopped.
def test_serve_checks_the_checkpoint_and_reports_vllm_failing(tiny_pruned, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file in tiny_pruned.iterdir():
        (truncated / file.name).write_bytes(file.read_bytes())
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    code = main(["serve", str(truncated), "--vllm", "/bin/false"])
    assert_one_line_error(code, capsys.readouterr().err, "truncated")
    code = main(["serve", str(tiny_pruned), "--vllm", "/bin/false"])
    captured = capsys.readouterr()
    assert code == 1 and "vLLM exited with status 1" in captured.err and "Running: /bin/false serve" in captured.out


def test_serve_gives_vllms_cpu_build_memory_and_eager_defaults_unless_told_otherwise():
    from linearpatch.integration.serving import CPU_KV_CACHE_GIB, cpu_defaults

    assert cpu_defaults([], {}) == (["--enforce-eager"], {"VLLM_CPU_KVCACHE_SPACE": str(CPU_KV_CACHE_GIB)})
    assert cpu_defaults(["--gpu-memory-utilization", "0.3", "--no-enforce-eager"], {}) == ([], {})
    assert cpu_defaults(["--compilation-config={}"], {"VLLM_CPU_KVCACHE_SPACE": "8"}) == ([], {})


# 4. The README's Python adapter block: what it saves loads, with stock PEFT and with linearpatch.
def test_an_adapter_trained_on_a_saved_checkpoint_loads_everywhere(tiny_checkpoint, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    import linearpatch
    from linearpatch.integration.data import token_windows
    from linearpatch.integration.distillation import (
        build_teacher_cache,
        distill,
        load_patch_adapter,
        save_patch_adapter,
    )

    dense, tokenizer = linearpatch.load_model(str(tiny_checkpoint))
    pruned, report = linearpatch.prune(dense, tokenizer, layers=[2, 3], num_samples=4, seq_len=32, progress=False)
    linearpatch.save_checkpoint(pruned, tokenizer, tmp_path / "checkpoint", report=report)
    windows = token_windows("wikipedia-calibration", tokenizer, num_windows=4, seq_len=16)
    cache = build_teacher_cache(dense, windows.input_ids, tmp_path / "cache", top_k=8, progress=False)
    peft_model = distill(pruned, cache, tmp_path / "runs", learning_rate=1e-2, disable_tqdm=True)
    ids = windows.input_ids[:1]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "stock")  # stock PEFT: records the saved checkpoint as its base
    save_patch_adapter(peft_model, tmp_path / "ours", base=tmp_path / "checkpoint")
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "# LinearPatch adapter" in card and "[More Information Needed]" not in card
    assert json.loads((tmp_path / "ours" / "linearpatch_adapter.json").read_text())["pruned_layers"] == [2, 3]
    for adapter in ("stock", "ours"):
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / adapter, trust_remote_code=True)
        merged, _ = load_patch_adapter(tmp_path / adapter)
        with torch.no_grad():
            assert (auto(input_ids=ids).logits - want).abs().max().item() <= 1e-5, adapter
            assert (merged(ids).logits - want).abs().max().item() <= 1e-5, adapter


# 5. Tracebacks where one line is promised.
def test_forked_workers_end_quietly_when_their_pool_is_terminated(monkeypatch, capfd):
    """A library's fork pool (lm-eval's bootstrap pool did this before `eval` kept it in-process) ends with
    `terminate()` (SIGTERM). The workers inherit the CLI's SIGTERM handler: it must end them as SIGTERM would, not
    raise KeyboardInterrupt there (one traceback per worker, after a successful command)."""
    import multiprocessing
    import time

    import linearpatch.integration.evaluation as evaluation
    from linearpatch.common.errors import LinearPatchError

    def evaluate_with_a_pool(*args, **kwargs):
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map_async(time.sleep, [5, 5])
            time.sleep(1)  # both workers busy when the pool is terminated
        raise LinearPatchError("evaluated")

    monkeypatch.setattr(evaluation, "evaluate_checkpoints", evaluate_with_a_pool)
    code = main(["eval", "candidate", "--baseline", "dense"])
    err = capfd.readouterr().err
    assert code == 2 and "evaluated" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_an_eval_baseline_or_report_dense_with_another_vocabulary_is_a_message(tiny_pruned, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tiny_llama(vocab_size=300).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_pruned).save_pretrained(other)
    code = main(["eval", str(tiny_pruned), "--baseline", str(other), "--tasks", "--ppl-windows", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "vocabulary of 49152 tokens", "baseline")
    code = main(["report", str(tiny_pruned), "--dense", str(other)])
    assert_one_line_error(code, capsys.readouterr().err, "vocab_size 300 against 49152")


# 6. Late or missing checks.
def test_an_unwritable_output_is_found_before_calibration(tiny_checkpoint, capsys, monkeypatch):
    no_calibration(monkeypatch)
    code = main(["prune", str(tiny_checkpoint), "--num-layers", "2", *QUICK, "--output", "/sys/linearpatch/out"])
    assert_one_line_error(code, capsys.readouterr().err, "Cannot write /sys/linearpatch/out", "not writable")


def test_windows_longer_than_the_context_are_refused_at_once(
    tiny_checkpoint, tiny_pruned, tmp_path, capsys, monkeypatch
):
    no_calibration(monkeypatch)
    no_teacher_cache(monkeypatch)
    output = str(tmp_path / "o")
    prune = ["prune", str(tiny_checkpoint), "--num-layers", "2", "--num-samples", "2", "--seq-len", "100000"]
    assert_one_line_error(main([*prune, "--output", output]), capsys.readouterr().err, "context of 256 tokens")
    distill = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--seq-len", "300", "--output", output]
    assert_one_line_error(main(distill), capsys.readouterr().err, "--seq-len 300", "context of 256")


def test_export_with_zero_eval_windows_skips_the_comparison(tiny_pruned, tmp_path, capsys):
    assert main(["export", str(tiny_pruned), "--output", str(tmp_path / "e"), *QUICK, "--eval-windows", "0"]) == 0
    assert json.loads((tmp_path / "e" / "linearpatch_export.json").read_text())["perplexity"] == {}
    assert "| model |" not in capsys.readouterr().out


# 7. Small.
def test_top_candidates_say_what_they_score_and_which_way_is_better(tiny_checkpoint, tmp_path, capsys):
    assert main(["prune", str(tiny_checkpoint), "--num-layers", "2", *QUICK, "--output", str(tmp_path / "o")]) == 0
    assert "Top candidates (block start: cosine of the block's input and output, higher is better):" in (
        capsys.readouterr().out
    )


def test_export_names_the_final_norm_for_a_gap_at_the_end(tiny_checkpoint, tmp_path, capsys):
    end = tmp_path / "end"
    assert main(["prune", str(tiny_checkpoint), "--layers", "4-5", *QUICK, "--output", str(end)]) == 0
    assert main(["export", str(end), "--output", str(tmp_path / "e"), *QUICK, "--eval-windows", "0"]) == 0
    out = capsys.readouterr().out
    assert "patch before the final norm" in out and "kept layer 4" not in out


def test_the_adapter_card_is_ours(tiny_checkpoint, tiny_pruned, tmp_path):
    adapter = tmp_path / "adapter"
    arguments = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--adapter-only", *DISTILL]
    assert main([*arguments, "--cache-dir", str(tmp_path / "cache"), "--output", str(adapter)]) == 0
    card = (adapter / "README.md").read_text()
    assert "# LinearPatch adapter" in card and "pruned layers [2, 3]" in card
    assert "[More Information Needed]" not in card


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\nfrom linearpatch.cli import main\n"
        "for command in ([], ['prune'], ['distill'], ['eval'], ['export'], ['serve']):\n"
        "    try:\n        main([*command, '--help'])\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
