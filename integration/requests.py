"""What each command is asked to do, as data: one request per stage (`prune`, `distill`, `eval`, `export`), whose
fields and defaults are the one home of that command's options. The CLI's flags map onto the fields (its defaults are
read from here: `tests/test_cli.py` checks that they agree), the Python API builds the same request from its keywords,
and each job receives every field and restates no default.

Importable without torch or transformers, so that `linearpatch --help` stays quick.
"""

from dataclasses import dataclass, fields
from pathlib import Path

from .defaults import DEFAULT_CANDIDATES, DEFAULT_TASKS

DEFAULT_CALIBRATION = "wikipedia-calibration"
DEFAULT_EVAL_CORPORA = ("wikipedia-eval", "lee-news")
DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class Request:
    """A command's options; `options()` gives them as the keywords of its job."""

    def options(self) -> dict:
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True)
class PruneRequest(Request):
    r"""
    `linearpatch prune` ([`prune_checkpoint`]).

    Args:
        model (`str`): `smollm2-135m`, a folder or a Hub id of a dense model.
        output (`str` or `Path`): the checkpoint folder to create.
        num_layers (`int`, *optional*), layers (`list[int]`, *optional*), target_ppl_ratio (`float`, *optional*):
            what to remove: this many layers (chosen by `metric`), these layers, or as many as keep the held-out
            perplexity within this ratio of the dense model's (exactly one of the three).
        metric (`str`, *optional*), patch (`str`, *optional*): how the block is chosen and the patch fitted (see
            `choices.py`; defaults: cosine and hadamard, or loss and auto with `target_ppl_ratio`).
        holdout (`int`, *optional*), candidates (`int`): windows held out to choose by outcome, and blocks per depth
            that `loss` scores.
        calibration (`str`), num_samples (`int`, *optional*), seq_len (`int`, *optional*), seed (`int`),
            batch_size (`int`): the calibration text and windows (default sizes: `defaults.py`).
        dtype (`str`), device (`str`, *optional*): how the dense model is loaded (default device: CUDA if any).
        base_model (`str`, *optional*): the Hub id recorded as the dense model.
        eval_windows (`int`), eval_seq_len (`int`, *optional*), eval_corpora (`tuple[str, ...]`): also measure the
            held-out perplexity of the dense and pruned models (0 windows: skip).
        plots (`bool`): also write the figures of `linearpatch report`.
        overwrite (`bool`): replace an existing output.
        progress (`bool`): progress bars.
        sequential (`bool`, *optional*), max_memory (`str` or `int`, *optional*), max_shard_size (`str` or `int`):
            calibrate layer by layer from the shards and stream the output (default: when the model does not fit
            `max_memory`, the device's free memory), in shards of this size.
    """

    model: str
    output: str | Path
    num_layers: int | None = None
    layers: list[int] | None = None
    metric: str | None = None
    patch: str | None = None
    calibration: str = DEFAULT_CALIBRATION
    num_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 1
    dtype: str = "float32"
    device: str | None = None
    base_model: str | None = None
    eval_windows: int = 0
    eval_seq_len: int | None = None
    eval_corpora: tuple[str, ...] = DEFAULT_EVAL_CORPORA
    plots: bool = False
    overwrite: bool = False
    progress: bool = True
    sequential: bool | None = None
    max_memory: str | int | None = None
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    target_ppl_ratio: float | None = None
    holdout: int | None = None
    candidates: int = DEFAULT_CANDIDATES


@dataclass(frozen=True)
class DistillRequest(Request):
    r"""
    `linearpatch distill` ([`distill_checkpoint`]).

    Args:
        checkpoint (`str`): a LinearPatch checkpoint (folder or Hub id).
        teacher (`str`): the dense model it was pruned from.
        output (`str` or `Path`): folder for the merged checkpoint (or the adapter with `adapter_only`).
        top_k (`int`): teacher log-probabilities kept per token.
        data (`str`), num_samples (`int`, *optional*), seq_len (`int`, *optional*): the training text and windows.
        epochs (`float`), lr (`float`), batch_size (`int`), gradient_accumulation_steps (`int`), max_steps (`int`),
            temperature (`float`), seed (`int`), bf16 (`bool`), activation_checkpointing (`bool`): the recipe
            (paper: AdamW lr 1e-4, cosine to lr/20, batch 1, one epoch).
        save_steps (`int`), resume (`bool`), work_dir (`str` or `Path`, *optional*): keep a Trainer checkpoint every
            N steps in `work_dir` (default `OUTPUT.work`) and continue an interrupted run from it.
        cache_dir (`str` or `Path`, *optional*): the teacher cache root (default `~/.cache/linearpatch/teacher-cache`).
        adapter_only (`bool`): write only the PEFT adapter.
        dtype (`str`), device (`str`, *optional*), overwrite (`bool`): as for [`PruneRequest`].
        sequential_teacher (`bool`, *optional*), max_memory (`str`, *optional*): build the teacher cache layer by
            layer (default: when the teacher does not fit `max_memory`); a larger student is spread with
            `device_map="auto"`.
        export (`bool`): train the stock export's fold maps instead of the patches and write the family's stock
            architecture (`distillation/folded.py`); its training-free start is fitted on the export's calibration
            windows of `data`.
        eval_corpora (`tuple[str, ...]`), eval_windows (`int`, *optional*): with `export`, held-out perplexity of the
            patched checkpoint, the training-free and the distilled export and plain pruning (0: skip).
    """

    checkpoint: str
    teacher: str
    output: str | Path
    top_k: int = 100
    data: str = DEFAULT_CALIBRATION
    num_samples: int | None = None
    seq_len: int | None = None
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 0
    temperature: float = 1.0
    seed: int = 1
    bf16: bool = False
    activation_checkpointing: bool = False
    save_steps: int = 0
    resume: bool = False
    work_dir: str | Path | None = None
    cache_dir: str | Path | None = None
    adapter_only: bool = False
    dtype: str = "float32"
    device: str | None = None
    overwrite: bool = False
    sequential_teacher: bool | None = None
    max_memory: str | None = None
    export: bool = False
    eval_corpora: tuple[str, ...] = DEFAULT_EVAL_CORPORA
    eval_windows: int | None = None


@dataclass(frozen=True)
class EvalRequest(Request):
    r"""
    `linearpatch eval` ([`compare_models`]).

    Args:
        models (`list[str]`): the models compared with the baseline (checkpoints, adapters, exports).
        baseline (`str`): the dense model.
        tasks (`tuple[str, ...]`), limit (`int`, *optional*): lm-eval tasks and documents per task (-1: the
            device's default, `None`: all).
        corpora (`tuple[str, ...]`), perplexity_windows (`int`, *optional*), seq_len (`int`, *optional*): chunked
            perplexity.
        batch_size (`int`): lm-eval batch size.
        dtype (`str`), device (`str`, *optional*): how the models are loaded.
        output (`str` or `Path`, *optional*), overwrite (`bool`): where to write the results and table.
    """

    models: list[str]
    baseline: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = -1
    corpora: tuple[str, ...] = DEFAULT_EVAL_CORPORA
    perplexity_windows: int | None = None
    seq_len: int | None = None
    batch_size: int = 8
    dtype: str = "float32"
    device: str | None = None
    output: str | Path | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ExportRequest(Request):
    r"""
    `linearpatch export` ([`export_checkpoint`]).

    Args:
        checkpoint (`str`): a LinearPatch checkpoint (folder or Hub id).
        output (`str` or `Path`): the stock-architecture folder to create.
        fold (`str`): one of `FOLDS`: `auto` (each objective fitted, the best on held-out windows kept), `down-proj`,
            `down-proj-dense`, `down-proj-cosine`, `down-proj-rotated` or `scalar` (see `export.py`).
        dense (`str`, *optional*): the dense model, for the dense objectives (default: the checkpoint's
            `base_model`).
        calibration (`str`), num_samples (`int`, *optional*), seq_len (`int`, *optional*), seed (`int`): text for
            the fit (and, for `auto`, its held-out windows: one in eight).
        eval_corpora (`tuple[str, ...]`), eval_windows (`int`, *optional*): held-out perplexity of the patched
            checkpoint, the export and plain pruning (0: skip; default: the device's evaluation size).
        device (`str`, *optional*), overwrite (`bool`), progress (`bool`), sequential (`bool`, *optional*),
            max_memory (`str` or `int`, *optional*), max_shard_size (`str` or `int`): as for [`PruneRequest`].
    """

    checkpoint: str
    output: str | Path
    fold: str = "auto"
    dense: str | None = None
    calibration: str = DEFAULT_CALIBRATION
    num_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    eval_corpora: tuple[str, ...] = DEFAULT_EVAL_CORPORA
    eval_windows: int | None = None
    device: str | None = None
    overwrite: bool = False
    progress: bool = True
    sequential: bool | None = None
    max_memory: str | int | None = None
    max_shard_size: str | int = DEFAULT_SHARD_SIZE


__all__ = [
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVAL_CORPORA",
    "DistillRequest",
    "EvalRequest",
    "ExportRequest",
    "PruneRequest",
    "Request",
]
