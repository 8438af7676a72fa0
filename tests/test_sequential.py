"""Models larger than the machine: layer-by-layer calibration and streaming prune give what the in-memory path gives.

The in-memory pass (the whole dense model loaded, one window per forward) is the reference. The sequential pass
reads one layer at a time from the safetensors shards and streams the pruned tensors to the output.
"""

import json
import shutil

import pytest
import torch
from helpers import SMOLLM2_PRUNE, tiny_family
from safetensors.torch import load_file

from linearpatch.common.errors import CheckpointMismatchError
from linearpatch.integration.layerwise import layerwise_model
from linearpatch.integration.pruning import calibrate
from linearpatch.integration.shards import SafetensorsCheckpoint, parse_size

FAMILIES = ["llama", "gemma3_text", "qwen2"]


def weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, sharded or not."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_checkpoint(sequential, in_memory):
    """Patches equal to 1e-5 relative, every other tensor identical, and the same config."""
    a, b = weights(sequential), weights(in_memory)
    assert a.keys() == b.keys()
    for name in a:
        if "linear_patch" in name:
            assert (a[name] - b[name]).norm() <= 1e-5 * b[name].norm(), name
        else:
            assert torch.equal(a[name], b[name]), name
    assert json.loads((sequential / "config.json").read_text()) == json.loads((in_memory / "config.json").read_text())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layerwise_statistics_equal_in_memory(tmp_path, model_type):
    dense = tiny_family(model_type, 6)
    with torch.no_grad():  # a massive-activation channel, as Gemma 3 carries: found alike in both passes
        dense.get_input_embeddings().weight[:, 5] = 300.0
    dense.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards, with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    distances, blocks = (1, 2, 4), [(1, 3), (2, 3), (4, 6)]
    reference = calibrate(dense, windows, distances, blocks, batch_size=1, progress=False)
    with layerwise_model(tmp_path, chunk_size=2, progress=False) as model:
        assert all(p.device.type == "meta" for p in model.parameters())  # nothing loaded up front
        statistics = calibrate(model, windows, distances, blocks, batch_size=5, progress=False)
        assert all(p.device.type == "meta" for p in model.parameters())  # and every layer freed
    for name in ("cosine", "angular", "channel_abs_mean", "rotated_abs_mean", "rotated_rest_abs_mean"):
        expected, got = getattr(reference, name), getattr(statistics, name)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    assert torch.equal(statistics.massive_channels, reference.massive_channels)
    assert reference.massive_channels[:, 5].all()
    for block in blocks:
        for expected, got in zip(reference.gram[block], statistics.gram[block], strict=True):
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_layerwise_stops_early_and_spills_to_disk(tmp_path, caplog):
    dense = tiny_family("llama", 6)
    dense.save_pretrained(tmp_path)
    windows = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    reference = calibrate(dense, windows, (1,), [(2, 4)], batch_size=1, progress=False, last_layer=4)
    # A budget of one byte: every activation goes to a memory-mapped file, and the log says so.
    with caplog.at_level("WARNING", logger="linearpatch"):
        with layerwise_model(tmp_path, memory_budget=1, progress=False) as model:
            statistics = calibrate(model, windows, (1,), [(2, 4)], batch_size=4, progress=False, last_layer=4)
            assert model.layerwise.store_location == "disk"
    assert "spill to memory-mapped files" in caplog.text
    torch.testing.assert_close(statistics.channel_abs_mean, reference.channel_abs_mean, rtol=1e-5, atol=0)
    assert statistics.channel_abs_mean[:, 5:].abs().sum() == 0  # layers after the last one needed never ran
    torch.testing.assert_close(statistics.gram[(2, 4)][1], reference.gram[(2, 4)][1], rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def sharded_dense(tmp_path_factory, smollm2_tokenizer):
    """A tiny Qwen2 (biases, sliding windows) with a real tokenizer, in shards of 200 KB with an index."""
    path = tmp_path_factory.mktemp("sharded-dense")
    model = tiny_family("qwen2", 6, tied=False, seed=5, vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(path, max_shard_size="200KB")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded_pruned(tmp_path_factory, sharded_dense):
    """`sharded_dense` pruned (layers 2-3, Hadamard patch) by the CLI: what distill and export start from."""
    from linearpatch.cli import main

    pruned = tmp_path_factory.mktemp("sharded-pruned") / "pruned"
    assert (
        main(
            ["prune", str(sharded_dense), "--layers", "2-3", "--num-samples", "3", "--seq-len", "32"]
            + ["--output", str(pruned)]
        )
        == 0
    )
    return pruned


@pytest.mark.parametrize("patch", ["hadamard", "lstsq"])
def test_cli_sequential_prune_writes_the_in_memory_tensors(tmp_path, sharded_dense, patch, linearpatch_cli):
    common = ["prune", str(sharded_dense), "--num-layers", "2", "--patch", patch, "--num-samples", "4"]
    common += ["--seq-len", "32"]
    in_memory = linearpatch_cli(*common, "--output", str(tmp_path / "memory"))
    assert in_memory.returncode == 0, in_memory.stderr
    sequential = linearpatch_cli(
        *common, "--sequential", "--max-shard-size", "300KB", "--output", str(tmp_path / "seq")
    )
    assert sequential.returncode == 0, sequential.stderr
    assert "layers" in sequential.stderr  # the per-layer progress bar
    index = json.loads((tmp_path / "seq" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # a sharded output, as save_pretrained writes it
    assert_same_checkpoint(tmp_path / "seq", tmp_path / "memory")
    report = json.loads((tmp_path / "seq" / "linearpatch_report.json").read_text())
    assert report["calibration"]["sequential"] is True
    assert (
        report["pruned_layers"]
        == json.loads((tmp_path / "memory" / "linearpatch_report.json").read_text())["pruned_layers"]
    )

    # The sharded output loads like any checkpoint and gives the in-memory output's logits.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    logits = [
        AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True)(ids).logits
        for name in ("seq", "memory")
    ]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_cli_max_memory_goes_sequential(tmp_path, sharded_dense, linearpatch_cli):
    common = ["prune", str(sharded_dense), "--layers", "2-3", "--num-samples", "3", "--seq-len", "32"]
    plain = linearpatch_cli(*common, "--output", str(tmp_path / "memory"))
    assert plain.returncode == 0, plain.stderr
    assert "layer by layer" not in plain.stderr
    limited = linearpatch_cli(*common, "--max-memory", "100KB", "--output", str(tmp_path / "limited"))
    assert limited.returncode == 0, limited.stderr
    assert "does not fit in 100.0 KB (--max-memory): running it layer by layer (--sequential)" in limited.stderr
    assert_same_checkpoint(tmp_path / "limited", tmp_path / "memory")
    refused = linearpatch_cli(
        *common, "--max-memory", "100KB", "--no-sequential", "--output", str(tmp_path / "refused")
    )
    assert refused.returncode != 0 and "--max-memory" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "refused").exists()
    evaluating = linearpatch_cli(
        *common, "--sequential", "--eval-windows", "2", "--output", str(tmp_path / "evaluated")
    )
    assert evaluating.returncode != 0 and "linearpatch eval" in evaluating.stderr
    assert not (tmp_path / "evaluated").exists()


@pytest.mark.slow
def test_cli_sequential_on_smollm2(tmp_path, smollm2_pruned, linearpatch_cli):
    """The real model: a `--max-memory` below its size goes sequential and writes the tensors of the shared in-memory
    prune (same flags)."""
    result = linearpatch_cli(*SMOLLM2_PRUNE, "--max-memory", "200MB", "--output", str(tmp_path / "limited"))
    assert result.returncode == 0, result.stderr
    assert "layer by layer (--sequential)" in result.stderr
    assert_same_checkpoint(tmp_path / "limited", smollm2_pruned)


def test_missing_or_truncated_shard_is_refused_before_any_output(tmp_path, sharded_dense, linearpatch_cli):
    index = json.loads((sharded_dense / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))

    missing = tmp_path / "missing"
    shutil.copytree(sharded_dense, missing)
    (missing / shards[1]).unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(sharded_dense, truncated)
    data = (truncated / shards[-1]).read_bytes()
    (truncated / shards[-1]).write_bytes(data[: len(data) - 100])

    for folder, message in ((missing, f"missing ({shards[1]})"), (truncated, "is truncated")):
        with pytest.raises(CheckpointMismatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SafetensorsCheckpoint(folder)
        # Through the CLI: the sequential path for one, the in-memory path for the other (both check first).
        flags = ["--sequential"] if folder == missing else []
        output = tmp_path / f"out-{folder.name}"
        result = linearpatch_cli("prune", str(folder), "--layers", "2", *flags, "--output", str(output))
        assert result.returncode != 0
        assert message in result.stderr and "download" in result.stderr.lower() and "Traceback" not in result.stderr
        assert not output.exists()


def test_parse_size():
    assert parse_size("200MB") == 200 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("80gb") == 80 * 10**9
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="200MB"):
        parse_size("lots")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_layerwise_teacher_cache_equals_in_memory(tmp_path, model_type):
    from linearpatch.integration.distillation.teacher_cache import TeacherCacheDataset, build_teacher_cache

    dense = tiny_family(model_type, 6, tied=model_type == "llama", seed=2)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    # With the stream entering layer 3 (issue #44: copied before the layerwise pass overwrites it in place).
    options = dict(top_k=8, shard_windows=2, batch_size=2, progress=False, stream_layer=3)
    reference = TeacherCacheDataset(build_teacher_cache(dense, ids, tmp_path / "memory", **options))
    with layerwise_model(tmp_path / "dense", progress=False) as teacher:
        cache = build_teacher_cache(teacher, ids, tmp_path / "layerwise", **options)
        assert all(p.device.type == "meta" for p in teacher.parameters())
    assert cache.manifest["complete"] and cache.num_windows == 5
    for index in range(5):
        expected, got = reference[index], TeacherCacheDataset(cache)[index]
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["teacher_indices"], expected["teacher_indices"])
        torch.testing.assert_close(got["teacher_values"], expected["teacher_values"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["stream"], expected["stream"], rtol=1e-5, atol=1e-5)


def test_cli_distill_with_a_teacher_larger_than_max_memory(tmp_path, sharded_dense, sharded_pruned, linearpatch_cli):
    pruned = sharded_pruned
    common = ["distill", str(pruned), "--teacher", str(sharded_dense), "--num-samples", "4", "--seq-len", "32"]
    common += ["--max-steps", "2", "--lr", "1e-2", "--top-k", "16", "--cache-dir", str(tmp_path / "cache")]
    limited = linearpatch_cli(*common, "--max-memory", "100KB", "--output", str(tmp_path / "limited"))
    assert limited.returncode == 0, limited.stderr
    assert "the teacher" in limited.stderr and "layer by layer (--sequential)" in limited.stderr
    cache = next(path for path in (tmp_path / "cache").iterdir() if path.is_dir())
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    # The patches trained (that cache holds what the in-memory teacher gives: the test above).
    a, before = weights(tmp_path / "limited"), weights(pruned)
    patch = next(name for name in a if "linear_patch" in name)
    assert (a[patch] - before[patch]).norm() > 1e-4


def test_student_device_map_only_when_it_does_not_fit():
    from linearpatch.integration.distillation.job import choose_device_map

    assert choose_device_map(10**6, "cuda:1", "200MB") == {}
    spread = choose_device_map(10**9, "cuda:1", "200MB")
    assert spread["device_map"] == "auto" and spread["max_memory"][1] == 200 * 10**6 and "cpu" in spread["max_memory"]
    assert choose_device_map(10**9, "cpu", "200MB") == {}  # nowhere to spread to on a CPU


@pytest.mark.parametrize("fold", ["down-proj", "scalar", "auto", "down-proj-rotated"])
def test_cli_sequential_export_writes_the_in_memory_tensors(
    tmp_path, sharded_dense, sharded_pruned, fold, linearpatch_cli
):
    pruned = sharded_pruned
    common = ["export", str(pruned), "--fold", fold, "--num-samples", "3", "--seq-len", "32", "--eval-windows", "1"]
    if fold in ("auto", "down-proj-rotated"):  # the dense objectives, fitted to a dense model run layer by layer too
        common += ["--dense", str(sharded_dense)]
    in_memory = linearpatch_cli(*common, "--output", str(tmp_path / "memory"))
    assert in_memory.returncode == 0, in_memory.stderr
    limited = linearpatch_cli(
        *common, "--max-memory", "100KB", "--max-shard-size", "300KB", "--output", str(tmp_path / "seq")
    )
    assert limited.returncode == 0, limited.stderr
    assert "the checkpoint" in limited.stderr and "layer by layer (--sequential)" in limited.stderr
    assert "held-out comparison" in limited.stderr
    assert (tmp_path / "seq" / "model.safetensors.index.json").exists()
    a, b = weights(tmp_path / "seq"), weights(tmp_path / "memory")
    assert a.keys() == b.keys() and not any("linear_patch" in name for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    seq_config = json.loads((tmp_path / "seq" / "config.json").read_text())
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert seq_config == memory_config and seq_config["model_type"] == "qwen2"
    folds = [
        json.loads((tmp_path / name / "linearpatch_export.json").read_text())["folds"] for name in ("seq", "memory")
    ]
    # The same fold from the same windows; floats (fit error, held-out scores) up to the order of the sums.
    numbers = [[{k: v for k, v in item.items() if isinstance(v, float)} for item in found] for found in folds]
    words = [[{k: v for k, v in item.items() if not isinstance(v, float | dict)} for item in found] for found in folds]
    scores = [[item.get("heldout_perplexity", {}) for item in found] for found in folds]
    assert words[0] == words[1] and len(numbers[0]) == len(numbers[1])
    for seq, memory in zip(numbers[0] + scores[0], numbers[1] + scores[1], strict=True):
        assert seq == pytest.approx(memory, rel=1e-5)
    assert fold != "auto" or len(scores[0][0]) == 4


# Issue #33: choosing by outcome (`--patch auto`, `--metric loss` / `kl`, a target ratio) layer by layer, as large
# models need it, scores every candidate as the in-memory search does.
@pytest.mark.parametrize(
    "model_type, choice",
    [
        ("llama", dict(num_layers=2, metric="cosine", patch="auto")),
        ("gemma3_text", dict(num_layers=2, metric="kl", patch="auto", score="kl", candidates=3)),
        ("qwen2", dict(num_layers=1, metric="loss", patch="hadamard", candidates=0)),
        ("llama", dict(target_ppl_ratio=1.5, metric="loss", patch="auto", candidates=2)),
    ],
)
def test_layerwise_choice_by_outcome_equals_in_memory(tmp_path, model_type, choice):
    from linearpatch.integration.pruning.plan import plan_pruning
    from linearpatch.integration.requests import PruneRequest

    dense = tiny_family(model_type, 6)
    dense.save_pretrained(tmp_path, max_shard_size="100KB")
    from linearpatch.integration.data import TokenWindows

    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(3))
    windows = TokenWindows(ids, "random tokens", "random", 3, ids.numel())
    request = PruneRequest(model="tiny", calibration=windows, holdout=3, progress=False, **choice)
    expected = plan_pruning(dense, windows, request, None)
    with layerwise_model(tmp_path, chunk_size=3, progress=False) as model:
        got = plan_pruning(model, windows, request, None)
        assert all(p.device.type == "meta" for p in model.parameters())  # every layer freed
    assert got.layers == expected.layers and got.patch_kind == expected.patch_kind
    assert [c.to_dict()["label"] for c in got.choices] == [c.to_dict()["label"] for c in expected.choices]
    for mine, theirs in zip(got.choices, expected.choices, strict=True):
        assert mine.scores.keys() == theirs.scores.keys()
        for label, value in theirs.scores.items():
            assert mine.scores[label] == pytest.approx(value, rel=1e-5), label
        for label, value in theirs.kl_scores.items():
            assert mine.kl_scores[label] == pytest.approx(value, rel=1e-4, abs=1e-7), label
    assert got.holdout["dense_perplexity"] == pytest.approx(expected.holdout["dense_perplexity"], rel=1e-5)
    for mine, theirs in zip(got.patches or [], expected.patches or [], strict=True):
        assert (mine - theirs).norm() <= 1e-5 * theirs.norm()
    assert [row["num_layers"] for row in got.depth_curve] == [row["num_layers"] for row in expected.depth_curve]


# Issue #33: `eval --max-memory` scores models larger than the limit layer by layer, with the figures of the in-memory
# run, and refuses what needs a model whole.
def test_cli_eval_layer_by_layer_equals_in_memory(tmp_path, sharded_dense, sharded_pruned, linearpatch_cli):
    common = ["eval", str(sharded_pruned), "--baseline", str(sharded_dense), "--tasks", "--ppl-windows", "2"]
    common += ["--seq-len", "32", "--gen-prompts", "0"]
    in_memory = linearpatch_cli(*common, "--output", tmp_path / "memory")
    assert in_memory.returncode == 0, in_memory.stderr
    limited = linearpatch_cli(*common, "--max-memory", "100KB", "--output", tmp_path / "limited")
    assert limited.returncode == 0, limited.stderr
    assert "does not fit in 100.0 KB (--max-memory): running it layer by layer" in limited.stderr
    assert "layers" in limited.stderr  # the per-layer progress bar
    expected, got = (
        json.loads((tmp_path / name / "linearpatch_eval.json").read_text()) for name in ("memory", "limited")
    )
    assert len(got["models"]) == len(expected["models"]) == 2
    for mine, theirs in zip(got["models"], expected["models"], strict=True):
        assert mine["parameters"] == theirs["parameters"] and mine["num_layers"] == theirs["num_layers"]
        for corpus, value in theirs["perplexity"].items():
            assert mine["perplexity"][corpus] == pytest.approx(value, rel=1e-5), corpus
        for corpus, figures in theirs["closeness"].items():
            for name, value in figures.items():
                assert mine["closeness"][corpus][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (corpus, name)
    # lm-eval tasks and greedy generation need the model whole: one line each, nothing written.
    for extra, fragment in (
        (["--tasks", "wiki_last_word"], "--tasks with no names"),
        (["--gen-prompts", "2"], "--gen-prompts 0"),
    ):
        refused = linearpatch_cli(*common, *extra, "--max-memory", "100KB", "--output", tmp_path / "refused")
        assert refused.returncode == 2 and fragment in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "refused").exists()


# Issue #33: --max-memory bounds what a layer-by-layer model holds: two layers while the next is read ahead (one when
# two do not fit), and the activation store takes what is left before it spills to disk.
def test_max_memory_bounds_the_layers_and_the_activations(tmp_path, caplog):
    dense = tiny_family("llama", 6)
    dense.save_pretrained(tmp_path)
    windows = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(4))
    reference = calibrate(dense, windows, (1,), [(2, 4)], batch_size=1, progress=False)
    layer = SafetensorsCheckpoint(tmp_path).nbytes(torch.float32, "model.layers.0.")
    with layerwise_model(tmp_path, max_memory=100 * layer, progress=False) as model:
        assert model.layerwise.read_ahead and model.layerwise.memory_budget == 98 * layer
    with layerwise_model(tmp_path, max_memory=3 * layer // 2, progress=False) as model:
        assert not model.layerwise.read_ahead and model.layerwise.memory_budget == 3 * layer // 2 - layer
    with caplog.at_level("WARNING", logger="linearpatch"):
        with layerwise_model(tmp_path, max_memory=layer // 2, progress=False) as model:
            assert not model.layerwise.read_ahead and model.layerwise.memory_budget == 0
            statistics = calibrate(model, windows, (1,), [(2, 4)], batch_size=4, progress=False)
            assert model.layerwise.store_location == "disk"
    assert "is larger than --max-memory" in caplog.text and "spill to memory-mapped files" in caplog.text
    torch.testing.assert_close(statistics.channel_abs_mean, reference.channel_abs_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(statistics.gram[(2, 4)][1], reference.gram[(2, 4)][1], rtol=1e-5, atol=1e-8)
