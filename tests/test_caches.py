"""Issue #44, item 6: every cache is a cache. The teacher cache, the token streams and the Wikipedia articles (and
the generated text, in test_generated.py): one whose files or manifest are damaged is rebuilt, with one warning line
that names what was wrong and where. It is never used, and never ends a run in a traceback."""

import json
import logging

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import save_file

from linearpatch.integration.data import token_windows
from linearpatch.integration.distillation.teacher_cache import build_teacher_cache

DAMAGE = {
    "not JSON": '{"shards": [',
    "not an object": "[1, 2]",
    "entries without their fields": json.dumps({"shards": [{"file": "shard-00000.safetensors"}], "complete": True}),
    "binary": "\x00\xff\x00",
}


def damaged_lines(caplog) -> list[str]:
    return [message for message in caplog.messages if "is damaged" in message]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_teacher_manifest_is_rebuilt_with_one_line(tmp_path, caplog, damage):
    teacher = tiny_llama(seed=1)
    input_ids = torch.randint(3, 256, (5, 8), generator=torch.Generator().manual_seed(0))
    cache = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    shards = [shard["sha256"] for shard in cache.manifest["shards"]]
    manifest = cache.path / "manifest.json"
    manifest.write_text(DAMAGE[damage], encoding="latin-1")
    with caplog.at_level(logging.WARNING, logger="linearpatch"):
        rebuilt = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    (line,) = damaged_lines(caplog)
    assert str(manifest) in line and "teacher cache" in line
    assert rebuilt.path == cache.path and rebuilt.manifest["complete"]
    assert [shard["sha256"] for shard in rebuilt.manifest["shards"]] == shards  # the same content, written again
    assert json.loads(manifest.read_text())["complete"]


def test_a_damaged_teacher_shard_is_rebuilt_with_one_line(tmp_path, caplog):
    teacher = tiny_llama(seed=1)
    input_ids = torch.randint(3, 256, (5, 8), generator=torch.Generator().manual_seed(0))
    cache = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    shard = cache.path / cache.manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    with caplog.at_level(logging.WARNING, logger="linearpatch"):
        rebuilt = build_teacher_cache(teacher, input_ids, tmp_path, top_k=10, shard_windows=2, progress=False)
    (line,) = damaged_lines(caplog)
    assert str(shard) in line and rebuilt.manifest["shards"] == cache.manifest["shards"]


def test_distill_on_a_damaged_teacher_cache_rebuilds_it(tiny_checkpoint, tiny_pruned, tmp_path, linearpatch_cli):
    """As a new user met it: a damaged manifest used to end every later `distill` on that cache in the teacher
    process's traceback. Now the run rebuilds the cache, says so in one line, and trains."""
    common = ["--teacher", tiny_checkpoint, "--top-k", "8", "--num-samples", "4", "--seq-len", "16", "--device", "cpu"]
    common += ["--cache-dir", tmp_path / "cache"]
    assert linearpatch_cli("distill", tiny_pruned, *common, "--output", tmp_path / "first").returncode == 0
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    manifest.write_text('{"format": 3, "shards": [{"file": ')
    run = linearpatch_cli("distill", tiny_pruned, *common, "--output", tmp_path / "second")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if "is damaged" in line]
    assert str(manifest) in line
    assert (tmp_path / "second" / "model.safetensors").exists() and json.loads(manifest.read_text())["complete"]


@pytest.mark.parametrize("damage", ["truncated", "other tokens"])
def test_a_damaged_token_stream_is_rebuilt_with_one_line(tmp_path, monkeypatch, smollm2_tokenizer, caplog, damage):
    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path))
    expected = token_windows("lee-news", smollm2_tokenizer, 3, 16, seed=2).input_ids
    (cached,) = (tmp_path / "tokens").glob("*.safetensors")
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:100])
    else:  # a well-formed file whose tokens are not the ones written under that SHA-256
        from safetensors import safe_open

        with safe_open(str(cached), framework="pt") as handle:
            stream, metadata = handle.get_tensor("input_ids"), handle.metadata()
        save_file({"input_ids": stream.flip(0).contiguous()}, str(cached), metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="linearpatch"):
        again = token_windows("lee-news", smollm2_tokenizer, 3, 16, seed=2).input_ids
    assert torch.equal(again, expected)
    (line,) = damaged_lines(caplog)
    assert str(cached) in line and "token cache" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="linearpatch"):
        assert torch.equal(token_windows("lee-news", smollm2_tokenizer, 3, 16, seed=2).input_ids, expected)
    assert not damaged_lines(caplog)  # rebuilt once, then read


def test_a_damaged_wikipedia_cache_is_rebuilt_with_one_line(tmp_path, monkeypatch, caplog):
    from linearpatch.integration.data import _wikipedia_articles

    monkeypatch.setenv("LINEARPATCH_CACHE", str(tmp_path))
    cached = tmp_path / "corpora" / "wikipedia-articles.json"
    cached.parent.mkdir(parents=True)
    cached.write_text('["Anarchism\\nAnarchism is')
    with caplog.at_level(logging.WARNING, logger="linearpatch"):
        articles = _wikipedia_articles()
    assert len(articles) > 100 and all(isinstance(article, str) for article in articles)
    (line,) = damaged_lines(caplog)
    assert str(cached) in line
    assert json.loads(cached.read_text()) == articles
