"""Hub tools against a real (loopback) HTTP server speaking the Hub's API: push, pull, load, refuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_patch
from hub_server import start_hub_server
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearpatch.common.remote_check import logits_without_package
from linearpatch.hub_tools import InvalidCheckpointError, model_card, push_to_hub, validate_folder
from linearpatch.modeling import prune_layers


@pytest.fixture(scope="module")
def hub():
    server, state, endpoint = start_hub_server()
    yield state, endpoint
    server.shutdown()


def hub_env(endpoint: str, home: Path, offline: bool = False) -> dict:
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_TOKEN": "test-token",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
    }


def cli(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linearpatch.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def patched_checkpoint(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "patched"
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    patched = prune_layers(
        dense,
        [2, 3],
        patches=[random_patch(64, 3)],
        base_model="org/tiny-dense",
        selection_metric="cosine",
        patch_kind="hadamard",
    )
    patched.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(path)
    (path / "linearpatch_eval.md").write_text("| model | avg |\n|---|---|\n| dense | 50.00 |\n| patched | 40.00 |\n")
    return path, patched


def test_checkpoint_and_its_adapter_round_trip(hub, patched_checkpoint, tmp_path, capsys):
    """Push a checkpoint, pull it (online, then offline from the cache), push a patch adapter trained on it, and load
    both from the Hub where linearpatch is not installed: the same logits as before pushing. (One test, so that the
    adapter's base is the pushed checkpoint and one package-free process loads both.)"""
    from linearpatch.cli import main
    from linearpatch.integration.distillation.trainer import get_patch_peft_model

    state, endpoint = hub
    path, patched = patched_checkpoint
    env = hub_env(endpoint, tmp_path / "home-push")
    pushed = cli("push", str(path), "org/tiny-patched", env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert set(state.files("org/tiny-patched", "main")[1]) >= {
        "model.safetensors",
        "modeling_linearpatch.py",
        "README.md",
        "tokenizer.json",
        "config.json",
    }
    fresh = hub_env(endpoint, tmp_path / "home-pull")
    pulled = cli("pull", "org/tiny-patched", env=fresh)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert "kept layers: 4" in pulled.stdout and "pruned layers: [2, 3]" in pulled.stdout
    offline = cli("pull", "org/tiny-patched", env=hub_env(endpoint, tmp_path / "home-pull", offline=True))
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "files verified" in offline.stdout and " 0 files verified" not in offline.stdout

    model = get_patch_peft_model(AutoModelForCausalLM.from_pretrained(path))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.peft_config["default"].base_model_name_or_path = str(path)  # a local path, as after training
    model.save_pretrained(tmp_path / "adapter")
    # Refused before the Hub is asked: a local base path means nothing there.
    assert main(["push", str(tmp_path / "adapter"), "org/tiny-adapter"]) == 2
    assert "--base-model ORG/NAME" in capsys.readouterr().err
    arguments = ("push", str(tmp_path / "adapter"), "org/tiny-adapter", "--base-model", "org/tiny-patched")
    pushed = cli(*arguments, env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    files = state.files("org/tiny-adapter", "main")[1]
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-patched"
    card = files["README.md"].decode()
    assert "base_model: org/tiny-patched" in card and str(tmp_path) not in card

    input_ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = [patched(input_ids).logits, model(input_ids=input_ids).logits]
    got = logits_without_package(
        ["org/tiny-patched", "adapter:org/tiny-adapter"], input_ids, env=hub_env(endpoint, tmp_path / "home-load")
    )
    for name, expected, loaded in zip(("checkpoint", "adapter"), want, got, strict=True):
        assert (expected - loaded).abs().max().item() <= 1e-5, name


def test_interrupted_push_leaves_nothing_and_retry_succeeds(hub, patched_checkpoint, tmp_path):
    state, endpoint = hub
    path, _ = patched_checkpoint
    env = hub_env(endpoint, tmp_path / "home")
    state.fail_next("/commit/")
    failed = cli("push", str(path), "org/interrupted", "--commit-message", "first try", env=env)
    assert failed.returncode != 0
    assert state.files("org/interrupted", "main")[1] == {}  # no partial revision visible
    retried = cli("push", str(path), "org/interrupted", env=env)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "model.safetensors" in state.files("org/interrupted", "main")[1]


def _copy(source: Path, target: Path, skip: tuple = ()) -> Path:
    target.mkdir()
    for file in source.iterdir():
        if file.name not in skip:
            (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize(
    "skip, message",
    [
        (("model.safetensors",), "no safetensors weights"),
        (("modeling_linearpatch.py",), "remote-code files"),
        (("tokenizer.json", "tokenizer_config.json"), "no tokenizer"),
    ],
)
def test_push_refuses_incomplete_folders(patched_checkpoint, tmp_path, skip, message):
    folder = _copy(patched_checkpoint[0], tmp_path / "copy", skip)
    with pytest.raises(InvalidCheckpointError, match=message):
        push_to_hub(folder, "org/never")


def test_push_refuses_pickles_and_leaking_cards(patched_checkpoint, tmp_path):
    folder = _copy(patched_checkpoint[0], tmp_path / "pickled", ("model.safetensors",))
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(InvalidCheckpointError, match="pickle files"):
        push_to_hub(folder, "org/never")
    leaky = _copy(patched_checkpoint[0], tmp_path / "leaky")
    config = json.loads((leaky / "config.json").read_text())
    config["base_model"] = "/home/alice/models/llama-dense"
    (leaky / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpointError, match="reveal local paths"):
        push_to_hub(leaky, "org/never")
    with pytest.raises(InvalidCheckpointError, match="not a Hub repo id"):
        push_to_hub(leaky, "not a repo")


def test_card_parses_and_its_metadata_validates_offline(patched_checkpoint, tmp_path):
    info = validate_folder(patched_checkpoint[0], check_import=False)
    card = model_card(info, "org/tiny-patched")
    (tmp_path / "README.md").write_text(str(card))
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == "org/tiny-dense"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"linearpatch", "custom_code"} <= set(data["tags"])
    assert "trust_remote_code=True" in loaded.text and "[2, 3]" in loaded.text and "| patched | 40.00 |" in loaded.text
    assert "fewer" in loaded.text and "transformers>=5.0,<6" in loaded.text


def test_card_snippet_loads_tokenizer_without_asking_on_a_terminal(patched_checkpoint, tmp_path):
    """Finding 9 of issue #10: run the card's usage code as a user would, on a terminal, without linearpatch: the
    tokenizer must load without transformers asking "run custom code? [y/N]" (which waits 15 s for an answer)."""
    import pty
    import re

    from linearpatch.common.remote_check import LOAD_WITHOUT_PACKAGE

    path, _ = patched_checkpoint
    (tmp_path / "ckpt").symlink_to(path)
    card = str(model_card(validate_folder(path, check_import=False), "ckpt"))
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    # The same import blocker as the package-free loader, then the card's code verbatim.
    blocker = LOAD_WITHOUT_PACKAGE.read_text().split("import torch  # noqa: E402")[0]
    script = blocker + code + "\nprint('tokens', tokenizer('hello world').input_ids)\n"
    primary, secondary = pty.openpty()
    result = subprocess.run(
        [sys.executable, "-c", script],
        stdin=secondary,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    os.close(primary)
    os.close(secondary)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert "tokens [" in result.stdout
