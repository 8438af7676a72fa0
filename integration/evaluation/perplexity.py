"""Perplexity as the paper reports it: non-overlapping windows over a concatenated corpus, token-level mean NLL."""

import math
import os

import torch
from tqdm.auto import tqdm

from ..data import TokenWindows, token_windows


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


def corpus_perplexity(
    model, tokenizer, source: str, num_windows: int | None = 16, seq_len: int = 512, **kwargs
) -> float:
    """[`chunked_perplexity`] on the first `num_windows` non-overlapping windows of `source`."""
    return chunked_perplexity(
        model, token_windows(source, tokenizer, num_windows, seq_len, sampling="chunked"), **kwargs
    )


# lm-eval estimates the standard error of a perplexity metric (wiki_last_word's) by resampling the per-document scores:
# 100000 times by default, in a fork pool of one process per core. Forking a process whose torch and tokenizer threads
# are running can leave a child stuck on a lock it inherited held, and the pool's shutdown waiting on it forever (CI's
# `linearpatch eval` hung 20 minutes, twice; reproduced here: the worker on a futex, the parent in waitpid). So the
# resampling stays in this process; 1000 resamples give the standard error to about 2%.
BOOTSTRAP_ITERS = 1000


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on an in-memory model; return `{task: {"acc": .., "acc_stderr": .., "acc_norm": .., ...}}`.

    Offline tasks (see `tasks.OFFLINE_TASKS`) are built on first use; other names are lm-eval's own tasks (they
    download their data from the Hub). Nothing is forked: bootstrapped standard errors use `BOOTSTRAP_ITERS`
    resamples in this process.
    """
    from unittest import mock

    import lm_eval.evaluator
    import lm_eval.loggers.utils
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from .tasks import task_manager

    manager = task_manager(tasks, include_path)
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", device=device, batch_size=batch_size)
    # lm-eval records the git commit of the current directory by running `git describe`, which prints "fatal: not a
    # git repository" outside one; that commit says nothing about the models evaluated here.
    no_git = lambda: None  # noqa: E731
    with (
        mock.patch.object(lm_eval.loggers.utils, "get_git_commit_hash", no_git),
        mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", no_git),
        mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}),  # lm-eval's switch to resample without a pool
    ):
        results = simple_evaluate(
            model=wrapped,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    scores = {}
    for task, values in results["results"].items():
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and isinstance(value, int | float)
        }
    return scores


__all__ = ["chunked_perplexity", "corpus_perplexity", "lm_eval_tasks"]
