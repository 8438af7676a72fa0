"""Distillation: the offline top-K teacher cache, the patch-only PEFT adapter and Trainer, `distill_checkpoint`.

The names below are imported on first use (PEP 562): the teacher-cache child process that every `distill` starts
imports `teacher_cache` only, and pays neither the Trainer's imports (peft, datasets, pandas: about 1.5 s) nor the
job's.
"""

import importlib

_SOURCES = {
    "base_identity": "..adapter",
    "check_adapter_base": "..adapter",
    "load_patch_adapter": "..models",
    "save_patch_adapter": "..models",
    "DistillReport": ".report",
    "DistillPlan": ".plan",
    "plan_distillation": ".plan",
    "build_cache_in_subprocess": ".job",
    "distill_checkpoint": ".job",
    "TeacherCacheDataset": ".teacher_cache",
    "TopKTeacherCache": ".teacher_cache",
    "build_teacher_cache": ".teacher_cache",
    "TopKDistillationTrainer": ".trainer",
    "distill": ".trainer",
    "distillation_arguments": ".trainer",
    "get_patch_peft_model": ".trainer",
    "top_k_kl_loss": ".trainer",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
