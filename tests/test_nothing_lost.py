"""No work or data is lost: an existing output is never replaced without --overwrite, an output over an input is
refused, two runs into one output never replace each other, an interrupted or killed run says what was and was not
written (and leaves no staging folder or orphaned child), a full disk keeps finished training, and outputs honour the
umask. (Bad input refused in one line: tests/test_refusals.py and the files it points to.)"""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK, assert_one_line_error, folder_digest, leftovers

import linearpatch.integration.distillation.job as distill_pipeline
from linearpatch.cli import main
from linearpatch.common.errors import OutputExistsError
from linearpatch.common.files import atomic_directory, clean_stale_staging, staging_path

DISTILL = ["--top-k", "8", *QUICK]


@contextlib.contextmanager
def full_disk(limit: int = 2_000_000):
    """No file this process (or a child it starts) writes may grow past `limit` bytes: writes fail as on a full disk
    (EFBIG; Python ignores SIGXFSZ). Only the soft limit is lowered, so it is raised back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _limited_run(cli, arguments: list[str]):
    """`linearpatch ARGS...` in this process (the `linearpatch_cli` fixture) on a full disk."""
    with full_disk():
        return cli(*arguments)


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


# 2. An output equal to, inside or containing any input file is refused.
def test_an_output_over_an_input_file_is_refused(tiny_checkpoint, tiny_pruned, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    text = "A sentence of calibration text, long enough to cut windows from. " * 200
    calibration = folder / "cal.txt"
    calibration.write_text(text)
    for output in (calibration, folder):
        prune = ["prune", str(tiny_checkpoint), "--layers", "2", "--calibration", str(calibration), *QUICK]
        code = main([*prune, "--output", str(output), "--overwrite"])
        assert_one_line_error(code, capsys.readouterr().err, "would overwrite the input", "calibration text")
    code = main(
        ["export", str(tiny_pruned), "--calibration", str(calibration), "--output", str(calibration), "--overwrite"]
    )
    assert_one_line_error(code, capsys.readouterr().err, "would overwrite the input")
    distill = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), "--data", str(calibration)]
    code = main([*distill, "--output", str(folder), "--overwrite"])
    assert_one_line_error(code, capsys.readouterr().err, "training text")
    assert calibration.read_text() == text and sorted(p.name for p in folder.iterdir()) == ["cal.txt"]


def test_a_full_disk_is_one_line_and_distill_keeps_its_training(
    tiny_checkpoint, tiny_pruned, tmp_path, linearpatch_cli
):
    from linearpatch.integration.data import load_texts

    load_texts("wikipedia-calibration")  # its cache is written here, not under the limit below
    runs = {
        "prune": ["prune", str(tiny_checkpoint), "--layers", "2", *QUICK],
        "export": ["export", str(tiny_pruned), *QUICK, "--eval-windows", "1"],
    }
    for name, arguments in runs.items():
        result = _limited_run(linearpatch_cli, [*arguments, "--output", str(tmp_path / name)])
        assert_one_line_error(result.returncode, result.stderr, "Could not write", "File too large")
        assert not (tmp_path / name).exists()
    output = tmp_path / "distilled"
    distill = ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), *DISTILL]
    distill += ["--cache-dir", str(tmp_path / "cache"), "--output", str(output)]
    result = _limited_run(linearpatch_cli, distill)
    assert_one_line_error(result.returncode, result.stderr, "Could not write", "--resume")
    assert (tmp_path / "distilled.work" / "finished-adapter").is_dir() and not output.exists()
    resumed = linearpatch_cli(*distill, "--resume")  # the disk has room again
    assert resumed.returncode == 0, resumed.stderr
    assert "without training" in resumed.stderr and "'loss'" not in resumed.stdout  # no step ran
    assert (output / "model.safetensors").exists() and not (tmp_path / "distilled.work").exists()
    # The same for `distill --export`: its trained fold maps are kept and folded on resume.
    exported = tmp_path / "distilled-export"
    distill_export = [*distill[:-1], str(exported), "--export", "--eval-windows", "0"]
    result = _limited_run(linearpatch_cli, distill_export)
    assert_one_line_error(result.returncode, result.stderr, "Could not write", "--resume")
    assert (tmp_path / "distilled-export.work" / "finished-adapter").is_dir() and not exported.exists()
    resumed = linearpatch_cli(*distill_export, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "without training" in resumed.stderr and "'loss'" not in resumed.stdout
    assert "auto_map" not in json.loads((exported / "config.json").read_text())


def test_an_interrupted_training_says_its_checkpoints_are_kept(
    tiny_checkpoint, tiny_pruned, tmp_path, capsys, monkeypatch
):
    from transformers import TrainerCallback

    class InterruptAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                raise KeyboardInterrupt

    trained = distill_pipeline.distill
    monkeypatch.setattr(
        distill_pipeline, "distill", lambda *a, **k: trained(*a, callbacks=[InterruptAfterTwoSteps()], **k)
    )
    output = tmp_path / "out"
    code = main(
        ["distill", str(tiny_pruned), "--teacher", str(tiny_checkpoint), *DISTILL, "--save-steps", "1"]
        + ["--cache-dir", str(tmp_path / "cache"), "--output", str(output)]
    )
    err = capsys.readouterr().err
    assert code == 130 and f"{output}.work: the Trainer checkpoints are kept" in err and "--resume" in err
    assert (tmp_path / "out.work" / "checkpoint-1").is_dir() and not output.exists()
