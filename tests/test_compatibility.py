"""Checkpoints written by earlier releases keep loading, with and without the package (issue #12)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from linearpatch.common.remote_check import logits_without_package
from linearpatch.modeling import LinearPatchForCausalLM

V0_1 = Path(__file__).parent / "fixtures" / "linearpatch_llama_v0_1"
EXPECTED = load_file(str(V0_1 / "expected_logits.safetensors"))


@pytest.mark.parametrize("loader", [LinearPatchForCausalLM, AutoModelForCausalLM])
def test_v0_1_llama_checkpoint_loads_with_the_package(loader):
    model = loader.from_pretrained(V0_1)
    assert model.config.model_type == "linearpatch_llama"
    assert model.config.pruned_layers == [0, 3, 4]
    with torch.no_grad():
        logits = model(EXPECTED["input_ids"]).logits
    torch.testing.assert_close(logits, EXPECTED["logits"], rtol=0, atol=1e-5)


def test_v0_1_llama_checkpoint_loads_without_the_package():
    (logits,) = logits_without_package([V0_1], EXPECTED["input_ids"])
    torch.testing.assert_close(logits, EXPECTED["logits"], rtol=0, atol=1e-5)
