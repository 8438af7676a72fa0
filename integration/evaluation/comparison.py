"""Side-by-side comparison of dense, pruned, patched and distilled models: accuracy, retained performance, PPL, and
closeness to the dense model (KL, top-1 and top-10 agreement, greedy generation agreement)."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from linearpatch.common import reporting
from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import check_output, write_files_atomically
from linearpatch.common.names import EVAL_FILES

from ..data import TokenWindows
from ..defaults import TEACHER_TOP_K, Sizes, task_limit
from ..measurement.closeness import (
    Reference,
    compare_with,
    generation_agreement,
    greedy_continuations,
    held_out_prompts,
    reference_of,
)
from ..measurement.perplexity import held_out_windows
from ..models import ModelRef, check_same_vocabulary, load_tokenizer, open_model, resolve_device
from ..requests import EvalRequest
from .opening import open_baseline, opened_model, place_models
from .tasks import chance_accuracy, lm_eval_tasks, task_manager

# A task counts as solved by the dense model only if it beats chance by more than this many standard errors.
CHANCE_STDERRS = 2.0


@dataclass
class ModelEvaluation:
    r"""
    Evaluation of one model.

    Args:
        name (`str`): what the user passed (path, Hub id or embedded name).
        parameters (`int`): parameter count (tied weights counted once).
        num_layers (`int`): decoder layers the model runs.
        pruned_layers (`list[int]`): dense indices it dropped (empty for a dense model).
        patch_kind (`str`): how its patches were made, if any.
        tasks (`dict[str, dict[str, float]]`): lm-eval metrics per task (`acc`, `acc_norm` where defined, and their
            `_stderr`).
        perplexity (`dict[str, float]`): chunked perplexity per corpus.
        closeness (`dict[str, dict[str, float]]`): per corpus, against the baseline on the same windows: `kl` (mean
            nats per token), `top1` and `top10` agreement (see `measurement/closeness.py`); empty for the baseline.
        generation (`dict[str, float]`): greedy generation agreement with the baseline: `identical_prefix` (mean
            tokens) and `identical_tokens` (share); empty for the baseline.
    """

    name: str
    parameters: int
    num_layers: int
    pruned_layers: list[int] = field(default_factory=list)
    patch_kind: str | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    closeness: dict[str, dict[str, float]] = field(default_factory=dict)
    generation: dict[str, float] = field(default_factory=dict)


@dataclass
class Baseline:
    r"""
    What the baseline left for the others to be compared with: its [`Reference`] on each corpus's windows, the
    greedy-generation prompts and its continuations of them (`None` when generation is skipped).
    """

    references: dict[str, Reference]
    prompts: torch.Tensor | None = None
    continuations: torch.Tensor | None = None


def primary_accuracy(metrics: dict[str, float]) -> float:
    """`acc_norm` where the task defines it, else `acc` (the paper's convention)."""
    return metrics["acc_norm"] if "acc_norm" in metrics else metrics["acc"]


def average_accuracy(evaluation: ModelEvaluation) -> float:
    """Mean over tasks of the primary accuracy, in percent."""
    values = [primary_accuracy(metrics) for metrics in evaluation.tasks.values()]
    return 100.0 * sum(values) / len(values) if values else float("nan")


def primary_stderr(metrics: dict[str, float]) -> float | None:
    """The standard error of [`primary_accuracy`], when lm-eval reported it."""
    return metrics.get("acc_norm_stderr" if "acc_norm" in metrics else "acc_stderr")


def chance_flags(baseline: ModelEvaluation) -> dict[str, dict]:
    """Per task: chance accuracy, the dense accuracy and its standard error, and `at_chance`: the dense model is
    within `CHANCE_STDERRS` standard errors of chance, so a pruned model's ratio on it measures noise, not retained
    ability (a task whose chance level or standard error is unknown is never flagged)."""
    flags = {}
    for task, metrics in baseline.tasks.items():
        chance, accuracy, stderr = chance_accuracy(task), primary_accuracy(metrics), primary_stderr(metrics)
        at_chance = chance is not None and stderr is not None and accuracy - chance <= CHANCE_STDERRS * stderr
        flags[task] = dict(chance=chance, dense=accuracy, stderr=stderr, at_chance=at_chance)
    return flags


def retained_performance(
    evaluation: ModelEvaluation, baseline: ModelEvaluation, tasks: list[str] | None = None
) -> float:
    """RP = mean over tasks of (model accuracy / dense accuracy) x 100: the mean of ratios, not the ratio of means.

    Args:
        tasks (`list[str]`, *optional*): only these tasks (e.g. those the dense model does above chance).

    Raises:
        ValueError: if a task is missing from the baseline, or the baseline scores 0 on it.
    """
    ratios = []
    for task, metrics in evaluation.tasks.items():
        if tasks is not None and task not in tasks:
            continue
        if task not in baseline.tasks:
            raise ValueError(f"The baseline was not evaluated on {task!r}; evaluate both on the same tasks.")
        dense = primary_accuracy(baseline.tasks[task])
        if dense == 0:
            raise ValueError(f"The baseline scores 0 on {task!r}: retained performance is undefined.")
        ratios.append(primary_accuracy(metrics) / dense)
    return 100.0 * sum(ratios) / len(ratios) if ratios else float("nan")


def _evaluate_tasks(name: str, request: EvalRequest, model, tokenizer) -> ModelEvaluation:
    """Describe the opened model `name` and run the request's lm-eval tasks on it."""
    config = model.config
    evaluation = ModelEvaluation(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),  # meta tensors of a layer-by-layer model count too
        num_layers=config.num_hidden_layers,
        pruned_layers=list(getattr(config, "pruned_layers", None) or []),
        patch_kind=getattr(config, "patch_kind", None),
    )
    if request.tasks:
        limit = documents_per_task(request.limit, resolve_device(request.device))
        tasks = list(request.tasks)
        evaluation.tasks = lm_eval_tasks(model, tokenizer, tasks, limit=limit, batch_size=request.batch_size)
    return evaluation


def evaluate_baseline(
    ref: ModelRef, request: EvalRequest, windows: dict[str, TokenWindows], loaded: tuple | None = None
) -> tuple[ModelEvaluation, Baseline]:
    """Evaluate the baseline `ref` as [`evaluate_model`] does, and keep what the others are compared with: its
    top-K predictions on the perplexity `windows` (from the same forward passes as its perplexity) and its greedy
    continuations of the held-out prompts (none when a model runs layer by layer: [`place_models`])."""
    with opened_model(ref, request, loaded) as (model, tokenizer):
        evaluation = _evaluate_tasks(ref.name, request, model, tokenizer)
        references = {}
        for corpus, text in windows.items():
            references[corpus], evaluation.perplexity[corpus] = reference_of(model, text, TEACHER_TOP_K, True)
        device = resolve_device(request.device)
        sizes = Sizes.resolve("generation", device, request.generation_prompts, None, model.config)
        layerwise = ref.layerwise
        prompts = None if layerwise else held_out_prompts(tokenizer, request.corpora, sizes.num_samples, sizes.seq_len)
        continuations = None if prompts is None else greedy_continuations(model, prompts, request.generation_tokens)
    return evaluation, Baseline(references, prompts, continuations)


def evaluate_model(
    ref: ModelRef, request: EvalRequest, baseline: Baseline, loaded: tuple | None = None
) -> ModelEvaluation:
    """Load `ref` (an opened embedded name, folder, adapter folder or Hub id; run layer by layer from its shards where
    [`place_models`] said so) and evaluate it on the request's lm-eval tasks, and on the `baseline`'s windows: its
    perplexity and its closeness to the baseline (the same forward passes), and its greedy generation agreement;
    `loaded` is an already loaded `(model, tokenizer)` of it."""
    with opened_model(ref, request, loaded) as (model, tokenizer):
        evaluation = _evaluate_tasks(ref.name, request, model, tokenizer)
        for corpus, reference in baseline.references.items():
            evaluation.closeness[corpus], evaluation.perplexity[corpus] = compare_with(model, reference, progress=True)
        if baseline.prompts is not None:
            continuations = greedy_continuations(model, baseline.prompts, request.generation_tokens)
            evaluation.generation = generation_agreement(continuations, baseline.continuations)
    return evaluation


def documents_per_task(limit: int | None, device) -> int | None:
    """lm-eval documents per task: `-1` the device's default, `0` or `None` every document."""
    return task_limit(device) if limit == -1 else (limit or None)


def comparison(evaluations: list[ModelEvaluation], baseline: ModelEvaluation) -> dict:
    """The comparison as JSON-ready data: every model's figures plus average, RP (over every task, and over the
    tasks the dense model does above chance, see [`chance_flags`]) and parameter ratio."""
    flags = chance_flags(baseline)
    informative = [task for task, flag in flags.items() if not flag["at_chance"]]
    rows = []
    for evaluation in [baseline, *evaluations]:
        row = asdict(evaluation)
        row["average"] = average_accuracy(evaluation)
        row["retained_performance"] = row["retained_performance_above_chance"] = None
        if evaluation.tasks:
            try:
                row["retained_performance"] = retained_performance(evaluation, baseline)
                if informative:
                    row["retained_performance_above_chance"] = retained_performance(evaluation, baseline, informative)
            except ValueError as error:  # e.g. the baseline scored 0 on a task: say so instead of failing the run
                row["retained_performance_note"] = str(error)
        row["parameter_ratio"] = evaluation.parameters / baseline.parameters
        rows.append(row)
    return {
        "baseline": baseline.name,
        "models": rows,
        "chance": flags,
        "at_chance": [task for task, flag in flags.items() if flag["at_chance"]],
    }


def comparison_table(data: dict) -> str:
    """Render [`comparison`] data as a Markdown table (accuracies in percent)."""
    rows = data["models"]
    tasks = sorted({task for row in rows for task in row["tasks"]})
    corpora = sorted({corpus for row in rows for corpus in row["perplexity"]})
    header = ["model", "dropped layers", "params (ratio)"]
    for task in tasks:
        metrics = sorted({m for row in rows for m in row["tasks"].get(task, {}) if m in ("acc", "acc_norm")})
        header += [f"{task} {metric}" for metric in metrics]
    header += ["avg", "RP %", "RP % above chance"] + [f"PPL {corpus}" for corpus in corpora]
    close = sorted({corpus for row in rows for corpus in row.get("closeness", {})})
    generated = any(row.get("generation") for row in rows)
    header += [f"KL {corpus}" for corpus in close] + (["top-1 %", "top-10 %"] if close else [])
    header += ["gen prefix", "gen same %"] if generated else []
    cells_of_rows = []
    for row in rows:
        cells = [
            row["name"],
            ",".join(map(str, row["pruned_layers"])) or "-",
            f"{row['parameters'] / 1e6:.1f}M ({row['parameter_ratio']:.3f})",
        ]
        for task in tasks:
            metrics = sorted({m for r in rows for m in r["tasks"].get(task, {}) if m in ("acc", "acc_norm")})
            cells += [f"{100 * row['tasks'][task][m]:.2f}" if task in row["tasks"] else "-" for m in metrics]
        cells.append(f"{row['average']:.2f}" if tasks else "-")
        for key in ("retained_performance", "retained_performance_above_chance"):
            cells.append(f"{row[key]:.2f}" if row.get(key) is not None else "-")
        cells += [f"{row['perplexity'][c]:.2f}" if c in row["perplexity"] else "-" for c in corpora]
        cells += _closeness_cells(row, close, generated)
        cells_of_rows.append(cells)
    lines = [reporting.markdown_table(header, cells_of_rows)]
    if close or generated:
        settings = data.get("settings", {})
        lines += ["", _closeness_legend(settings, generated)]
    flagged = [(task, data["chance"][task]) for task in data.get("at_chance") or []]
    if flagged:
        lines.append("")
        lines.append(
            f"At chance for the dense model (within {CHANCE_STDERRS:g} standard errors), left out of `RP % above "
            "chance`: "
            + ", ".join(f"{task} ({100 * f['dense']:.1f} vs chance {100 * f['chance']:.0f})" for task, f in flagged)
        )
    return "\n".join(lines) + "\n"


def _closeness_legend(settings: dict, generated: bool) -> str:
    top_k = settings.get("closeness_top_k", "K")
    legend = (
        f"Closeness to the baseline on the same held-out windows: KL(baseline || model) in nats per token (over the "
        f"baseline's top {top_k} tokens and the rest of its mass), teacher-forced top-1 and top-10 agreement"
    )
    if generated:
        prompts, tokens = settings.get("generation_prompts"), settings.get("generation_tokens")
        legend += (
            f"; {prompts} held-out prompts continued greedily for {tokens} tokens: the mean length of the prefix "
            "identical to the baseline's continuation, and the share of identical tokens"
        )
    return legend + "."


def _closeness_cells(row: dict, corpora: list[str], generated: bool) -> list[str]:
    """A row's KL per corpus, top-1 and top-10 agreement (mean over the corpora) and generation agreement; `-` for
    the baseline, which they compare with."""
    closeness, generation = row.get("closeness") or {}, row.get("generation") or {}
    cells = [f"{closeness[c]['kl']:.3f}" if c in closeness else "-" for c in corpora]
    if corpora:
        for name in ("top1", "top10"):
            values = [figures[name] for figures in closeness.values()]
            cells.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
    if generated:
        cells.append(f"{generation['identical_prefix']:.1f}" if generation else "-")
        cells.append(f"{100 * generation['identical_tokens']:.1f}" if generation else "-")
    return cells


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2)


@dataclass
class ModelComparison:
    r"""
    The result of `linearpatch eval`: every model beside the dense baseline.

    Args:
        data (`dict`): [`comparison`] data plus `settings` (JSON as written to `linearpatch_eval.json`).
        table (`str`): the Markdown table (`linearpatch_eval.md`).
        estimate_seconds (`float` or `None`): the up-front estimate of the run's time (none when the baseline runs
            layer by layer).
        seconds (`float`): what it took.
        written (`list[str]`): files written.
    """

    data: dict
    table: str
    estimate_seconds: float | None = 0.0
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)

    record = EVAL_FILES[0]

    def to_json(self) -> str:
        return to_json(self.data)

    def summary(self) -> str:
        """The table, the time it took and the files written: what `linearpatch eval` prints."""
        estimated = "" if self.estimate_seconds is None else f" (estimated {self.estimate_seconds / 60:.1f})"
        lines = [self.table, f"Took {self.seconds / 60:.1f} min{estimated}."]
        if self.written:
            lines.append(f"Wrote {', '.join(self.written)}")
        return "\n".join(lines)


def compare_models(models: list[str], baseline: str, log=print, **options) -> ModelComparison:
    r"""
    `linearpatch eval`: evaluate the dense baseline and each model on the same tasks and corpora, side by side.

    Every input (devices, models, task names, corpora, output files) is checked before the first model is loaded,
    and an estimate of the run's time is logged once the baseline is loaded.

    Args:
        models (`list[str]`): pruned, patched or distilled checkpoints (folders, adapter folders or Hub ids).
        baseline (`str`): the dense model.
        tasks (`list[str]`): lm-eval tasks (the offline ones work without the Hub).
        limit (`int`, *optional*): documents per task; `-1` for the device's default (100 on CPU), `None` or 0 for
            all.
        perplexity_windows (`int`, *optional*), seq_len (`int`, *optional*): chunked perplexity windows per corpus
            (defaults: see `linearpatch.integration.defaults`).
        output (`str` or `Path`, *optional*): folder for `linearpatch_eval.json` and `.md` (a checkpoint's own
            folder works: `linearpatch push` puts the table on its card).
        log (`callable`, *optional*, defaults to `print`): where progress lines go.
        Other keywords: the fields of [`EvalRequest`], which hold every default.

    Returns:
        `ModelComparison`
    """
    return evaluate_checkpoints(EvalRequest(models=models, baseline=baseline, **options), log=log)


def evaluate_checkpoints(request: EvalRequest, log=print) -> ModelComparison:
    """The job of `linearpatch eval` ([`compare_models`] with its request made); `log` takes the progress lines."""
    started = time.perf_counter()
    device = resolve_device(request.device)
    tasks, limit = request.tasks, request.limit
    if limit is not None and limit < -1:
        raise LinearPatchError(f"--limit {limit}: give the documents per task (0: all; -1: the device's default).")
    if request.output is not None:
        for name in EVAL_FILES:
            check_output(Path(request.output) / name, request.overwrite)
    # Every model, adapter and export is opened and checked once, before the first forward pass of any of them.
    opened = [open_model(request.baseline)]
    for name in request.models:
        opened.append(open_model(name))
        # Every model is scored on the baseline's tokens, and retained performance compares like with like.
        check_same_vocabulary(
            name,
            opened[-1].config.vocab_size,
            f"the baseline {request.baseline}",
            opened[0].config.vocab_size,
            "compare a pruned model with the dense model it was pruned from.",
        )
    limit = documents_per_task(limit, device)
    sizes = Sizes.resolve("perplexity", device, request.perplexity_windows, request.seq_len, opened[0].config)
    if tasks:
        task_manager(list(tasks))
    opened = place_models(opened, request, device)
    windows = held_out_windows(load_tokenizer(opened[0]), request.corpora, sizes.num_samples, sizes.seq_len)

    dense, estimate = open_baseline(request, opened, windows, limit, device, log)

    def announce(ref: ModelRef) -> ModelRef:
        log(f"[{time.perf_counter() - started:.0f}s] evaluating {ref}")
        return ref

    baseline_result, baseline = evaluate_baseline(announce(opened[0]), request, windows, dense)
    del dense
    results = [evaluate_model(announce(ref), request, baseline) for ref in opened[1:]]
    data = comparison(results, baseline_result)
    data["settings"] = dict(
        tasks=list(tasks),
        limit=limit,
        corpora=list(request.corpora),
        perplexity_windows=sizes.num_samples,
        seq_len=sizes.seq_len,
        closeness_top_k=TEACHER_TOP_K,
        generation_prompts=0 if baseline.prompts is None else len(baseline.prompts),
        generation_prompt_tokens=0 if baseline.prompts is None else baseline.prompts.shape[1],
        generation_tokens=request.generation_tokens,
        batch_size=request.batch_size,
        dtype=request.dtype,
    )
    result = ModelComparison(data, comparison_table(data), estimate, time.perf_counter() - started)
    if request.output is not None:
        files = {EVAL_FILES[0]: to_json(data), EVAL_FILES[1]: result.table}
        write_files_atomically(request.output, files, request.overwrite)
        result.written = [str(Path(request.output) / name) for name in EVAL_FILES]
    return result


__all__ = [
    "ModelComparison",
    "ModelEvaluation",
    "compare_models",
    "documents_per_task",
    "evaluate_checkpoints",
    "average_accuracy",
    "chance_flags",
    "comparison",
    "evaluate_baseline",
    "evaluate_model",
    "comparison_table",
    "primary_accuracy",
    "retained_performance",
]
