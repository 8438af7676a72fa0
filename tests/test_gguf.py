"""`export --gguf` and `serve x.gguf` with the llama.cpp that `make gguf` builds (issue #32): every family llama.cpp
converts, with a gap in the middle and one at the end, runs in llama.cpp as the stock export runs in transformers
(perplexity on the same text, scored the same way, within 0.1% at f32); quantized files run; what llama.cpp would run
differently is refused or said; the files are served, checked and pushed."""

import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
from helpers import QUICK, serving, tiny_family
from transformers import AutoTokenizer

from linearpatch.cli import main
from linearpatch.integration.export.gguf import llama_cpp_period, plan_gguf
from linearpatch.integration.llama_cpp import LLAMA_CPP_SHA256, llama_cpp_home, read_gguf
from linearpatch.modeling import FAMILIES
from linearpatch.modeling.families import GEMMA3_LLAMA_CPP

ROOT = Path(__file__).resolve().parents[1]
# Sliding windows off where llama.cpp ignores them (their note is tested apart); Gemma 3 keeps its 4-token windows,
# which llama.cpp runs, on 256-token windows of text.
NO_SLIDING = {"mistral": dict(sliding_window=None), "qwen2": dict(use_sliding_window=False)}
NO_SLIDING["qwen3"] = NO_SLIDING["qwen2"]
GAPS = {"middle": "2-3", "end": "4-5"}
CONVERTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# llama.cpp's converter recognises a tokenizer by hashing how it splits a test text, and transformers 5 gives every
# qwen2 folder its Qwen2Tokenizer, whose split of SmolLM2's vocabulary no real model has: a tiny Qwen2 gets a real
# Qwen2 vocabulary (`make qwen2-tokenizer`).
QWEN2_TOKENIZER = Path(os.environ.get("QWEN2_TOKENIZER") or Path.home() / ".cache" / "linearpatch" / "qwen2-tokenizer")


@pytest.fixture(scope="module", autouse=True)
def built():
    """`make gguf` (a dependency of `make test`) has built llama.cpp: without it these tests cannot mean anything."""
    if not (llama_cpp_home() / ".built").is_file():
        pytest.fail(f"llama.cpp is not built in {llama_cpp_home()}: run `make gguf` (`make test` does).")


def test_the_makefile_builds_the_wheel_the_package_looks_for():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LLAMA_CPP_SHA256 := (\w+)$", makefile, re.M)[1] == LLAMA_CPP_SHA256


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory, smollm2_tokenizer):
    """One tiny dense model per family, with SmolLM2's real tokenizer (Qwen2: Qwen2.5's), which llama.cpp's converter
    recognises."""
    root = tmp_path_factory.mktemp("gguf-dense")
    folders = {}
    if not (QWEN2_TOKENIZER / "tokenizer.json").is_file():
        pytest.fail(f"no Qwen2 tokenizer in {QWEN2_TOKENIZER}: run `make qwen2-tokenizer` (`make test` does).")
    for name in CONVERTED:
        tokenizer = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER) if name == "qwen2" else smollm2_tokenizer
        model = tiny_family(name, vocab_size=len(tokenizer), **NO_SLIDING.get(name, {}))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def export_gguf(dense: Path, layers: str, output: Path, *types: str, fold: str = "auto") -> dict:
    """Prune `dense` at `layers`, export it with `--gguf TYPES`: the export's record."""
    pruned = output.with_name(output.name + "-pruned")
    assert main(["prune", str(dense), "--layers", layers, *QUICK, "--output", str(pruned)]) == 0
    command = ["export", str(pruned), "--dense", str(dense), "--fold", fold, *QUICK, "--eval-windows", "2"]
    assert main([*command, "--gguf", *types, "--output", str(output)]) == 0
    return json.loads((output / "linearpatch_export.json").read_text())


@pytest.mark.parametrize("gap", GAPS)
@pytest.mark.parametrize("family", CONVERTED)
def test_llama_cpp_runs_the_export_as_transformers_does(dense_models, tmp_path, family, gap):
    """llama-perplexity of the f32 GGUF equals transformers' perplexity of the stock export on the same text, scored
    the same way (each window's second half), within 0.1%; the tokenizer and chat template travel with it. Llama
    takes the rotated fold (every layer after the gap rewritten, the head untied)."""
    fold = "down-proj-rotated" if family == "llama" else "auto"
    record = export_gguf(dense_models[family], GAPS[gap], tmp_path / "export", "f32", fold=fold)
    gguf = record["gguf"]
    (entry,) = gguf["files"]
    assert (
        entry["file"] == "export-F32.gguf" and (tmp_path / "export" / entry["file"]).stat().st_size == entry["bytes"]
    )
    for corpus, want in gguf["reference"].items():
        assert abs(entry["perplexity"][corpus] / want - 1) <= 1e-3, (corpus, entry["perplexity"][corpus], want)
    metadata = read_gguf(tmp_path / "export" / entry["file"])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    architecture = {"gemma3_text": "gemma3", "mistral": "llama"}.get(family, family)  # llama.cpp runs Mistral as Llama
    assert metadata["general.architecture"] == architecture
    assert metadata[f"{architecture}.block_count"] == config["num_hidden_layers"] == 4
    template = tmp_path / "export" / "chat_template.jinja"  # SmolLM2's tokenizer has one, the Qwen2 vocabulary none
    assert metadata.get("tokenizer.chat_template") == (template.read_text() if template.exists() else None)
    if family == "llama":
        assert not config["tie_word_embeddings"] and record["folds"][0]["objective"] == "down-proj-rotated"
    if family == "gemma3_text":  # [S, S, S, F] and [S, S, F, S]: llama.cpp's period is written, not its default 6
        period = {"middle": 4, "end": 3}[gap]
        assert gguf["overrides"] == [f"gemma3.attention.sliding_window_pattern=int:{period}"]
        assert metadata["gemma3.attention.sliding_window_pattern"] == period


def test_quantized_files_run_and_stay_close(dense_models, tmp_path):
    """Every type llama.cpp makes, from one conversion; each runs in llama-perplexity (a CPU build that faults on an
    instruction set it claims would fail here) and q8_0 stays within 1% of f16 (random weights: a loose bound)."""
    types = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
    record = export_gguf(dense_models["llama"], "2-3", tmp_path / "export", *types)
    files = {entry["type"]: entry for entry in record["gguf"]["files"]}
    assert list(files) == list(types) and record["gguf"]["base"] == "f16"
    assert sorted(path.name for path in (tmp_path / "export").glob("*.gguf")) == sorted(
        f"export-{kind.upper()}.gguf" for kind in types
    )
    assert not list((tmp_path / "export").glob(".*"))  # the conversion's base file is gone
    assert files["q4_k_m"]["bytes"] < files["q8_0"]["bytes"] < files["f16"]["bytes"]
    for corpus, want in record["gguf"]["reference"].items():
        assert abs(files["q8_0"]["perplexity"][corpus] / files["f16"]["perplexity"][corpus] - 1) <= 0.01
        assert abs(files["f16"]["perplexity"][corpus] / want - 1) <= 0.01


def test_the_importance_matrix_quantizes_the_low_bit_files_and_makes_the_iquants(dense_models, tmp_path, capsys):
    """Issue #45: by default the files of 4 bits and below are quantized with llama.cpp's importance matrix, computed
    by llama-imatrix over the windows `prune` calibrated on (drawn again, checked by their SHA-256) and kept beside
    them as NAME.imatrix; the i-quants are made with it, and every file runs in llama-perplexity. `--no-imatrix`
    quantizes the same weights to other bytes, and refuses the i-quants in one line."""
    record = export_gguf(dense_models["llama"], "2-3", tmp_path / "export", "q8_0", "q4_k_m", "iq4_xs")
    gguf, folder = record["gguf"], tmp_path / "export"
    assert {entry["type"]: entry["imatrix"] for entry in gguf["files"]} == dict(q8_0=False, q4_k_m=True, iq4_xs=True)
    assert (folder / "export.imatrix").read_bytes()[:4] == b"GGUF" and gguf["imatrix"]["file"] == "export.imatrix"
    calibration = json.loads((tmp_path / "export-pruned" / "linearpatch_report.json").read_text())["calibration"]
    assert gguf["imatrix"]["sha256"] == calibration["sha256"] and gguf["imatrix"]["source"] == calibration["source"]
    for entry in gguf["files"]:
        assert all(0 < value < float("inf") for value in entry["perplexity"].values()), entry

    plain = tmp_path / "plain"
    command = ["export", str(tmp_path / "export-pruned"), "--dense", str(dense_models["llama"]), *QUICK]
    assert main([*command, "--eval-windows", "0", "--gguf", "q4_k_m", "--no-imatrix", "--output", str(plain)]) == 0
    (entry,) = json.loads((plain / "linearpatch_export.json").read_text())["gguf"]["files"]
    assert entry["imatrix"] is False and not list(plain.glob("*.imatrix"))
    assert (plain / "plain-Q4_K_M.gguf").read_bytes() != (folder / "export-Q4_K_M.gguf").read_bytes()

    for flags, message in (
        (["--gguf", "iq3_m", "--no-imatrix"], "made only with an importance matrix"),
        (["--imatrix"], "add --gguf TYPE"),
    ):
        capsys.readouterr()
        code = main([*command, *flags, "--output", str(tmp_path / "refused")])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1 and message in error, error
        assert not (tmp_path / "refused").exists()


def test_a_sequential_export_converts_its_shards(dense_models, tmp_path):
    """Larger than the machine: the export streams its folded tensors into shards and llama.cpp's converter reads
    them (lazily); the held-out comparison needs whole models, so the files are written unmeasured."""
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense_models["qwen3"]), "--layers", "4-5", *QUICK, "--output", str(pruned)]) == 0
    command = ["export", str(pruned), "--dense", str(dense_models["qwen3"]), "--sequential", "--max-shard-size", "2MB"]
    assert main([*command, *QUICK, "--gguf", "q8_0", "--output", str(tmp_path / "big")]) == 0
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) > 1
    gguf = json.loads((tmp_path / "big" / "linearpatch_export.json").read_text())["gguf"]
    assert [entry["file"] for entry in gguf["files"]] == ["big-Q8_0.gguf"] and "reference" not in gguf
    assert read_gguf(tmp_path / "big" / "big-Q8_0.gguf")["qwen3.block_count"] == 4


def test_llama_cpps_gemma3_period():
    """The period llama.cpp reads for a layer pattern, Gemma 3's default (6, from the family registry) first."""
    sliding, full = True, False
    GEMMA3_PERIOD = GEMMA3_LLAMA_CPP.default_period
    assert GEMMA3_PERIOD == 6
    assert llama_cpp_period([sliding] * 5 + [full] + [sliding] * 5 + [full], GEMMA3_PERIOD) == 6
    assert llama_cpp_period([sliding, sliding, full, sliding], GEMMA3_PERIOD) == 3
    assert llama_cpp_period([sliding] * 3, GEMMA3_PERIOD) == 6  # every layer sliding: the default says it already
    assert llama_cpp_period([full, full], GEMMA3_PERIOD) == 1
    assert llama_cpp_period([sliding, sliding, full, sliding, full], GEMMA3_PERIOD) is None


def test_what_llama_cpp_would_run_differently_is_refused_or_said(dense_models, tmp_path, capsys):
    """Gemma 3 whose global layers no period gives, or whose query_pre_attn_scalar llama.cpp would not use: refused
    in one line before any work, nothing written. A sliding window llama.cpp ignores: said, with the length up to
    which the GGUF is exact."""
    pruned = tmp_path / "gemma-pruned"
    assert main(["prune", str(dense_models["gemma3_text"]), "--layers", "3", *QUICK, "--output", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["export", str(pruned), "--gguf", "q8_0", "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        len(error.splitlines()) == 1 and "global layers are [2, 4] of 5" in error and not (tmp_path / "out").exists()
    )

    config = FAMILIES["gemma3_text"].dense_config_class(**json.loads((pruned / "config.json").read_text()))
    config.layer_types = ["sliding_attention", "full_attention"]
    config.num_hidden_layers, config.query_pre_attn_scalar = 2, 2 * config.head_dim
    with pytest.raises(ValueError, match=r"scales this Gemma 3's attention by 1/sqrt\(16\)"):
        plan_gguf(config, ["f16"])

    mistral = FAMILIES["mistral"].dense_config_class(sliding_window=4096, num_hidden_layers=2)
    (note,) = plan_gguf(mistral, ["q8_0"]).notes
    assert "up to 4096 tokens" in note
    qwen3 = FAMILIES["qwen3"].dense_config_class(use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert "up to 64 tokens" in plan_gguf(qwen3, ["q8_0"]).notes[0]
    assert plan_gguf(FAMILIES["llama"].dense_config_class(), ["q8_0"]).notes == ()


def test_a_sliding_window_llama_cpp_ignores_is_said_on_the_card(tmp_path, smollm2_tokenizer):
    from linearpatch.hub_tools import model_card, validate_folder

    dense = tiny_family("mistral", vocab_size=len(smollm2_tokenizer), sliding_window=16)
    dense.save_pretrained(tmp_path / "dense")
    smollm2_tokenizer.save_pretrained(tmp_path / "dense")
    record = export_gguf(tmp_path / "dense", "2-3", tmp_path / "windowed", "q8_0")
    (note,) = record["gguf"]["notes"]
    assert "equal transformers for contexts up to 16 tokens" in note
    card = str(model_card(validate_folder(tmp_path / "windowed", check_import=False), "org/windowed"))
    assert f"**Note:** {note}" in card


def test_bad_requests_are_refused_before_work(dense_models, tmp_path, capsys, monkeypatch):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense_models["llama"]), "--layers", "2", *QUICK, "--output", str(pruned)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", str(pruned), "--gguf", "q3_k_s", "--output", str(tmp_path / "out")])
    assert "invalid choice: 'q3_k_s'" in capsys.readouterr().err
    distill = ["distill", str(pruned), "--teacher", str(dense_models["llama"]), "--output", str(tmp_path / "out")]
    assert main([*distill, "--gguf", "q8_0"]) == 2
    assert "add --export" in capsys.readouterr().err
    monkeypatch.setenv("LLAMA_CPP_HOME", str(tmp_path / "nowhere"))
    assert main(["export", str(pruned), "--gguf", "q8_0", "--output", str(tmp_path / "out")]) == 2
    assert "run `make gguf`" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_distill_export_writes_measured_gguf_files(dense_models, tmp_path):
    pruned = tmp_path / "pruned"
    dense = str(dense_models["qwen3"])
    assert main(["prune", dense, "--layers", "2-3", *QUICK, "--output", str(pruned)]) == 0
    command = ["distill", str(pruned), "--teacher", dense, "--export", "--gguf", "q8_0", *QUICK, "--eval-windows", "2"]
    assert main([*command, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "distilled")]) == 0
    record = json.loads((tmp_path / "distilled" / "linearpatch_export.json").read_text())
    (entry,) = record["gguf"]["files"]
    assert record["distilled"] and entry["file"] == "distilled-Q8_0.gguf"
    for corpus, want in record["gguf"]["reference"].items():
        assert abs(entry["perplexity"][corpus] / want - 1) <= 0.01


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_answers_an_openai_chat_completion_and_refuses_bad_files(dense_models, tmp_path, capsys):
    """`linearpatch serve x.gguf` runs llama-server (the chat template came from the tokenizer); a file that is not a
    GGUF, or a cut one, is refused in one line before anything starts."""
    export_gguf(dense_models["llama"], "2-3", tmp_path / "export", "q4_k_m")
    gguf = tmp_path / "export" / "export-Q4_K_M.gguf"
    (tmp_path / "notes.gguf").write_text("not a model")
    (tmp_path / "cut.gguf").write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    capsys.readouterr()
    for bad, message in (("notes.gguf", "is not a GGUF file"), ("cut.gguf", "is truncated")):
        assert main(["serve", str(tmp_path / bad)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error

    port = free_port()
    command = [sys.executable, "-m", "linearpatch.cli", "serve", str(gguf), "--port", str(port), "--threads", "1"]
    with serving(command, port, tmp_path / "serve.log", 120) as ask:
        question = [{"role": "user", "content": "Hello!"}]
        answer = ask("/v1/chat/completions", {"model": "export-Q4_K_M", "messages": question, "max_tokens": 5})
    assert answer["object"] == "chat.completion" and answer["model"] == "export-Q4_K_M"
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] == 5
    # The chat template the tokenizer carries framed the message (SmolLM2's `<|im_start|>user ...`).
    assert answer["usage"]["prompt_tokens"] > len("Hello!".split()) + 4


def test_push_uploads_the_gguf_files_and_lists_them_on_the_card(dense_models, tmp_path):
    from linearpatch.hub_tools import InvalidCheckpointError, model_card, validate_folder

    export_gguf(dense_models["mistral"], "4-5", tmp_path / "tiny", "q8_0", "q4_k_m")
    info = validate_folder(tmp_path / "tiny", check_import=False)
    assert {"tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"} <= set(info.files)  # pushed with the stock folder
    card = str(model_card(info, "org/tiny-gguf"))
    record = json.loads((tmp_path / "tiny" / "linearpatch_export.json").read_text())
    for entry in record["gguf"]["files"]:
        perplexity = " | ".join(f"{value:.2f}" for value in entry["perplexity"].values())
        matrix = "yes" if entry["imatrix"] else "no"
        size = f"{entry['bytes'] / 1e6:.1f} MB"
        row = f"| `{entry['file']}` | {entry['type'].upper()} | {size} | {matrix} | {perplexity} |"
        assert row in card
    assert "ollama run hf.co/org/tiny-gguf:Q4_K_M" in card and "- gguf" in card
    assert "Recommended: `tiny-Q4_K_M.gguf`" in card and "`tiny.imatrix`" in card
    assert "tiny.imatrix" in info.files  # pushed with the files it made
    with open(tmp_path / "tiny" / "tiny-Q8_0.gguf", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(InvalidCheckpointError, match="truncated or replaced"):
        validate_folder(tmp_path / "tiny", check_import=False)
    (tmp_path / "tiny" / "tiny-Q8_0.gguf").unlink()
    (tmp_path / "tiny" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(InvalidCheckpointError, match="not written by `linearpatch export --gguf`"):
        validate_folder(tmp_path / "tiny", check_import=False)


@pytest.mark.slow
def test_smollm2_gguf_at_f32_equals_the_stock_export(smollm2_pruned, tmp_path):
    """The real SmolLM2 (the suite's prune: a patch before kept layer 20 and one before the final norm), exported
    with the rotated fold (every layer after the first gap rewritten, the head untied): llama.cpp's f32 file within
    0.1% of transformers; the q8_0 file runs and is measured. (The suite's prune is calibrated on 4 x 128 tokens, so
    its quality says nothing: q8_0's cost at the stress cut is the bench's claim, `python -m bench --check`.)"""
    command = ["export", str(smollm2_pruned), "--fold", "down-proj-rotated", "--num-samples", "4", "--seq-len", "128"]
    command += ["--eval-windows", "2", "--gguf", "f32", "q8_0", "--output", str(tmp_path / "smollm2")]
    assert main(command) == 0
    gguf = json.loads((tmp_path / "smollm2" / "linearpatch_export.json").read_text())["gguf"]
    files = {entry["type"]: entry for entry in gguf["files"]}
    assert files["q8_0"]["bytes"] < 0.3 * files["f32"]["bytes"]
    for corpus, want in gguf["reference"].items():
        assert abs(files["f32"]["perplexity"][corpus] / want - 1) <= 1e-3
        assert files["q8_0"]["perplexity"][corpus] > 1  # measured, not left out
