"""Bad input gets one line that names the problem and the fix; no run loses finished work or an existing folder.

Each test is named after the finding it covers (issue #10: "Tried as a new user would").
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

from linearpatch.cli import main
from linearpatch.common.errors import OutputExistsError
from linearpatch.common.files import atomic_directory, clean_stale_staging, staging_path

QUICK = ["--num-samples", "4", "--seq-len", "32"]


def run_cli(*arguments: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "linearpatch.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("linearpatch ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.suffix == ".work")


# 1. `--output distilled/` (trailing slash) lost the finished training; `*.work` folders were left behind.
@pytest.mark.parametrize("save_steps", [0, 2])
def test_distill_output_with_trailing_slash_keeps_the_result(
    tiny_checkpoint, tiny_pruned, tmp_path, capsys, save_steps
):
    output = f"{tmp_path / 'distilled'}/"
    arguments = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--output", output]
    arguments += ["--top-k", "8", *QUICK, "--cache-dir", str(tmp_path / "cache"), "--save-steps", str(save_steps)]
    assert main(arguments) == 0, capsys.readouterr().err
    assert (tmp_path / "distilled" / "model.safetensors").exists()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "distilled"]
    assert "'loss'" in capsys.readouterr().out  # the Trainer logs its loss while it trains (finding 10)


# 2. `prune FOLDER --output FOLDER --overwrite` replaced the dense model with the pruned one.
def test_output_equal_to_or_inside_an_input_is_refused(tiny_checkpoint, tiny_pruned, tmp_path, capsys):
    before = folder_digest(tiny_checkpoint)
    for output in (tiny_checkpoint, tiny_checkpoint / "pruned", tiny_checkpoint.parent):
        code = main(["prune", str(tiny_checkpoint), "--layers", "2", *QUICK, "--output", str(output), "--overwrite"])
        assert_one_line_error(code, capsys.readouterr().err, "would overwrite the input", "outside")
    assert folder_digest(tiny_checkpoint) == before
    distill = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--cache-dir", str(tmp_path)]
    for output, role in (
        (tiny_pruned, "checkpoint"),
        (tiny_checkpoint, "teacher"),
        (tmp_path / "inside-cache", "teacher cache"),
    ):
        code = main([*distill, "--output", str(output), "--overwrite"])
        assert_one_line_error(code, capsys.readouterr().err, f"the {role}")


# 3. Two runs with the same --output both printed "Saved"; one silently replaced the other.
def test_concurrent_runs_with_one_output_never_replace_each_other(tiny_checkpoint, tmp_path):
    output = tmp_path / "shared"
    arguments = ["prune", str(tiny_checkpoint), "--num-layers", "2", *QUICK, "--output", str(output)]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "linearpatch.cli", *arguments, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(run.wait(timeout=600), run.stdout.read(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = next(out for code, out, _ in results if code == 0)
    loser = next(err for code, _, err in results if code == 2)
    assert "Saved to" in winner and "Saved to" not in next(out for code, out, _ in results if code == 2)
    assert "already exists" in loser or "created by another run" in loser
    report = json.loads((output / "linearpatch_report.json").read_text())
    assert report["calibration"]["seed"] in (0, 1) and leftovers(tmp_path) == []


def test_rename_into_place_refuses_a_target_created_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="created by another run"):
        with atomic_directory(target) as staging:
            (staging / "mine.txt").write_text("mine")
            target.mkdir()  # another run finishes first, between our check and our rename
            (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and leftovers(tmp_path) == []
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []


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
    # 100 = 25 * 4 has no Hadamard matrix.
    dense = tiny_llama(
        hidden_size=100, num_attention_heads=2, num_key_value_heads=1, vocab_size=len(smollm2_tokenizer)
    )
    dense.save_pretrained(tmp_path / "dense")
    smollm2_tokenizer.save_pretrained(tmp_path / "dense")
    code = main(["prune", str(tmp_path / "dense"), "--layers", "2", *QUICK, "--output", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "order 100", "patch='diag'")
    assert not (tmp_path / "out").exists()


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


# 5. Killing distill left its teacher child running (orphaned) and /tmp/linearpatch-teacher-* behind.
def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(child) for child in children]
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _ctrl_c_reaches_the_child() -> None:
    # A shell starts background jobs with SIGINT ignored (`make test &`), and a child inherits that: Python then
    # installs no KeyboardInterrupt handler, so the SIGINT these tests send would be lost and the run go on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_long_distill(tiny_checkpoint, tiny_pruned, tmp_path) -> tuple[subprocess.Popen, int]:
    """A distill whose teacher cache takes long enough to be interrupted, returned once the teacher child has written
    its first shard; returns the process and the child's pid."""
    process = subprocess.Popen(
        [sys.executable, "-m", "linearpatch.cli", "distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint)]
        + ["--output", str(tmp_path / "out"), "--num-samples", "20000", "--seq-len", "32", "--top-k", "8"]
        + ["--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_reaches_the_child,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        children = _children(process.pid)
        if children and list(tmp_path.glob("cache/*/manifest.json")):
            return process, children[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError("the teacher child never started")


def test_killed_distill_takes_its_teacher_child_with_it(tiny_checkpoint, tiny_pruned, tmp_path):
    temporary_before = set(Path("/tmp").glob("linearpatch-teacher-*"))
    process, child = _start_long_distill(tiny_checkpoint, tiny_pruned, tmp_path)
    process.kill()  # SIGKILL: no handler runs in the parent
    process.wait()
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the teacher child outlived its parent"
    stale = list((tmp_path / "cache").glob(".teacher-input.tmp-*"))
    assert stale  # a killed run cannot clean up after itself: the next run into the same cache does
    assert set(Path("/tmp").glob("linearpatch-teacher-*")) == temporary_before  # nothing staged outside the cache
    removed = clean_stale_staging(tmp_path / "cache")
    assert set(removed) >= set(stale) and not list((tmp_path / "cache").glob(".teacher-input.tmp-*"))


def test_interrupted_distill_says_what_was_written_and_exits_130(tiny_checkpoint, tiny_pruned, tmp_path):
    process, child = _start_long_distill(tiny_checkpoint, tiny_pruned, tmp_path)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # no-op once it has exited
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "nothing was written" in stderr and "resumes on the next run" in stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob(".teacher-input.tmp-*"))


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


def test_ctrl_c_during_prune_exits_130_and_leaves_nothing(tiny_checkpoint, tmp_path):
    output, log = tmp_path / "out", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "linearpatch.cli", "prune", str(tiny_checkpoint), "--num-layers", "2"]
            + ["--num-samples", "40000", "--seq-len", "16", "--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_ctrl_c_reaches_the_child,
        )
        try:
            deadline = time.monotonic() + 300
            while "calibration" not in log.read_text() and time.monotonic() < deadline:  # its progress bar is up
                assert process.poll() is None, log.read_text()
                time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            process.kill()  # no-op once it has exited; a failed wait must not leave a 40000-window prune running
    text = log.read_text()
    assert process.returncode == 130, text
    assert "interrupted; nothing was written" in text and "Traceback" not in text
    assert not output.exists() and leftovers(tmp_path) == []


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


# 10. Output folders honour the umask (they were 0700).
def test_output_folders_honour_the_umask(tiny_checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["prune", str(tiny_checkpoint), "--layers", "2", *QUICK, "--output", str(tmp_path / "o")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_stale_staging_of_dead_processes_is_cleaned_and_live_ones_are_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    mine = staging_path(tmp_path / "other")
    mine.mkdir()
    assert clean_stale_staging(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


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
        (["--num-layers", "2", "--patch", "auto", "--sequential", *QUICK], ("held-out windows", "--no-sequential")),
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
