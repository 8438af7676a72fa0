"""Distillation: the offline top-K teacher cache, the patch-only PEFT adapter and Trainer, `distill_checkpoint`."""

from ..adapter import base_identity, check_adapter_base
from ..models import load_patch_adapter, save_patch_adapter
from .job import DistillReport, build_cache_in_subprocess, distill_checkpoint
from .teacher_cache import TeacherCacheDataset, TopKTeacherCache, build_teacher_cache
from .trainer import TopKDistillationTrainer, distill, distillation_arguments, get_patch_peft_model, top_k_kl_loss

__all__ = [
    "DistillReport",
    "TeacherCacheDataset",
    "TopKDistillationTrainer",
    "TopKTeacherCache",
    "base_identity",
    "build_cache_in_subprocess",
    "build_teacher_cache",
    "check_adapter_base",
    "distill",
    "distill_checkpoint",
    "distillation_arguments",
    "get_patch_peft_model",
    "load_patch_adapter",
    "save_patch_adapter",
    "top_k_kl_loss",
]
