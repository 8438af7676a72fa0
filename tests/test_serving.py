"""Serving (issue #11): the patched checkpoint in vLLM's Transformers backend gives transformers' greedy outputs, both
through the offline `vllm.LLM` API and through `linearpatch serve` (vLLM's OpenAI server), and the remote-code files
work under the transformers version vLLM pins. Needs `make serving` (.venv-serving); `make test` builds it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearpatch.cli import main
from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.serving import SERVING_VENV

pytestmark = [pytest.mark.serving, pytest.mark.slow]
PROMPTS = ["The capital of France is", "Layer pruning makes language models", "def fibonacci(n):"]
MAX_TOKENS = 32
SERVING_PYTHON = SERVING_VENV / "bin" / "python"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def serving_python():
    if not SERVING_PYTHON.exists():
        pytest.fail(f"{SERVING_PYTHON} is missing: run `make serving` first (`make test` does).")
    return SERVING_PYTHON


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """SmolLM2 with a gap in the middle (patch before kept layer 20) and one reaching the end (patch before the
    final norm), fp32."""
    root = tmp_path_factory.mktemp("serving")
    paths = {}
    for name, layers in (("middle", "20-24"), ("end", "25-29")):
        paths[name] = root / name
        options = ["--num-samples", "8", "--seq-len", "256", "--output", str(paths[name])]
        assert main(["prune", "smollm2-135m", "--layers", layers, *options]) == 0
    return paths


def transformers_greedy(path: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = []
    for ids in prompt_ids:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(generated[0, len(ids) :].tolist())
    return outputs


def test_vllm_offline_greedy_equals_transformers(serving_python, checkpoints, tmp_path):
    # The gap in the middle here; the gap at the end (patch before the final norm) through the server below.
    output, served_checkpoints = tmp_path / "vllm.json", {"middle": checkpoints["middle"]}
    result = subprocess.run(
        [str(serving_python), str(Path(__file__).with_name("serving_check.py")), str(output), str(MAX_TOKENS)]
        + [str(path) for path in served_checkpoints.values()],
        input=json.dumps(PROMPTS),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, **VLLM_ENV},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    served = json.loads(output.read_text())
    for name, path in served_checkpoints.items():
        runs = served[str(path)]
        want = transformers_greedy(path, [run["prompt_token_ids"] for run in runs])
        got = [run["token_ids"] for run in runs]
        assert [len(ids) for ids in got] == [MAX_TOKENS] * len(PROMPTS), name
        assert got == want, name


def test_remote_code_works_under_the_transformers_vllm_pins(serving_python, checkpoints):
    version = subprocess.run(
        [str(serving_python), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith("5.") and version != __import__("transformers").__version__  # really another version
    input_ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    paths = list(checkpoints.values())
    theirs = logits_without_package(paths, input_ids, python=serving_python)
    ours = logits_without_package(paths, input_ids)
    for got, want in zip(theirs, ours, strict=True):
        assert (got - want).abs().max().item() <= 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_linearpatch_serve_answers_like_transformers(serving_python, checkpoints, tmp_path):
    from transformers import AutoTokenizer

    path, port = checkpoints["end"], _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below, after the server
    server = subprocess.Popen(
        [sys.executable, "-m", "linearpatch.cli", "serve", str(path), "--vllm", str(SERVING_VENV / "bin" / "vllm")]
        + ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256"]
        + ["--enforce-eager", "--gpu-memory-utilization", "0.3"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **VLLM_ENV},
        start_new_session=True,  # its own process group: vLLM's engine processes are stopped with it
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "vLLM did not start in time"
                time.sleep(2)
        request = {"model": str(path), "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0}
        reply = urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=300,
        )
        choices = sorted(json.loads(reply.read())["choices"], key=lambda choice: choice["index"])
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    want = [tokenizer.decode(ids) for ids in transformers_greedy(path, prompt_ids)]
    assert [choice["text"] for choice in choices] == want


def test_serve_without_vllm_is_a_clear_error(checkpoints, capsys):
    code = main(["serve", str(checkpoints["end"]), "--vllm", "/nonexistent/vllm"])
    assert code == 2 and "vLLM is not installed" in capsys.readouterr().err
