"""The README's examples, run as written (issue #10): every `bash` and `python` block, in document order, in one
working folder, with `LINEARPATCH_QUICK=1` (documented there) for small sizes and the loopback Hub server for push and
pull. Blocks preceded by a `<!-- not run by tests/test_readme.py: ... -->` line say why not (they need the Hub or a
GPU).

The blocks name the embedded model, `smollm2-135m`; what they show (commands, flags, files, the API) does not depend
on its weights, so they run on a tiny random stand-in of the same shape of interface (a 30-layer Llama with SmolLM2's
tokenizer) laid where the embedded model's cache is (issue #20). The figures the README quotes are SmolLM2's, measured
and checked by the bench (`python -m bench --check`); the demo, the main job, runs on the real model.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_llama
from hub_server import start_hub_server

from linearpatch.integration.llama_cpp import llama_cpp_home

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n+```(?P<language>bash|python)\n(?P<code>.*?)```", re.S)
# README sections whose blocks need nothing that the other sections make: each runs in a working folder of its own (a
# test of its own, which pytest-xdist may run beside the others). Every other section runs in document order in one.
INDEPENDENT_SECTIONS = ("Choose by outcome", "Models larger than the machine")
# What each chain leaves behind in its working folder.
EXPECTED = {
    "use": (
        "pruned/cosine_heatmap.png",
        "pruned-lstsq",
        "smollm2-linearpatch",
        "distilled",
        "adapter",
        "patch-adapter",
        "eval",
        "pruned-stock",
        "distilled-stock",
    ),
    "Choose by outcome": ("pruned-auto", "pruned-loss", "pruned-target/depth_curve.png"),
    "Models larger than the machine": ("pruned-seq", "pruned-limited"),
}


def documents() -> list[Path]:
    """The README, then every page of the documentation in the site's order (mkdocs.yml's nav): the guides continue
    one another (a later one uses what an earlier one made), as a reader following them would."""
    pages = re.findall(r"^\s+- (?:[^:\n]+: )?([\w/.-]+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    return [ROOT / "README.md", *(ROOT / "docs" / page for page in pages)]


def document_blocks(marked: bool = False) -> list[tuple[str, str, str, str]]:
    """(section, language, code, why not run) of every block of every document, in order: those not marked as not
    run (`marked=True`: those marked, with the reason)."""
    blocks = []
    for document in documents():
        text = document.read_text()
        for match in _BLOCK.finditer(text):
            reason = re.search(r"<!-- not run by tests/test_readme.py: (.*?) -->", match["before"])
            if bool(reason) != marked:
                continue
            headings = re.findall(r"^## (.+)$", text[: match.start("code")], re.M)
            section = headings[-1] if headings else ""
            blocks.append((section, match["language"], match["code"], reason[1] if reason else ""))
    return blocks


def readme_blocks() -> list[tuple[str, str, str]]:
    """(section, language, code) of every block the README and the guides do not mark as not run, in order."""
    return [(section, language, code) for section, language, code, _ in document_blocks()]


def chain_of(section: str) -> str:
    return section if section in INDEPENDENT_SECTIONS else "use"


def test_readme_marks_only_hub_or_gpu_examples_as_not_run():
    for _, _, _, reason in document_blocks(marked=True):
        assert any(word in reason for word in ("Hub", "GPU", "test suite")), reason  # each says where it is covered
    languages = [language for _, language, _ in readme_blocks()]
    assert languages.count("bash") >= 4 and languages.count("python") >= 2
    assert {chain_of(section) for section, _, _ in readme_blocks()} == set(EXPECTED)  # no independent section is gone


def test_the_readme_is_a_front_page_whose_commands_run_in_the_guides():
    """Issue #46: at most 250 lines, the two commands first; each command line of a README block that a guide runs
    (marked "the guide ... runs" or "runs in docs/...") is in a block of the guides that runs, word for word."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first = _BLOCK.search(text)
    assert [line.split()[:2] for line in first["code"].splitlines()] == [["make", "demo"], ["make", "test"]]
    run = "\n".join(code for _, _, code in readme_blocks())
    serving = (ROOT / "docs" / "guides" / "serving.md").read_text()  # tests/test_serving.py runs its serve lines
    for _, language, code, reason in document_blocks(marked=True):
        if "guide" not in reason or language not in ("bash", "python"):
            continue
        lines = shell_commands(code) if language == "bash" else [line for line in code.splitlines() if line.strip()]
        for line in lines:
            assert line in run or (line.startswith("linearpatch serve") and line in serving), line


def test_readme_names_the_current_offline_task_folder():
    # `lm-eval run --include_path` in the README points at the folder `linearpatch eval` builds; a stale version there
    # works only on machines that still hold the old folder.
    from linearpatch.integration.evaluation.tasks import TASKS_VERSION

    named = re.findall(r"lm_eval_tasks-v(\d+)-", "".join(document.read_text() for document in documents()))
    assert named and set(named) == {str(TASKS_VERSION)}, named


def embedded_stand_in(home: Path, tokenizer) -> Path:
    """A tiny random Llama in `home`'s linearpatch cache under the embedded model's name, so that `smollm2-135m`
    resolves to it (as a converted embedded model: its Hub id recorded in EMBEDDED_SOURCE)."""
    from linearpatch.integration.models import EMBEDDED_MODELS

    cache = home / ".cache" / "linearpatch"
    folder = cache / "models" / "smollm2-135m"
    tiny_llama(num_layers=30, vocab_size=len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = EMBEDDED_MODELS["smollm2-135m"]
    (folder / "EMBEDDED_SOURCE").write_text(f"{spec.package} {spec.gguf_file} {spec.hub_id}\n")
    return cache


def run_or_dump(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run`, except that a command still running after `timeout` seconds has every Python process it
    started print each thread's stack (faulthandler, on SIGABRT) before the test fails: a hang names where it waits."""
    env = {**kwargs.pop("env"), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        out, err = process.communicate()
        return subprocess.CompletedProcess(command, -signal.SIGABRT, out, f"timed out after {timeout} s\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# `linearpatch` commands that run in this process, through `main` with the words as typed (like the `linearpatch_cli`
# fixture): a new interpreter per command costs seconds of imports. `push` and `pull` start one, as a user's shell
# would: huggingface_hub fixes the Hub's address and caches when it is imported. So do lm-eval's CLI and the Python
# blocks (a fresh session, where the package-free reload is the point).
IN_PROCESS = {"prune", "distill", "eval", "report", "export"}


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continued lines joined, blank and comment-only lines dropped."""
    lines = code.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def runs_in_process(command: str) -> list[str] | None:
    """The arguments of `linearpatch COMMAND ...` when it can run through `main`; None for anything a shell must
    expand or another program runs."""
    if any(mark in command for mark in "~$|&;<>`"):
        return None
    words = shlex.split(command, comments=True)
    return words[1:] if words[:1] == ["linearpatch"] and words[1:2] and words[1] in IN_PROCESS else None


def test_readme_commands_are_split_as_a_shell_would():
    block = "linearpatch eval a/ b/ --output e/   # JSON\n\n# note\nlm-eval run --tasks t \\\n    --limit 10\n"
    assert shell_commands(block) == [
        "linearpatch eval a/ b/ --output e/   # JSON",
        "lm-eval run --tasks t      --limit 10",
    ]
    assert runs_in_process(shell_commands(block)[0]) == ["eval", "a/", "b/", "--output", "e/"]
    assert runs_in_process("lm-eval run --include_path ~/x") is None
    assert runs_in_process("linearpatch push distilled/ my-org/x") is None


@pytest.mark.parametrize("chain", list(EXPECTED))
def test_readme_examples_run_as_written(chain, tmp_path, smollm2_tokenizer, linearpatch_cli, monkeypatch):
    server, state, endpoint = start_hub_server()
    # `~` in the README's commands is this home: the stand-in's cache, and the offline task folder `eval` builds there.
    home = tmp_path / "home"
    cache = embedded_stand_in(home, smollm2_tokenizer)
    ours = {"HOME": str(home), "LINEARPATCH_CACHE": str(cache), "LINEARPATCH_QUICK": "1"}
    # llama.cpp is built once per machine, outside the checkout (`make gguf`): the one this machine has.
    ours["LLAMA_CPP_HOME"] = str(llama_cpp_home())
    env = {
        **os.environ,
        **ours,
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
    blocks = [(language, code) for section, language, code in readme_blocks() if chain_of(section) == chain]
    python = [index for index, (language, _) in enumerate(blocks) if language == "python"]
    python_code = "\n".join(blocks[index][1] for index in python)

    printed = {}  # command -> what it printed

    def run(command: list[str], shown: str) -> None:
        result = run_or_dump(command, cwd=work, env=env, timeout=600)
        assert result.returncode == 0, f"{shown}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        printed[shown] = result.stdout

    try:
        for index, (language, code) in enumerate(blocks):
            if language == "python" and index == python[-1]:  # the Python blocks are one session, like a notebook
                run([sys.executable, "-c", python_code], python_code)
            elif language == "bash":
                for command in shell_commands(code):
                    arguments = runs_in_process(command)
                    if arguments is None:
                        run(["bash", "-e", "-o", "pipefail", "-c", command], command)
                        continue
                    with monkeypatch.context() as patched:
                        patched.chdir(work)
                        for name, value in ours.items():
                            patched.setenv(name, value)
                        result = linearpatch_cli(*arguments)
                    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    finally:
        server.shutdown()
    for path in EXPECTED[chain]:
        assert (work / path).exists(), path
    if chain == "use":
        assert {"my-org/smollm2-pruned-linearpatch", "my-org/smollm2-patch-adapter"} <= set(state.repos)
        # lm-eval's own CLI loaded pruned/ with trust_remote_code and scored the offline task: its results table.
        (table,) = [out for command, out in printed.items() if command.startswith("lm-eval run")]
        assert re.search(r"wiki_next_sentence.*\|\s*acc\s*\|", table), table[-2000:]
