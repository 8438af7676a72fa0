import pytest
import torch
from safetensors.torch import load_file

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
    assert load_file(str(entry))["input_ids"].tolist() == stream
    monkeypatch.setenv("LINEARPATCH_CACHE", "/proc/linearpatch-cache")
    assert torch.equal(token_windows(str(source), smollm2_tokenizer, 4, 16, seed=3).input_ids, cold.input_ids)


class BosTokenizer(CharacterTokenizer):
    """A tokenizer that starts every sequence with BOS when it adds special tokens (as Gemma's, Llama 3's do)."""

    bos_token_id = 300

    def __call__(self, text: str | list[str], add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [self(one, add_special_tokens)["input_ids"] for one in text]}
        ids = [b + 1 for b in text.encode()]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


@pytest.mark.parametrize("sampling", ["chunked", "random"])
def test_windows_start_as_the_tokenizer_starts_a_sequence(tmp_path, sampling):
    """Where the tokenizer adds BOS, every window is BOS then `seq_len - 1` tokens of the text (chunked: consecutive,
    non-overlapping); where it adds none, windows are the text alone, as before."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    source, seq_len = str(tmp_path / "a.txt"), 16
    stream = data._tokenize(load_texts(source), CharacterTokenizer())
    assert data.bos_token_of(BosTokenizer()) == 300 and data.bos_token_of(CharacterTokenizer()) is None
    with_bos = token_windows(source, BosTokenizer(), 6, seq_len, seed=4, sampling=sampling).input_ids
    plain = token_windows(source, CharacterTokenizer(), 6, seq_len, seed=4, sampling=sampling).input_ids
    assert with_bos.shape == plain.shape == (6, seq_len)
    assert (with_bos[:, 0] == 300).all() and (with_bos[:, 1:] != 300).all()
    assert not (plain == 300).any()
    if sampling == "chunked":
        assert torch.equal(with_bos[:, 1:].reshape(-1), stream[: 6 * (seq_len - 1)])
        assert torch.equal(plain.reshape(-1), stream[: 6 * seq_len])
    every = token_windows(source, BosTokenizer(), None, seq_len, sampling="chunked").input_ids
    assert len(every) == len(stream) // (seq_len - 1)


def test_real_tokenizers_bos_gemma_yes_smollm2_no(smollm2_tokenizer):
    """Gemma-3-270M's tokenizer adds BOS, and its windows start with it; SmolLM2's adds none (windows unchanged)."""
    from transformers import AutoTokenizer

    from linearpatch.integration.models import resolve_model

    gemma = AutoTokenizer.from_pretrained(resolve_model("gemma3-270m"))
    assert data.bos_token_of(gemma) == gemma.bos_token_id == 2
    assert data.bos_token_of(smollm2_tokenizer) is None
    windows = token_windows("wikipedia-eval", gemma, 3, 32, sampling="chunked").input_ids
    assert (windows[:, 0] == 2).all() and (windows[:, 1:] != 2).all()
