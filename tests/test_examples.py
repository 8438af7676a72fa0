"""The scripts of examples/ (issue #46), each run as a user runs it, on SmolLM2 at the smoke-test sizes
(`LINEARPATCH_QUICK=1`, set for the session by conftest.py): what each says it shows, it does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import start_hub_server

from linearpatch.integration.llama_cpp import llama_cpp_home

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> str:
    environment = {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def test_every_example_is_tested_and_says_what_it_shows():
    tested = {
        "demo.py",
        "prune_and_evaluate.py",
        "distill_with_your_trainer.py",
        "export_to_gguf.sh",
        "push_to_hub.py",
    }
    assert {path.name for path in EXAMPLES.iterdir() if path.is_file()} == tested
    for path in EXAMPLES.iterdir():
        text = path.read_text()
        assert "shows" in text[:1500] or path.name in ("demo.py", "export_to_gguf.sh"), path.name


def test_prune_and_evaluate(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "prune_and_evaluate.py"), "--output", "pruned"], tmp_path)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert len(config["pruned_layers"]) == 5
    evaluation = json.loads((tmp_path / "pruned" / "evaluation" / "linearpatch_eval.json").read_text())
    names = [row["name"] for row in evaluation["models"]]
    assert names == ["smollm2-135m", "pruned"]
    assert "wiki_next_sentence" in out and "| pruned |" in out  # the table, printed


def test_distill_with_your_trainer(tmp_path, smollm2_pruned):
    text = tmp_path / "my.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the river runs past the old mill and into the sea." for i in range(40))
    )
    out = run(
        [
            sys.executable,
            str(EXAMPLES / "distill_with_your_trainer.py"),
            str(smollm2_pruned),
            "--text",
            str(text),
            "--max-steps",
            "3",
            "--block-size",
            "64",
        ],
        tmp_path,
    )
    assert "training " in out and "(the patches)" in out
    adapter = tmp_path / "patch-adapter"
    weights = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    before = {k: v for k, v in load_file(smollm2_pruned / "model.safetensors").items() if "linear_patch" in k}
    patch_bytes = sum(tensor.numel() * tensor.element_size() for tensor in before.values())  # two 576 x 576 matrices
    assert patch_bytes <= weights.stat().st_size <= patch_bytes + 100_000  # the patches, nothing else
    after = {k: v for k, v in load_file(tmp_path / "patched-merged" / "model.safetensors").items() if k in before}
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)  # trained


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_export_to_gguf(tmp_path):
    env = {"LLAMA_CPP_HOME": str(llama_cpp_home())}
    out = run(["bash", str(EXAMPLES / "export_to_gguf.sh"), "smollm2-135m", "work", str(_free_port())], tmp_path, env)
    stock = tmp_path / "work" / "stock"
    assert json.loads((stock / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert list(stock.glob("*Q4_K_M.gguf"))
    completion = json.loads(out.strip().splitlines()[-1])  # the server's answer to the one request
    assert completion["choices"][0]["text"]


def test_push_to_hub(tmp_path, smollm2_pruned):
    server, state, endpoint = start_hub_server()
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "test-token",
        "HF_HUB_DISABLE_XET": "1",
    }
    try:
        out = run(
            [sys.executable, str(EXAMPLES / "push_to_hub.py"), str(smollm2_pruned), "my-org/example"], tmp_path, env
        )
    finally:
        server.shutdown()
    assert "my-org/example" in state.repos
    assert "valid: a LinearPatch model" in out and "pushed:" in out
