"""The README's examples, run as written (issue #10): every `bash` and `python` block, in document order, in one
working folder, on the embedded model, with `LINEARPATCH_QUICK=1` (documented there) for small sizes and the loopback
Hub server for push and pull. Blocks preceded by a `<!-- not run by tests/test_readme.py: ... -->` line say why not
(they need the Hub or a GPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import start_hub_server

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n+```(?P<language>bash|python)\n(?P<code>.*?)```", re.S)

pytestmark = pytest.mark.slow


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every block the README does not mark as not run, in order."""
    blocks = []
    for match in _BLOCK.finditer((ROOT / "README.md").read_text()):
        if "not run by tests/test_readme.py" in match["before"]:
            continue
        blocks.append((match["language"], match["code"]))
    return blocks


def test_readme_marks_only_hub_or_gpu_examples_as_not_run():
    text = (ROOT / "README.md").read_text()
    for reason in re.findall(r"<!-- not run by tests/test_readme.py: (.*?) -->", text):
        assert any(word in reason for word in ("Hub", "GPU", "test suite")), reason  # each says where it is covered
    languages = [language for language, _ in readme_blocks()]
    assert languages.count("bash") >= 4 and languages.count("python") >= 2


def test_readme_names_the_current_offline_task_folder():
    # `lm-eval run --include_path` in the README points at the folder `linearpatch eval` builds; a stale version there
    # works only on machines that still hold the old folder.
    from linearpatch.integration.evaluation.tasks import TASKS_VERSION

    named = re.findall(r"lm_eval_tasks-v(\d+)-", (ROOT / "README.md").read_text())
    assert named and set(named) == {str(TASKS_VERSION)}, named


def test_readme_examples_run_as_written(tmp_path):
    server, state, endpoint = start_hub_server()
    env = {
        **os.environ,
        "LINEARPATCH_QUICK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "test-token",
        "HF_HUB_DISABLE_XET": "1",
        "PYTHONUNBUFFERED": "1",
    }
    work = tmp_path / "work"
    work.mkdir()
    blocks = readme_blocks()
    last_python = max(index for index, (language, _) in enumerate(blocks) if language == "python")
    python_code = "\n".join(code for language, code in blocks if language == "python")
    try:
        for index, (language, code) in enumerate(blocks):
            if language == "bash":
                command = ["bash", "-e", "-o", "pipefail", "-c", code]
            elif index == last_python:  # the Python blocks are one session, like a notebook
                command = [sys.executable, "-c", python_code]
            else:
                continue
            result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
            assert result.returncode == 0, f"{code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    finally:
        server.shutdown()
    folders = ("pruned", "pruned-lstsq", "pruned-stock", "distilled", "adapter", "eval", "smollm2-linearpatch")
    folders += ("pruned-auto", "pruned-loss", "pruned-target")
    for folder in (*folders, "patch-adapter"):
        assert (work / folder).is_dir(), folder
    assert (work / "pruned" / "cosine_heatmap.png").exists()
    assert (work / "pruned-target" / "depth_curve.png").exists()
    assert {"my-org/smollm2-pruned-linearpatch", "my-org/smollm2-patch-adapter"} <= set(state.repos)


def test_demo_runs_on_the_embedded_model(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--num-samples", "8", "--seq-len", "128"]
        + ["--eval-windows", "2", "--output", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-> OK" in result.stdout and "LinearPatch improves plain pruning" in result.stdout
