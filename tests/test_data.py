import pytest
import torch

import linearpatch.integration.data as data
from linearpatch.integration.data import load_texts, token_windows


class CharacterTokenizer:
    """Minimal tokenizer (one id per byte) so that data tests need no model."""

    eos_token_id = 0

    def __call__(self, text: str | list[str], add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(one)["input_ids"] for one in text]}
        return {"input_ids": [b + 1 for b in text.encode()]}


def test_wikipedia_split_is_disjoint_by_article():
    calibration = load_texts("wikipedia-calibration")
    evaluation = load_texts("wikipedia-eval")
    assert len(calibration) > 3 * len(evaluation) > 30
    titles = {text.split("\n", 1)[0] for text in calibration}
    assert not titles & {text.split("\n", 1)[0] for text in evaluation}
    assert len(load_texts("lee-news")) > 100 and len(load_texts("pydoc")) > 50


def test_local_files_and_windows(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph here\n\nsecond paragraph there")
    (tmp_path / "b.jsonl").write_text('{"text": "one json line"}\n{"text": "another"}\n')
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph here", "second paragraph there"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["one json line", "another"]
    tokenizer = CharacterTokenizer()
    random_windows = token_windows(str(tmp_path / "a.txt"), tokenizer, 5, 8, seed=1)
    assert random_windows.input_ids.shape == (5, 8)
    assert torch.equal(
        random_windows.input_ids, token_windows(str(tmp_path / "a.txt"), tokenizer, 5, 8, seed=1).input_ids
    )
    assert not torch.equal(
        random_windows.input_ids, token_windows(str(tmp_path / "a.txt"), tokenizer, 5, 8, seed=2).input_ids
    )
    chunked = token_windows(str(tmp_path / "a.txt"), tokenizer, None, 10, sampling="chunked")
    stream = [b + 1 for b in b"first paragraph here"] + [0] + [b + 1 for b in b"second paragraph there"] + [0]
    assert chunked.input_ids.flatten().tolist() == stream[: len(stream) // 10 * 10]
    assert len(random_windows.fingerprint) == 64


def test_empty_and_short_data_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="only 5 tokens, fewer than one window of 64"):
        token_windows(str(tmp_path / "short.txt"), CharacterTokenizer(), 2, 64)
    with pytest.raises(ValueError, match="not an embedded corpus"):
        load_texts("no-such-corpus-anywhere")


def test_the_token_stream_is_cached_by_text_and_tokenizer(smollm2_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LINEARPATCH_CACHE", str(cache))
    source = tmp_path / "text.txt"
    source.write_text("\n\n".join(f"Paragraph {i}: the patch restores the magnitudes at the cut." for i in range(40)))
    texts = load_texts(str(source))

    def stream_of(tokenizer) -> list[int]:  # what the stream is: each document tokenised on its own, then EOS
        ids = []
        for text in texts:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids

    def chunked(tokenizer) -> list[int]:
        return token_windows(str(source), tokenizer, None, 2, sampling="chunked").input_ids.flatten().tolist()

    stream = stream_of(smollm2_tokenizer)
    cold = token_windows(str(source), smollm2_tokenizer, 4, 16, seed=3)
    assert chunked(smollm2_tokenizer) == stream[: len(stream) // 2 * 2]
    (entry,) = (cache / "tokens").iterdir()

    def tokenised_again(*arguments, **options):
        raise AssertionError("the cached stream was tokenised again")

    with monkeypatch.context() as patched:  # a warm cache gives the same windows without tokenising
        patched.setattr(data, "_tokenize", tokenised_again)
        warm = token_windows(str(source), smollm2_tokenizer, 4, 16, seed=3)
        assert torch.equal(warm.input_ids, cold.input_ids) and warm.total_tokens == len(stream)
    # The same vocabulary with another EOS, or another text, is another entry: never the stale stream.
    other_eos = type(smollm2_tokenizer).from_pretrained(smollm2_tokenizer.name_or_path, eos_token="<|im_start|>")
    other_stream = stream_of(other_eos)
    assert other_stream != stream and chunked(other_eos) == other_stream[: len(other_stream) // 2 * 2]
    source.write_text(source.read_text() + "\n\nOne more paragraph.")
    assert token_windows(str(source), smollm2_tokenizer, 1, 16).total_tokens > len(stream)
    assert len(list((cache / "tokens").iterdir())) == 3
    # A damaged entry is rebuilt; a cache that cannot be written only costs the time.
    source.write_text("\n\n".join(texts))
    entry.write_bytes(b"not safetensors")
    assert torch.equal(token_windows(str(source), smollm2_tokenizer, 4, 16, seed=3).input_ids, cold.input_ids)
    assert data.load_file(str(entry))["input_ids"].tolist() == stream
    monkeypatch.setenv("LINEARPATCH_CACHE", "/proc/linearpatch-cache")
    assert torch.equal(token_windows(str(source), smollm2_tokenizer, 4, 16, seed=3).input_ids, cold.input_ids)
