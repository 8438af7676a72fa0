"""Perplexity as the paper reports it: non-overlapping windows over a concatenated corpus, token-level mean NLL. The
search, the export comparison and `eval` all score with it."""

import math

import torch
from tqdm.auto import tqdm

from ..data import TokenWindows, token_windows
from ..defaults import Sizes


def summed_next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum over every window of the NLL of each token given the ones before it (the last position predicts nothing).

    Args:
        logits (`torch.FloatTensor` of shape `(windows, seq_len, vocab)`): the model's logits for `input_ids`.
        input_ids (`torch.LongTensor` of shape `(windows, seq_len)`): the scored tokens.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item()


@torch.no_grad()
def chunked_perplexity(
    model, windows: TokenWindows | torch.Tensor, batch_size: int = 1, progress: bool = False
) -> float:
    """exp(mean NLL) over every predicted token of every window (each window is scored independently).

    Args:
        model: a causal LM.
        windows (`TokenWindows` or `torch.LongTensor` of shape `(num_windows, seq_len)`): from
            `token_windows(..., sampling="chunked")`.
        batch_size (`int`, *optional*, defaults to 1): windows per forward.
        progress (`bool`, *optional*, defaults to `False`): progress bar.
    """
    input_ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for first in tqdm(range(0, len(input_ids), batch_size), desc="perplexity", disable=not progress):
        batch = input_ids[first : first + batch_size].to(device)
        total_nll += summed_next_token_nll(model(batch, use_cache=False).logits, batch)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def half_window_perplexity(
    model, token_ids: torch.Tensor, seq_len: int, chunks: int, bos_token_id: int | None
) -> float:
    """exp(mean NLL) as `llama-perplexity` scores a text: `chunks` consecutive windows of `seq_len` tokens of
    `token_ids` (the text tokenised whole), the first token of each replaced by `bos_token_id` (when the vocabulary
    adds one), and only the second half of each window scored, so that every scored token has at least `seq_len / 2`
    tokens of context. The export's GGUF files are compared with the stock model this way, on the same text.
    """
    device = next(model.parameters()).device
    first = seq_len // 2
    total_nll, total_tokens = 0.0, 0
    for index in range(chunks):
        window = token_ids[index * seq_len : (index + 1) * seq_len].clone()
        if bos_token_id is not None:
            window[0] = bos_token_id
        window = window.to(device)
        logits = model(window[None], use_cache=False).logits[0, first : seq_len - 1].float()
        total_nll += torch.nn.functional.cross_entropy(logits, window[first + 1 :], reduction="sum").item()
        total_tokens += seq_len - 1 - first
    return math.exp(total_nll / total_tokens)


def corpus_perplexity(
    model, tokenizer, source: str, num_windows: int | None = None, seq_len: int | None = None, **kwargs
) -> float:
    """[`chunked_perplexity`] on the first `num_windows` non-overlapping windows of `source` (default sizes:
    [`Sizes.resolve`] for perplexity on the model's device)."""
    device = next(model.parameters()).device
    sizes = Sizes.resolve("perplexity", device, num_windows, seq_len, model.config)
    windows = token_windows(source, tokenizer, sizes.num_samples, sizes.seq_len, sampling="chunked")
    return chunked_perplexity(model, windows, **kwargs)


def held_out_windows(tokenizer, corpora, num_windows: int, seq_len: int) -> dict[str, TokenWindows]:
    """The first `num_windows` non-overlapping windows of each corpus (what every held-out comparison scores)."""
    return {corpus: token_windows(corpus, tokenizer, num_windows, seq_len, sampling="chunked") for corpus in corpora}


def perplexity_table(models: dict, windows: dict[str, TokenWindows], progress: bool = False) -> dict:
    """`{name: {corpus: perplexity}}` of each model on each corpus's windows, side by side."""
    return {
        name: {
            corpus: chunked_perplexity(model, corpus_windows, progress=progress)
            for corpus, corpus_windows in windows.items()
        }
        for name, model in models.items()
    }


__all__ = [
    "chunked_perplexity",
    "corpus_perplexity",
    "half_window_perplexity",
    "held_out_windows",
    "perplexity_table",
    "summed_next_token_nll",
]
