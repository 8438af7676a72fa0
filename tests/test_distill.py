"""Patch-only distillation: top-K cache, loss, PEFT adapter, Trainer resume, CLI."""

import json
import math

import pytest
import torch
from helpers import random_patch, tiny_llama
from transformers import AutoModelForCausalLM, TrainerCallback

from linearpatch.common.remote_check import logits_without_package
from linearpatch.integration.distillation.teacher_cache import (
    TeacherCacheDataset,
    TopKTeacherCache,
    build_teacher_cache,
    index_dtype,
)
from linearpatch.integration.distillation.trainer import distill, get_patch_peft_model, top_k_kl_loss
from linearpatch.modeling import prune_layers


def windows(count=6, length=12, seed=0):
    return torch.randint(3, 256, (count, length), generator=torch.Generator().manual_seed(seed))


def test_loss_equals_hand_computation():
    student = torch.tensor([[2.0, 0.5, -1.0, 3.0, 0.0]])
    teacher_values = torch.tensor([[-0.2, -1.9, -3.0]])  # log-probabilities at the indices below
    indices = torch.tensor([[3, 0, 1]])
    p = [math.exp(v) for v in teacher_values[0].tolist()]
    p = [x / sum(p) for x in p]
    s = [3.0, 2.0, 0.5]
    q = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]
    expected = sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q, strict=True))
    assert top_k_kl_loss(student, teacher_values, indices).item() == pytest.approx(expected, abs=1e-6)
    # Temperature 2: both sides divided by T before renormalising.
    p2 = [math.exp(v / 2) for v in teacher_values[0].tolist()]
    p2 = [x / sum(p2) for x in p2]
    q2 = [math.exp(x / 2) / sum(math.exp(y / 2) for y in s) for x in s]
    expected2 = sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p2, q2, strict=True))
    assert top_k_kl_loss(student, teacher_values, indices, temperature=2.0).item() == pytest.approx(
        expected2, abs=1e-6
    )
    # Identical distributions: zero loss.
    same = torch.log_softmax(student.gather(-1, indices), -1)
    assert top_k_kl_loss(student, same, indices).item() == pytest.approx(0.0, abs=1e-7)


def test_only_the_patches_train(capsys):
    pruned = prune_layers(tiny_llama(), [1, 2, 5], patches=[random_patch(64, 1), random_patch(64, 2)])
    model = get_patch_peft_model(pruned)
    model.print_trainable_parameters()
    assert "trainable params: 8,192 " in capsys.readouterr().out  # 2 gaps x 64^2
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all("linear_patch" in name for name in trainable)
    input_ids = windows(2)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert sorted(with_grad) == sorted(trainable)


def test_cache_size_dtype_key_and_resume(tmp_path):
    teacher = tiny_llama(vocab_size=300)
    input_ids = windows(6, 12)
    cache = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    assert cache.num_windows == 6 and index_dtype(300) == torch.int16 and index_dtype(49152) == torch.uint16
    assert index_dtype(128256) == torch.int32
    # Whole folder (shards with their token ids and headers, manifest) vs tokens x K x (2 value + 2 index bytes).
    sized = build_teacher_cache(teacher, windows(8, 32), tmp_path / "sized", top_k=50, progress=False)
    on_disk = sum(file.stat().st_size for file in sized.path.iterdir())
    expected = 8 * 32 * 50 * (2 + 2)
    assert sized.bytes_per_token == 200 and abs(on_disk - expected) / expected < 0.10
    example = TeacherCacheDataset(cache)[3]
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher(input_ids[3:4]).logits[0], -1)
    top = log_probs.topk(10, -1)
    assert torch.equal(example["teacher_indices"], top.indices)
    assert torch.allclose(example["teacher_values"], top.values, atol=1e-2)
    assert torch.equal(example["input_ids"], input_ids[3])

    # Same inputs -> same folder; any changed input -> a different one.
    again = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    assert again.path == cache.path
    assert build_teacher_cache(teacher, input_ids, tmp_path, top_k=5, progress=False).path != cache.path
    assert build_teacher_cache(teacher, windows(6, 12, seed=1), tmp_path, top_k=10, progress=False).path != cache.path
    other = tiny_llama(vocab_size=300, seed=9)
    assert build_teacher_cache(other, input_ids, tmp_path, top_k=10, progress=False).path != cache.path

    # Interrupted build (last shard missing, manifest not complete) and a corrupt shard: only those are redone.
    manifest = json.loads((cache.path / "manifest.json").read_text())
    good = manifest["shards"][0]["sha256"]
    (cache.path / "shard-00002.safetensors").unlink()
    manifest.update(complete=False, shards=manifest["shards"][:2])
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    corrupt = cache.path / "shard-00001.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-7])
    with pytest.raises(ValueError, match="incomplete"):
        TopKTeacherCache.open(cache.path)
    calls = []
    original = teacher.forward
    teacher.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    rebuilt = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    assert len(calls) == 4  # shards 1 and 2 (two windows each), not shard 0
    assert rebuilt.manifest["shards"][0]["sha256"] == good
    assert TopKTeacherCache.open(rebuilt.path).num_windows == 6
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="missing or corrupt"):
        TopKTeacherCache.open(rebuilt.path)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _student():
    return prune_layers(tiny_llama(seed=4), [2, 3], patches=[random_patch(64, 3)])


def _trained_patch(model):
    return next(p for n, p in model.named_parameters() if "linear_patch" in n and p.requires_grad).detach().clone()


def test_distillation_lowers_the_top_k_kl_on_its_windows(tmp_path):
    """Training works: the student's KL to the teacher's top-K on the training windows goes down. (How much it helps
    held-out text on SmolLM2 is the bench's `quality` claim.)"""
    teacher = tiny_llama(seed=4)
    cache = build_teacher_cache(teacher, windows(8, 16), tmp_path / "cache", top_k=16, progress=False)
    examples = [TeacherCacheDataset(cache)[index] for index in range(8)]

    def kl(model) -> float:
        with torch.no_grad():
            logits = [model(example["input_ids"][None]).logits for example in examples]
            losses = [
                top_k_kl_loss(row, example["teacher_values"][None], example["teacher_indices"][None])
                for row, example in zip(logits, examples, strict=True)
            ]
        return torch.stack(losses).mean().item()

    student = _student()
    before = kl(student)
    trained = distill(student, cache, tmp_path / "run", learning_rate=1e-2, num_train_epochs=3, disable_tqdm=True)
    after = kl(trained.merge_and_unload())
    assert after < 0.9 * before, (before, after)


def test_interrupted_and_resumed_training_gives_the_same_patch(tmp_path):
    teacher = tiny_llama(seed=4)
    cache = build_teacher_cache(teacher, windows(8, 10), tmp_path / "cache", top_k=16, progress=False)
    settings = dict(learning_rate=1e-2, disable_tqdm=True, use_cpu=True, logging_steps=100)
    straight = _trained_patch(distill(_student(), cache, tmp_path / "a", **settings))
    assert not torch.allclose(straight, random_patch(64, 3), atol=1e-4)  # it trained

    distill(_student(), cache, tmp_path / "b", callbacks=[StopAt(5)], save_strategy="steps", save_steps=3, **settings)
    assert (tmp_path / "b" / "checkpoint-3").exists()
    resumed = _trained_patch(
        distill(
            _student(),
            cache,
            tmp_path / "b",
            resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"),
            save_strategy="steps",
            save_steps=3,
            **settings,
        )
    )
    assert (resumed - straight).abs().max().item() <= 1e-5


def test_adapter_round_trip_with_stock_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    teacher = tiny_llama(seed=4)
    cache = build_teacher_cache(teacher, windows(4, 10), tmp_path / "cache", top_k=16, progress=False)
    student = _student()
    student.save_pretrained(tmp_path / "pruned")
    trained = distill(student, cache, tmp_path / "run", learning_rate=1e-2, disable_tqdm=True, use_cpu=True)
    input_ids = windows(1, 10, seed=5)
    with torch.no_grad():
        want = trained(input_ids=input_ids).logits
    trained.peft_config["default"].base_model_name_or_path = str(tmp_path / "pruned")
    trained.save_pretrained(tmp_path / "adapter")
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 64 * 64 * 4 + 4096  # just the patch

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", trust_remote_code=True)
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "LinearPatchForCausalLM"
    with torch.no_grad():
        assert (auto(input_ids=input_ids).logits - want).abs().max().item() <= 1e-5
        assert (merged(input_ids).logits - want).abs().max().item() <= 1e-5
    merged.save_pretrained(tmp_path / "merged")
    (got,) = logits_without_package([tmp_path / "merged"], input_ids)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("adapter_only", [False, True])
def test_distill_cli_never_loads_teacher_in_training_process(
    tiny_checkpoint, tiny_pruned, tmp_path, monkeypatch, adapter_only
):
    from transformers import AutoModelForCausalLM as Auto

    from linearpatch.cli import main

    loaded = []
    original = Auto.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(recording))
    output = tmp_path / "distilled"
    arguments = [
        "distill",
        str(tiny_pruned),
        "--teacher",
        str(tiny_checkpoint),
        "--output",
        str(output),
        "--top-k",
        "8",
        "--num-samples",
        "4",
        "--seq-len",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    assert main(arguments + (["--adapter-only"] if adapter_only else ["--activation-checkpointing"])) == 0
    assert loaded == [str(tiny_pruned)]  # only the student; the teacher ran in a child process
    recipe = json.loads((output / "linearpatch_distill.json").read_text())
    assert recipe["top_k"] == 8 and recipe["bytes_per_token"] == 8 * (2 + 2)
    if adapter_only:
        assert (output / "adapter_model.safetensors").exists() and not (output / "model.safetensors").exists()
    else:
        config = json.loads((output / "config.json").read_text())
        assert config["patch_kind"] == "hadamard+distilled" and (output / "modeling_linearpatch.py").exists()


def test_distill_export_trains_the_fold_maps_and_writes_a_stock_model(tiny_checkpoint, tiny_pruned, tmp_path):
    """`distill --export`: the maps start from the training-free auto fold (fitted to the teacher), only they train,
    and the result is the family's stock architecture, equal to the trained student it folds and loadable without
    remote code or the package."""
    from safetensors.torch import load_file

    from linearpatch.cli import main
    from linearpatch.common.remote_check import logits_without_package

    output, start = tmp_path / "distilled-export", tmp_path / "training-free"
    common = ["--num-samples", "8", "--seq-len", "16", "--eval-windows", "1", "--eval-corpus", "lee-news"]
    teacher = ["--teacher", str(tiny_checkpoint), "--top-k", "8", "--cache-dir", str(tmp_path / "cache")]
    arguments = ["distill", str(tiny_pruned), *teacher, "--export", "--output", str(output), *common]
    assert main(arguments + ["--lr", "1e-2"]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (output / "modeling_linearpatch.py").exists()
    record = json.loads((output / "linearpatch_export.json").read_text())
    (fold,) = record["folds"]
    assert fold["position"] == 2 and "(distilled)" in fold["how"]
    assert fold["objective"] == min(fold["heldout_perplexity"], key=fold["heldout_perplexity"].get)
    assert record["distilled"]["fold_check_max_logit_difference"] <= 1e-4
    assert record["distilled"]["training"]["kind"] == "export" and record["distilled"]["training"]["steps"] == 8
    assert set(record["perplexity"]) == {"patched", "training-free export", "export", "plain"}
    from linearpatch.hub_tools import model_card, validate_folder

    info = validate_folder(output)  # what `push` checks and writes on the card: the measured comparison
    card = str(model_card(info, "org/distilled-export"))
    assert info.kind == "export" and "distilled from" in card and "| training-free export |" in card
    # Training moved the folded map away from its training-free start (`export` on the same calibration windows: the
    # default sizes, as --num-samples and --seq-len size distill's training windows, and distill's seed), and only
    # the layer it folds into, the other writers of the (default 3, here 2) kept layers before the gap, and, for a
    # rotated fold, the frame folded into the layers after the gap and the head.
    writers = ["0.self_attn.o_proj", "0.mlp.down_proj", "1.self_attn.o_proj"]
    assert record["distilled"]["writer_maps"] == writers
    export = ["export", str(tiny_pruned), "--dense", str(tiny_checkpoint), "--output", str(start)]
    assert main([*export, *common[4:], "--seed", str(record["calibration"]["seed"])]) == 0
    assert json.loads((start / "linearpatch_export.json").read_text())["calibration"] == record["calibration"]
    assert json.loads((start / "linearpatch_export.json").read_text())["folds"][0]["objective"] == fold["objective"]
    trained, fitted = load_file(output / "model.safetensors"), load_file(start / "model.safetensors")
    changed = {key for key in trained if not torch.equal(trained[key], fitted[key])}
    assert fold["objective"] == "down-proj-rotated"  # what the frames' training is checked on
    after_gap = {key for key in trained if key.startswith(("model.layers.2.", "model.layers.3.", "lm_head."))}
    mapped = {"model.layers.1.mlp.down_proj.weight"} | {f"model.layers.{site}.weight" for site in writers}
    assert mapped <= changed and changed & after_gap
    assert changed <= mapped | after_gap
    input_ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    (got,) = logits_without_package([f"stock:{output}"], input_ids)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(output).eval()(input_ids).logits
    assert (got - want).abs().max().item() <= 1e-5
