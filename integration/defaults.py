"""Every default size in one place, for the Python API and the CLI alike.

Sizes follow the hardware: the paper's 128 x 2048 calibration tokens on a GPU, 32 x 512 on a CPU. Setting the
environment variable `LINEARPATCH_QUICK=1` shrinks every default (calibration, distillation, evaluation) to a smoke
test that finishes in seconds on a laptop; explicit arguments and flags still win.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    r"""
    Default sizes of one kind of run.

    Args:
        num_samples (`int`): windows of text.
        seq_len (`int`): tokens per window.
    """

    num_samples: int
    seq_len: int


CALIBRATION = {"cpu": Sizes(32, 512), "cuda": Sizes(128, 2048), "quick": Sizes(4, 64)}
DISTILLATION = {"cpu": Sizes(256, 512), "cuda": Sizes(5000, 2048), "quick": Sizes(4, 64)}
PERPLEXITY = {"cpu": Sizes(8, 512), "cuda": Sizes(64, 2048), "quick": Sizes(2, 64)}
# Figures (`linearpatch report`, `prune --plots`): one dense pass with every layer distance, then a forward of each
# model per window.
FIGURES = {"cpu": Sizes(8, 256), "cuda": Sizes(32, 1024), "quick": Sizes(2, 64)}
# lm-eval documents per task: 100 four-way questions are 400 requests per model, about 2 minutes for SmolLM2 on 2 CPU
# cores; the full offline tasks would take 5x longer.
TASK_LIMIT = {"cpu": 100, "cuda": 0, "quick": 8}
# lm-eval tasks of `linearpatch eval` and `compare_models`: offline, built from installed corpora (see
# evaluation/tasks.py). mmlu_dev_offline sits at chance for small models; the comparison flags such tasks.
DEFAULT_TASKS = ("wiki_next_sentence", "mmlu_dev_offline", "wiki_last_word")
# Blocks per depth that `prune --metric loss` scores on held-out windows, best cosine first (0: every start). Each
# costs about half a forward of the held-out windows per patch variant (7 for `--patch auto`).
DEFAULT_CANDIDATES = 4


def quick() -> bool:
    """True when `LINEARPATCH_QUICK` asks for smoke-test sizes."""
    return os.environ.get("LINEARPATCH_QUICK", "").lower() not in ("", "0", "false", "no")


def default_device() -> str:
    """`cuda` when torch sees a GPU, else `cpu`."""
    import torch  # here, not at the top: the CLI reads the sizes for its --help without torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _profile(device) -> str:
    if quick():
        return "quick"
    return "cuda" if str(device or default_device()).startswith("cuda") else "cpu"


def calibration_sizes(device=None) -> Sizes:
    """Calibration windows for a model on `device` (the paper's 128 x 2048 on a GPU)."""
    return CALIBRATION[_profile(device)]


def distillation_sizes(device=None) -> Sizes:
    """Distillation training windows for `device` (the paper's 5000 x 2048 on a GPU)."""
    return DISTILLATION[_profile(device)]


def perplexity_sizes(device=None) -> Sizes:
    """Held-out perplexity windows per corpus for `device`."""
    return PERPLEXITY[_profile(device)]


def figure_sizes(device=None) -> Sizes:
    """Windows for the figures of `linearpatch report` and `prune --plots`."""
    return FIGURES[_profile(device)]


def task_limit(device=None) -> int | None:
    """lm-eval documents per task for `device` (`None`: every document)."""
    return TASK_LIMIT[_profile(device)] or None


__all__ = [
    "Sizes",
    "calibration_sizes",
    "default_device",
    "distillation_sizes",
    "figure_sizes",
    "perplexity_sizes",
    "quick",
    "task_limit",
]
