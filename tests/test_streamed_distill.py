"""Issue #44, items 2 and 3: a student that does not fit trains with its decoder layers read from the shards, forward
and backward, one at a time ([`streamed_student`]); its loss, its gradients and every step equal the in-memory
student's."""

import json

import pytest
import torch
from helpers import random_patch, tiny_family

from linearpatch.integration.distillation.streamed import streamed_student
from linearpatch.integration.distillation.trainer import get_patch_peft_model, top_k_kl_loss
from linearpatch.integration.shards import SafetensorsCheckpoint
from linearpatch.modeling import prune_layers

# A middle gap, an end gap (the patch before the final norm) and two gaps.
GAPS = {"middle": [2, 3], "end": [4, 5], "two": [1, 4]}


def checkpoint_of(tmp_path, family: str, layers: list[int]):
    dense = tiny_family(family, seed=1)
    count = len({(layer - index) for index, layer in enumerate(layers)})  # contiguous runs: one patch each
    patches = [random_patch(dense.config.hidden_size, seed) for seed in range(3, 3 + count)]
    pruned = prune_layers(dense, layers, patches=patches)
    pruned.save_pretrained(tmp_path / "student")
    return tmp_path / "student", pruned.config.vocab_size


def loss_and_gradients(model, input_ids, values, indices):
    model = get_patch_peft_model(model)
    loss = top_k_kl_loss(model(input_ids=input_ids, use_cache=False).logits, values, indices)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gaps", GAPS)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_streamed_student_has_the_in_memory_loss_and_gradients(tmp_path, family, gaps):
    from transformers import AutoModelForCausalLM

    folder, vocab = checkpoint_of(tmp_path, family, GAPS[gaps])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 12), generator=generator)
    values, indices = (
        torch.randn(2, 12, 8, generator=generator),
        torch.randint(0, vocab, (2, 12, 8), generator=generator),
    )
    whole = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    expected_loss, expected = loss_and_gradients(whole, input_ids, values, indices)
    with streamed_student(folder, torch.float32, "cpu") as student:
        loss, gradients = loss_and_gradients(student, input_ids, values, indices)
        # Between steps only the patches, the final norm and the head hold weights.
        held = {name for name, p in student.named_parameters() if p.device.type != "meta"}
        assert all("linear_patch" in name or name.startswith(("model.norm", "lm_head")) for name in held), held
    assert loss == pytest.approx(expected_loss, abs=1e-5) and gradients.keys() == expected.keys()
    assert len(gradients) == len({(layer - index) for index, layer in enumerate(GAPS[gaps])})
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, expected[name], atol=1e-5) and gradient.abs().max() > 0, name


def test_distill_streamed_trains_the_same_patch(tiny_checkpoint, tiny_pruned, tmp_path, linearpatch_cli):
    """`distill --sequential` (also chosen when the student exceeds --max-memory) trains the same patches as the
    in-memory student over the same steps, and writes the checkpoint tensor by tensor."""
    common = ["--teacher", tiny_checkpoint, "--top-k", "8", "--num-samples", "6", "--seq-len", "16", "--device", "cpu"]
    common += ["--cache-dir", tmp_path / "cache", "--lr", "1e-2"]
    outputs = {}
    for route, flags in (("memory", []), ("streamed", ["--sequential"]), ("limited", ["--max-memory", "100KB"])):
        outputs[route] = tmp_path / route
        run = linearpatch_cli("distill", tiny_pruned, *common, *flags, "--output", outputs[route])
        assert run.returncode == 0, run.stderr
    assert "does not fit" in run.stderr  # the student exceeded --max-memory: chosen by outcome, and said
    written = {route: SafetensorsCheckpoint(folder) for route, folder in outputs.items()}
    source = SafetensorsCheckpoint(tiny_pruned)
    assert written["streamed"].keys() == written["memory"].keys()
    for name in written["memory"].keys():
        trained = written["memory"].read(name)
        for route in ("streamed", "limited"):
            if ".linear_patch." in name:
                assert torch.allclose(written[route].read(name), trained, atol=1e-4), (route, name)
                assert not torch.allclose(trained, source.read(name))  # it trained
            else:
                assert torch.equal(written[route].read(name), trained), (route, name)
    configs = [json.loads((folder / "config.json").read_text()) for folder in outputs.values()]
    assert all(config["patch_kind"] == configs[0]["patch_kind"] for config in configs)


def test_a_step_reads_each_layer_once_forward_and_once_backward(tmp_path, monkeypatch):
    """Per step, every decoder layer is read once for the forward and, from the first patch on, once more for the
    backward, the next one read ahead in a background thread; no read is wasted."""
    from linearpatch.integration.distillation import streamed

    folder, vocab = checkpoint_of(tmp_path, "llama", [2, 3])  # kept layers 0..3, the patch before kept layer 2
    reads = []
    original = streamed._frozen_state
    monkeypatch.setattr(
        streamed, "_frozen_state", lambda layerwise, name: reads.append(name) or original(layerwise, name)
    )
    input_ids = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    values, indices = torch.randn(1, 8, 4), torch.randint(0, vocab, (1, 8, 4))
    with streamed_student(folder, torch.float32, "cpu") as student:
        model = get_patch_peft_model(student)
        for _ in range(2):  # the second step too: what the first read ahead at its end is not left over
            reads.clear()
            top_k_kl_loss(model(input_ids=input_ids, use_cache=False).logits, values, indices).backward()
            assert sorted(reads) == sorted([f"model.layers.{i}" for i in (0, 1, 2, 3, 2, 3)]), reads


def test_the_stream_cache_starts_every_step_at_the_first_patch(
    tiny_checkpoint, tiny_pruned, tmp_path, linearpatch_cli
):
    """Issue #44 item 1: the teacher cache also holds the dense stream entering the first patch's layer (the student's
    own stream there: the layers before the gap are the dense model's), and every step starts from it instead of
    running those layers. In memory and streamed, the trained patch equals the one trained from the tokens."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from linearpatch.integration.measurement.capture import recording

    common = ["--teacher", tiny_checkpoint, "--top-k", "8", "--num-samples", "6", "--seq-len", "16", "--device", "cpu"]
    common += ["--lr", "1e-2"]
    outputs = {}
    for route, flags in (("tokens", ["--no-stream-cache"]), ("stream", []), ("streamed", ["--sequential"])):
        outputs[route] = tmp_path / route
        run = linearpatch_cli(
            "distill", tiny_pruned, *common, *flags, "--cache-dir", tmp_path / "cache", "--output", outputs[route]
        )
        assert run.returncode == 0, run.stderr
        assert ("stream entering layer 2" in run.stdout) == (route == "stream")  # said once, when it is written
    trained = {route: SafetensorsCheckpoint(folder) for route, folder in outputs.items()}
    (name,) = [key for key in trained["tokens"].keys() if ".linear_patch." in key]
    for route in ("stream", "streamed"):
        assert torch.allclose(trained[route].read(name), trained["tokens"].read(name), atol=1e-4), route

    saved = json.loads((outputs["streamed"] / "linearpatch_distill.json").read_text())
    assert saved["streamed"] and saved["stream"]["layers_skipped"] == 2 and saved["stream"]["bytes_saved_per_step"] > 0
    assert json.loads((outputs["tokens"] / "linearpatch_distill.json").read_text())["stream"] == {}
    (manifest,) = [
        m for m in (tmp_path / "cache").glob("*/manifest.json") if json.loads(m.read_text()).get("stream_layer")
    ]
    assert json.loads(manifest.read_text())["stream_layer"] == 2
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    for shard in manifest.parent.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            input_ids, stream = handle.get_tensor("input_ids").long(), handle.get_tensor("stream")
        with torch.no_grad(), recording({2: dense.model.layers[2]}) as records:
            dense(input_ids=input_ids, use_cache=False)
        assert torch.allclose(stream, torch.cat(records[2]), atol=1e-5)
