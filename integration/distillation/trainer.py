"""Patch-only distillation from an offline top-K teacher cache, under a stock `transformers.Trainer`.

The student is the pruned model with every weight frozen except the LinearPatch matrices (a PEFT LN-tuning adapter
targeted at the `linear_patch` modules, so stock PEFT can save, load and merge it). The loss is the forward KL from
the teacher to the student restricted to the teacher's K stored indices, both renormalised over those K.

Multi-GPU: the same script runs under `accelerate launch` or `torchrun` (Trainer handles the distribution), e.g.
`accelerate launch -m linearpatch.cli distill CKPT --teacher MODEL --output OUT`.
"""

import contextlib
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from linearpatch.common.errors import CheckpointMismatchError

from ..adapter import quiet_peft
from .teacher_cache import TeacherCacheDataset, TopKTeacherCache


def top_k_kl_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Forward KL(teacher || student) over the teacher's top-K indices, mean over tokens.

    With `p = softmax(teacher_values / T)` (the teacher renormalised over its K entries) and
    `q = softmax(student_logits[..., indices] / T)` (the student renormalised over the same K), the loss is
    `mean_t sum_j p_j (log p_j - log q_j)`. Temperature 1 is the paper's setting.

    Args:
        student_logits (`torch.Tensor` of shape `(..., vocab)`): student logits.
        teacher_values (`torch.Tensor` of shape `(..., K)`): teacher log-probabilities (or logits) at the indices.
        teacher_indices (`torch.LongTensor` of shape `(..., K)`): vocabulary indices.
        temperature (`float`, *optional*, defaults to 1.0): softening temperature.
        mask (`torch.Tensor` of shape `(...)`, *optional*): 1 for tokens that count.
    """
    student = student_logits.float().gather(-1, teacher_indices) / temperature
    log_q = torch.log_softmax(student, dim=-1)
    log_p = torch.log_softmax(teacher_values.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def get_patch_peft_model(
    model,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    target_modules: list[str] | None = None,
):
    """Wrap a `LinearPatchForCausalLM` so that the patch matrices are the only trainable parameters.

    Uses PEFT's LN-tuning method (a trainable full copy of each targeted module) on the `linear_patch` modules, so
    the adapter saves as a small safetensors file and loads with stock `PeftModel.from_pretrained` /
    `AutoPeftModelForCausalLM`; `merge_and_unload()` swaps the trained patches back in.

    Args:
        model (`LinearPatchForCausalLM`): the pruned model (with at least one patch).
        adapter_name (`str`, *optional*, defaults to `"default"`).
        base_model_name_or_path (`str`, *optional*): recorded in the adapter config; set it to the pruned
            model's Hub id before pushing, never a local path.
        target_modules (`list[str]`, *optional*, defaults to `["linear_patch"]`): the modules to train instead, e.g.
            the fold maps of `distill --export` (`fold_maps.19`, see `folding.attach_fold_maps`).
    """
    from peft import LNTuningConfig, get_peft_model

    target_modules = target_modules or ["linear_patch"]
    names = [name for name, _ in model.named_modules()]
    if not any(name == target or name.endswith(f".{target}") for name in names for target in target_modules):
        raise ValueError(f"The model has no {' or '.join(target_modules)} to train (pruned with patch='none'?).")
    config = LNTuningConfig(target_modules=target_modules, task_type="CAUSAL_LM")
    with quiet_peft():
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if base_model_name_or_path is not None:
        peft_model.peft_config[adapter_name].base_model_name_or_path = base_model_name_or_path
    return peft_model


def collate_teacher_batch(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack cache examples (equal-length windows) into a batch."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


@contextlib.contextmanager
def starting_at(model, layer: int):
    """While inside, `model`'s decoder layers before `layer` leave the stream as it is: a forward on
    `inputs_embeds` = the stream entering `layer` is then the model's from there on."""
    from ..measurement.capture import pass_through

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skipped = list(base.model.layers[:layer])
    own = [layer_module.__dict__.get("forward") for layer_module in skipped]
    for layer_module in skipped:
        layer_module.forward = pass_through
    try:
        yield
    finally:
        for layer_module, forward in zip(skipped, own, strict=True):
            if forward is None:
                del layer_module.forward
            else:
                layer_module.forward = forward


class TopKDistillationTrainer(Trainer):
    """A `Trainer` whose loss is [`top_k_kl_loss`] against the cached teacher (columns `teacher_values`,
    `teacher_indices`); logits predict the next token, aligned with the teacher's per-position distributions."""

    def __init__(self, *args, temperature: float = 1.0, start_layer: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.start_layer = start_layer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_values = inputs.pop("teacher_values")
        teacher_indices = inputs.pop("teacher_indices")
        stream = inputs.pop("stream", None)
        if stream is None:
            outputs = model(input_ids=inputs["input_ids"], use_cache=False)
        else:  # the cached stream entering the first patch: the layers before it are not run
            with starting_at(self.accelerator.unwrap_model(model), self.start_layer):
                outputs = model(inputs_embeds=stream.to(teacher_values.device), use_cache=False)
        loss = top_k_kl_loss(outputs.logits, teacher_values, teacher_indices, self.temperature)
        return (loss, outputs) if return_outputs else loss


class _StudentPlacesItself(TrainingArguments):
    """Arguments for a student that puts its own weights on the device (layer by layer): the Trainer must not move
    it (its frozen weights are empty until each layer runs)."""

    @property
    def place_model_on_device(self) -> bool:
        return False


def distillation_arguments(
    output_dir: str | Path, place_model_on_device: bool = True, **overrides
) -> TrainingArguments:
    """The paper's recipe as `TrainingArguments`: AdamW lr 1e-4, weight decay 1e-4, cosine decay to lr/20, batch 1,
    one epoch. Any standard argument can be overridden (gradient accumulation, bf16, checkpointing, logging...);
    `place_model_on_device=False` for a student that loads its layers onto the device itself."""
    values = dict(
        output_dir=str(output_dir),
        learning_rate=1e-4,
        weight_decay=1e-4,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 1 / 20},
        per_device_train_batch_size=1,
        num_train_epochs=1,
        optim="adamw_torch",
        remove_unused_columns=False,  # the teacher columns are not forward() arguments
        logging_steps=0.02,  # a ratio of the total steps: about 50 loss lines, and every step of a short run
        save_strategy="no",
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    values.update(overrides)
    return (TrainingArguments if place_model_on_device else _StudentPlacesItself)(**values)


def distill(
    student,
    cache: TopKTeacherCache,
    output_dir: str | Path,
    temperature: float = 1.0,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list | None = None,
    return_history: bool = False,
    **training_overrides,
):
    """Train only the patches of `student` (a `LinearPatchForCausalLM`) on `cache`; return the trained PEFT model.

    Args:
        student: the pruned model; it is wrapped by [`get_patch_peft_model`] unless it already is a PEFT model.
        cache (`TopKTeacherCache`): from [`build_teacher_cache`]; one that holds the stream entering the first
            patch (`stream_layer`) starts every step there.
        output_dir: Trainer output (checkpoints).
        temperature (`float`, *optional*, defaults to 1.0).
        resume_from_checkpoint (`str` or `bool`, *optional*): passed to `Trainer.train`.
        callbacks (`list`, *optional*): Trainer callbacks.
        return_history (`bool`, *optional*, defaults to `False`): also return the Trainer's log history (losses,
            learning rates).
        **training_overrides: any `TrainingArguments` field.
    """
    from peft import PeftModel

    model = student if isinstance(student, PeftModel) else get_patch_peft_model(student)
    if any(parameter.device.type == "meta" for parameter in model.parameters()):
        # A streamed student's frozen weights are read from the same shards on every rank: data parallelism syncs
        # and reduces only what trains (DDP reads this list; empty weights cannot be broadcast).
        model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    if cache.manifest["vocab_size"] != model.config.vocab_size:
        raise CheckpointMismatchError(
            f"The teacher cache has vocabulary {cache.manifest['vocab_size']} but the student has "
            f"{model.config.vocab_size}: teacher and student must share a tokenizer."
        )
    trainer = TopKDistillationTrainer(
        model=model,
        args=distillation_arguments(output_dir, **training_overrides),
        train_dataset=TeacherCacheDataset(cache),
        data_collator=collate_teacher_batch,
        temperature=temperature,
        callbacks=callbacks,
        start_layer=cache.manifest.get("stream_layer"),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return (model, trainer.state.log_history) if return_history else model


__all__ = [
    "TopKDistillationTrainer",
    "collate_teacher_batch",
    "distill",
    "distillation_arguments",
    "get_patch_peft_model",
    "top_k_kl_loss",
]
