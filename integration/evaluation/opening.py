"""How `linearpatch eval` holds each model: whole in memory, or run layer by layer from its safetensors shards when it
does not fit `--max-memory` (or `--sequential` says so). Perplexity and closeness to the baseline need one forward per
window, which a [`layerwise_model`] gives with one layer in memory at a time; lm-eval tasks and greedy generation need
the model whole (generation would read every layer once per token), so they are refused for such a model."""

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from linearpatch.common.errors import LinearPatchError

from ..layerwise import choose_sequential, layerwise_model
from ..models import ModelRef, load_model, load_tokenizer
from ..requests import EvalRequest
from ..shards import SafetensorsCheckpoint, compute_dtype
from .tasks import OFFLINE_TASKS

# (requests, tokens) a document of an offline task costs, roughly: four (context plus one choice) requests of about 60
# tokens each for the multiple-choice tasks; one passage of about 160 tokens for the last-word task.
_DOCUMENT_COST = {"wiki_next_sentence": (4, 240), "mmlu_dev_offline": (4, 240), "wiki_last_word": (1, 160)}


def place_models(refs: list[ModelRef], request: EvalRequest, device: str) -> list[ModelRef]:
    """The opened models of `request` (the baseline first), each marked whether it runs layer by layer
    ([`ModelRef.placed`]): every local checkpoint folder with `--sequential`, else those whose weights in `--dtype`
    exceed `--max-memory` (default: the device's free memory).

    Raises:
        LinearPatchError: for lm-eval tasks or generation prompts asked of a model run layer by layer, and for an
            adapter folder or a Hub id asked to run layer by layer (naming the fix).
    """
    dtype = compute_dtype(request.dtype)
    placed = []
    for ref in refs:
        if not ref.is_folder or ref.kind == "adapter":
            if request.sequential:
                what = "a patch adapter (merge it: distill without --adapter-only)" if ref.is_folder else "on the Hub"
                raise LinearPatchError(f"--sequential reads a checkpoint folder's shards, and {ref} is {what}.")
            placed.append(ref)
            continue
        size = SafetensorsCheckpoint(Path(ref.path)).nbytes(dtype)
        placed.append(ref.placed(choose_sequential(size, device, request.sequential, request.max_memory, ref.name)))
    chosen = sorted({ref.name for ref in placed if ref.layerwise})
    if chosen:
        which = ", ".join(chosen)
        if request.tasks:
            raise LinearPatchError(
                f"lm-eval tasks run each model whole, and {which} runs layer by layer (--sequential, or it does not "
                "fit --max-memory): pass --tasks with no names to compare perplexity and closeness only, or allow "
                "more memory."
            )
        if request.generation_prompts:
            raise LinearPatchError(
                f"--gen-prompts: greedy generation would read every layer of {which} once per token: pass "
                "--gen-prompts 0 (perplexity and closeness are measured layer by layer), or allow more memory."
            )
    return placed


@contextlib.contextmanager
def opened_model(ref: ModelRef, request: EvalRequest, loaded: tuple | None = None) -> Iterator[tuple]:
    """`(model, tokenizer)` of `ref`: `loaded` when given, else loaded whole on the request's device, or (when it runs
    layer by layer) the model run from its shards; released on exit."""
    if loaded is not None:
        yield loaded
        return
    from ..models import resolve_device

    device, dtype = resolve_device(request.device), compute_dtype(request.dtype)
    if not ref.layerwise:
        yield load_model(ref, dtype=dtype, device=device)
        return
    # The layers and the activation store share --max-memory.
    with layerwise_model(ref.path, dtype, device, max_memory=request.max_memory) as model:
        yield model, load_tokenizer(ref)


def _measure_tokens_per_second(model, seq_len: int) -> float:
    window = torch.randint(0, model.config.vocab_size, (1, min(seq_len, 256)), device=next(model.parameters()).device)
    with torch.no_grad():
        model(window, use_cache=False)  # warm-up
        started = time.perf_counter()
        model(window, use_cache=False)
    return window.numel() / max(time.perf_counter() - started, 1e-6)


def open_baseline(
    request: EvalRequest, refs: list[ModelRef], windows: dict, limit: int | None, device: str, log: Callable
) -> tuple[tuple | None, float | None]:
    """Load the baseline (`refs[0]`; the models follow) whole unless it runs layer by layer, log what the run will do
    and how long it should take (timed on the baseline in memory; no estimate for one run layer by layer); return
    `(model, tokenizer)` or `None`, and the estimate in seconds."""
    tasks = request.tasks
    known = [task for task in tasks if task in OFFLINE_TASKS]
    requests = (limit or 500) * sum(_DOCUMENT_COST[task][0] for task in known)
    tokens = (limit or 500) * sum(_DOCUMENT_COST[task][1] for task in known)
    tokens += sum(w.input_ids.numel() for w in windows.values())
    count = len(refs)
    layerwise = sorted({ref.name for ref in refs if ref.layerwise})
    dense, estimate, how = None, None, f"{', '.join(layerwise)} layer by layer"
    if not refs[0].layerwise:
        dense = load_model(refs[0], dtype=request.dtype, device=device)
        seq_len = max((w.input_ids.shape[1] for w in windows.values()), default=256)
        estimate = count * tokens / _measure_tokens_per_second(dense[0], seq_len)
        how = f"estimated {estimate / 60:.1f} min on {device}" + (f", {how}" if layerwise else "")
    unknown = "" if len(known) == len(tasks) else " plus the Hub tasks"
    log(
        f"Evaluating {count} models: {requests} lm-eval requests{unknown} and "
        f"{sum(len(w.input_ids) for w in windows.values())} perplexity windows each; {how} "
        "(lower --limit / --ppl-windows to go faster)."
    )
    return dense, estimate


__all__ = ["open_baseline", "opened_model", "place_models"]
