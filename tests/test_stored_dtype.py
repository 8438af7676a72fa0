"""Issue #44, item 8: outputs keep the source's dtype. `prune`, `distill` and `export` compute in float32 by default
but write the weights in the dtype their source is stored in (a bf16 model stays bf16 on disk, its patches float32);
`--dtype` names one for both."""

import json

import pytest
import torch
from helpers import tiny_llama

from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.shards import SafetensorsCheckpoint

SIZES = ["--num-samples", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def bf16_dense(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama stored in bfloat16, with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("bf16-dense")
    model = tiny_llama(num_layers=6, vocab_size=len(smollm2_tokenizer), seed=3).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def stored(folder) -> dict[str, torch.dtype]:
    checkpoint = SafetensorsCheckpoint(folder)
    return {name: checkpoint.read(name).dtype for name in checkpoint.keys()}


def kept_source_bytes(dense, removed: list[int]) -> int:
    """Bytes, as stored in the source, of the tensors a prune of `removed` keeps."""
    checkpoint = SafetensorsCheckpoint(dense)
    dropped = tuple(f"model.layers.{index}." for index in removed)
    return sum(entry.end - entry.start for name, entry in checkpoint.entries.items() if not name.startswith(dropped))


@pytest.mark.parametrize("route", ["in-memory", "sequential"])
def test_prune_writes_the_source_dtype_by_default(bf16_dense, tmp_path, linearpatch_cli, route):
    """A bf16 dense model pruned at the defaults is written in bf16 (the patch in float32), at most 1.05x the kept
    layers' bytes in the source; it loads with remote code alone and runs as it does here. `--dtype float32` writes
    float32."""
    output = tmp_path / "pruned"
    extra = ["--sequential"] if route == "sequential" else []
    run = linearpatch_cli("prune", bf16_dense, "--layers", "2-3", *SIZES, *extra, "--output", output)
    assert run.returncode == 0, run.stderr
    dtypes = stored(output)
    patches = {name for name in dtypes if ".linear_patch." in name}
    assert patches and all(dtypes[name] == torch.float32 for name in patches)
    assert {dtypes[name] for name in dtypes.keys() - patches} == {torch.bfloat16}
    size = SafetensorsCheckpoint(output).nbytes()
    assert size <= 1.05 * kept_source_bytes(bf16_dense, [2, 3])
    report = json.loads((output / "linearpatch_report.json").read_text())
    assert report["dtype"] == {"compute": "float32", "stored": "bfloat16"}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"

    from transformers import AutoModelForCausalLM

    input_ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    (remote,) = logits_without_package([output], input_ids)
    local = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    assert local.model.layers[2].linear_patch.weight.dtype == torch.float32
    assert local.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        expected = local(input_ids).logits.float()
    assert torch.allclose(remote, expected, atol=1e-5) and remote.abs().max() > 0

    explicit = tmp_path / "fp32"
    run = linearpatch_cli(
        "prune", bf16_dense, "--layers", "2-3", *SIZES, *extra, "--dtype", "float32", "--output", explicit
    )
    assert run.returncode == 0, run.stderr
    assert set(stored(explicit).values()) == {torch.float32}
    patch_bytes = SafetensorsCheckpoint(output).nbytes(prefix="model.layers.2.linear_patch")
    assert SafetensorsCheckpoint(explicit).nbytes() - patch_bytes == 2 * (size - patch_bytes)


def test_in_memory_and_sequential_prunes_write_the_same_weights(bf16_dense, tmp_path, linearpatch_cli):
    """The bf16 weights copied from the source are the source's bits on both routes (computing in float32 and
    casting back loses nothing), and the patches agree."""
    written = {}
    for route in ("in-memory", "sequential"):
        output = tmp_path / route
        extra = ["--sequential"] if route == "sequential" else []
        assert (
            linearpatch_cli("prune", bf16_dense, "--layers", "2-3", *SIZES, *extra, "--output", output).returncode == 0
        )
        checkpoint = SafetensorsCheckpoint(output)
        written[route] = {name: checkpoint.read(name) for name in checkpoint.keys()}
    source = SafetensorsCheckpoint(bf16_dense)
    memory, sequential = written["in-memory"], written["sequential"]
    assert memory.keys() == sequential.keys()
    for name, tensor in memory.items():
        if ".linear_patch." in name:
            assert torch.allclose(tensor, sequential[name], atol=1e-5)
        else:
            assert torch.equal(tensor, sequential[name]), name
    assert torch.equal(
        memory["model.layers.2.mlp.down_proj.weight"], source.read("model.layers.4.mlp.down_proj.weight")
    )


def test_distill_and_export_write_the_checkpoint_dtype(bf16_dense, tmp_path, linearpatch_cli):
    """`distill` of a bf16 checkpoint writes bf16 with a float32 patch; `export` writes a bf16 stock model."""
    pruned = tmp_path / "pruned"
    assert linearpatch_cli("prune", bf16_dense, "--layers", "2-3", *SIZES, "--output", pruned).returncode == 0
    distilled = tmp_path / "distilled"
    teacher = ["--teacher", bf16_dense, "--top-k", "8", "--cache-dir", tmp_path / "cache", "--device", "cpu"]
    run = linearpatch_cli("distill", pruned, *teacher, "--num-samples", "4", "--seq-len", "16", "--output", distilled)
    assert run.returncode == 0, run.stderr
    dtypes = stored(distilled)
    assert {dtype for name, dtype in dtypes.items() if ".linear_patch." not in name} == {torch.bfloat16}
    assert {dtype for name, dtype in dtypes.items() if ".linear_patch." in name} == {torch.float32}
    assert json.loads((distilled / "linearpatch_distill.json").read_text())["dtype"]["stored"] == "bfloat16"

    exported = tmp_path / "exported"
    run = linearpatch_cli("export", pruned, "--fold", "scalar", "--eval-windows", "0", "--output", exported)
    assert run.returncode == 0, run.stderr
    assert set(stored(exported).values()) == {torch.bfloat16}
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
