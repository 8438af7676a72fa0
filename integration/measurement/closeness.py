"""How close a model stays to the model it came from, not only to the text: what `eval` reports beside perplexity.

Perplexity rankings and downstream rankings often disagree after depth pruning; what a user of a pruned model needs
is that it still behaves like its dense model. On held-out windows, teacher-forced, against the baseline:

- the mean per-token KL(baseline || model), in nats, over the baseline's top-K tokens plus one bucket for the rest of
  its mass (the same top-K a distillation cache keeps). That is the full KL where the baseline's mass lies in its top
  K, and a lower bound of it otherwise (the log-sum inequality); with K at least the vocabulary it is exact;
- top-1 agreement: the share of positions where both predict the same next token;
- top-10 agreement: the mean share of the baseline's 10 likeliest next tokens among the model's 10 likeliest.

And free-running: each model continues the same held-out prompts greedily for a fixed number of tokens (a KV cache,
no stop token), and the continuations are compared with the baseline's: the mean length of the identical prefix, and
the share of positions with the same token.

The baseline runs once ([`reference_of`], [`greedy_continuations`]); each model is then compared with what it left
([`compare_with`]), so only one model is held at a time. One forward per window gives its perplexity too.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import TokenWindows
from .capture import logits_source
from .perplexity import held_out_windows, summed_next_token_nll

# Tokens of the top-K agreement figure.
AGREEMENT_K = 10


@dataclass
class Reference:
    r"""
    What the baseline predicted on one corpus's windows.

    Args:
        input_ids (`torch.LongTensor` of shape `(windows, seq_len)`): the windows.
        log_probs (`torch.FloatTensor` of shape `(windows, seq_len, k)`): its top-K log-probabilities per position,
            sorted (the first is its top-1).
        token_ids (`torch.LongTensor` of shape `(windows, seq_len, k)`): their token ids.
        rest (`torch.FloatTensor` of shape `(windows, seq_len)`): the log of its mass outside them (`-inf` when they
            are the whole vocabulary).
    """

    input_ids: torch.Tensor
    log_probs: torch.Tensor
    token_ids: torch.Tensor
    rest: torch.Tensor


def _windows(windows: TokenWindows | torch.Tensor) -> torch.Tensor:
    return windows.input_ids if isinstance(windows, TokenWindows) else windows


@torch.no_grad()
def reference_of(model, windows: TokenWindows | torch.Tensor, top_k: int, progress: bool = False):
    """The baseline `model`'s [`Reference`] on `windows` (its top-`top_k` next-token log-probabilities, at least the
    top 10), and its perplexity on them (from the same forward passes). `model` may be a [`layerwise_model`]."""
    input_ids = _windows(windows)
    predictions, nll = [], 0.0
    with logits_source(model, input_ids) as logits_of:
        for row in tqdm(range(len(input_ids)), desc="reference", disable=not progress):
            logits = logits_of(slice(row, row + 1)).float()
            nll += summed_next_token_nll(logits, input_ids[row : row + 1])
            predictions.append([part.cpu() for part in top_predictions(logits, top_k)])
    reference = Reference(input_ids, *(torch.cat(parts) for parts in zip(*predictions, strict=True)))
    return reference, math.exp(nll / input_ids[:, 1:].numel())


def top_predictions(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a [`Reference`] keeps of the baseline's `logits` (`(..., vocab)`): its top-`top_k` (at least the top 10)
    log-probabilities, their token ids, and the log of the mass outside them."""
    every = next_token_log_probs(logits)
    top = every.topk(min(max(top_k, AGREEMENT_K), logits.shape[-1]), dim=-1)
    return top.values, top.indices, _rest(every, top.indices)


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in fp32, computed one way for the baseline and every model: the baseline against itself is
    then exactly 0 nats apart."""
    return torch.log_softmax(logits.float(), dim=-1)


def _rest(log_probs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The log of the mass of `log_probs` (`(..., vocab)`) outside the `kept` token ids (`(..., k)`), summed directly,
    not as one minus the kept mass (which rounding leaves at about 1e-7 when nothing is left)."""
    outside = log_probs.scatter(-1, kept, float("-inf"))
    return torch.logsumexp(outside, dim=-1)


def token_closeness(reference: Reference, index: int | slice, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of window `index` (or windows): KL(baseline || model) over the baseline's kept tokens and the rest
    bucket, and top-1 and top-10 agreement, for the model's `logits` (`(..., seq_len, vocab)`) against the baseline's
    [`Reference`]."""
    log_q_all = next_token_log_probs(logits)
    ids = reference.token_ids[index].to(log_q_all.device)
    log_p = reference.log_probs[index].to(log_q_all.device).double()
    log_q = log_q_all.gather(-1, ids).double()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    log_p_rest = reference.rest[index].to(log_q_all.device).double()
    log_q_rest = _rest(log_q_all, ids).double()
    # No rest bucket where the kept tokens are the whole vocabulary (0 * (-inf - -inf) would be NaN).
    kl = kl + torch.where(log_p_rest > float("-inf"), log_p_rest.exp() * (log_p_rest - log_q_rest), 0.0)
    mine = log_q_all.topk(AGREEMENT_K, dim=-1).indices
    theirs = ids[..., :AGREEMENT_K]
    top10 = (mine[..., :, None] == theirs[..., None, :]).any(-1).double().sum(-1) / theirs.shape[-1]
    return dict(kl=kl, top1=(mine[..., 0] == ids[..., 0]).double(), top10=top10)


@torch.no_grad()
def measure_windows(
    model, input_ids: torch.Tensor, reference: Reference | None = None, progress: bool = False
) -> tuple[float, dict[str, float]]:
    """`model`'s perplexity on `input_ids` (in memory or a [`layerwise_model`]) and, with the baseline's `reference`
    on the same windows, its closeness to it (`kl`, `top1`, `top10`: means over every position of every window; `{}`
    without), from the same forward passes."""
    sums, nll = dict(kl=0.0, top1=0.0, top10=0.0), 0.0
    with logits_source(model, input_ids) as logits_of:
        for row in tqdm(range(len(input_ids)), desc="closeness", disable=not progress):
            rows = slice(row, row + 1)
            logits = logits_of(rows).float()
            nll += summed_next_token_nll(logits, input_ids[rows])
            if reference is not None:
                for name, values in token_closeness(reference, rows, logits).items():
                    sums[name] += float(values.sum())
    perplexity = math.exp(nll / input_ids[:, 1:].numel())
    figures = {name: total / input_ids.numel() for name, total in sums.items()} if reference is not None else {}
    return perplexity, figures


def compare_with(model, reference: Reference, progress: bool = False) -> tuple[dict[str, float], float]:
    """`model`'s closeness to the baseline on the reference's windows (see [`measure_windows`]), and its perplexity
    on them."""
    perplexity, figures = measure_windows(model, reference.input_ids, reference, progress)
    return figures, perplexity


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens after each of `prompts` (`(prompts, length)`, all of one length), with a KV cache;
    the end-of-text token is held off, so that every continuation has the same length."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    generated = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.generation_config.pad_token_id or 0,
        use_cache=True,
    )
    return generated[:, prompts.shape[1] :].cpu()


def held_out_prompts(tokenizer, corpora, num_prompts: int, length: int) -> torch.Tensor | None:
    """`num_prompts` prompts of `length` tokens: the first windows of held-out text, taken in turn from each corpus
    (`None` for none)."""
    if not num_prompts or not corpora:
        return None
    per_corpus = -(-num_prompts // len(corpora))
    windows = held_out_windows(tokenizer, corpora, per_corpus, length)
    each = [corpus_windows.input_ids for corpus_windows in windows.values()]
    return torch.stack([ids[index] for index in range(per_corpus) for ids in each if index < len(ids)][:num_prompts])


def generation_agreement(continuations: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far greedy `continuations` follow the baseline's (`reference`, same shape): the mean length of the identical
    prefix (tokens), and the share of positions with the same token."""
    same = continuations == reference
    prefix = torch.where(same.all(-1), same.shape[-1], (~same).int().argmax(-1))
    return dict(identical_prefix=float(prefix.double().mean()), identical_tokens=float(same.double().mean()))


__all__ = [
    "AGREEMENT_K",
    "Reference",
    "compare_with",
    "generation_agreement",
    "greedy_continuations",
    "held_out_prompts",
    "measure_windows",
    "next_token_log_probs",
    "reference_of",
    "token_closeness",
    "top_predictions",
]
