import pytest
import torch

from linearpatch.integration.data import load_texts, token_windows


class CharacterTokenizer:
    """Minimal tokenizer (one id per byte) so that data tests need no model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
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
