"""Bad input gets one line that names the problem and the fix, found before the expensive work (the refusals that need
no more than a command line: tests/test_refusals.py; no lost work or folder: tests/test_nothing_lost.py).

Each test is named after the finding it covers (issue #10: "Tried as a new user would").
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import QUICK, assert_one_line_error, run_cli, tiny_llama
from transformers import AutoModelForCausalLM

from linearpatch.cli import main


# 4. Checks that failed only after the expensive work: no weights may be loaded before the input is validated.
@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_every_prune_input_is_checked_before_the_first_forward(tiny_checkpoint, gpt2_folder, tmp_path, capsys):
    from unittest import mock

    out = str(tmp_path / "out")
    cases = [
        (["--num-layers", "2", "--eval-windows", "2", "--eval-corpus", "wikipedia-evl"], "wikipedia-evl"),
        (["--layers", "2-9"], "out of range"),
        (["--num-layers", "6"], "Cannot prune 6 of 6"),
        (["--num-layers", "2", "--calibration", str(tmp_path / "empty.txt")], "empty"),
        (["--num-layers", "2", "--device", "cuda"], "no CUDA device"),
    ]
    (tmp_path / "empty.txt").write_text("\n\n")
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=AssertionError("loaded weights")):
        for options, message in cases:
            if options[-1] == "cuda" and torch.cuda.is_available():
                continue
            code = main(["prune", str(tiny_checkpoint), *options, *QUICK, "--output", out])
            assert_one_line_error(code, capsys.readouterr().err, message)
        code = main(["prune", str(gpt2_folder), "--num-layers", "1", "--output", out])
        assert_one_line_error(code, capsys.readouterr().err, "'gpt2' model", "families: llama")
    assert not Path(out).exists()


def test_unsupported_hidden_size_fails_before_calibration(tmp_path, smollm2_tokenizer, capsys):
    """100 = 25 * 4 has no Hadamard matrix: `--patch hadamard` is refused before calibration, naming the width and
    the kinds that work; the default (auto) leaves the Hadamard patch out and prunes."""
    dense = tiny_llama(
        hidden_size=100, num_attention_heads=2, num_key_value_heads=1, vocab_size=len(smollm2_tokenizer)
    )
    dense.save_pretrained(tmp_path / "dense")
    smollm2_tokenizer.save_pretrained(tmp_path / "dense")
    command = ["prune", str(tmp_path / "dense"), "--layers", "2", *QUICK]
    code = main([*command, "--patch", "hadamard", "--output", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "order 100", "patch='diag'")
    assert not (tmp_path / "out").exists()
    assert main([*command, "--output", str(tmp_path / "out")]) == 0
    (choice,) = json.loads((tmp_path / "out" / "linearpatch_report.json").read_text())["patch_choices"]
    assert "hadamard" not in choice["scores"]


@pytest.fixture(scope="module")
def other_vocabulary_teacher(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("teacher-300")
    tiny_llama(vocab_size=300).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_teacher_with_another_vocabulary_fails_before_the_cache(
    tiny_pruned, other_vocabulary_teacher, tmp_path, capsys, monkeypatch
):
    import linearpatch.integration.distillation.job as pipeline

    monkeypatch.setattr(pipeline, "build_cache_in_subprocess", lambda *a, **k: pytest.fail("cache was built"))
    code = main(
        [
            "distill",
            str(tiny_pruned),
            "--teacher",
            str(other_vocabulary_teacher),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert_one_line_error(code, capsys.readouterr().err, "vocabulary of 300 tokens", "49152", "pruned from")


# 6. Tracebacks instead of messages.
def test_missing_model_and_truncated_weights_are_messages(tiny_checkpoint, tmp_path, capsys):
    code = main(["prune", str(tmp_path / "no-such-model"), "--num-layers", "1", "--output", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "not found", "Check the path")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code = main(["prune", str(broken), "--layers", "2", *QUICK, "--output", str(tmp_path / "o")])
    assert_one_line_error(code, capsys.readouterr().err, "truncated or corrupt")
    assert not (tmp_path / "o").exists()


def test_push_and_pull_without_the_hub_are_messages(tiny_pruned, tmp_path):
    offline = dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_cli("push", str(tiny_pruned), "org/name", env=offline)
    assert_one_line_error(result.returncode, result.stderr, "offline mode is on")
    result = run_cli("pull", "org/name", env=offline)
    assert_one_line_error(result.returncode, result.stderr, "not in the local HF cache")
    unreachable = dict(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    unreachable |= dict(HF_TOKEN="x", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    result = run_cli("push", str(tiny_pruned), "org/name", env=unreachable)
    assert_one_line_error(result.returncode, result.stderr, "unreachable", "HF_ENDPOINT")


# 7. Silent wrong results.
def test_zero_windows_is_refused_not_replaced_by_the_default(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(tiny_checkpoint), "--num-layers", "2", "--num-samples", "0", "--output", str(tmp_path)])
    assert exit_.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
    from linearpatch.integration.pruning import prune

    with pytest.raises(ValueError, match="num_windows >= 1"):
        prune(tiny_llama(), tokenizer=None, num_layers=2, num_samples=0)


def test_adapter_refuses_a_base_it_was_not_trained_on(tiny_checkpoint, tiny_pruned, tmp_path, capsys):
    from linearpatch.common.errors import CheckpointMismatchError
    from linearpatch.integration.distillation import load_patch_adapter

    adapter = tmp_path / "adapter"
    arguments = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--output", str(adapter)]
    assert main([*arguments, "--adapter-only", "--top-k", "8", *QUICK, "--cache-dir", str(tmp_path / "c")]) == 0
    record = json.loads((adapter / "linearpatch_adapter.json").read_text())
    assert record["pruned_layers"] == [2, 3] and record["base_model_path"] == str(tiny_pruned.resolve())
    merged, _ = load_patch_adapter(adapter)  # the right base: loads and merges
    assert not torch.equal(
        merged.model.layers[2].linear_patch.weight,
        AutoModelForCausalLM.from_pretrained(tiny_pruned).model.layers[2].linear_patch.weight,
    )
    # Another cut: other patch modules.
    other_cut = tmp_path / "other-cut"
    assert main(["prune", str(tiny_checkpoint), "--layers", "1", *QUICK, "--output", str(other_cut)]) == 0
    with pytest.raises(CheckpointMismatchError, match="pruned layers"):
        load_patch_adapter(adapter, base=str(other_cut))
    # Same cut, other calibration: same shapes, other patch weights.
    same_cut = tmp_path / "same-cut"
    assert (
        main(["prune", str(tiny_checkpoint), "--layers", "2-3", *QUICK, "--seed", "5", "--output", str(same_cut)]) == 0
    )
    with pytest.raises(CheckpointMismatchError, match="hash"):
        load_patch_adapter(adapter, base=str(same_cut))
    # An adapter without the record (written by stock PEFT) is still checked by its modules.
    (adapter / "linearpatch_adapter.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="differently pruned"):
        load_patch_adapter(adapter, base=str(other_cut))
    capsys.readouterr()


def test_every_option_has_help_and_shows_its_default():
    from linearpatch.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in commands.items():
        text = command.format_help()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if not any(action.default is x for x in (None, False)):
                assert f"(default: {action.default}" in " ".join(text.split()).replace("- ", "-") or (
                    "default" in action.help
                ), f"{name} {action.option_strings[0]} hides its default"


# Issue #13: choosing by outcome. Each bad request ends with one line, before any model is run or written.
def test_outcome_choices_refuse_what_they_cannot_do(tiny_checkpoint, tmp_path, capsys):
    output = str(tmp_path / "out")
    prune = ["prune", str(tiny_checkpoint), "--output", output]
    for arguments, fragments in (
        (["--target-ppl-ratio", "0.9", *QUICK], ("not above 1",)),
        (["--num-layers", "2", "--metric", "loss", "--num-samples", "1", "--seq-len", "32"], ("--holdout",)),
        (["--num-layers", "2", "--metric", "loss", "--holdout", "4", *QUICK], ("Cannot hold out 4 of 4",)),
        (["--target-ppl-ratio", "1.5", "--metric", "block-influence", *QUICK], ("one block per depth",)),
    ):
        assert_one_line_error(main([*prune, *arguments]), capsys.readouterr().err, *fragments)
        assert not (tmp_path / "out").exists()
    # A target depth and a layer count are one choice too many (argparse says so).
    with pytest.raises(SystemExit) as exit_:
        main([*prune, "--layers", "2", "--target-ppl-ratio", "1.5"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
