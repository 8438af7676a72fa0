"""Side-by-side comparison of dense, pruned, patched and distilled models: accuracy, retained performance, PPL."""

import json
from dataclasses import asdict, dataclass, field

from .evaluation import corpus_perplexity, lm_eval_tasks
from .models import load_model


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
        tasks (`dict[str, dict[str, float]]`): lm-eval metrics per task (`acc`, `acc_norm` where defined).
        perplexity (`dict[str, float]`): chunked perplexity per corpus.
    """

    name: str
    parameters: int
    num_layers: int
    pruned_layers: list[int] = field(default_factory=list)
    patch_kind: str | None = None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)


def primary_accuracy(metrics: dict[str, float]) -> float:
    """`acc_norm` where the task defines it, else `acc` (the paper's convention)."""
    return metrics["acc_norm"] if "acc_norm" in metrics else metrics["acc"]


def average_accuracy(evaluation: ModelEvaluation) -> float:
    """Mean over tasks of the primary accuracy, in percent."""
    values = [primary_accuracy(metrics) for metrics in evaluation.tasks.values()]
    return 100.0 * sum(values) / len(values) if values else float("nan")


def retained_performance(evaluation: ModelEvaluation, baseline: ModelEvaluation) -> float:
    """RP = mean over tasks of (model accuracy / dense accuracy) x 100: the mean of ratios, not the ratio of means.

    Raises:
        ValueError: if a task is missing from the baseline, or the baseline scores 0 on it.
    """
    ratios = []
    for task, metrics in evaluation.tasks.items():
        if task not in baseline.tasks:
            raise ValueError(f"The baseline was not evaluated on {task!r}; evaluate both on the same tasks.")
        dense = primary_accuracy(baseline.tasks[task])
        if dense == 0:
            raise ValueError(f"The baseline scores 0 on {task!r}: retained performance is undefined.")
        ratios.append(primary_accuracy(metrics) / dense)
    return 100.0 * sum(ratios) / len(ratios) if ratios else float("nan")


def evaluate_model(
    name: str,
    tasks: list[str],
    limit: int | None = None,
    corpora: list[str] = (),
    perplexity_windows: int = 16,
    seq_len: int = 512,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str | None = None,
) -> ModelEvaluation:
    """Load `name` (embedded name, folder or Hub id) and evaluate it on `tasks` (lm-eval) and `corpora` (PPL)."""
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    config = model.config
    evaluation = ModelEvaluation(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        num_layers=config.num_hidden_layers,
        pruned_layers=list(getattr(config, "pruned_layers", None) or []),
        patch_kind=getattr(config, "patch_kind", None),
    )
    if tasks:
        evaluation.tasks = lm_eval_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
    for corpus in corpora:
        evaluation.perplexity[corpus] = corpus_perplexity(model, tokenizer, corpus, perplexity_windows, seq_len)
    return evaluation


def comparison(evaluations: list[ModelEvaluation], baseline: ModelEvaluation) -> dict:
    """The comparison as JSON-ready data: every model's figures plus average, RP and parameter ratio."""
    rows = []
    for evaluation in [baseline, *evaluations]:
        row = asdict(evaluation)
        row["average"] = average_accuracy(evaluation)
        row["retained_performance"] = None
        if evaluation.tasks:
            try:
                row["retained_performance"] = retained_performance(evaluation, baseline)
            except ValueError as error:  # e.g. the baseline scored 0 on a task: say so instead of failing the run
                row["retained_performance_note"] = str(error)
        row["parameter_ratio"] = evaluation.parameters / baseline.parameters
        rows.append(row)
    return {"baseline": baseline.name, "models": rows}


def markdown_table(data: dict) -> str:
    """Render [`comparison`] data as a Markdown table (accuracies in percent)."""
    rows = data["models"]
    tasks = sorted({task for row in rows for task in row["tasks"]})
    corpora = sorted({corpus for row in rows for corpus in row["perplexity"]})
    header = ["model", "dropped layers", "params (ratio)"]
    for task in tasks:
        metrics = sorted({m for row in rows for m in row["tasks"].get(task, {}) if m in ("acc", "acc_norm")})
        header += [f"{task} {metric}" for metric in metrics]
    header += ["avg", "RP %"] + [f"PPL {corpus}" for corpus in corpora]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
        cells.append(f"{row['retained_performance']:.2f}" if row["retained_performance"] is not None else "-")
        cells += [f"{row['perplexity'][c]:.2f}" if c in row["perplexity"] else "-" for c in corpora]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2)


__all__ = [
    "ModelEvaluation",
    "average_accuracy",
    "comparison",
    "evaluate_model",
    "markdown_table",
    "primary_accuracy",
    "retained_performance",
]
