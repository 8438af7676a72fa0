"""The bench's random large-model writer (issue #33), on a tiny shape: shards within the limit, the config's shape,
loadable by transformers, the same weights whatever the shard size, and never written twice."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.scale_model import SHAPES, shapes_of, write_scale_model


def _tensors(folder) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def test_writes_bounded_shards_of_the_shape_that_load_and_do_not_depend_on_the_shard_size(tmp_path):
    limit = 10**5  # about one tiny layer
    folder = write_scale_model(tmp_path / "sharded", "tiny", max_shard_size=limit, progress=False)
    shards = sorted(folder.glob("*.safetensors"))
    # The embedding and the head (49152 x 64 bf16, 6.3 MB) are larger than the limit and get a shard each.
    assert len(shards) >= SHAPES["tiny"]["num_hidden_layers"] + 2
    oversized = [path for path in shards if path.stat().st_size > limit + 10**4]  # + the JSON header
    assert len(oversized) == 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected = dict(shapes_of(LlamaConfig(**SHAPES["tiny"])))
    assert set(index["weight_map"]) == set(expected)
    tensors = _tensors(folder)
    assert {name: tuple(tensor.shape) for name, tensor in tensors.items()} == expected
    assert all(tensor.dtype == torch.bfloat16 for tensor in tensors.values())
    assert abs(tensors["model.layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 2e-3

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == SHAPES["tiny"]["num_hidden_layers"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    whole = write_scale_model(tmp_path / "whole", "tiny", progress=False)
    assert [path.name for path in whole.glob("*.safetensors")] == ["model.safetensors"]
    theirs = _tensors(whole)
    assert all(torch.equal(tensors[name], theirs[name]) for name in expected)


def test_an_existing_model_is_kept(tmp_path):
    folder = write_scale_model(tmp_path / "model", "tiny", progress=False)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_scale_model(folder, "tiny", progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
