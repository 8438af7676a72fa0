"""Evaluation: chunked perplexity, lm-eval tasks (offline ones included), model comparison, figures."""

from .comparison import ModelComparison, ModelEvaluation, compare_models, retained_performance
from .figures import plot_checkpoint, write_report_plots
from .perplexity import chunked_perplexity, corpus_perplexity, lm_eval_tasks
from .tasks import OFFLINE_TASKS, build_offline_tasks

__all__ = [
    "OFFLINE_TASKS",
    "ModelComparison",
    "ModelEvaluation",
    "build_offline_tasks",
    "chunked_perplexity",
    "compare_models",
    "corpus_perplexity",
    "lm_eval_tasks",
    "plot_checkpoint",
    "retained_performance",
    "write_report_plots",
]
