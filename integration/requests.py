"""What each command is asked to do, as data: one request per command, whose fields hold every option, its default
and its command-line flag (the field's metadata: flag, help, choices). The CLI's parser is generated from these fields
(`cli.py`), the Python API's keyword functions build the same request, and each job takes the request whole.

A request checks its own options when it is made (options that contradict each other, names that are not choices):
checks that need the model (its depth, its width) run where the model is opened.

Importable without torch or transformers, so that `linearpatch --help` stays quick.
"""

from dataclasses import dataclass
from pathlib import Path

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.names import is_repo_id

from .choices import (
    FOLDS,
    GGUF_HELP,
    GGUF_OPTION,
    IMATRIX_OPTION,
    OUTCOMES,
    PATCH_CHOICES,
    SELECTION_METRICS,
    gguf_types,
)
from .defaults import DEFAULT_CANDIDATES, DEFAULT_TASKS, GENERATION_TOKENS, TASK_LIMIT, TEACHER_TOP_K, describe
from .options import MODEL_OPTIONS, Request, non_negative_int, option, parse_layers, positive_int
from .service_requests import PullRequest, PushRequest, ServeRequest  # re-exported: every request in one place

DEFAULT_CALIBRATION = "wikipedia-calibration"
DEFAULT_EVAL_CORPORA = ("wikipedia-eval", "lee-news")
DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class PruneRequest(Request):
    r"""
    `linearpatch prune` ([`prune_checkpoint`]; the in-memory [`prune`] takes the same options). Each field's `help`
    is its documentation (and its flag's `--help`), as in `TrainingArguments`.

    What to remove is exactly one of `num_layers` (chosen by `metric`), `layers` (a list, or `20-24` as on the
    command line) or `target_ppl_ratio`; `calibration` may also be ready `TokenWindows` (Python API); `output` is
    required by [`prune_checkpoint`]; `progress` shows progress bars.
    """

    model: str = option(
        positional=True,
        help="dense model (llama, mistral, qwen2, qwen3 or gemma3_text): smollm2-135m (embedded), a local folder, or "
        "a Hub id",
    )
    num_layers: int | None = option(None, type=positive_int, group="which", help="layers to drop (chosen by --metric)")
    layers: list[int] | str | None = option(
        None, group="which", help="explicit layers, e.g. 20-24 or 3,7,9 (dense indices)"
    )
    target_ppl_ratio: float | None = option(
        None,
        group="which",
        metavar="R",
        help="drop the most layers whose pruned model stays within R x the dense perplexity on held-out calibration "
        "windows (metric loss and patch auto unless given)",
    )
    metric: str | None = option(
        None,
        choices=SELECTION_METRICS,
        help="how the block is chosen: a proxy (cosine, angular, block-influence), or loss or kl: the held-out "
        "perplexity or KL to the dense model of each patched candidate (default: cosine; loss with a target ratio)",
    )
    patch: str | None = option(
        None,
        choices=PATCH_CHOICES,
        help="patch kind fitted per gap (hadamard: the paper's), or auto: every kind (lstsq with a ridge grid) and no "
        "patch scored on held-out windows and the best kept (default: auto)",
    )
    score: str = option("loss", choices=OUTCOMES, help="what --patch auto keeps: the lowest held-out loss, or KL")
    holdout: int | None = option(
        None,
        type=positive_int,
        help="calibration windows held out (never fitted) to score loss, auto and --target-ppl-ratio "
        "(default: one in eight)",
    )
    candidates: int = option(
        DEFAULT_CANDIDATES,
        type=non_negative_int,
        help="blocks per depth that --metric loss scores, best cosine first (0: every start)",
    )
    calibration: str = option(DEFAULT_CALIBRATION, help="embedded corpus, .txt/.jsonl file or datasets name")
    num_samples: int | None = option(
        None, type=positive_int, help=f"calibration windows (default: {describe('calibration')})"
    )
    seq_len: int | None = option(None, type=positive_int, help="tokens per calibration window (default: see above)")
    seed: int = option(0, help="seed of the calibration window offsets")
    batch_size: int = option(1, type=positive_int, help="windows per calibration forward")
    base_model: str | None = option(None, help="Hub id to record as the dense model (default: the model's own)")
    eval_windows: int = option(0, type=non_negative_int, help="also report held-out perplexity on N windows")
    eval_seq_len: int | None = option(None, type=positive_int, help="tokens per evaluation window (default: as eval)")
    eval_corpora: tuple[str, ...] = option(
        DEFAULT_EVAL_CORPORA, flag="--eval-corpus", nargs="+", help="corpora for --eval-windows"
    )
    plots: bool = option(False, help="also write the figures of `linearpatch report`")
    sequential: bool | None = option(
        None,
        negatable=True,
        help="calibrate one layer at a time from the safetensors shards and stream the output, never holding the "
        "whole model (default: only when it does not fit --max-memory)",
    )
    max_memory: str | int | None = option(None, **MODEL_OPTIONS["max_memory"])
    max_shard_size: str | int = option(DEFAULT_SHARD_SIZE, help="weights shard size of a sequential output")
    output: str | Path | None = option(None, required=True, help="checkpoint folder to create")
    overwrite: bool = option(False, help="replace an existing output folder")
    dtype: str = option("auto", **MODEL_OPTIONS["dtype"])
    device: str | None = option(None, **MODEL_OPTIONS["device"])
    progress: bool = option(True, cli=False)

    def __post_init__(self):
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", parse_layers(self.layers))
        given = [value is not None for value in (self.num_layers, self.layers, self.target_ppl_ratio)]
        if sum(given) != 1:
            raise LinearPatchError(
                "Give exactly one of `num_layers` (chosen by the metric), `layers` (explicit) or `target_ppl_ratio` "
                "(the most layers within that held-out perplexity ratio)."
            )
        if self.patch is not None and self.patch not in PATCH_CHOICES:
            raise LinearPatchError(f"Unknown patch kind {self.patch!r}: choose one of {', '.join(PATCH_CHOICES)}.")
        if self.metric is not None and self.metric not in SELECTION_METRICS:
            raise LinearPatchError(f"Unknown metric {self.metric!r}: choose one of {', '.join(SELECTION_METRICS)}.")
        if self.layers is not None and self.metric is not None:
            raise LinearPatchError(
                f"--metric {self.metric} chooses which layers to drop, but --layers names them: drop one of the two "
                "(with --layers, --patch auto still chooses the patch by held-out perplexity)."
            )
        if self.holdout is not None and not self.chooses_by_outcome:
            raise LinearPatchError(
                "--holdout sets the windows that --metric loss/kl, --patch auto and --target-ppl-ratio score on; "
                "without one of them nothing is held out: drop --holdout, or add one of them."
            )
        if self.score != "loss" and self.patch_kind != "auto":
            raise LinearPatchError(f"--score {self.score} chooses among --patch auto's patches: add --patch auto.")
        if self.target_ppl_ratio is not None and not self.target_ppl_ratio > 1.0:
            raise LinearPatchError(
                f"--target-ppl-ratio {self.target_ppl_ratio} is not above 1: it bounds pruned / dense perplexity, "
                "e.g. 1.5."
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise LinearPatchError(f"Cannot prune {self.num_layers} layers: choose at least 1.")
        if self.base_model is not None and not is_repo_id(self.base_model):
            raise LinearPatchError(
                f"--base-model {self.base_model!r} is not a Hub repo id (org/name): it is recorded so that another "
                "machine can find the dense model."
            )

    @property
    def selection_metric(self) -> str:
        """The metric to use: the given one, else `loss` when searching for a target ratio and `cosine` (the paper's)
        when not (explicit layers are then chosen by nothing: the plan records `manual`)."""
        return self.metric or ("loss" if self.target_ppl_ratio is not None else "cosine")

    @property
    def patch_kind(self) -> str:
        """The patch to fit: the given one, else `auto` (bench `real_models`: best, or within 0.2% of the Hadamard
        patch, on both real models at every cut; the README's "Choose by outcome" has the figures)."""
        return self.patch or "auto"

    @property
    def chooses_by_outcome(self) -> bool:
        """Does this request score pruned models on held-out windows (and so need a held-out split)?"""
        return self.metric in OUTCOMES or self.patch_kind == "auto" or self.target_ppl_ratio is not None


@dataclass(frozen=True)
class DistillRequest(Request):
    r"""
    `linearpatch distill` ([`distill_checkpoint`]). Each field's `help` is its documentation; the recipe defaults
    to the paper's (AdamW lr 1e-4, cosine to lr/20, batch 1, one epoch). With `export`, the stock export's fold maps
    and frames (and maps on the writers before each gap) train instead of the patches (`distillation/folded.py`),
    from the export's training-free fold on calibration windows of `data`.
    """

    checkpoint: str = option(positional=True, help="a LinearPatch checkpoint (from `linearpatch prune`)")
    teacher: str = option(required=True, help="the dense model (run once, in a separate process)")
    output: str | Path = option(required=True, help="folder for the merged checkpoint (or the adapter)")
    top_k: int = option(TEACHER_TOP_K, type=positive_int, help="teacher log-probabilities kept per token")
    data: str = option(
        DEFAULT_CALIBRATION,
        help="training text (embedded corpus, file, datasets name), or generated: the teacher continues prompts of "
        "the calibration corpus (cached beside the teacher cache)",
    )
    gen_temperature: float = option(1.0, help="with --data generated: the teacher's sampling temperature")
    gen_top_p: float = option(0.95, help="with --data generated: the teacher's nucleus (top-p) sampling")
    num_samples: int | None = option(
        None, type=positive_int, help=f"training windows (default: {describe('distillation')})"
    )
    seq_len: int | None = option(None, type=positive_int, help="tokens per training window (default: see above)")
    epochs: float = option(1.0, help="passes over the training windows")
    lr: float = option(1e-4, help="AdamW learning rate (cosine decay to lr/20)")
    batch_size: int = option(1, type=positive_int, help="windows per device per step")
    gradient_accumulation_steps: int = option(1, type=positive_int, help="steps per update")
    max_steps: int = option(0, type=non_negative_int, help="stop after N steps (0: no limit)")
    temperature: float = option(1.0, help="distillation temperature")
    seed: int = option(1, help="window sampling and training seed")
    bf16: bool = option(False, help="train in bf16 mixed precision (GPU)")
    activation_checkpointing: bool = option(False, help="trade compute for memory")
    save_steps: int = option(0, type=non_negative_int, help="Trainer checkpoint every N steps (for --resume)")
    resume: bool = option(False, help="resume from the last checkpoint in --work-dir")
    work_dir: str | Path | None = option(None, help="Trainer checkpoints with --save-steps (default: OUTPUT.work)")
    cache_dir: str | Path | None = option(
        None, help="teacher cache root (default: ~/.cache/linearpatch/teacher-cache)"
    )
    adapter_only: bool = option(False, help="write only the PEFT adapter, not merged")
    export: bool = option(
        False,
        help="train, per gap, a map on the MLP output before it and the rotation after it instead of the patch "
        "(started from the best training-free `export --fold auto`) and write the family's stock architecture with "
        "them folded in",
    )
    export_layers: int = option(
        3,
        type=non_negative_int,
        help="with --export: also train a map on every writer (attention and MLP output) of the N kept layers before "
        "each gap, each folded into its o_proj or down_proj; 0: only the map before the gap",
    )
    gguf: tuple[str, ...] = option((), **GGUF_OPTION | dict(help="with --export: " + GGUF_HELP))
    imatrix: bool | None = option(None, **IMATRIX_OPTION)
    eval_corpora: tuple[str, ...] = option(
        DEFAULT_EVAL_CORPORA, flag="--eval-corpus", nargs="*", help="with --export: held-out perplexity corpora"
    )
    eval_windows: int | None = option(
        None,
        type=non_negative_int,
        help=f"with --export: held-out windows per corpus; 0 skips the comparison (default: {describe('perplexity')})",
    )
    sequential: bool | None = option(
        None,
        negatable=True,
        help="train the student with its layers read from the shards, forward and backward, one at a time (default: "
        "when it does not fit --max-memory)",
    )
    stream_cache: bool = option(
        True,
        negatable=True,
        help="store the stream entering the first patch with the teacher cache (its size is printed), so that every "
        "step starts there instead of running the layers before it",
    )
    sequential_teacher: bool | None = option(
        None,
        negatable=True,
        help="build the teacher cache one layer at a time from its shards (default: if it exceeds --max-memory)",
    )
    max_memory: str | None = option(
        None,
        help="memory a model may use on the device, e.g. 80GB (default: its free memory); a larger student is "
        "spread with device_map='auto'",
    )
    overwrite: bool = option(False, help="replace an existing output folder")
    dtype: str = option("auto", **MODEL_OPTIONS["dtype"])
    device: str | None = option(None, **MODEL_OPTIONS["device"])

    def __post_init__(self):
        """Refuse a recipe that cannot train, and options that contradict each other (before the teacher runs)."""
        for name in ("num_samples", "seq_len", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LinearPatchError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
        if not self.temperature > 0:
            raise LinearPatchError(
                f"--temperature {self.temperature} must be above 0: the logits are divided by it (1, the paper's, is "
                "usual)."
            )
        if not self.lr > 0:
            raise LinearPatchError(f"--lr {self.lr} must be above 0 (the paper's is 1e-4).")
        if not self.epochs > 0 and not self.max_steps:
            raise LinearPatchError(
                f"--epochs {self.epochs} trains for zero steps: give a number above 0 (or --max-steps N)."
            )
        object.__setattr__(self, "gguf", gguf_types(self.gguf, self.imatrix))
        if self.gguf and not self.export:
            raise LinearPatchError("--gguf converts the stock export: add --export.")
        if self.export and self.adapter_only:
            raise LinearPatchError(
                "--export writes a stock model with the trained maps folded in, --adapter-only writes only an "
                "adapter: choose one."
            )


@dataclass(frozen=True)
class EvalRequest(Request):
    r"""
    `linearpatch eval` ([`evaluate_checkpoints`], [`compare_models`]). Each field's `help` is its documentation: the
    models compared with the dense baseline, the lm-eval tasks, the held-out windows that perplexity and closeness to
    the baseline (`measurement/closeness.py`) are measured on, and the greedy generations compared.
    """

    models: list[str] = option(
        positional=True, nargs="+", help="models to compare (folders, adapters, Hub ids, smollm2-135m)"
    )
    baseline: str = option(required=True, help="the dense model")
    tasks: tuple[str, ...] = option(
        DEFAULT_TASKS,
        nargs="*",
        help="lm-eval tasks: the offline ones, or lm-eval names (arc_easy, piqa, ...) with Hub access",
    )
    limit: int | None = option(
        -1,
        help=f"documents per task (-1: {TASK_LIMIT['cpu']} on CPU, all on GPU, {TASK_LIMIT['quick']} quick; 0: all)",
    )
    corpora: tuple[str, ...] = option(
        DEFAULT_EVAL_CORPORA, flag="--ppl-corpus", nargs="*", help="corpora for chunked perplexity"
    )
    perplexity_windows: int | None = option(
        None,
        flag="--ppl-windows",
        type=positive_int,
        help=f"windows per corpus (default: {describe('perplexity')})",
    )
    seq_len: int | None = option(None, type=positive_int, help="perplexity window length (paper: 2048)")
    generation_prompts: int | None = option(
        None,
        flag="--gen-prompts",
        type=non_negative_int,
        help=f"held-out prompts x prompt tokens that every model continues greedily, compared with the baseline's "
        f"continuations; 0 skips it (default: {describe('generation')})",
    )
    generation_tokens: int = option(
        GENERATION_TOKENS, flag="--gen-tokens", type=positive_int, help="greedy tokens per prompt"
    )
    batch_size: int = option(8, type=positive_int, help="lm-eval batch size")
    output: str | Path | None = option(
        None, help="folder for linearpatch_eval.json/.md (a checkpoint folder: push shows it on the card)"
    )
    overwrite: bool = option(False, help="replace existing linearpatch_eval files")
    sequential: bool | None = option(
        None,
        negatable=True,
        help="score perplexity and closeness one layer at a time from each folder's shards (default: for a model that "
        "does not fit --max-memory; lm-eval tasks and generation need models whole)",
    )
    max_memory: str | int | None = option(None, **MODEL_OPTIONS["max_memory"])
    dtype: str = option("float32", **MODEL_OPTIONS["compute_dtype"])
    device: str | None = option(None, **MODEL_OPTIONS["device"])


@dataclass(frozen=True)
class ReportRequest(Request):
    r"""
    `linearpatch report` ([`plot_checkpoint`]). Each field's `help` is its documentation; `progress` (no flag) turns
    the progress bars off for the Python API.
    """

    checkpoint: str = option(positional=True, help="a LinearPatch checkpoint folder")
    dense: str | None = option(None, help="the dense model (default: the checkpoint's base_model when available)")
    data: str = option("wikipedia-eval", help="text for the windows")
    num_samples: int | None = option(None, type=positive_int, help=f"windows (default: {describe('figures')})")
    seq_len: int | None = option(None, type=positive_int, help="tokens per window (default: see above)")
    seed: int = option(0, help="seed of the window offsets")
    overwrite: bool = option(False, help="replace figures already in the folder")
    device: str | None = option(None, help="cpu, cuda, ... (default: cuda when available)")
    progress: bool = option(True, cli=False)


@dataclass(frozen=True)
class ExportRequest(Request):
    r"""
    `linearpatch export` ([`export_checkpoint`]). Each field's `help` is its documentation: the fold (one of
    `FOLDS`, see `export/`), the dense model for the dense objectives, the fit text (`auto` holds out one window in
    eight of it), and the held-out comparison of the patched checkpoint, the export and plain pruning.
    """

    checkpoint: str = option(positional=True, help="a LinearPatch checkpoint")
    output: str | Path = option(required=True, help="folder for the stock-architecture model")
    fold: str = option(
        "auto",
        choices=FOLDS,
        help="auto: fit a map on the MLP output before each gap (folded into that layer's down_proj) to each "
        "objective and keep the best on held-out calibration windows; down-proj: reproduce the patched stream; "
        "down-proj-dense / down-proj-cosine: reproduce the dense model's stream by least squares / cosine distance; "
        "down-proj-rotated: the same by least squares together with a rotation and scale of the stream after the "
        "gap, folded into every later layer and the head (Llama, Mistral, Qwen; unties the head); scalar: Prune&Comp "
        "scaling (exact for scalar patches). A gap at layer 0 is always folded exactly into the embeddings",
    )
    score: str = option("loss", choices=OUTCOMES, help="what auto keeps: the lowest held-out loss, or KL to --dense")
    dense: str | None = option(
        None,
        help="the dense model the checkpoint was pruned from, for the dense objectives (default: its base_model; "
        "auto leaves them out, with a warning, when that cannot be opened)",
    )
    calibration: str = option(DEFAULT_CALIBRATION, help="text for the fit")
    num_samples: int | None = option(None, type=positive_int, help=f"fit windows (default: {describe('calibration')})")
    seq_len: int | None = option(None, type=positive_int, help="tokens per fit window (default: see above)")
    seed: int = option(0, help="seed of the fit window offsets")
    eval_corpora: tuple[str, ...] = option(
        DEFAULT_EVAL_CORPORA, flag="--eval-corpus", nargs="*", help="held-out perplexity corpora"
    )
    eval_windows: int | None = option(
        None,
        type=non_negative_int,
        help=f"held-out windows per corpus; 0 skips the comparison (default: {describe('perplexity')})",
    )
    overwrite: bool = option(False, help="replace an existing output folder")
    sequential: bool | None = option(
        None,
        negatable=True,
        help="fit layer by layer and stream the folded tensors, never holding the checkpoint (default: when it does "
        "not fit --max-memory; skips the held-out comparison)",
    )
    max_memory: str | int | None = option(None, **MODEL_OPTIONS["max_memory"])
    max_shard_size: str | int = option(DEFAULT_SHARD_SIZE, help="weights shard size of a sequential output")
    gguf: tuple[str, ...] = option((), **GGUF_OPTION)
    imatrix: bool | None = option(None, **IMATRIX_OPTION)
    dtype: str = option("auto", **MODEL_OPTIONS["dtype"])
    device: str | None = option(None, help="cpu, cuda, ... (default: cuda when available)")
    progress: bool = option(True, cli=False)

    def __post_init__(self):
        object.__setattr__(self, "gguf", gguf_types(self.gguf, self.imatrix))
        if self.fold not in FOLDS:
            raise LinearPatchError(f"Unknown fold {self.fold!r}: choose one of {', '.join(FOLDS)}.")


__all__ = [
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVAL_CORPORA",
    "DistillRequest",
    "EvalRequest",
    "ExportRequest",
    "PruneRequest",
    "PullRequest",
    "PushRequest",
    "ReportRequest",
    "ServeRequest",
]
