"""Text for calibration, distillation and evaluation: local files, `datasets` names, or corpora embedded offline.

Embedded corpora come from installed packages, so the whole flow runs without the Hub:

- `wikipedia-calibration` / `wikipedia-eval`: 105 real Wikipedia articles from the gensim wheel, split *by article*
  (every fifth article is evaluation), so calibration/training text and evaluation text never overlap;
- `lee-news`: the Lee news corpus from gensim (300 short articles, evaluation only);
- `pydoc`: Python's own documentation topics (stdlib `pydoc_data`).
"""

import difflib
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import (
    clean_stale_staging,
    read_cache_record,
    rebuilding,
    save_tensors_atomically,
    write_text_atomically,
)

from .models import cache_dir

logger = logging.getLogger("linearpatch")

WIKIPEDIA_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_EVERY = 5  # every fifth Wikipedia article is held out for evaluation


def _gensim_data(name: str) -> Path:
    """A file of the gensim wheel's test data, found without importing gensim (seconds of scipy imports)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - depends on the install
        raise RuntimeError("The embedded corpora need gensim: `pip install 'linearpatch[embedded]'`.")
    return Path(spec.submodule_search_locations[0], "test", "test_data", name)


def _wikipedia_articles() -> list[str]:
    """The gensim wheel's Wikipedia articles as plain text, extracted once and cached as JSON."""
    cached = cache_dir() / "corpora" / "wikipedia-articles.json"
    articles = read_cache_record(cached, "the Wikipedia articles cache", list)
    if articles is not None and articles and all(isinstance(article, str) for article in articles):
        return articles
    if articles is not None:
        rebuilding("the Wikipedia articles cache", cached, "no articles, or not text")
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "The embedded Wikipedia corpus needs gensim: `pip install 'linearpatch[embedded]'`."
        ) from error
    import bz2

    articles = []
    with bz2.open(_gensim_data(WIKIPEDIA_DUMP), "rt", encoding="utf-8") as stream:
        for title, text, _ in extract_pages(stream):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            body = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if line.strip())
            if len(body) > 200:
                articles.append(f"{title}\n{body}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(cached, json.dumps(articles))
    return articles


def _lee_news() -> list[str]:
    text = _gensim_data("lee_background.cor").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


EMBEDDED_CORPORA: dict[str, Callable[[], list[str]]] = {
    "wikipedia-calibration": lambda: [
        a for i, a in enumerate(_wikipedia_articles()) if i % EVAL_EVERY != EVAL_EVERY - 1
    ],
    "wikipedia-eval": lambda: [a for i, a in enumerate(_wikipedia_articles()) if i % EVAL_EVERY == EVAL_EVERY - 1],
    "lee-news": _lee_news,
    "pydoc": _pydoc_topics,
}


# `NAME[:CONFIG][:SPLIT]` or `ORG/NAME[:CONFIG][:SPLIT]`, as `datasets` names them.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]*){0,2}$")
_TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".md")


def local_text_file(source: str) -> Path | None:
    """The local file `source` names, if it is one (what an output must never overwrite)."""
    path = Path(source).expanduser()
    return path if source not in EMBEDDED_CORPORA and path.is_file() else None


def check_text_source(source: str) -> None:
    """Refuse, at once, a text source that is neither an embedded corpus, a file, nor shaped like a `datasets` name:
    a near miss of an embedded name gets "did you mean", a path that does not exist says so. (A real `datasets`
    name is tried by [`load_texts`], which needs the Hub.)

    Raises:
        LinearPatchError: naming the source and what was probably meant.
    """
    if source in EMBEDDED_CORPORA or Path(source).expanduser().is_file():
        return
    close = difflib.get_close_matches(source, EMBEDDED_CORPORA, n=1, cutoff=0.8)
    if close:
        raise LinearPatchError(
            f"Unknown text source {source!r}: did you mean {close[0]!r}? (embedded: {', '.join(EMBEDDED_CORPORA)})"
        )
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(_TEXT_SUFFIXES) or source.count("/") > 1
    if looks_like_path or not _DATASET_NAME.match(source):
        raise LinearPatchError(
            f"Text source {source!r} not found: no such file, not an embedded corpus ({', '.join(EMBEDDED_CORPORA)}) "
            "and not a datasets name (NAME[:CONFIG][:SPLIT]). Check the path."
        )


def load_texts(source: str, text_field: str = "text") -> list[str]:
    """Documents of `source`: an embedded corpus name, a local `.txt` / `.jsonl` / `.json` file, or a `datasets`
    name written `NAME[:CONFIG][:SPLIT]` (e.g. `wikitext:wikitext-2-raw-v1:train`, needs Hub access).

    Raises:
        ValueError: if the source yields no text, or is none of the above (see [`check_text_source`]).
    """
    check_text_source(source)
    if source in EMBEDDED_CORPORA:
        texts = EMBEDDED_CORPORA[source]()
    elif Path(source).is_file():
        path = Path(source)
        if path.suffix in (".jsonl", ".json"):
            from datasets import load_dataset

            dataset = load_dataset("json", data_files=str(path), split="train")
            if text_field not in dataset.column_names:
                raise LinearPatchError(f"{path} has no {text_field!r} field (fields: {dataset.column_names}).")
            texts = list(dataset[text_field])
        else:
            texts = path.read_text(encoding="utf-8").split("\n\n")
    else:
        from datasets import load_dataset

        name, config, split = (source.split(":") + [None, None])[:3]
        try:
            dataset = load_dataset(name, config, split=split or "train")
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise LinearPatchError(
                f"Cannot load text from {source!r}: not an embedded corpus ({', '.join(EMBEDDED_CORPORA)}), not a "
                f"local file, and `datasets` failed ({type(error).__name__}: {first_line}). Check the name."
            ) from error
        texts = list(dataset[text_field])
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise LinearPatchError(f"The text source {source!r} is empty: give a file or dataset with non-empty text.")
    return texts


def _stream_key(texts: list[str], tokenizer) -> str | None:
    """What a token stream depends on, hashed: the texts, the tokenizer's whole definition (its `tokenizer.json`) and
    EOS, and the library versions that run it. None for a tokenizer without a serialisable backend (slow tokenizers),
    whose stream is not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    parts = (tokenizers.__version__, transformers.__version__, type(tokenizer).__name__, str(tokenizer.eos_token_id))
    for part in (*parts, backend.to_str(), *texts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _tokenize(texts: list[str], tokenizer, batch: int = 64) -> torch.Tensor:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for start in range(0, len(texts), batch):  # batched: half the time of one call per document, same ids
        for document in tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(document)
            ids.extend(separator)
    return torch.tensor(ids, dtype=torch.long)


def _token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenised and concatenated, each followed by EOS so that windows may cross documents.

    Every command cuts windows from a whole corpus (calibration, training, held-out perplexity), and tokenising one
    takes seconds (the 2.5 MB calibration corpus: about 3 s on one core), so the stream is kept under
    `cache_dir()/tokens`, keyed by [`_stream_key`]. The cache only saves time: one that cannot be read is rebuilt, one
    that cannot be written (read-only or full disk) is skipped.
    """
    key = _stream_key(texts, tokenizer)
    if key is None:
        return _tokenize(texts, tokenizer)
    cached = cache_dir() / "tokens" / f"{key}.safetensors"
    if cached.is_file():
        try:
            with safe_open(str(cached), framework="pt") as handle:
                stream, recorded = handle.get_tensor("input_ids").long(), (handle.metadata() or {}).get("sha256")
            if recorded is None:  # written before entries carried their SHA-256: replaced, not damaged
                logger.debug("linearpatch: rewriting the token cache %s with its SHA-256", cached)
            elif recorded != token_fingerprint(stream):  # a file that parses but is not what was written
                raise ValueError("its tokens do not match their recorded SHA-256")
            else:
                return stream
        except Exception as error:  # a damaged cache entry is rebuilt, whatever the damage
            rebuilding("the token cache", cached, error)
    stream = _tokenize(texts, tokenizer)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(cached.parent)  # what a killed run left
        metadata = {"sha256": token_fingerprint(stream.long())}
        save_tensors_atomically({"input_ids": stream.to(torch.int32)}, cached, metadata)
    except (OSError, SafetensorError) as error:
        logger.debug("linearpatch: not caching the token stream at %s (%s)", cached, error)
    return stream


def bos_token_of(tokenizer) -> int | None:
    """The BOS id `tokenizer` starts every sequence with when it adds special tokens, else `None` (SmolLM2 adds none;
    Gemma, Llama 3 and Mistral add one, and Gemma reads at half its quality without it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if tokenizer("a")["input_ids"][:1] == [bos] else None


def token_fingerprint(input_ids: torch.Tensor) -> str:
    """SHA-256 of token ids (a CPU tensor): the identity of windows of text, wherever they are stored."""
    return hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()


@dataclass
class TokenWindows:
    """Fixed-length token windows and where they came from.

    Args:
        input_ids (`torch.LongTensor` of shape `(num_windows, seq_len)`): the windows.
        source (`str`): the text source they were cut from.
        sampling (`str`): `random` (seeded start offsets, the paper's calibration) or `chunked` (consecutive,
            non-overlapping windows from the start: the paper's perplexity protocol).
        seed (`int`): seed of the random offsets.
        total_tokens (`int`): tokens in the whole source.
    """

    input_ids: torch.Tensor
    source: str
    sampling: str
    seed: int
    total_tokens: int

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the token ids: identifies the exact data (for caches and model cards)."""
        return token_fingerprint(self.input_ids)

    def describe(self) -> dict:
        num_windows, seq_len = self.input_ids.shape
        return dict(
            source=self.source,
            sampling=self.sampling,
            num_windows=num_windows,
            seq_len=seq_len,
            seed=self.seed,
            source_tokens=self.total_tokens,
            sha256=self.fingerprint,
        )


def token_windows(
    source: str,
    tokenizer,
    num_windows: int | None,
    seq_len: int,
    seed: int = 0,
    sampling: str = "random",
) -> TokenWindows:
    """Cut `num_windows` windows of `seq_len` tokens from `source` (see [`load_texts`]).

    `random` draws start offsets with `seed` (the paper's calibration sampling); `chunked` takes consecutive
    non-overlapping windows from the start (the paper's perplexity protocol); `num_windows=None` with `chunked`
    takes every full window.

    Every window starts as the model's tokenizer starts a sequence: where it adds BOS (see [`bos_token_of`]), each
    window is BOS followed by `seq_len - 1` tokens of text, so that calibration, training and scoring see the model
    as it runs in use.

    Raises:
        ValueError: if the source has fewer than `seq_len + 1` tokens, or the arguments are not positive.
    """
    if seq_len < 2 or (num_windows is not None and num_windows < 1):
        raise ValueError(f"Need seq_len >= 2 and num_windows >= 1, got seq_len={seq_len}, num_windows={num_windows}.")
    stream = _token_stream(load_texts(source), tokenizer)
    bos = bos_token_of(tokenizer)
    text_len = seq_len - (bos is not None)  # tokens of text per window
    if len(stream) < text_len + 1:
        raise ValueError(
            f"The text source {source!r} has only {len(stream)} tokens, fewer than one window of {seq_len}: "
            f"use a shorter --seq-len or more text."
        )
    if sampling == "chunked":
        available = len(stream) // text_len
        count = available if num_windows is None else min(num_windows, available)
        windows = stream[: count * text_len].view(count, text_len)
    elif sampling == "random":
        if num_windows is None:
            raise ValueError("Random sampling needs a number of windows.")
        rng = random.Random(seed)
        starts = [rng.randrange(0, len(stream) - text_len) for _ in range(num_windows)]
        windows = torch.stack([stream[start : start + text_len] for start in starts])
    else:
        raise ValueError(f"Unknown sampling {sampling!r}: use 'random' or 'chunked'.")
    if bos is not None:
        windows = torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)
    return TokenWindows(windows.contiguous(), source, sampling, seed, len(stream))


__all__ = [
    "EMBEDDED_CORPORA",
    "TokenWindows",
    "bos_token_of",
    "check_text_source",
    "load_texts",
    "local_text_file",
    "token_fingerprint",
    "token_windows",
]
