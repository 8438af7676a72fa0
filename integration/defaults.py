"""Every default size in one place, for the Python API and the CLI alike.

Sizes follow the hardware: the paper's 128 x 2048 calibration tokens on a GPU, 32 x 512 on a CPU. Setting the
environment variable `LINEARPATCH_QUICK=1` shrinks every default (calibration, distillation, evaluation) to a smoke
test that finishes in seconds on a laptop; explicit arguments and flags still win. [`Sizes.resolve`] is the one place
that turns a request's sizes (given or not) into the ones a run uses.
"""

import os
from dataclasses import dataclass

from linearpatch.common.errors import LinearPatchError


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

    @classmethod
    def resolve(
        cls,
        kind: str,
        device=None,
        num_samples: int | None = None,
        seq_len: int | None = None,
        config=None,
        option: str = "--seq-len",
    ) -> "Sizes":
        r"""
        The sizes a run of `kind` uses: the given ones, else the device's defaults (`SIZES[kind]`).

        Args:
            kind (`str`): `calibration`, `distillation`, `perplexity`, `figures` or `generation` (prompts x prompt
                tokens).
            device (*optional*): where the model runs (default: CUDA when available); `LINEARPATCH_QUICK=1` picks the
                smoke-test sizes instead.
            num_samples (`int`, *optional*), seq_len (`int`, *optional*): given sizes, which win.
            config (*optional*): the model's config; the default length is cut to its context
                (`max_position_embeddings`), so that the defaults work on a short-context model.
            option (`str`, *optional*, defaults to `"--seq-len"`): the flag named when a given length is refused.

        Raises:
            LinearPatchError: a given length beyond the model's context (positions the model never saw give
                meaningless statistics, and attention over them grows quadratically).
        """
        default = SIZES[kind][_profile(device)]
        limit = getattr(config, "max_position_embeddings", None)
        if seq_len is None:
            seq_len = min(default.seq_len, limit) if limit else default.seq_len
        elif limit and seq_len > limit:
            raise LinearPatchError(
                f"{option} {seq_len} is longer than the model's context of {limit} tokens (max_position_embeddings): "
                f"use {option} {limit} or less."
            )
        return cls(default.num_samples if num_samples is None else num_samples, seq_len)


CALIBRATION = {"cpu": Sizes(32, 512), "cuda": Sizes(128, 2048), "quick": Sizes(4, 64)}
DISTILLATION = {"cpu": Sizes(256, 512), "cuda": Sizes(5000, 2048), "quick": Sizes(4, 64)}
PERPLEXITY = {"cpu": Sizes(8, 512), "cuda": Sizes(64, 2048), "quick": Sizes(2, 64)}
# Figures (`linearpatch report`, `prune --plots`): one dense pass with every layer distance, then a forward of each
# model per window.
FIGURES = {"cpu": Sizes(8, 256), "cuda": Sizes(32, 1024), "quick": Sizes(2, 64)}
# Greedy generation agreement in `eval`: prompts (held-out text, split among the corpora) x prompt tokens; each model
# continues every prompt for GENERATION_TOKENS tokens.
GENERATION = {"cpu": Sizes(8, 32), "cuda": Sizes(32, 64), "quick": Sizes(2, 16)}
GENERATION_TOKENS = 64
# Teacher log-probabilities a distillation cache keeps per token, and the baseline's tokens kept per position for
# `eval`'s KL (see measurement/closeness.py): the same, so that the KL eval reports is the one distillation lowers.
TEACHER_TOP_K = 100
SIZES = {
    "calibration": CALIBRATION,
    "distillation": DISTILLATION,
    "perplexity": PERPLEXITY,
    "figures": FIGURES,
    "generation": GENERATION,
}
# lm-eval documents per task: 100 four-way questions are 400 requests per model, about 2 minutes for SmolLM2 on 2 CPU
# cores; the full offline tasks would take 5x longer.
TASK_LIMIT = {"cpu": 100, "cuda": 0, "quick": 8}
# lm-eval tasks of `linearpatch eval` and `compare_models`: offline, built from installed corpora (see
# evaluation/tasks.py). mmlu_dev_offline sits at chance for small models; the comparison flags such tasks.
DEFAULT_TASKS = ("wiki_next_sentence", "mmlu_dev_offline", "wiki_last_word")
# Blocks per depth that `prune --metric loss` scores on held-out windows, best cosine first (0: every start). Each
# costs about half a forward of the held-out windows per patch variant (7 for `--patch auto`).
DEFAULT_CANDIDATES = 4


def describe(kind: str) -> str:
    """The default sizes of `kind` on each device, as `--help` says them."""
    table = SIZES[kind]
    return ", ".join(
        f"{table[profile].num_samples} x {table[profile].seq_len} {where}"
        for profile, where in (("cpu", "on CPU"), ("cuda", "on GPU"), ("quick", "with LINEARPATCH_QUICK=1"))
    )


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
    return Sizes.resolve("calibration", device)


def distillation_sizes(device=None) -> Sizes:
    """Distillation training windows for `device` (the paper's 5000 x 2048 on a GPU)."""
    return Sizes.resolve("distillation", device)


def perplexity_sizes(device=None) -> Sizes:
    """Held-out perplexity windows per corpus for `device`."""
    return Sizes.resolve("perplexity", device)


def figure_sizes(device=None) -> Sizes:
    """Windows for the figures of `linearpatch report` and `prune --plots`."""
    return Sizes.resolve("figures", device)


def task_limit(device=None) -> int | None:
    """lm-eval documents per task for `device` (`None`: every document)."""
    return TASK_LIMIT[_profile(device)] or None


__all__ = [
    "GENERATION_TOKENS",
    "SIZES",
    "TEACHER_TOP_K",
    "Sizes",
    "calibration_sizes",
    "default_device",
    "describe",
    "distillation_sizes",
    "figure_sizes",
    "perplexity_sizes",
    "quick",
    "task_limit",
]
