"""Evaluation: chunked perplexity, lm-eval tasks (offline ones included), model comparison, figures."""

from ..measurement.perplexity import chunked_perplexity, corpus_perplexity
from .comparison import ModelComparison, ModelEvaluation, compare_models, evaluate_checkpoints, retained_performance
from .figures import FiguresReport, plot_checkpoint, write_report_plots
from .tasks import OFFLINE_TASKS, build_offline_tasks, lm_eval_tasks

__all__ = [
    "OFFLINE_TASKS",
    "ModelComparison",
    "ModelEvaluation",
    "build_offline_tasks",
    "chunked_perplexity",
    "compare_models",
    "evaluate_checkpoints",
    "FiguresReport",
    "corpus_perplexity",
    "lm_eval_tasks",
    "plot_checkpoint",
    "retained_performance",
    "write_report_plots",
]
