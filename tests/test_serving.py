"""Serving (issues #11, #12): the patched checkpoint in vLLM's Transformers backend gives transformers' greedy outputs,
through `linearpatch serve` (vLLM's OpenAI server) for SmolLM2 and through the offline `vllm.LLM` API for the other
families, and the remote-code files work under the transformers version vLLM pins. Needs `make serving`
(.venv-serving); `make test` builds it."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_OVERRIDES, random_patch, serving, tiny_family
from transformers import AutoModelForCausalLM

from linearpatch.cli import main
from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.serving import SERVING_VENV
from linearpatch.modeling import prune_layers

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
def family_checkpoints(tmp_path_factory, smollm2_tokenizer):
    """Per non-Llama family, a tiny random pruned checkpoint (gaps in the middle and at the end) with a real tokenizer.
    Head size 32, which vLLM's CPU attention supports; sliding windows of 4 tokens, shorter than every prompt."""
    root = tmp_path_factory.mktemp("serving-families")
    paths = {}
    for index, family in enumerate(name for name in FAMILY_OVERRIDES if name != "llama"):
        sizes = dict(hidden_size=128, head_dim=32, intermediate_size=256)
        if family == "gemma3_text":
            sizes["query_pre_attn_scalar"] = 32
        dense = tiny_family(family, vocab_size=len(smollm2_tokenizer), seed=index, **sizes)
        pruned = prune_layers(dense, [1, 4, 5], patches=[random_patch(128, 1), random_patch(128, 2)])
        paths[family] = root / family
        pruned.save_pretrained(paths[family])
        smollm2_tokenizer.save_pretrained(paths[family])
    return paths


def transformers_greedy(path: Path, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs = []
    for ids in prompt_ids:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        outputs.append(generated[0, len(ids) :].tolist())
    return outputs


def vllm_greedy(serving_python, paths: list[Path], scratch: Path, max_tokens: int) -> dict[str, list[dict]]:
    """Greedy generations of PROMPTS by the offline `vllm.LLM` API for each checkpoint, in one vLLM process."""
    output = scratch / "vllm.json"
    result = subprocess.run(
        [str(serving_python), str(Path(__file__).with_name("serving_check.py")), str(output), str(max_tokens)]
        + [str(path) for path in paths],
        input=json.dumps(PROMPTS),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=scratch,
        env={**os.environ, **VLLM_ENV},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text())


def assert_same_greedy(served: dict[str, list[dict]], path: Path, max_tokens: int) -> None:
    runs = served[str(path)]
    want = transformers_greedy(path, [run["prompt_token_ids"] for run in runs], max_tokens)
    got = [run["token_ids"] for run in runs]
    assert [len(ids) for ids in got] == [max_tokens] * len(PROMPTS), path.name
    assert got == want, path.name


@pytest.fixture(scope="module")
def distilled_export(tmp_path_factory, smollm2_tokenizer):
    """`linearpatch distill --export` of a tiny Gemma 3 (its maps are diagonal, folded into the norms after the MLP)
    with a gap at layer 0 (its map folded into the embeddings) and one in the middle: a stock `gemma3_text` folder."""
    root = tmp_path_factory.mktemp("distilled-export")
    sizes = dict(hidden_size=128, head_dim=32, intermediate_size=256, query_pre_attn_scalar=32)
    dense = tiny_family("gemma3_text", vocab_size=len(smollm2_tokenizer), seed=11, **sizes)
    pruned = prune_layers(dense, [0, 3], patches=[random_patch(128, 3), random_patch(128, 4)])
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save_pretrained(root / name)
        smollm2_tokenizer.save_pretrained(root / name)
    sizes = ["--num-samples", "8", "--seq-len", "16", "--eval-windows", "0", "--top-k", "8", "--lr", "1e-2"]
    command = ["distill", str(root / "pruned"), "--teacher", str(root / "dense"), "--export", *sizes]
    assert main([*command, "--cache-dir", str(root / "cache"), "--output", str(root / "export")]) == 0
    assert json.loads((root / "export" / "config.json").read_text())["model_type"] == "gemma3_text"
    return root / "export"


# Each vLLM engine start costs about a minute on 2 cores, so each checkpoint is served once: the suite's SmolLM2 prune
# (a patch before kept layer 20 and one before the final norm) through `linearpatch serve` below, and Gemma 3, the
# family furthest from Llama (scaled embeddings, norms around the MLP, alternating sliding/full attention, a gap at the
# end), through the offline API here, with a distilled Gemma 3 export through the native kernels; `-m exhaustive`
# serves every family.
@pytest.fixture(scope="module")
def served(serving_python, family_checkpoints, distilled_export, tmp_path_factory):
    paths = [family_checkpoints["gemma3_text"], distilled_export]
    return vllm_greedy(serving_python, paths, tmp_path_factory.mktemp("vllm"), MAX_TOKENS)


def test_vllm_greedy_equals_transformers_for_gemma3(served, family_checkpoints):
    assert_same_greedy(served, family_checkpoints["gemma3_text"], MAX_TOKENS)


def test_vllm_native_kernels_serve_a_distilled_export_as_transformers_does(served, distilled_export):
    assert_same_greedy(served, distilled_export, MAX_TOKENS)


@pytest.mark.exhaustive
@pytest.mark.parametrize("family", [name for name in FAMILY_OVERRIDES if name not in ("llama", "gemma3_text")])
def test_vllm_greedy_equals_transformers_for_other_families(serving_python, family_checkpoints, tmp_path, family):
    served = vllm_greedy(serving_python, [family_checkpoints[family]], tmp_path, 16)
    assert_same_greedy(served, family_checkpoints[family], 16)


def test_remote_code_works_under_the_transformers_vllm_pins(serving_python, smollm2_pruned, family_checkpoints):
    version = subprocess.run(
        [str(serving_python), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith("5.") and version != __import__("transformers").__version__  # really another version
    input_ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    paths = [smollm2_pruned, *family_checkpoints.values()]
    theirs = logits_without_package(paths, input_ids, python=serving_python)
    ours = logits_without_package(paths, input_ids)
    for got, want in zip(theirs, ours, strict=True):
        assert (got - want).abs().max().item() <= 1e-5


def readme_serve_commands() -> list[str]:
    """The serving guide's `linearpatch serve ...` lines for vLLM (the README's front page shows one of them),
    without their comments (a `.gguf` goes to llama-server: tests/test_gguf.py)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "serving.md").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("linearpatch serve ")]
    return [line for line in lines if ".gguf" not in line]


@pytest.fixture(scope="module")
def readme_folder(smollm2_pruned, tmp_path_factory):
    """A working folder with the README's `pruned/` (the suite's SmolLM2 prune) and `pruned-stock/` (its export)."""
    folder = tmp_path_factory.mktemp("readme-serving")
    (folder / "pruned").symlink_to(smollm2_pruned)
    export = ["export", str(smollm2_pruned), "--num-samples", "2", "--seq-len", "64", "--eval-windows", "0"]
    # The fold that rewrites the most (two frames: every layer after the first gap, the norms' weights moved into
    # the Linear layers that read them, an untied head), so that vLLM's native Llama is checked on all of it.
    export += ["--fold", "down-proj-rotated"]
    assert main([*export, "--output", str(folder / "pruned-stock")]) == 0
    folds = json.loads((folder / "pruned-stock" / "linearpatch_export.json").read_text())["folds"]
    assert [fold["objective"] for fold in folds] == ["down-proj-rotated"] * 2
    return folder


@pytest.mark.parametrize("command", readme_serve_commands())
def test_the_readmes_serve_commands_answer_like_transformers(serving_python, readme_folder, tmp_path, command):
    """Each `linearpatch serve ...` line of the README, exactly as written (in a folder where `pruned/` is the suite's
    SmolLM2 prune and `pruned-stock/` its export, with vLLM's CPU memory left to linearpatch's defaults), answers the
    OpenAI completions API with transformers' greedy tokens: the checkpoint through vLLM's Transformers backend (a
    patch before kept layer 20 and one before the final norm), the export through vLLM's native kernels."""
    from transformers import AutoTokenizer

    served = command.split()[2]
    port = int(re.search(r"--port (\d+)", command)[1])
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port}, which the README's serve command uses, is taken: free it to run this test")
    environment = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    request = {"model": served, "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0}
    with serving(
        ["bash", "-c", f"exec {command}"], port, tmp_path / "serve.log", 600, cwd=readme_folder, env=environment
    ) as ask:
        choices = sorted(ask("/v1/completions", request)["choices"], key=lambda choice: choice["index"])
    started = (tmp_path / "serve.log").read_text()
    assert "VLLM_CPU_KVCACHE_SPACE=2" in started and "--enforce-eager" in started  # the CPU defaults, said aloud
    folder = readme_folder / served
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    want = [tokenizer.decode(ids) for ids in transformers_greedy(folder, prompt_ids)]
    assert [choice["text"] for choice in choices] == want


def test_serve_without_vllm_is_a_clear_error(family_checkpoints, capsys):
    code = main(["serve", str(family_checkpoints["qwen3"]), "--vllm", "/nonexistent/vllm"])
    assert code == 2 and "vLLM is not installed" in capsys.readouterr().err
